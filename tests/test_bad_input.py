"""Hostile input: every case ends with one message naming its cause, the right exit code, no traceback, and
every file that existed before byte-identical after.

Most cases call the scripts' main() in-process (fast): argparse's refusals arrive as SystemExit(2), the scripts'
own as UserError / LoRAError / FileError, which the excepthook prints as one line and exits 1 (checked once, in a real
process, with the signals and Ctrl-C cases at the end). Any other exception fails the test: it would have been a
traceback.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import evaluate
import train
from conftest import ROOT
from finetune.run import Run, read_checkpoint
from data.prompts import prompt_tokens
from data.squad import SquadExample, load_squad_file
from gpt2 import UserError
from lora import LoRAError, load_adapter
from tensorio import FileError, atomic_write, load_safetensors

TINY = ["--model", "gpt2-tiny", "--init", "random", "--device", "cpu", "--micro-batch-size", "2", "--grad-accum", "1"]


def snapshot(*roots: Path) -> dict[Path, bytes]:
    """Every file under the roots (or the root itself, if a file), with its bytes."""
    files = {}
    for root in roots:
        for path in ([root] if root.is_file() else sorted(root.rglob("*"))):
            if path.is_file():
                files[path] = path.read_bytes()
    return files


def refused(main, argv: list[str], capsys, code: int, cause: str, watch: tuple[Path, ...] = ()) -> str:
    """Run a script's main on `argv`; assert it stops with exit `code`, a message matching `cause`, and the files
    under `watch` untouched. Returns the message."""
    before = snapshot(*watch)
    try:
        main([str(a) for a in argv])
    except SystemExit as e:
        exit_code, message = e.code, capsys.readouterr().err
    except (UserError, LoRAError, FileError) as e:
        exit_code, message = 1, str(e)
    else:
        pytest.fail(f"accepted: {argv}")
    assert exit_code == code, message
    assert re.search(cause, message), message
    assert snapshot(*watch) == before
    return message


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


def squad(*qas, context="Paris is the capital of France.") -> dict:
    return {"version": "v2.0", "data": [{"title": "t", "paragraphs": [{"context": context, "qas": list(qas)}]}]}


def qa(qid="q1", question="What is the capital of France?", answers=("Paris",)) -> dict:
    return {"id": qid, "question": question, "answers": [{"text": a, "answer_start": 0} for a in answers]}


@pytest.fixture(scope="module")
def tiny_run(short_dev_file, tmp_path_factory) -> Path:
    """A 2-step run on the 16 short questions; tests copy it before touching it."""
    run = tmp_path_factory.mktemp("runs") / "run"
    train.main([*TINY, "--train-file", str(short_dev_file), "--eval-file", str(short_dev_file), "--out", str(run),
                "--max-steps", "2", "--warmup-steps", "0"])
    return run


@pytest.fixture
def run_copy(tiny_run, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_run, tmp_path / "run"))


# ----------------------------------------------------------------------------------------------- train.py flags

@pytest.mark.parametrize("flags, cause", [
    (["--lr", "-1"], r"--lr: -1.0 must be above 0"),
    (["--lr", "nan"], r"--lr: nan is not a finite number"),
    (["--lora-dropout", "1.5"], r"--lora-dropout: 1.5 is outside \[0, 1\)"),
    (["--base-dropout", "1"], r"--base-dropout: 1.0 is outside \[0, 1\)"),
    (["--max-steps", "0"], r"--max-steps: 0 is below 1"),
    (["--max-steps", "-3"], r"--max-steps: -3 is below 1"),
    (["--epochs", "0"], r"--epochs: 0.0 must be above 0"),
    (["--betas", "1.5", "0.9"], r"--betas: 1.5 is outside \[0, 1\)"),
    (["--eps", "0"], r"--eps: 0.0 must be above 0"),
    (["--weight-decay", "-0.1"], r"--weight-decay: -0.1 must be 0 or more"),
    (["--warmup-steps", "-5"], r"--warmup-steps: -5 is below 0"),
    (["--clip", "0"], r"--clip: 0.0 must be above 0"),
    (["--seed", "-1"], r"--seed: -1 is below 0"),
    (["--rank", "0"], r"--rank: 0 is below 1"),
    (["--alpha", "inf"], r"--alpha: inf is not a finite number"),
    (["--rank", "four"], r"--rank: 'four' is not an integer"),
    (["--targets", "c_bogus"], r"--targets: invalid choice: 'c_bogus'"),
    (["--qkv", "xyz"], r"--qkv 'xyz': use some of the letters q, k, v"),
    (["--max-len", "2000"], r"--max-len cannot exceed GPT-2's 1024"),
    (["--eval-examples", "0"], r"--eval-examples: 0 is below 1"),
    (["--micro-batch-size", "0"], r"--micro-batch-size: 0 is below 1"),
    (["--max-steps", "5", "--epochs", "1"], r"--epochs: not allowed with argument --max-steps"),
    (["--data-dir", "d", "--train-file", "a.json", "--eval-file", "b.json"], r"--data-dir is unused"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_train_refuses_flag_values_out_of_range(flags, cause, tmp_path, capsys):
    refused(train.main, ["--out", tmp_path / "run", *flags], capsys, 2, cause, watch=(tmp_path,))
    assert not (tmp_path / "run").exists()  # refused before anything was created


@pytest.mark.parametrize("device, cause", [("cuda:99", r"--device cuda:99: this machine has"),
                                           ("tpu", r"--device 'tpu': give cpu, cuda or cuda:N")])
def test_train_refuses_a_device_this_machine_lacks(device, cause, short_dev_file, tmp_path, capsys):
    argv = [*TINY, "--train-file", short_dev_file, "--out", tmp_path / "run", "--device", device]
    refused(train.main, argv, capsys, 1, cause, watch=(tmp_path,))


# ------------------------------------------------------------------------------------- --out: never touch others'

def test_out_holding_a_model_is_refused(tiny_hub_dir, short_dev_file, tmp_path, capsys):
    """The reported data loss: --out at a model folder overwrote its config.json and deleted its log.jsonl."""
    model = Path(shutil.copytree(tiny_hub_dir, tmp_path / "model"))
    (model / "log.jsonl").write_text("the model's own notes\n")
    argv = [*TINY, "--train-file", short_dev_file, "--eval-file", short_dev_file, "--out", model]
    refused(train.main, argv, capsys, 1, r"holds files that are not a train.py run's \(.*model.safetensors",
            watch=(model,))


@pytest.mark.parametrize("name, content", [("config.json", '{"model_type": "gpt2", "n_layer": 2}'),
                                           ("log.jsonl", "not json\n"), ("notes.txt", "mine")])
def test_out_holding_another_tools_file_is_refused(name, content, short_dev_file, tmp_path, capsys):
    (tmp_path / name).write_text(content)
    argv = [*TINY, "--train-file", short_dev_file, "--eval-file", short_dev_file, "--out", tmp_path]
    refused(train.main, argv, capsys, 1, rf"not a train.py run's \({re.escape(name)}\)", watch=(tmp_path,))


def test_out_that_is_a_file_or_below_one_is_refused(short_dev_file, tmp_path, capsys):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    for out in (blocker, blocker / "run"):
        argv = [*TINY, "--train-file", short_dev_file, "--out", out]
        refused(train.main, argv, capsys, 1, r"file.txt is a file, not a directory", watch=(tmp_path,))


def test_a_new_run_never_replaces_a_run(run_copy, short_dev_file, capsys):
    argv = [*TINY, "--train-file", short_dev_file, "--eval-file", short_dev_file, "--out", run_copy]
    refused(train.main, argv, capsys, 1, r"already holds a run: continue it with --resume", watch=(run_copy,))


def test_a_run_folder_with_evaluation_files_is_still_a_run(run_copy, short_dev_file, capsys):
    (run_copy / "metrics.json").write_text("{}")
    (run_copy / "metrics.predictions.json").write_text("{}")
    train.main(["--out", str(run_copy), "--resume", "--max-steps", "3"])
    assert load_adapter(run_copy / "checkpoint.pt")["step"] == 3


# ------------------------------------------------------------------------------------------------- data and steps

def test_max_len_too_small_for_any_question_names_the_real_cause(short_dev_file, tmp_path, capsys):
    argv = [*TINY, "--train-file", short_dev_file, "--eval-file", short_dev_file, "--out", tmp_path / "r",
            "--max-len", "5"]
    message = refused(train.main, argv, capsys, 1, r"none of the 16 training questions fits --max-len 5 tokens.*"
                      r"raise --max-len", watch=(short_dev_file,))
    assert "micro-batch" not in message


def test_epochs_that_round_to_no_step_are_refused(short_dev_file, tmp_path, capsys):
    argv = [*TINY, "--train-file", short_dev_file, "--eval-file", short_dev_file, "--out", tmp_path / "r",
            "--epochs", "0.01"]
    refused(train.main, argv, capsys, 1, r"--epochs 0.01 of 8 steps each is less than one step")


@pytest.mark.parametrize("data, cause", [
    (squad(qa(question=5)), r"qas\[0\] \(question 'q1'\).question is not in SQuAD format: it must be a string"),
    (squad(qa(answers=[None])), r"qas\[0\] \(question 'q1'\).answers\[0\].text is not in SQuAD format"),
    (squad(qa("q1"), qa("q1", "Another?")), r"1 question id\(s\) occur more than once \(first: 'q1'\)"),
    ({"data": "nope"}, r"is not in SQuAD format"),
    ([1, 2], r"is not a SQuAD 2.0 JSON file"),
], ids=["question-number", "answer-null", "duplicate-ids", "data-string", "list"])
def test_squad_files_that_are_not_squad_are_refused(data, cause, tmp_path, capsys):
    bad = write_json(tmp_path / "bad.json", data)
    with pytest.raises(UserError, match=cause):
        load_squad_file(bad)
    refused(train.main, [*TINY, "--train-file", bad, "--out", tmp_path / "r"], capsys, 1, cause, watch=(tmp_path,))


# ------------------------------------------------------------------------------------------------- model files

@pytest.mark.parametrize("header, cause", [
    ([1, 2], r"not a JSON object"),
    ({"wte.weight": {"dtype": "F32", "data_offsets": [0, 4]}}, r"header entry of tensor wte.weight is not"),
    ({"wte.weight": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, r"header entry of tensor wte.weight"),
    ({"wte.weight": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, r"header entry of tensor wte.weight"),
    ({"wte.weight": "F32"}, r"header entry of tensor wte.weight"),
], ids=["list", "no-shape", "negative-size", "offsets-reversed", "entry-string"])
def test_safetensors_headers_that_are_json_but_not_the_format(header, cause, tmp_path, short_dev_file, capsys):
    model = tmp_path / "model"
    model.mkdir()
    raw = json.dumps(header).encode()
    (model / "model.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw + bytes(16))
    with pytest.raises(FileError, match=cause):
        load_safetensors(model / "model.safetensors")
    argv = ["--model", model, "--train-file", short_dev_file, "--eval-file", short_dev_file, "--out", tmp_path / "r",
            "--device", "cpu"]
    refused(train.main, argv, capsys, 1, cause, watch=(model,))


def test_a_model_config_without_its_shape_is_refused(tiny_hub_dir, short_dev_file, tmp_path, capsys):
    model = Path(shutil.copytree(tiny_hub_dir, tmp_path / "model"))
    write_json(model / "config.json", {"model_type": "gpt2", "n_layer": 2, "n_embd": 64})
    argv = ["--model", model, "--train-file", short_dev_file, "--eval-file", short_dev_file, "--out", tmp_path / "r",
            "--device", "cpu", "--max-steps", "1"]
    refused(train.main, argv, capsys, 1, r"config.json: .*'n_head': None.* is not a GPT-2 shape", watch=(model,))


def test_a_damaged_checkpoint_is_refused(run_copy, short_dev_file, capsys):
    checkpoint = torch.load(run_copy / "checkpoint.pt", weights_only=True)
    del checkpoint["adapter"]
    torch.save(checkpoint, run_copy / "checkpoint.pt")
    refused(evaluate.main, ["--checkpoint", run_copy, "--eval-file", short_dev_file], capsys, 1,
            r"checkpoint.pt is damaged: adapter missing", watch=(run_copy,))


# --------------------------------------------------------------------------------------------------- --resume

def test_resume_needs_a_checkpoint(tmp_path, capsys):
    refused(train.main, ["--out", tmp_path, "--resume"], capsys, 1, r"nothing to resume: no .*checkpoint.pt")


def test_resume_refuses_a_changed_setting(run_copy, capsys):
    refused(train.main, ["--out", run_copy, "--resume", "--rank", "8"], capsys, 1, r"--rank 4 -> 8",
            watch=(run_copy,))


def test_resume_refuses_training_data_changed_under_the_same_path(run_copy, short_dev_file, tmp_path, capsys):
    changed = Path(shutil.copy(short_dev_file, tmp_path / "data.json"))
    data = json.loads(changed.read_text())
    data["data"][0]["paragraphs"][0]["qas"][0]["question"] += " Really?"
    write_json(changed, data)
    refused(train.main, ["--out", run_copy, "--resume", "--train-file", changed, "--max-steps", "3"], capsys, 1,
            r"trained on other training data", watch=(run_copy, changed))


def test_resume_refuses_an_adapter_without_training_state(run_copy, capsys):
    checkpoint = torch.load(run_copy / "checkpoint.pt", weights_only=True)
    del checkpoint["optimizer"]
    torch.save(checkpoint, run_copy / "checkpoint.pt")
    refused(train.main, ["--out", run_copy, "--resume"], capsys, 1, r"no training state \(optimizer missing\)",
            watch=(run_copy,))


def test_resume_of_a_finished_run_says_how_to_go_on(run_copy, capsys):
    refused(train.main, ["--out", run_copy, "--resume"], capsys, 1, r"at step 2 already.*larger --max-steps",
            watch=(run_copy,))


def test_resume_with_no_flags_continues_with_the_runs_settings(run_copy, capsys):
    """A run stopped at step 2 of 4 (made so by editing its recorded --max-steps) continues with no other flag."""
    checkpoint = torch.load(run_copy / "checkpoint.pt", weights_only=True)
    checkpoint["args"]["max_steps"] = 4
    torch.save(checkpoint, run_copy / "checkpoint.pt")
    train.main(["--out", str(run_copy), "--resume"])
    resumed = load_adapter(run_copy / "checkpoint.pt")
    assert resumed["step"] == 4
    assert {k: resumed["args"][k] for k in ("model", "init", "rank", "train_file", "device")} == \
        {k: checkpoint["args"][k] for k in ("model", "init", "rank", "train_file", "device")}


def test_resume_compares_files_by_content_not_path(run_copy, short_dev_file, tmp_path):
    moved = shutil.copy(short_dev_file, tmp_path / "moved.json")
    train.main(["--out", str(run_copy), "--resume", "--train-file", str(moved), "--max-steps", "3"])
    assert load_adapter(run_copy / "checkpoint.pt")["step"] == 3


def test_divergence_never_saves_and_leaves_a_resumable_checkpoint(run_copy, capsys):
    """lr 1e20: the loss of step 3 is still finite (computed before the update), but A and B hold ~1e19 after it.
    The checkpoint of step 2 stays, and resumes."""
    keep = (run_copy / "checkpoint.pt", run_copy / "log.jsonl")
    refused(train.main, ["--out", run_copy, "--resume", "--max-steps", "3", "--lr", "1e20"], capsys, 1,
            r"by step 3 the adapter holds .*e\+\d\d .*training diverged; not saved.*holds step 2.*--resume --lr",
            watch=keep)
    refused(train.main, ["--out", run_copy, "--resume", "--max-steps", "40", "--lr", "1e30"], capsys, 1,
            r"the loss became nan by step 10; not saved.*holds step 2", watch=keep)
    train.main(["--out", str(run_copy), "--resume", "--max-steps", "3", "--lr", "1e-4"])
    resumed = load_adapter(run_copy / "checkpoint.pt")
    assert resumed["step"] == 3 and all(torch.isfinite(t).all() for t in resumed["adapter"].values())
    log = [json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in log.jsonl"))  # strict JSON
           for line in (run_copy / "log.jsonl").read_text().splitlines()]
    assert [record["step"] for record in log] == [2, 3]  # each step logged once


# ---------------------------------------------------------------------------------------------- evaluate.py flags

@pytest.mark.parametrize("flags, cause", [
    (["--batch-size", "-1"], r"--batch-size: -1 is below 1"),
    (["--limit", "-1"], r"--limit: -1 is below 1"),
    (["--limit", "0"], r"--limit: 0 is below 1"),
    (["--max-new-tokens", "0"], r"--max-new-tokens: 0 is below 1"),
    (["--examples", "-2"], r"--examples: -2 is below 0"),
    (["--predictions", "p.json", "--context", "c", "--question", "q"], r"--predictions scores answers.*--context"),
    (["--predictions", "p.json", "--checkpoint", "run"], r"--predictions scores answers.*--checkpoint"),
    (["--model", "gpt2-tiny"], r"gpt2-tiny is a shape without pretrained weights.*--checkpoint RUN"),
    (["--data-dir", "d", "--eval-file", "e.json", "--checkpoint", "run"], r"--data-dir is unused"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_evaluate_refuses_flag_values_out_of_range(flags, cause, tmp_path, capsys):
    answering = any(flag in flags for flag in ("--checkpoint", "--predictions", "--model"))
    refused(evaluate.main, flags if answering else ["--checkpoint", tmp_path, *flags], capsys, 2, cause)


def test_evaluate_refuses_a_missing_gpu(run_copy, short_dev_file, capsys):
    refused(evaluate.main, ["--checkpoint", run_copy, "--eval-file", short_dev_file, "--device", "cuda:99"],
            capsys, 1, r"--device cuda:99: this machine has", watch=(run_copy,))


def test_evaluate_never_replaces_earlier_metrics_unasked(run_copy, short_dev_file, capsys):
    (run_copy / "metrics.short16.json").write_text('{"exact": 71.2, "f1": 74.0, "total": 16}')  # named after the questions it scored
    refused(evaluate.main, ["--checkpoint", run_copy, "--eval-file", short_dev_file], capsys, 1,
            r"metrics.short16.json .*already exist.*--overwrite", watch=(run_copy,))


def test_evaluate_checks_it_can_write_before_answering(run_copy, short_dev_file, tmp_path, capsys):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    refused(evaluate.main, ["--checkpoint", run_copy, "--eval-file", short_dev_file, "--out", blocker / "m.json"],
            capsys, 1, r"file.txt is a file, not a directory", watch=(run_copy, blocker))


def test_evaluate_on_another_base_warns_and_strict_refuses(run_copy, tiny_hub_dir, short_dev_file, tmp_path, capsys):
    """The adapter was trained on gpt2-tiny's random init (seed 42); tiny_hub_dir has the same shape, other weights."""
    argv = ["--checkpoint", run_copy, "--model", tiny_hub_dir, "--eval-file", short_dev_file, "--limit", "2",
            "--max-new-tokens", "2", "--out", tmp_path / "m.json"]
    refused(evaluate.main, [*argv, "--strict"], capsys, 1, r"other weights than the one the adapter was trained on",
            watch=(run_copy, tmp_path))
    evaluate.main([str(a) for a in argv])
    assert "warning: the base model given has other weights" in capsys.readouterr().err
    assert json.loads((tmp_path / "m.json").read_text())["total"] == 2
    evaluate.main([str(a) for a in argv if a != tiny_hub_dir and a != "--model"] + ["--overwrite", "--strict"])
    assert "warning" not in capsys.readouterr().err  # its own base passes --strict


