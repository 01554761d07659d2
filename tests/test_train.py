"""train.py: exact gradient accumulation, exact resume, DDP, Ctrl-C, NaN, and learning end to end."""
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import fields, replace

import pytest
import torch

import evaluate
import train
from conftest import DEV_FILE, ROOT
from data.batching import collate
from data.prompts import training_sequences
from data.squad import load_squad_file
from gpt2 import UserError
from finetune.model import build_model
from finetune.report import warmup_warning
from finetune.settings import Settings, parse
from finetune.step import train_step
from lora import LoRAConfig, load_adapter, lora_layers


def tiny_args(data_file, out, *extra):
    return ["--model", "gpt2-tiny", "--init", "random", "--train-file", str(data_file), "--eval-file", str(data_file),
            "--out", str(out), "--device", "cpu", *extra]


def adapter(out):
    return load_adapter(out / "checkpoint.pt")["adapter"]


def test_accumulated_micro_batches_give_the_gradient_of_one_batch(short_dev_file):
    config = LoRAConfig(rank=4, alpha=8, dropout=0.0, targets=("c_attn", "c_proj", "c_fc"))
    sequences, _ = training_sequences(load_squad_file(short_dev_file)[:6], 1024, True, "all", seed=0)
    results = []
    for split in ([sequences], [sequences[:1], sequences[1:4], sequences[4:]]):  # uneven micro-batches on purpose
        torch.manual_seed(0)
        model = build_model("gpt2-tiny", "random", 0, 0.0, config, torch.device("cpu"), torch.float32)
        with torch.no_grad():
            for layer in lora_layers(model):  # B = 0 would leave A without gradient; random, as LayerNorm
                layer.lora_B.copy_(torch.randn_like(layer.lora_B) * 0.01)  # cancels constant changes
        sgd = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)  # update = -gradient
        train_step(model, [collate(part) for part in split], sgd, None, torch.float32, clip=1e9,
                         device=torch.device("cpu"))
        results.append({k: v for k, v in model.state_dict().items() if "lora_" in k})
    for key, value in results[0].items():
        torch.testing.assert_close(results[1][key], value, rtol=1e-5, atol=1e-7)


def test_a_bf16_step_on_the_cpu_matches_fp32(short_dev_file):
    """The half-precision path (bf16 frozen base, bf16 autocast, fp32 A and B) runs on a CPU too, so CI checks it:
    one step's loss and A/B updates against fp32, from the same weights and random adapters."""
    config = LoRAConfig(rank=4, alpha=8, dropout=0.0, targets=("c_attn", "c_proj", "c_fc"))
    batch = collate(training_sequences(load_squad_file(short_dev_file), 1024, True, "all", seed=0)[0])
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        model = build_model("gpt2-tiny", "random", 0, 0.0, config, torch.device("cpu"), dtype)
        with torch.no_grad():
            for layer in lora_layers(model):
                layer.lora_B.copy_(torch.randn_like(layer.lora_B) * 0.02)
        before = {k: v.clone() for k, v in model.named_parameters() if v.requires_grad}
        sgd = torch.optim.SGD(list(model.parameters()), lr=1.0)  # only A and B require grad: update = -gradient
        loss = train_step(model, [batch], sgd, None, dtype, clip=1e9, device=torch.device("cpu")).item()
        results[dtype] = loss / len(batch.targets), {k: before[k] - p for k, p in model.named_parameters()
                                                     if p.requires_grad}
    (loss32, update32), (loss16, update16) = results[torch.float32], results[torch.bfloat16]
    assert abs(loss16 - loss32) / loss32 < 1e-2
    for key, update in update32.items():
        assert ((update16[key] - update).norm() / update.norm()).item() < 3e-2, key


def test_resume_continues_exactly(short_dev_file, tmp_path, capsys):
    common = ["--micro-batch-size", "2", "--grad-accum", "2", "--save-every", "3"]
    train.main(tiny_args(short_dev_file, tmp_path / "straight", *common, "--max-steps", "6"))
    train.main(tiny_args(short_dev_file, tmp_path / "resumed", *common, "--max-steps", "3"))
    train.main(tiny_args(short_dev_file, tmp_path / "resumed", *common, "--max-steps", "6", "--resume"))
    assert "resumed from" in capsys.readouterr().out
    straight, resumed = adapter(tmp_path / "straight"), adapter(tmp_path / "resumed")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)  # dropout on: RNG state restored too
    assert load_adapter(tmp_path / "resumed" / "checkpoint.pt")["step"] == 6
    with pytest.raises(UserError, match="already holds a run"):
        train.main(tiny_args(short_dev_file, tmp_path / "straight", *common))
    with pytest.raises(UserError, match="--rank 4 -> 8"):
        train.main(tiny_args(short_dev_file, tmp_path / "straight", *common, "--resume", "--rank", "8"))


