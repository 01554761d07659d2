"""The README's smoke run, exactly as written there: it must learn (a falling loss), evaluate, and be scored, as on a
fresh clone offline: no TIKTOKEN_CACHE_DIR (the tokenizer's files come with the repository), HF_HUB_OFFLINE=1."""
import json
import os
import re
import shlex
import subprocess
import sys

from conftest import DEV_FILE, ROOT

README_DEV_FILE = "../shared/squad_v2/dev-v2.0.json"
README_OUT = "runs/smoke"


def readme_smoke_commands() -> list[list[str]]:
    """The README's indented commands that write or read runs/smoke, continuation lines joined, comments removed."""
    text = (ROOT / "README.md").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.startswith("    python ")]
    return [shlex.split(line, comments=True) for line in lines if re.search(rf"\s{README_OUT}(\s|$)", line)]


def run_as_a_user(command: list[str]) -> subprocess.CompletedProcess:
    """`python script.py ...` in the repository, offline, with none of the variables the tests set for themselves."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("TIKTOKEN_CACHE_DIR", None)
    result = subprocess.run([sys.executable, *command[1:]], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    return result


def test_the_readme_smoke_run_learns_evaluates_and_is_scored(tmp_path):
    here = {README_DEV_FILE: str(DEV_FILE), README_OUT: str(tmp_path / "smoke")}  # the same run, in a temp folder
    (train_command, evaluate_command) = [[here.get(word, word) for word in command]
                                         for command in readme_smoke_commands()]
    assert train_command[:2] == ["python", "train.py"] and evaluate_command[:2] == ["python", "evaluate.py"]

    trained = run_as_a_user(train_command)
    out, err = trained.stdout, trained.stderr
    log = [json.loads(line) for line in (tmp_path / "smoke" / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    evals = [r["eval_loss"] for r in log if "eval_loss" in r]
    assert losses[-1] < losses[0] - 0.3, losses  # it learns, visibly
    assert len(evals) >= 1 and evals[-1] < losses[0] - 0.3
    assert "warning" not in err
    assert f"score it   python evaluate.py --checkpoint {tmp_path / 'smoke'} --limit 50 --max-new-tokens 8" in out
    assert "eval loss  " in out
    config = json.loads((tmp_path / "smoke" / "config.json").read_text())
    assert config["lr"] == 1e-2 and "parameters" in config and "{" not in out  # the table, not a JSON dump

    evaluated = run_as_a_user(evaluate_command)
    assert "note: every na_prob is below" in evaluated.stdout  # the near-uniform model's, explained
    metrics = json.loads((tmp_path / "smoke" / "metrics.dev.first50.json").read_text())
    assert metrics["total"] == 50