# ------------------------------------------------------------------------------------------- the predictions path

@pytest.mark.parametrize("predictions, cause", [
    ('{"q1": 3, "q2": ""}', r"1 answer\(s\) are not strings \(first: 'q1' -> 3\)"),
    ('{"q1": "Paris", "q1": ""}', r"answers 1 question id\(s\) more than once \(first: 'q1'\)"),
    ('["Paris"]', r"must map question ids to answer strings"),
    ('{"q1": "Paris"', r"cannot read predictions"),
    ('{"q1": "Paris", "q2": "", "made-up": "x"}', r"1 unknown prediction id"),
], ids=["number", "repeated-id", "list", "truncated", "unknown-id"])
def test_bad_prediction_files_are_refused(predictions, cause, tmp_path, capsys):
    eval_file = write_json(tmp_path / "dev.json", squad(qa("q1"), qa("q2", "Where?", ())))
    (tmp_path / "p.json").write_text(predictions)
    refused(evaluate.main, ["--predictions", tmp_path / "p.json", "--eval-file", eval_file, "--out",
                            tmp_path / "m.json"], capsys, 1, cause, watch=(tmp_path,))
    assert not (tmp_path / "m.json").exists()


def test_limit_scores_only_the_selected_questions(tmp_path, capsys):
    eval_file = write_json(tmp_path / "dev.json", squad(qa("q1"), qa("q2", "Where?", ()), qa("q3", "Who?", ("Bo",))))
    predictions = write_json(tmp_path / "p.json", {"q1": "Paris", "q2": "", "q3": "wrong"})
    evaluate.main(["--predictions", str(predictions), "--eval-file", str(eval_file), "--limit", "2", "--out",
                   str(tmp_path / "m.json")])
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert (metrics["total"], metrics["exact"]) == (2, 100.0)  # q3's wrong answer is not counted
    write_json(predictions, {"q2": ""})
    refused(evaluate.main, ["--predictions", predictions, "--eval-file", eval_file, "--limit", "2", "--out",
                            tmp_path / "m2.json"], capsys, 1, r"1 question id\(s\) missing a prediction \(first: \['q1'\]")


