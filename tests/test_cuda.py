"""The CUDA paths: bf16 and fp16 (with loss scaling) against fp32, the output loss in bf16, half-precision
answering, torch.compile, NCCL through torchrun, and resume on the GPU.

Skipped without CUDA (CI is CPU-only); `scripts/gpu_check.sh` runs them on a GPU machine.
"""
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import evaluate
import train
from conftest import ROOT
from data.batching import collate
from data.prompts import training_sequences
from data.squad import load_squad_file
from finetune.answer import answer
from finetune.model import build_model, load_answerer
from finetune.step import make_optimizer, train_step
from gpt2 import generate, load_model
from gpt2.loss import head_cross_entropy
from lora import LoRAConfig, load_adapter, lora_layers

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")
SEED_LORA = LoRAConfig(rank=4, alpha=8, dropout=0.0, targets=("c_attn", "c_proj", "c_fc"))


def tiny_args(data_file, out, *extra):
    return ["--model", "gpt2-tiny", "--init", "random", "--train-file", str(data_file), "--eval-file", str(data_file),
            "--out", str(out), "--device", "cuda", *extra]


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return ((value.float() - reference.float()).norm() / reference.float().norm()).item()


def one_step_update(dtype: torch.dtype, batch) -> tuple[float, dict[str, torch.Tensor]]:
    """The loss and the A/B update of one train_step (SGD with lr 1: update = -gradient) on gpt2-shaped random
    weights with random adapters, in `dtype`. fp16 goes through a GradScaler, as in train.py."""
    torch.manual_seed(0)
    model = build_model("gpt2", "random", 0, 0.0, SEED_LORA, CUDA, dtype)
    with torch.no_grad():
        for layer in lora_layers(model):  # random B: B = 0 would give A no gradient
            layer.lora_B.copy_(torch.randn_like(layer.lora_B) * 0.02)
    before = {k: v.clone() for k, v in model.named_parameters() if v.requires_grad}
    sgd = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    # A modest initial scale: the default 65536 overflows on a first step and skips it, by design.
    scaler = torch.amp.GradScaler("cuda", init_scale=1024) if dtype == torch.float16 else None
    loss = train_step(model, [batch], sgd, scaler, dtype, clip=1e9, device=CUDA)
    n_targets = len(batch.targets)
    updates = {k: before[k] - p.detach() for k, p in model.named_parameters() if p.requires_grad}
    return loss.item() / n_targets, updates


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_step_matches_fp32(dtype, short_dev_file):
    sequences, _ = training_sequences(load_squad_file(short_dev_file), 1024, True, "all", seed=0)
    batch = collate(sequences)
    loss32, update32 = one_step_update(torch.float32, batch)
    loss16, update16 = one_step_update(dtype, batch)
    assert abs(loss16 - loss32) / loss32 < 1e-2
    errors = {k: relative_error(update16[k], update32[k]) for k in update32}
    assert max(errors.values()) < 3e-2, sorted(errors.items(), key=lambda kv: -kv[1])[:3]



def test_training_step_never_makes_the_cpu_wait(short_dev_file):
    """The README's "no per-step host sync": CUDA's sync debug mode raises at any call in the step that would make
    the CPU wait for the GPU (a .item(), a tensor built from a Python number on the GPU, a blocking copy)."""
    sequences, _ = training_sequences(load_squad_file(short_dev_file), 1024, True, "all", seed=0)
    model = build_model("gpt2-tiny", "random", 0, 0.1, SEED_LORA, CUDA, torch.bfloat16)
    optimizer = make_optimizer(model, 1e-3, (0.9, 0.999), 1e-8, 0.0, CUDA)
    steps = [[collate(sequences[:4]), collate(sequences[4:8])]] * 2
    train_step(model, steps[0], optimizer, None, torch.bfloat16, 1.0, CUDA)  # first call: allocations, state
    torch.cuda.set_sync_debug_mode("error")
    try:
        train_step(model, steps[1], optimizer, None, torch.bfloat16, 1.0, CUDA)
    finally:
        torch.cuda.set_sync_debug_mode("default")

def test_head_cross_entropy_in_bf16_matches_fp32_cross_entropy():
    torch.manual_seed(0)
    hidden = torch.randn(4096, 768, device=CUDA)
    weight = (torch.randn(50257, 768, device=CUDA) * 0.05).to(torch.bfloat16)  # the frozen bf16 head
    targets = torch.randint(0, 50257, (4096,), device=CUDA)
    ours_hidden = hidden.to(torch.bfloat16).requires_grad_()
    ours = head_cross_entropy(ours_hidden, weight, targets)
    ours.backward()
    reference_hidden = hidden.to(torch.bfloat16).float().requires_grad_()  # same inputs, fp32 from there on
    reference = F.cross_entropy(reference_hidden @ weight.float().T, targets, reduction="sum")
    reference.backward()
    assert abs(ours.item() - reference.item()) / reference.item() < 1e-2
    assert relative_error(ours_hidden.grad, reference_hidden.grad) < 3e-2


