"""Outputs never replace inputs or foreign files, and writing fails with a message: evaluate.py, export.py, plot.py,
python -m lora.anatomy and scripts/split_squad.py.

Each case is hostile input in the sense of test_bad_input.py, with its helpers: the exit code, one message naming the
cause, no traceback (any other exception fails the test), and every file that existed byte-identical afterwards.
"""
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import evaluate
import export
import plot
import train
from conftest import ROOT
from finetune.model import load_answerer
from lora import anatomy
from tensorio import load_safetensors
from test_bad_input import TINY, qa, refused, run_copy, snapshot, squad, tiny_run, write_json  # noqa: F401 fixtures

PNG = b"\x89PNG\r\n\x1a\n"


def strict_json(path: Path):
    """The file's JSON, failing the test on NaN or Infinity, which JSON does not have."""
    return json.loads(path.read_text(), parse_constant=lambda name: pytest.fail(f"{name} in {path}"))


@pytest.fixture
def scored(tmp_path) -> tuple[Path, Path]:
    """An eval file of two questions and a predictions file answering them: evaluate.py without a model."""
    return (write_json(tmp_path / "dev.json", squad(qa("q1"), qa("q2", "Where?", ()))),
            write_json(tmp_path / "p.json", {"q1": "Paris", "q2": ""}))


def score(eval_file: Path, predictions: Path, *flags) -> list[str]:
    return ["--predictions", predictions, "--eval-file", eval_file, *flags]


def mounted_tmpfs(directory: Path, *options: str) -> Path:
    """A 64 KiB tmpfs at `directory`: a disk that fills up at once (root only; the test skips elsewhere)."""
    directory.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", ",".join(["size=64k", *options]), "tmpfs", str(directory)],
            capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root")
    return directory


@pytest.fixture
def small_disk(tmp_path):
    disk = mounted_tmpfs(tmp_path / "disk")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def fill(disk: Path) -> None:
    with open(disk / "filler", "wb") as f:
        try:
            f.write(bytes(1 << 20))
            f.flush()
        except OSError:  # ENOSPC: the disk is now full
            pass


def read_only(disk: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)


# ------------------------------------------------------------------------------------------------ evaluate.py

def test_evaluate_never_writes_over_what_it_reads(scored, tmp_path, capsys):
    eval_file, predictions = scored
    for out, what in ((eval_file, "dev.json"), (predictions, "p.json")):
        refused(evaluate.main, score(eval_file, predictions, "--out", out, "--overwrite"), capsys, 1,
                rf"--out .*{what} would replace .*{what}, which this command reads", watch=(tmp_path,))
    (tmp_path / "link.json").symlink_to(eval_file)  # a link to the eval set is the eval set
    refused(evaluate.main, score(eval_file, predictions, "--out", tmp_path / "link.json", "--overwrite"), capsys, 1,
            r"link.json would replace .*dev.json", watch=(tmp_path,))


def test_evaluate_replaces_only_its_own_files_and_only_with_overwrite(scored, tmp_path, capsys):
    eval_file, predictions = scored
    (tmp_path / "notes.json").write_text('{"mine": 1}')
    refused(evaluate.main, score(eval_file, predictions, "--out", tmp_path / "notes.json", "--overwrite"), capsys, 1,
            r"notes.json holds another file, not a metrics JSON of evaluate.py", watch=(tmp_path,))
    out = tmp_path / "m.json"
    evaluate.main([str(a) for a in score(eval_file, predictions, "--out", out, "--report", tmp_path / "r.md")])
    refused(evaluate.main, score(eval_file, predictions, "--out", out), capsys, 1,
            r"m.json already exists .*pass --overwrite", watch=(tmp_path,))
    write_json(predictions, {"q1": "wrong", "q2": ""})
    evaluate.main([str(a) for a in score(eval_file, predictions, "--out", out, "--report", tmp_path / "r.md",
                                         "--overwrite")])
    assert strict_json(out)["exact"] == 50.0 and "| exact | 50.00 |" in (tmp_path / "r.md").read_text()


def test_evaluate_outputs_are_distinct(scored, tmp_path, capsys):
    eval_file, predictions = scored
    refused(evaluate.main, score(eval_file, predictions, "--out", tmp_path / "m.json", "--report", tmp_path / "m.json"),
            capsys, 1, r"--report .*m.json and --out .*m.json are the same file", watch=(tmp_path,))


