"""serve.py as a user meets it: a server started on a free local port, asked over HTTP and from its page in a real
(headless) browser; and its request queue, which batches requests without letting one wait behind a flood."""
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch

import evaluate
from conftest import ROOT, random_run
from data.prompts import WINOGRAD
from data.squad import SquadExample
from finetune.answer import no_answer_probability
from finetune.model import load_answerer
from lora import LoRAConfig
from serve import Batcher, Busy, Row

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
TARGETS = ("c_attn", "c_proj", "c_fc")
MAX_NEW_TOKENS = 8
STARTUP_POLLS = 240  # x 0.5 s: loading takes seconds, more on a busy machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(url: str, body: bytes | dict | None = None) -> tuple[int, dict]:
    """(status, JSON body) of a GET, or of a POST when `body` is given (a dict is sent as JSON)."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """serve.py with two adapters of one random gpt2-tiny base (plain r=4 and DoRA r=8), on 127.0.0.1 (its default)."""
    runs = tmp_path_factory.mktemp("runs")
    checkpoints = [random_run(runs / "plain", LoRAConfig(rank=4, alpha=8, targets=TARGETS), seed=1),
                   random_run(runs / "dora", LoRAConfig(rank=8, alpha=8, targets=TARGETS, dora=True), seed=2)]
    port = free_port()
    process = subprocess.Popen([sys.executable, "serve.py", "--checkpoint", checkpoints[0], "--checkpoint",
                                checkpoints[1], "--port", str(port), "--device", "cpu"], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(STARTUP_POLLS):
            if process.poll() is not None:
                pytest.fail(f"serve.py exited: {process.stdout.read()}")
            try:
                if call(url + "/health")[0] == 200:
                    break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("serve.py did not answer /health")
        yield url, checkpoints
    finally:
        process.terminate()
        process.wait(timeout=30)


def ask(url: str, **fields) -> tuple[int, dict]:
    context, question = WINOGRAD
    return call(url + "/v1/answer", {"context": context, "question": question, **fields})


def test_health_and_what_is_loaded(server):
    url, checkpoints = server
    status, health = call(url + "/health")
    assert status == 200 and health["status"] == "ok" and health["adapters"] == 2
    status, body = call(url + "/v1/adapters")
    plain, dora = body["adapters"]
    assert (plain["name"], plain["rank"], plain["variant"]) == (checkpoints[0], 4, "lora")
    assert (dora["name"], dora["rank"], dora["variant"]) == (checkpoints[1], 8, "dora")
    assert plain["targets"] == ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
    assert plain["base_fingerprint"] == dora["base_fingerprint"] and plain["quantize"] == "none"


def test_the_api_answers_as_evaluate_py_does(server, capsys):
    url, checkpoints = server
    question = SquadExample("q", "Normandy is a region in France. The Normans came from Normandy.",
                            "Where is Normandy?", [])
    for example in (SquadExample("winograd", *WINOGRAD, []), question):
        status, body = call(url + "/v1/answer", {"context": example.context, "question": example.question,
                                                 "max_new_tokens": MAX_NEW_TOKENS})
        assert status == 200 and [a["adapter"] for a in body["answers"]] == checkpoints
        for checkpoint, served in zip(checkpoints, body["answers"]):
            evaluate.main(["--checkpoint", checkpoint, "--context", example.context, "--question", example.question,
                           "--max-new-tokens", str(MAX_NEW_TOKENS), "--device", "cpu"])
            assert served["answer"] == capsys.readouterr().out.removesuffix("\n")
            model = load_answerer(checkpoint, None, torch.device("cpu"), torch.float32)
            na_prob = no_answer_probability(model, [example], 1, MAX_NEW_TOKENS, add_eos=True, progress=False)[0]
            assert served["no_answer_probability"] == pytest.approx(na_prob, rel=1e-4)
            assert served["seconds"] > 0
    assert body["answers"][0]["answer"] != body["answers"][1]["answer"]
    status, body = ask(url, adapters=[checkpoints[1]], max_new_tokens=MAX_NEW_TOKENS)
    assert status == 200 and [a["adapter"] for a in body["answers"]] == [checkpoints[1]]


def test_bad_input_gets_a_clear_4xx_and_the_server_keeps_serving(server):
    url, checkpoints = server
    context, question = WINOGRAD
    cases = [
        ({"question": question}, 422, "context: Field required"),
        ({"context": context, "question": ""}, 422, "question: String should have at least 1 character"),
        ({"context": context, "question": question, "max_new_tokens": 0}, 422, "max_new_tokens"),
        ({"context": context, "question": question, "temperature": 1}, 422, "temperature: Extra inputs"),
        (b"[1, 2", 422, "Invalid JSON"),
        (b'{"context": "caf\xe9", "question": "?"}', 422, "not UTF-8"),  # Latin-1, not UTF-8
        (b"x" * 10_000_000, 413, "at most 1,048,576"),
        ({"context": context, "question": question, "adapters": ["nope"]}, 404, "no adapter named 'nope'"),
        ({"context": "word " * 1100, "question": question}, 422, "shorten the context to fit 992"),
        ({"context": "word " * 900, "question": question, "max_new_tokens": 200}, 422, "max_new_tokens"),
    ]
    for body, status, message in cases:
        got, detail = call(url + "/v1/answer", body)
        assert (got, message in detail["detail"]) == (status, True), detail
        assert "Traceback" not in detail["detail"]
        assert call(url + "/health")[0] == 200
    assert ask(url, max_new_tokens=MAX_NEW_TOKENS)[0] == 200


def test_requests_for_different_adapters_at_once_get_their_own_answers(server):
    url, checkpoints = server
    alone = {name: ask(url, adapters=[name], max_new_tokens=MAX_NEW_TOKENS)[1]["answers"][0]["answer"]
             for name in checkpoints}
    results = [None] * 8
    def one(i):
        results[i] = ask(url, adapters=[checkpoints[i % 2]], max_new_tokens=MAX_NEW_TOKENS)
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(results))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    for i, (status, body) in enumerate(results):
        assert status == 200 and body["answers"][0]["answer"] == alone[checkpoints[i % 2]]


def test_the_page_in_a_browser_shows_every_adapters_answer(server):
    """Debian's chromium, headless, driven by selenium: type a question, press Ask, read the answers."""
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    driver_path = shutil.which("chromedriver")
    if driver_path is None or not (shutil.which("chromium") or shutil.which("chromium-browser")):
        pytest.skip("no chromium and chromedriver here (apt-get install chromium chromium-driver)")
    url, checkpoints = server
    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    browser = webdriver.Chrome(options=options, service=Service(driver_path))
    try:
        browser.get(url)
        assert browser.find_element(By.ID, "context").get_attribute("value") == WINOGRAD[0]  # prefilled
        question = browser.find_element(By.ID, "question")
        question.clear()
        question.send_keys("What doesn't fit?")
        browser.find_element(By.CSS_SELECTOR, "button").click()
        WebDriverWait(browser, 120).until(lambda b: len(b.find_elements(By.CSS_SELECTOR, ".adapter")) == 2)
        cards = browser.find_elements(By.CSS_SELECTOR, ".adapter")
        shown = [(card.find_element(By.CLASS_NAME, "name").text, card.find_element(By.CLASS_NAME, "answer").text)
                 for card in cards]
    finally:
        browser.quit()
    _, body = ask(url, question="What doesn't fit?")
    assert shown == [(a["adapter"], a["answer"] or "(an empty answer)") for a in body["answers"]]