def test_duplicate_ids_in_the_eval_file_are_an_error(tmp_path, capsys):
    eval_file = write_json(tmp_path / "dev.json", squad(qa("q1"), qa("q1", "Where?", ())))
    predictions = write_json(tmp_path / "p.json", {"q1": "Paris"})
    refused(evaluate.main, ["--predictions", predictions, "--eval-file", eval_file, "--out", tmp_path / "m.json"],
            capsys, 1, r"occur more than once \(first: 'q1'\)", watch=(tmp_path,))


def test_a_question_too_long_to_answer_gets_advice_that_works():
    long = SquadExample("long", "context", "why " * 900, [])
    with pytest.raises(UserError, match=r"long alone needs 917, .*lower --max-new-tokens to 107 or less"):
        prompt_tokens([long], 1024, 128)
    with pytest.raises(UserError, match=r"more than the model's 1024-token window.*shorten that question"):
        prompt_tokens([SquadExample("huge", "c", "why " * 1100, [])], 1024, 1)


def test_files_are_written_with_the_users_umask(run_copy):
    old = os.umask(0o027)
    try:
        with atomic_write(run_copy / "x.json", "w") as f:
            f.write("{}")
    finally:
        os.umask(old)
    assert (run_copy / "x.json").stat().st_mode & 0o777 == 0o640