def test_evaluate_leaves_a_runs_files_and_its_adapter_folder_alone(run_copy, short_dev_file, capsys):
    """config.json with --overwrite was replaced by metrics; a report in the run, or metrics in its adapter/,
    made --resume refuse the run as not a train.py run's."""
    answering = ["--checkpoint", run_copy, "--eval-file", short_dev_file]
    refused(evaluate.main, [*answering, "--out", run_copy / "config.json", "--overwrite"], capsys, 1,
            r"config.json holds another file, not a metrics JSON", watch=(run_copy,))
    refused(evaluate.main, [*answering, "--report", run_copy / "report.md"], capsys, 1,
            r"is a train.py run, which holds only train.py's files.*write report.md elsewhere", watch=(run_copy,))
    refused(evaluate.main, [*answering, "--out", run_copy / "adapter" / "m.json"], capsys, 1,
            r"adapter is a PEFT adapter; a file added there", watch=(run_copy,))


def test_evaluate_refuses_quantizing_a_dora_run_as_train_py_does(short_dev_file, tmp_path, capsys):
    run = tmp_path / "dora"
    train.main([*TINY, "--train-file", str(short_dev_file), "--eval-file", str(short_dev_file), "--out", str(run),
                "--max-steps", "1", "--warmup-steps", "0", "--dora"])
    refused(evaluate.main, ["--checkpoint", run, "--quantize", "int8", "--limit", "1"], capsys, 1,
            r"--quantize int8 takes plain LoRA: .*DoRA adapter.*drop --quantize", watch=(tmp_path,))


def test_evaluate_refuses_non_finite_no_answer_probabilities_before_answering(run_copy, short_dev_file, tmp_path,
                                                                                monkeypatch, capsys):
    """A NaN na_prob was written as a bare NaN, which is not JSON, after all the answering."""
    monkeypatch.setattr(evaluate, "no_answer_probability", lambda model, examples, *a, **k: [math.nan] * len(examples))
    monkeypatch.setattr(evaluate, "answer", lambda *a, **k: pytest.fail("answered after a NaN"))
    refused(evaluate.main, ["--checkpoint", run_copy, "--eval-file", short_dev_file, "--limit", "2", "--out",
                            tmp_path / "m.json"], capsys, 1,
            r"no-answer probability of 2 question\(s\) is not a number", watch=(run_copy,))
    assert not (tmp_path / "m.json").exists()


@pytest.mark.parametrize("flags, cause", [
    (["--model", "gpt2-tiny"], r"a shape without pretrained weights.*--checkpoint RUN and no --model"),
])
def test_evaluate_advises_only_its_own_flags(flags, cause, run_copy, capsys):
    refused(evaluate.main, ["--checkpoint", run_copy, *flags], capsys, 2, cause)


def test_a_peft_adapter_of_a_random_base_gets_advice_in_the_readers_flags(run_copy, short_dev_file, tmp_path,
                                                                          capsys):
    """Its base_model_name_or_path is gpt2-tiny, a shape: gpt2 advised train.py's --init random, a flag neither
    evaluate.py nor export.py has."""
    peft = tmp_path / "peft"
    export.main(["--checkpoint", str(run_copy), "--peft", str(peft)])
    cause = r"names gpt2-tiny as its base, a shape without pretrained weights: pass the base .* with --model"
    argv = ["--checkpoint", peft, "--eval-file", short_dev_file, "--out", tmp_path / "m.json"]
    message = refused(evaluate.main, argv, capsys, 1, cause, watch=(tmp_path,))
    message += refused(export.main, ["--checkpoint", peft, "--merged", tmp_path / "merged"], capsys, 1, cause,
                       watch=(tmp_path,))
    assert "--init" not in message


# ------------------------------------------------------------------------------------------------ SQuAD input

@pytest.mark.parametrize("data, cause", [
    (squad(qa("q1", "What is \ud800?")), r"qas\[0\] \(question 'q1'\).question holds '\\ud800' at character 8"),
    (squad(qa("q1"), context="Paris\udfff"), r"paragraphs\[0\].context holds '\\udfff'"),
    (squad({"id": "q1", "question": "Where?", "answers": "Paris"}),
     r"\(question 'q1'\).answers is not in SQuAD format: it must be a list, not str"),
    (squad({"id": "q1", "answers": []}), r"\(question 'q1'\).question is not in SQuAD format: it is missing"),
    (squad(qa(7)), r"qas\[0\].id is not in SQuAD format: it must be a string, not int"),
], ids=["surrogate-question", "surrogate-context", "answers-string", "no-question", "id-number"])
def test_squad_fields_are_checked_at_load_by_name(data, cause, tmp_path, capsys):
    """A lone surrogate trained, then crashed evaluate.py after all the answering."""
    eval_file = tmp_path / "dev.json"
    eval_file.write_text(json.dumps(data))  # json escapes the surrogate as \ud800: valid JSON, not valid text
    predictions = write_json(tmp_path / "p.json", {"q1": "Paris"})
    message = refused(evaluate.main, score(eval_file, predictions, "--out", tmp_path / "m.json"), capsys, 1, cause,
                      watch=(tmp_path,))
    assert str(eval_file) in message