@pytest.fixture(scope="module")
def learned_runs(short_dev_file, tmp_path_factory):
    """The 16-question learning test of test_train.py, on the GPU, in bf16 and in fp16: {precision: run dir}."""
    runs = {}
    for precision in ("bf16", "fp16"):
        run = tmp_path_factory.mktemp(f"learn_{precision}")
        train.main(tiny_args(short_dev_file, run, "--precision", precision, "--rank", "16", "--alpha", "32",
                             "--lora-dropout", "0", "--base-dropout", "0", "--lr", "1e-2", "--warmup-steps", "0",
                             "--max-steps", "300", "--micro-batch-size", "16", "--grad-accum", "1", "--loss-on",
                             "answer", "--eval-every", "100", "--log-every", "100"))
        runs[precision] = run
    return runs


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_lora_learns_to_answer_on_the_gpu(precision, learned_runs, short_dev_file):
    run = learned_runs[precision]
    assert json.loads((run / "config.json").read_text())["precision"] == precision
    assert load_adapter(run / "checkpoint.pt")["precision"] == precision
    evaluate.main(["--checkpoint", str(run), "--eval-file", str(short_dev_file), "--precision", precision,
                   "--out", str(run / "metrics.m.json")])
    metrics = json.loads((run / "metrics.m.json").read_text())
    assert metrics["exact"] == 100.0 and metrics["total"] == 16


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_answers_batched_equal_one_by_one_and_fp32(precision, learned_runs, short_dev_file):
    checkpoint = str(learned_runs[precision])
    questions = load_squad_file(short_dev_file)
    half = load_answerer(checkpoint, None, CUDA, {"bf16": torch.bfloat16, "fp16": torch.float16}[precision])
    batched = answer(half, questions, batch_size=16, max_new_tokens=24, progress=False)
    assert batched == [answer(half, [q], 1, 24, progress=False)[0] for q in questions]
    full = load_answerer(checkpoint, None, CUDA, torch.float32)
    assert batched == answer(full, questions, batch_size=16, max_new_tokens=24, progress=False)


def test_cuda_graph_decoding_equals_full_recomputation(tiny_hub_dir):
    """generate() replays each decoding step as a CUDA graph: batched, it must give the tokens that recomputing
    the whole sequence for every new token gives (fp32, so no rounding differences between the two)."""
    model = load_model(str(tiny_hub_dir)).to(CUDA).eval()
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 50256, (n,), generator=g).tolist() for n in (3, 40, 17)]
    batched = generate(model, prompts, max_new_tokens=12, eos_id=-1)
    for prompt, new in zip(prompts, batched):
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(12):
                ids.append(model(torch.tensor([ids], device=CUDA))[0, -1].argmax().item())
        assert new == ids[len(prompt):]


def losses(run) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "loss" in r]


def test_compile_gives_the_eager_losses(short_dev_file, tmp_path):
    common = ["--lora-dropout", "0", "--base-dropout", "0", "--max-steps", "5", "--log-every", "1", "--lr", "1e-3",
              "--warmup-steps", "0", "--micro-batch-size", "4", "--grad-accum", "2"]
    train.main(tiny_args(short_dev_file, tmp_path / "eager", *common))
    train.main(tiny_args(short_dev_file, tmp_path / "compiled", *common, "--compile"))
    eager, compiled = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert len(eager) == len(compiled) == 5
    assert compiled == pytest.approx(eager, rel=1e-2)  # bf16: the fused kernels round differently


def test_torchrun_nccl_one_process_equals_plain_run(short_dev_file, tmp_path):
    common = ["--lora-dropout", "0", "--base-dropout", "0", "--max-steps", "3", "--lr", "1e-3", "--warmup-steps", "0",
              "--micro-batch-size", "4", "--grad-accum", "2"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "train.py"]
    ddp = subprocess.run(torchrun + tiny_args(short_dev_file, tmp_path / "ddp", *common), cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert json.loads((tmp_path / "ddp" / "config.json").read_text())["world_size"] == 1
    train.main(tiny_args(short_dev_file, tmp_path / "plain", *common))
    nccl = load_adapter(tmp_path / "ddp" / "checkpoint.pt")["adapter"]
    plain = load_adapter(tmp_path / "plain" / "checkpoint.pt")["adapter"]
    for key in plain:
        torch.testing.assert_close(nccl[key], plain[key], rtol=1e-4, atol=1e-6)


def test_resume_on_the_gpu_is_bit_exact(short_dev_file, tmp_path):
    """Dropout on, so the CUDA random state must be restored too. Bit-exact: every kernel on this path is
    deterministic for a fixed shape (matmuls, flash attention's forward and backward, and the loss's index_select,
    whose backward scatters to distinct positions)."""
    common = ["--micro-batch-size", "4", "--grad-accum", "2", "--save-every", "3", "--warmup-steps", "2"]
    train.main(tiny_args(short_dev_file, tmp_path / "straight", *common, "--max-steps", "6"))
    train.main(tiny_args(short_dev_file, tmp_path / "resumed", *common, "--max-steps", "3"))
    train.main(tiny_args(short_dev_file, tmp_path / "resumed", *common, "--max-steps", "6", "--resume"))
    straight = load_adapter(tmp_path / "straight" / "checkpoint.pt")["adapter"]
    resumed = load_adapter(tmp_path / "resumed" / "checkpoint.pt")["adapter"]
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_answers_while_training_on_the_gpu(short_dev_file, tmp_path):
    """--eval-answers on by default on a GPU: the unmerged adapter answers under bf16 autocast, through the CUDA-graph
    decoder, and best/ keeps the best adapter."""
    train.main(tiny_args(short_dev_file, tmp_path, "--max-steps", "4", "--eval-every", "2", "--micro-batch-size", "4",
                         "--grad-accum", "1"))
    assert json.loads((tmp_path / "config.json").read_text())["eval_answers"] == 16  # all 16: fewer than 200
    evals = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines() if "eval_loss" in line]
    assert len(evals) == 2 and all(0 <= r["f1"] <= 100 and 0 <= r["abstained"] <= 1 for r in evals)
    best = json.loads((tmp_path / "best" / "metrics.json").read_text())
    assert best["f1"] == max(r["f1"] for r in evals)
    assert load_adapter(tmp_path / "best" / "checkpoint.pt")["step"] == best["step"]