# ------------------------------------------------------------------------------------- real processes: exit codes

def script(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_errors_print_one_line_and_exit_nonzero_in_a_real_process(tmp_path):
    bad_flag = script("train.py", "--lr", "-1", "--out", str(tmp_path / "r"))
    assert bad_flag.returncode == 2 and "Traceback" not in bad_flag.stderr and "--lr" in bad_flag.stderr
    (tmp_path / "p.json").write_text('{"q1": 3}')
    bad_file = script("evaluate.py", "--predictions", str(tmp_path / "p.json"), "--eval-file",
                      str(write_json(tmp_path / "dev.json", squad(qa("q1")))), "--out", str(tmp_path / "m.json"))
    assert bad_file.returncode == 1 and "Traceback" not in bad_file.stderr
    assert bad_file.stderr.startswith("error: ") and "not strings" in bad_file.stderr


def test_ctrl_c_while_starting_quits_without_a_traceback(short_dev_file, tmp_path):
    process = subprocess.Popen([sys.executable, "train.py", *TINY, "--train-file", str(short_dev_file), "--out",
                                str(tmp_path / "r")], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    # Ctrl-C while torch is being imported: once its library is mapped, the script's first line (the error
    # handling) has run, whatever the machine's load (a fixed sleep fired before it on a busy machine).
    maps, deadline = Path(f"/proc/{process.pid}/maps"), time.time() + 60
    while "libtorch" not in maps.read_text() and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode in (-signal.SIGINT, 130), err
    assert "Traceback" not in err and "interrupted" in err


@pytest.mark.parametrize("signals", [1, 2], ids=["SIGTERM saves", "second SIGTERM quits"])
def test_sigterm_saves_like_ctrl_c_and_a_second_one_quits(signals, short_dev_file, tmp_path):
    run = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "train.py", *TINY, "--train-file", str(short_dev_file),
                                "--eval-file", str(short_dev_file), "--out", str(run), "--max-steps", "100000",
                                "--save-every", "100000"],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (run / "config.json").exists() and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)
    for _ in range(signals):
        process.send_signal(signal.SIGTERM)
        time.sleep(0.01)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130 and "Traceback" not in err, err[-2000:]
    assert "SIGTERM: stopping after this step" in err
    if signals == 1:
        assert "continue with --resume" in out and load_adapter(run / "checkpoint.pt")["step"] >= 1
    assert not [p for p in os.listdir(run) if p.endswith(".tmp")]