def test_done_when_commands_write_and_resume(tmp_path):
    run = tmp_path / "RUN"
    command = [sys.executable, "train.py", "--model", "gpt2-tiny", "--init", "random", "--train-file", str(DEV_FILE),
               "--eval-file", str(DEV_FILE), "--out", str(run), "--micro-batch-size", "2", "--grad-accum", "2"]
    first = subprocess.run(command + ["--max-steps", "2"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    assert json.loads((run / "config.json").read_text())["max_steps"] == 2
    assert "warning: --warmup-steps 100 is not shorter than the run (2 steps)" in first.stderr  # the default 100
    second = subprocess.run(command + ["--max-steps", "3", "--resume"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert second.returncode == 0, second.stderr
    assert "resumed from" in second.stdout and "at step 2" in second.stdout
    assert [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()] == [2, 3]


def test_a_warmup_as_long_as_the_run_is_warned_about():
    warning = warmup_warning(100, 6, 5e-5)
    assert "--warmup-steps 100 is not shorter than the run (6 steps)" in warning and "2.5e-06" in warning
    assert warmup_warning(6, 6, 1e-3) is not None
    assert warmup_warning(5, 6, 1e-3) is None and warmup_warning(0, 6, 1e-3) is None


def test_ddp_on_two_cpu_processes_equals_one_process(short_dev_file, tmp_path):
    """Same examples per step (2 x 2 x 2 GPUs = 2 x 4 x 1), so the same gradients: DDP must average correctly."""
    deterministic = ["--lora-dropout", "0", "--base-dropout", "0", "--max-steps", "2", "--lr", "1e-3",
                     "--warmup-steps", "0", "--micro-batch-size", "2"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py"]
    ddp = subprocess.run(torchrun + tiny_args(short_dev_file, tmp_path / "ddp", *deterministic, "--grad-accum", "2"),
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    train.main(tiny_args(short_dev_file, tmp_path / "single", *deterministic, "--grad-accum", "4"))
    two, one = adapter(tmp_path / "ddp"), adapter(tmp_path / "single")
    assert load_adapter(tmp_path / "ddp" / "checkpoint.pt")["step"] == 2
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in two.items() if "lora_B" in k)
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-6)


def test_ctrl_c_saves_and_exits_cleanly(short_dev_file, tmp_path):
    run = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "train.py", *tiny_args(short_dev_file, run, "--max-steps", "100000",
                                                                       "--micro-batch-size", "2", "--grad-accum", "1")],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (run / "config.json").exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(2)  # let it train a few steps
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "continue with --resume" in out
    assert f"score it   python evaluate.py --checkpoint {run}" in out  # the summary, on stopping too
    step = load_adapter(run / "checkpoint.pt")["step"]
    assert step >= 1
    assert not [p for p in os.listdir(run) if p.endswith(".tmp")]


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(short_dev_file, tmp_path):
    common = ["--micro-batch-size", "2", "--grad-accum", "1", "--warmup-steps", "0"]
    train.main(tiny_args(short_dev_file, tmp_path, *common, "--max-steps", "2"))
    good = adapter(tmp_path)
    with pytest.raises(UserError, match="the loss became nan.*last good state"):
        train.main(tiny_args(short_dev_file, tmp_path, *common, "--max-steps", "50", "--resume", "--lr", "1e30"))
    assert all(torch.equal(v, good[k]) for k, v in adapter(tmp_path).items())


def test_lora_learns_to_answer_memorised_questions(short_dev_file, tmp_path):
    """End to end: template, loss mask, adapter, generation and parsing wired together. A tiny random base with
    LoRA overfits 16 dev questions until greedy decoding reproduces every answer; answered at every evaluation
    (--eval-answers), its F1 rises, and best/ keeps the adapter of the best one."""
    train.main(tiny_args(short_dev_file, tmp_path, "--rank", "16", "--alpha", "32", "--lora-dropout", "0",
                         "--base-dropout", "0", "--lr", "1e-2", "--warmup-steps", "0", "--max-steps", "300",
                         "--micro-batch-size", "16", "--grad-accum", "1", "--loss-on", "answer",
                         "--eval-every", "100", "--log-every", "100", "--eval-answers", "16"))
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    evals = [r for r in log if "eval_loss" in r]
    assert len(evals) == 3 and evals[0]["eval_loss"] > evals[1]["eval_loss"] > evals[2]["eval_loss"]
    f1s = [r["f1"] for r in evals]
    assert f1s[0] < f1s[-1] == 100.0 and all(0 <= r["abstained"] <= 1 and "NoAns_f1" in r for r in evals)
    best = json.loads((tmp_path / "best" / "metrics.json").read_text())
    assert best["step"] == evals[f1s.index(max(f1s))]["step"] < 300 and best["f1"] == max(f1s)
    best_checkpoint = load_adapter(tmp_path / "best" / "checkpoint.pt")
    assert best_checkpoint["step"] == best["step"]
    assert any(not torch.equal(v, adapter(tmp_path)[k]) for k, v in best_checkpoint["adapter"].items())  # not the last
    evaluate.main(["--checkpoint", str(tmp_path / "best"), "--eval-file", str(short_dev_file), "--out",
                   str(tmp_path / "metrics.best.json")])
    assert json.loads((tmp_path / "metrics.best.json").read_text())["f1"] == best["f1"]  # the best step's adapter

    evaluate.main(["--checkpoint", str(tmp_path), "--eval-file", str(short_dev_file), "--out",
                   str(tmp_path / "metrics.m.json")])
    metrics = json.loads((tmp_path / "metrics.m.json").read_text())
    assert metrics["exact"] == 100.0 and metrics["total"] == 16
    assert metrics["HasAns_total"] > 0 and metrics["NoAns_total"] > 0
    predictions = json.loads((tmp_path / "metrics.m.predictions.json").read_text())
    golds = {ex.id: ex.answers for ex in load_squad_file(short_dev_file)}
    assert all((text == "") == (golds[qid] == []) for qid, text in predictions.items())
    # The no-answer probability separates the two kinds (the tiny model's probabilities are all tiny: its logits are
    # flat), so the best threshold lies between them, and answering with it abstains exactly where it should.
    na_probs = json.loads((tmp_path / "metrics.m.na_prob.json").read_text())
    answerable = max(p for qid, p in na_probs.items() if golds[qid])
    assert answerable < min(p for qid, p in na_probs.items() if not golds[qid])
    assert (metrics["best_f1"], metrics["best_f1_thresh"]) == (100.0, answerable)
    evaluate.main(["--checkpoint", str(tmp_path), "--eval-file", str(short_dev_file), "--out",
                   str(tmp_path / "metrics.t.json"), "--na-threshold", str(metrics["best_f1_thresh"])])
    thresholded = json.loads((tmp_path / "metrics.t.json").read_text())
    assert thresholded["exact"] == 100.0 and thresholded["na_threshold"] == answerable


@pytest.mark.parametrize("variant", [["--dora"], ["--lora-init", "pissa"],
                                     ["--loraplus-ratio", "4", "--lr", "2.5e-3"],  # B at 1e-2, A 4x slower
                                     ["--rslora", "--alpha", "8"],  # scaling 8 / sqrt(16) = 2, as 32 / 16
                                     ["--quantize", "nf4"]],
                         ids=["dora", "pissa", "loraplus", "rslora", "nf4"])
def test_each_lora_variant_learns_to_answer_memorised_questions(short_dev_file, tmp_path, variant):
    """The variants end to end: trained, saved (PiSSA as a plain LoRA on the original base; nf4 with its
    quantization recorded, so evaluate.py rebuilds the same 4-bit base), reloaded by evaluate.py, they answer the
    16 memorised questions exactly."""
    train.main(tiny_args(short_dev_file, tmp_path, "--rank", "16", "--alpha", "32", "--lora-dropout", "0",
                         "--base-dropout", "0", "--lr", "1e-2", "--warmup-steps", "0", "--max-steps", "300",
                         "--micro-batch-size", "16", "--grad-accum", "1", "--loss-on", "answer",
                         "--eval-every", "100", "--log-every", "100", *variant))
    evaluate.main(["--checkpoint", str(tmp_path), "--eval-file", str(short_dev_file), "--out",
                   str(tmp_path / "metrics.m.json")])
    metrics = json.loads((tmp_path / "metrics.m.json").read_text())
    assert metrics["exact"] == 100.0 and metrics["total"] == 16


def test_every_setting_is_a_flag_recorded_and_restored(capsys):
    """Settings is the one place a flag is declared: each field is a flag of train.py with the field's default, a
    record without the field (an older checkpoint) gives that default, and a run-defining field cannot change on
    --resume while any other can."""
    defaults, given = parse(["--out", "x"])
    assert defaults == replace(Settings(), out="x") and given == {"out"}
    with pytest.raises(SystemExit):
        parse(["--help"])
    assert {f"--{f.name.replace('_', '-')}" for f in fields(Settings)} <= set(capsys.readouterr().out.split())
    assert Settings.from_record({}, "old") == Settings()
    recorded = replace(Settings(), max_steps=10)
    changed, given = parse(["--resume", "--max-steps", "20", "--lr", "1e-3", "--seed", "42"])
    resumed = changed.resumed(recorded, given, "run")
    assert (resumed.max_steps, resumed.lr, resumed.resume) == (20, 1e-3, True)
    with pytest.raises(UserError, match="--seed 42 -> 7"):
        parse(["--resume", "--seed", "7"])[0].resumed(recorded, {"seed"}, "run")

