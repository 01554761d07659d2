"""scripts/gpu_check.sh cannot come back empty: it stops at once, saying what is missing, when its data did not
arrive; a run stopped from outside still publishes every row; the summary reads whatever logs are there."""
import json
import signal
import subprocess
import sys
import tarfile
import time

from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import gpu_summary  # noqa: E402


def test_a_missing_data_folder_stops_the_check_with_one_line_and_a_summary(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    done = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "OUT": str(out),
                               "GPU_CHECK_LOG": str(tmp_path / "log"), "GPT2_LORA_SHARED": str(tmp_path / "empty")})
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and "the dev set" in done.stderr and "tiktoken" in done.stderr \
        and "the anchor script" in done.stderr and ".gpu/" in done.stderr
    assert "preflight      failed" in (out / "summary.txt").read_text()
    with tarfile.open(out / "gpu-check.tgz") as tar:
        assert "./steps.jsonl" in tar.getnames()


def test_a_check_stopped_from_outside_still_returns_its_rows(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    process = subprocess.Popen(["bash", "scripts/gpu_check.sh"], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                               stderr=subprocess.DEVNULL, env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable,
                                                               "OUT": str(out), "GPU_CHECK_LOG": str(tmp_path / "log")})
    for line in process.stdout:  # the preflight's row: the first step has started
        if line.startswith("preflight"):
            break
    time.sleep(1)
    process.send_signal(signal.SIGTERM)  # what `timeout` sends the whole check
    assert process.wait(timeout=60) == 143
    summary = (out / "summary.txt").read_text()
    assert "preflight      ok" in summary and "cut off" in summary


def write_log(path, *records, tail=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)


def test_the_summary_shows_every_step_and_the_phases_that_were_measured(tmp_path, capsys):
    write_log(tmp_path / "steps.jsonl",
              {"step": "ours", "status": "failed", "exit": 1, "seconds": 30, "why": "exit 1: see ours.log"},
              {"step": "xl-nf4", "status": "skipped", "exit": None, "seconds": 0, "why": "out of time"})
    write_log(tmp_path / "ours.log", {"phase": "training", "tokens_per_s": 123456, "peak_GB": 4.2},
              {"phase": "profile", "error": "RuntimeError: boom"},
              {"phase": "answering", "answers_per_s": 321.5},
              tail='{"phase": "answ')  # a line cut off when the step was killed
    write_log(tmp_path / "anchor.log", {"what": "hf_peft_train", "tokens_per_s": 61728, "peak_GB": 8.4})
    gpu_summary.main(tmp_path, "a test GPU")
    shown = capsys.readouterr().out
    assert "ours           failed" in shown and "xl-nf4         skipped" in shown and "out of time" in shown
    assert "123456" in shown and "321.5" in shown and "2.00x" in shown and "0.50x" in shown