# --------------------------------------------------------------------------------- the run folder: one owner, safe

def test_a_second_process_on_a_locked_run_folder_is_refused_and_changes_nothing(run_copy):
    """This process holds the folder's lock, as a training run does for its life; a second train.py (another
    process) is refused at once, with the holder's pid, and every file stays byte-identical."""
    before = snapshot(run_copy)
    with Run(run_copy).lock():
        second = script("train.py", "--out", str(run_copy), "--resume", "--max-steps", "3")
        assert snapshot(run_copy) == {**before, run_copy / "train.lock": f"{os.getpid()}\n".encode()}
    assert second.returncode == 1 and "Traceback" not in second.stderr, second.stderr
    assert f"is in use by another train.py (pid {os.getpid()})" in second.stderr
    assert snapshot(run_copy) == before  # the lock file goes with its holder


@pytest.mark.parametrize("damage, cause", [
    (lambda c: c["args"].update(lr="fast"), r"checkpoint.pt \(its args\) is damaged: lr = 'fast' \(not a number\)"),
    (lambda c: c["args"].update(rank=0), r"is damaged: rank = 0 \(0 is below 1"),
    (lambda c: c["args"].update(targets=["c_bogus"]), r"is damaged: targets = \['c_bogus'\] \(not one of"),
    (lambda c: c.update(args=[1, 2]), r"is damaged: the settings are a list"),
    (lambda c: c.update(step=-1), r"checkpoint.pt is damaged: its step is not"),
    (lambda c: c.update(step="2"), r"checkpoint.pt is damaged: its step is not"),
    (lambda c: c.update(rng=[None]), r"checkpoint.pt is damaged: its rng is not"),
    (lambda c: c.update(optimizer={"state": {}}), r"checkpoint.pt is damaged: its optimizer is not"),
    (lambda c: c["optimizer"]["param_groups"][0].update(params=[0]), r"checkpoint.pt is damaged: its optimizer state "
                                                                     r"does not fit the adapter"),
    (lambda c: c["base"].pop("init"), r"checkpoint.pt is damaged: base.init missing"),
], ids=["args-lr", "args-rank", "args-targets", "args-list", "step-negative", "step-text", "rng", "optimizer",
        "optimizer-groups", "base"])