def test_without_fastapi_it_says_how_to_install_it():
    hide = "import sys; sys.modules['fastapi'] = None; import serve; serve.main(['--checkpoint', 'runs/x'])"
    result = subprocess.run([sys.executable, "-c", hide], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip() == "error: serve.py needs FastAPI and uvicorn, an optional extra: pip install fastapi uvicorn"


# The queue, with a stand-in for the model: each row answers with its own label.

class Gate:
    """answer_rows that records every batch and, while closed, holds the worker inside its first batch."""

    def __init__(self, fail_on: str | None = None):
        self.batches, self.opened, self.entered, self.fail_on = [], threading.Event(), threading.Event(), fail_on

    def __call__(self, rows: list[Row]) -> list[tuple[str, float]]:
        self.entered.set()
        assert self.opened.wait(timeout=60)
        labels = [row.example.id for row in rows]
        self.batches.append(labels)
        if self.fail_on in labels:
            raise RuntimeError("a broken batch")
        return [(label, 0.0) for label in labels]


def rows(label: str, n: int) -> list[Row]:
    return [Row(SquadExample(f"{label}.{i}", "c", "q", []), i, 8) for i in range(n)]


def test_a_flood_is_answered_in_order_in_bounded_batches():
    gate = Gate()
    batcher = Batcher(gate, max_rows=8, max_wait_s=0.01, max_pending=100)
    first = batcher.submit(rows("first", 1))
    assert gate.entered.wait(timeout=60)  # the worker is busy with the first request; a flood arrives
    flood = [batcher.submit(rows(f"r{i}", 3)) for i in range(20)]
    late = batcher.submit(rows("late", 2))
    gate.opened.set()
    assert [label for label, _ in late.result(timeout=60)[0]] == ["late.0", "late.1"]
    for i, future in enumerate(flood):
        assert [label for label, _ in future.result(timeout=60)[0]] == [f"r{i}.{j}" for j in range(3)]
    assert first.result(timeout=60)[0] == [("first.0", 0.0)]
    assert all(len(batch) <= 8 for batch in gate.batches)
    assert [label for batch in gate.batches for label in batch] == \
        ["first.0"] + [f"r{i}.{j}" for i in range(20) for j in range(3)] + ["late.0", "late.1"]  # first come first served
    # Two requests of 3 rows a batch (a third would make 9 > 8), and the late one fits beside the last two.
    assert [len(batch) for batch in gate.batches] == [1] + [6] * 9 + [8]


def test_a_full_queue_refuses_at_once_and_a_failed_batch_fails_only_its_requests():
    gate = Gate(fail_on="broken.0")
    batcher = Batcher(gate, max_rows=4, max_wait_s=0.0, max_pending=2)
    broken = batcher.submit(rows("broken", 4))
    assert gate.entered.wait(timeout=60)
    waiting = [batcher.submit(rows("a", 1)), batcher.submit(rows("b", 1))]
    with pytest.raises(Busy, match="2 requests are waiting"):
        batcher.submit(rows("c", 1))
    with pytest.raises(ValueError, match="1 to 4 rows"):
        batcher.submit(rows("big", 5))
    gate.opened.set()
    with pytest.raises(RuntimeError, match="a broken batch"):
        broken.result(timeout=60)
    assert [future.result(timeout=60)[0][0][0] for future in waiting] == ["a.0", "b.0"]