# ------------------------------------------------------------------------------------------------ export.py

def test_export_never_writes_over_its_inputs(run_copy, tiny_hub_dir, tmp_path, capsys):
    model = Path(shutil.copytree(tiny_hub_dir, tmp_path / "model"))
    for flag in ("--merged", "--peft"):
        refused(export.main, ["--checkpoint", run_copy, flag, run_copy, "--overwrite"], capsys, 1,
                rf"{flag} .*run would replace .*run, which this command reads", watch=(tmp_path,))
    refused(export.main, ["--checkpoint", run_copy, "--model", model, "--merged", model, "--overwrite"], capsys, 1,
            r"--merged .*model would replace .*model", watch=(tmp_path,))


@pytest.mark.parametrize("flag, into, cause", [
    ("--merged", "run", r"holds a train.py run \(adapter, checkpoint.pt, config.json, .*\), not a model"),
    ("--peft", "model", r"holds a model \(config.json, model.safetensors\), not a PEFT adapter"),
    ("--peft", "run/adapter", r"run is a train.py run, which holds only"),
    ("--merged", "run/exported", r"run is a train.py run, which holds only .*write exported elsewhere"),
    ("--peft", "notes", r"holds other files \(notes.txt\), not a PEFT adapter"),
], ids=["merged-into-a-run", "peft-into-a-model", "peft-into-a-runs-adapter", "merged-inside-a-run", "peft-other"])
def test_export_never_writes_into_a_foreign_folder(flag, into, cause, tiny_run, tiny_hub_dir, tmp_path, capsys):
    """--merged into a run left it unresumable; --peft into a model folder made transformers load it with the
    adapter. Not even --overwrite does that."""
    source = Path(shutil.copytree(tiny_run, tmp_path / "source"))
    shutil.copytree(tiny_run, tmp_path / "run")
    shutil.copytree(tiny_hub_dir, tmp_path / "model")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "notes.txt").write_text("mine")
    refused(export.main, ["--checkpoint", source, flag, tmp_path / into, "--overwrite"], capsys, 1, cause,
            watch=(tmp_path,))


def test_export_replaces_its_own_kind_of_folder_only_with_overwrite(run_copy, tmp_path, capsys):
    peft = tmp_path / "peft"
    export.main(["--checkpoint", str(run_copy), "--peft", str(peft)])
    refused(export.main, ["--checkpoint", run_copy, "--peft", peft], capsys, 1,
            r"peft already exists \(a PEFT adapter.*pass --overwrite", watch=(tmp_path,))
    export.main(["--checkpoint", str(run_copy), "--peft", str(peft), "--overwrite"])
    assert sorted(os.listdir(peft)) == ["adapter_config.json", "adapter_model.safetensors"]
    strict_json(peft / "adapter_config.json")


@pytest.mark.parametrize("flags, cause", [
    (["--peft", "out", "--model", "gpt2"], r"--peft writes the adapter alone.*--model and --strict go with --merged"),
    (["--merged", "out", "--model", "gpt2-tiny"], r"a shape without pretrained weights.*drop --model"),
], ids=["peft-with-model", "preset-model"])
def test_export_refuses_flag_pairs(flags, cause, tmp_path, capsys):
    refused(export.main, ["--checkpoint", tmp_path, *flags], capsys, 2, cause, watch=(tmp_path,))


def test_export_merged_of_a_quantized_run_is_the_base_its_answers_come_from(short_dev_file, tmp_path):
    """evaluate.py answers an int8 run with the adapter merged into the dequantized base; the export merged it into
    the full-precision one."""
    run = tmp_path / "int8"
    train.main([*TINY, "--train-file", str(short_dev_file), "--eval-file", str(short_dev_file), "--out", str(run),
                "--max-steps", "1", "--warmup-steps", "0", "--quantize", "int8"])
    export.main(["--checkpoint", str(run), "--merged", str(tmp_path / "merged")])
    merged = load_safetensors(tmp_path / "merged" / "model.safetensors")["h.0.mlp.c_fc.weight"].t()
    cpu = torch.device("cpu")
    answering = load_answerer(str(run), None, cpu, torch.float32, "int8").transformer.h[0].mlp.c_fc.weight
    full_precision = load_answerer(str(run), None, cpu, torch.float32, "none").transformer.h[0].mlp.c_fc.weight
    assert torch.equal(merged, answering) and not torch.allclose(merged, full_precision, atol=1e-6)