def test_resume_refuses_a_damaged_training_state_before_writing(damage, cause, run_copy, capsys):
    checkpoint = torch.load(run_copy / "checkpoint.pt", weights_only=True)
    damage(checkpoint)
    torch.save(checkpoint, run_copy / "checkpoint.pt")
    refused(train.main, ["--out", run_copy, "--resume", "--max-steps", "3"], capsys, 1, cause, watch=(run_copy,))


def test_resume_refuses_a_best_folder_without_its_metrics(run_copy, capsys):
    (run_copy / "best").mkdir()
    shutil.copy(run_copy / "checkpoint.pt", run_copy / "best" / "checkpoint.pt")  # no quality, no metrics.json
    refused(train.main, ["--out", run_copy, "--resume", "--max-steps", "3"], capsys, 1,
            r"best is damaged: metrics.json missing", watch=(run_copy,))
    (run_copy / "best" / "metrics.json").write_text('{"step": 2, "f1": 50.0}')
    refused(train.main, ["--out", run_copy, "--resume", "--max-steps", "3"], capsys, 1,
            r"best/checkpoint.pt is damaged: quality.f1 missing", watch=(run_copy,))


def test_resume_removes_leftover_temporary_files_and_a_cut_log_line(run_copy, capsys):
    """What a killed or disk-full run leaves: its own atomic writes' temporary files and a cut last log line. The
    run is sound: --resume removes them, says so, and continues."""
    leftovers = [run_copy / ".checkpoint.pt.a1b2c3.tmp", run_copy / ".log.jsonl.x_y.tmp",
                 run_copy / "adapter" / ".adapter_model.safetensors.k9.tmp"]
    for path in leftovers:
        path.write_bytes(b"half a file")
    with open(run_copy / "log.jsonl", "a") as f:
        f.write('{"step": 3, "lo')
    train.main(["--out", str(run_copy), "--resume", "--max-steps", "3"])
    err = capsys.readouterr().err
    assert "removed 3 temporary file(s) left by an interrupted write" in err and "dropped the cut last line" in err
    assert not any(path.exists() for path in leftovers)
    assert [json.loads(line)["step"] for line in (run_copy / "log.jsonl").read_text().splitlines()] == [2, 3]


