"""A library import or a training run leaves the process as it found it; the scripts alone decide how it ends.

The GPU check runs each step under `timeout`, which sends SIGTERM: a test process that still held train.py's
"save and stop" handler after training would ignore it and run past its limit.
"""
import signal
import subprocess
import sys

import train
from conftest import ROOT

TINY = ["--model", "gpt2-tiny", "--init", "random", "--device", "cpu", "--micro-batch-size", "2", "--grad-accum", "1",
        "--max-steps", "2", "--warmup-steps", "0"]


def test_importing_the_packages_leaves_the_excepthook_alone():
    code = ("import sys; hook = sys.excepthook\n"
            "import gpt2, gpt2.errors, lora, lora.errors, lora.anatomy, data.batching, data.squad, data.prompts\n"
            "import finetune.signals, finetune.step, finetune.model, finetune.adapters, finetune.answer, finetune.run\n"
            "assert sys.excepthook is hook, sys.excepthook")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_errors_print_one_line_only_once_a_script_installs_the_handling():
    raise_both = ("from gpt2 import UserError; from lora import LoRAError\n"
                  "import sys; raise (UserError if sys.argv[1] == 'user' else LoRAError)('fix the input')")
    for kind in ("user", "lora"):
        bare = subprocess.run([sys.executable, "-c", raise_both, kind], cwd=ROOT, capture_output=True, text=True)
        assert bare.returncode == 1 and "Traceback" in bare.stderr  # importing installed nothing
        handled = subprocess.run([sys.executable, "-c", "from finetune.signals import install_error_handling\n"
                                  "install_error_handling()\n" + raise_both, kind],
                                 cwd=ROOT, capture_output=True, text=True)
        assert handled.returncode == 1 and handled.stderr == "error: fix the input\n"
    other = subprocess.run([sys.executable, "-c", "from finetune.signals import install_error_handling\n"
                            "install_error_handling(); raise RuntimeError('a bug')"], capture_output=True, text=True,
                           cwd=ROOT)
    assert "Traceback" in other.stderr and "RuntimeError: a bug" in other.stderr  # bugs keep their traceback


def test_training_restores_the_signal_handlers(short_dev_file, tmp_path):
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    train.main([*TINY, "--train-file", str(short_dev_file), "--eval-file", str(short_dev_file),
                "--out", str(tmp_path / "run")])
    assert {s: signal.getsignal(s) for s in before} == before


def test_sigterm_ends_a_process_that_has_trained(short_dev_file, tmp_path):
    """What `timeout` does to a pytest step: after train.main returned, SIGTERM must end the process at once."""
    code = ("import sys, time, train; train.main(sys.argv[1:]); print('trained', flush=True); time.sleep(120)")
    process = subprocess.Popen([sys.executable, "-c", code, *TINY, "--train-file", str(short_dev_file),
                                "--eval-file", str(short_dev_file), "--out", str(tmp_path / "run")],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        for line in process.stdout:  # the run's own output first
            if line == "trained\n":
                break
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == -signal.SIGTERM  # killed by it, not at the end of its sleep
    finally:
        process.kill()