# ------------------------------------------------------------------------------------------------ plot.py

def test_plot_never_writes_over_its_inputs_or_foreign_files(run_copy, capsys):
    refused(plot.main, [run_copy, "--out", run_copy / "log.jsonl", "--overwrite"], capsys, 1,
            r"log.jsonl would replace .*log.jsonl, which this command reads", watch=(run_copy,))
    (run_copy / "notes.png").write_text("not a picture")
    refused(plot.main, [run_copy, "--out", run_copy / "notes.png", "--overwrite"], capsys, 1,
            r"notes.png holds another file, not a PNG picture", watch=(run_copy,))
    refused(plot.main, [run_copy, "--out", run_copy / "adapter" / "c.png"], capsys, 1, r"is a PEFT adapter",
            watch=(run_copy,))


# ------------------------------------------------------------------------------------------------ lora.anatomy

def test_anatomy_never_writes_over_what_it_reads(run_copy, tiny_hub_dir, tmp_path, capsys):
    base = Path(shutil.copy(tiny_hub_dir / "model.safetensors", tmp_path / "base.safetensors"))
    (tmp_path / "link.png").symlink_to(run_copy / "checkpoint.pt")  # a link to the checkpoint is the checkpoint
    for png, what in ((run_copy / "checkpoint.pt", "checkpoint.pt"), (run_copy, "run"), (base, "base.safetensors"),
                      (tmp_path / "link.png", "checkpoint.pt")):
        refused(anatomy.main, [run_copy, "--base", base, "--png", png, "--overwrite"], capsys, 1,
                rf"--png .* would replace .*{what}, which this command reads", watch=(tmp_path,))


def test_anatomy_replaces_only_a_png_only_with_overwrite_and_never_in_a_models_folder(run_copy, tiny_hub_dir,
                                                                                      tmp_path, capsys):
    (run_copy / "notes.png").write_text("not a picture")
    refused(anatomy.main, [run_copy, "--png", run_copy / "notes.png", "--overwrite"], capsys, 1,
            r"notes.png holds another file, not a PNG picture", watch=(run_copy,))
    anatomy.main([str(run_copy)])  # RUN/anatomy.png: a run holds pictures
    assert (run_copy / "anatomy.png").read_bytes()[:8] == PNG
    refused(anatomy.main, [run_copy], capsys, 1, r"anatomy.png already exists .*pass --overwrite",
            watch=(run_copy,))
    anatomy.main([str(run_copy), "--overwrite"])
    model = Path(shutil.copytree(tiny_hub_dir, tmp_path / "model"))
    for folder in (model, run_copy / "adapter"):
        refused(anatomy.main, [run_copy, "--png", folder / "a.png"], capsys, 1,
                r"is a model or a PEFT adapter, whose readers load or refuse", watch=(tmp_path,))


# ------------------------------------------------------------------------------------------------ split_squad.py