def test_a_log_line_cut_short_by_a_full_disk_is_undone(run_copy, monkeypatch):
    before = (run_copy / "log.jsonl").read_bytes()
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, data[:len(data) // 2]))  # a full disk
    with pytest.raises(UserError, match=r"cannot write .*log.jsonl \(No space left on device\)"):
        Run(run_copy).append_log({"step": 3, "loss": 1.0})
    assert (run_copy / "log.jsonl").read_bytes() == before


def test_a_checkpoint_saved_before_the_later_flags_still_resumes_and_evaluates(run_copy, short_dev_file, tmp_path):
    """A checkpoint from before --dora, --lora-init, --loraplus-ratio and --quantize existed, and before the base's
    fingerprint and quantization were recorded: each missing field takes its default."""
    checkpoint = torch.load(run_copy / "checkpoint.pt", weights_only=True)
    for name in ("dora", "lora_init", "loraplus_ratio", "quantize"):
        del checkpoint["args"][name]
    del checkpoint["base"]["quantize"], checkpoint["base"]["fingerprint"]
    checkpoint["args"]["targets"] = list(checkpoint["args"]["targets"])  # as argparse gave it
    torch.save(checkpoint, run_copy / "checkpoint.pt")
    old = read_checkpoint(run_copy)
    assert (old.settings.dora, old.settings.quantize, old.base.quantize, old.base.fingerprint) == \
        (False, "none", "none", None)
    evaluate.main(["--checkpoint", str(run_copy), "--limit", "2", "--max-new-tokens", "2", "--out",
                   str(tmp_path / "m.json")])
    assert json.loads((tmp_path / "m.json").read_text())["total"] == 2
    train.main(["--out", str(run_copy), "--resume", "--max-steps", "3"])
    assert load_adapter(run_copy / "checkpoint.pt")["step"] == 3