def split_refused(argv: list, cause: str, watch: tuple[Path, ...]) -> None:
    """scripts/split_squad.py is a script, not a module: run it, and check its refusal as `refused` does."""
    before = snapshot(*watch)
    result = subprocess.run([sys.executable, "scripts/split_squad.py", *map(str, argv)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and result.stderr.startswith("error: "), result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    assert re.search(cause, result.stderr), result.stderr
    assert snapshot(*watch) == before


def test_split_squad_never_writes_over_its_source_or_one_half_over_the_other(short_dev_file, tmp_path):
    source = Path(shutil.copy(short_dev_file, tmp_path / "dev.json"))
    (tmp_path / "link.json").symlink_to(source)
    for first in (source, tmp_path / "link.json"):
        split_refused([source, first, tmp_path / "b.json", "--overwrite"], r"FIRST .* would replace .*dev.json, which "
                      r"this command reads", watch=(tmp_path,))
    split_refused([source, tmp_path / "a.json", tmp_path / "a.json"], r"SECOND .*a.json and FIRST .*a.json are the "
                  r"same file", watch=(tmp_path,))


def test_split_squad_replaces_only_a_squad_json_and_never_writes_into_a_run(short_dev_file, run_copy, tmp_path):
    (tmp_path / "notes.json").write_text('{"mine": 1}')
    split_refused([short_dev_file, tmp_path / "notes.json", tmp_path / "b.json", "--overwrite"],
                  r"notes.json holds another file, not a SQuAD JSON", watch=(tmp_path,))
    split_refused([short_dev_file, run_copy / "a.json", tmp_path / "b.json"], r"is a train.py run, which holds only "
                  r"train.py's files.*write a.json elsewhere", watch=(tmp_path,))
    split_refused([short_dev_file, run_copy / "adapter" / "a.json", tmp_path / "b.json"], r"adapter is a PEFT adapter",
                  watch=(tmp_path,))


# ------------------------------------------------------------------------------------------- the disk says no

def test_writing_below_a_file_or_under_proc_is_refused_before_any_work(scored, run_copy, tmp_path, capsys):
    eval_file, predictions = scored
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    refused(plot.main, [run_copy, "--out", blocker / "c.png"], capsys, 1, r"file.txt is a file, not a directory",
            watch=(tmp_path,))
    refused(export.main, ["--checkpoint", run_copy, "--peft", blocker / "peft"], capsys, 1,
            r"file.txt is a file, not a directory", watch=(tmp_path,))
    refused(anatomy.main, [run_copy, "--png", blocker / "a.png"], capsys, 1, r"file.txt is a file, not a directory",
            watch=(tmp_path,))
    split_refused([eval_file, blocker / "a.json", tmp_path / "b.json"], r"file.txt is a file, not a directory",
                  watch=(tmp_path,))
    refused(evaluate.main, score(eval_file, predictions, "--out", "/proc/m.json"), capsys, 1,
            r"--out /proc: cannot write in /proc", watch=(tmp_path,))


def test_a_full_disk_is_a_message_and_earlier_files_stay(scored, run_copy, small_disk, capsys):
    eval_file, predictions = scored
    out = small_disk / "m.json"
    evaluate.main([str(a) for a in score(eval_file, predictions, "--out", out)])
    fill(small_disk)
    before = snapshot(small_disk)
    refused(evaluate.main, score(eval_file, predictions, "--out", out, "--overwrite", "--report", small_disk / "r.md"),
            capsys, 1, r"cannot write .*: No space left on device", watch=(small_disk, run_copy))
    refused(plot.main, [run_copy, "--out", small_disk / "c.png"], capsys, 1, r"c.png: No space left on device",
            watch=(small_disk, run_copy))
    refused(export.main, ["--checkpoint", run_copy, "--peft", small_disk / "peft"], capsys, 1,
            r"No space left on device", watch=(small_disk, run_copy))
    refused(anatomy.main, [run_copy, "--png", small_disk / "a.png"], capsys, 1,
            r"cannot write .*a.png: No space left on device", watch=(small_disk, run_copy))
    split_refused([eval_file, small_disk / "a.json", small_disk / "b.json"],
                  r"cannot write .*a.json: No space left on device", watch=(small_disk, eval_file))
    assert snapshot(small_disk) == before  # not one temporary file left behind


def test_a_read_only_folder_is_refused_before_any_work(scored, run_copy, small_disk, capsys):
    eval_file, predictions = scored
    read_only(small_disk)
    refused(evaluate.main, score(eval_file, predictions, "--out", small_disk / "m.json"), capsys, 1,
            r"cannot write in .*disk \(Read-only file system\)")
    refused(export.main, ["--checkpoint", run_copy, "--merged", small_disk / "merged"], capsys, 1,
            r"--merged .*merged: cannot write in .*Read-only file system", watch=(run_copy,))
    refused(plot.main, [run_copy, "--out", small_disk / "c.png"], capsys, 1, r"Read-only file system",
            watch=(run_copy,))
    refused(anatomy.main, [run_copy, "--png", small_disk / "a.png"], capsys, 1,
            r"--png .*: cannot write in .*Read-only file system", watch=(run_copy,))
    split_refused([eval_file, small_disk / "a.json", small_disk / "b.json"],
                  r"FIRST .*disk: cannot write in .*disk \(Read-only file system\)", watch=(eval_file,))


def test_a_refusal_is_one_line_in_a_real_process(tiny_run, tmp_path):
    run = Path(shutil.copytree(tiny_run, tmp_path / "run"))
    before = snapshot(run)
    result = subprocess.run([sys.executable, "export.py", "--checkpoint", str(run), "--merged", str(run)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and result.stderr.startswith("error: ") and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and snapshot(run) == before
