"""Speed and memory of training and answering, measured on the current device with random weights.

    python bench.py --model gpt2-tiny --device cpu                       # seconds on a CPU
    python bench.py --model gpt2 --batch-size 16 --seq-len 512 --rank 4  # compare: ../shared/anchors/hf_peft_bench.py
    python bench.py --model gpt2 --data dev-v2.0.json --batch-size 5 --grad-accum 10 --answers 11873
                                                       # real SQuAD lengths, train.py's batching, the whole dev set

(a) training: train.py's own model setup and train_step (forward, backward, clipping, AdamW on A and B), on
random tokens of --batch-size x --seq-len, or with --data on real SQuAD sequences batched as train.py does;
(b) answering: evaluate.py's batched greedy decoding (merged adapter, KV cache), up to --max-new-tokens tokens
per answer, on random 150-250-token prompts or the real dev prompts. Warm-up steps are not timed; CUDA work is
timed with synchronisation. Each phase prints its JSON line as soon as it is measured ("phase": training,
profile, padding, answering); a failing phase prints its error there and the others still run. A table last.
"""
from finetune.signals import install_error_handling

install_error_handling()  # first: a UserError prints one line, and Ctrl-C during the slow imports below too
import argparse
import json
import os
import time
import traceback
from dataclasses import dataclass

import torch

from data.batching import Batch, collate, training_steps
from data.prompts import training_sequences
from data.squad import load_squad_file
from finetune.answer import answer
from finetune.cli import at_least, given_flags, resolve_device
from finetune.model import build_model
from finetune.multi import shared_copy
from finetune.precision import PRECISIONS, grad_scaler, precision_name, resolve_precision
from finetune.step import make_optimizer, train_step
from gpt2 import GPT, UserError, generate, load_model
from lora import LoRAConfig, LoRAError, apply_lora, lora_layers, merge_lora
from lora.multi import adapter_per_row, apply_multi_lora
from lora.quant import MODES, weight_bytes

# train.py's defaults, which the bench times: the seed's LoRA targets and dropouts, AdamW, clipping.
SEED_TARGETS, LORA_DROPOUT, BASE_DROPOUT, CLIP, MAX_LEN = ("c_attn", "c_proj", "c_fc"), 0.2, 0.1, 1.0, 1024

# Dense bf16 tensor-core peaks from the vendors' spec sheets (fp16 for GPUs without bf16), in FLOP/s. MFU is
# reported against the entry whose name appears in the device name, or not at all.
PEAK_FLOPS = {"H200": 989e12, "H100 SXM": 989e12, "H100 NVL": 835e12, "H100 PCIe": 756e12, "H100": 989e12,
              "GH200": 989e12, "B200": 2250e12, "A100": 312e12, "A10G": 70e12, "A10": 125e12, "L40S": 362e12,
              "L4": 121e12, "RTX 4090": 165e12, "RTX 3090": 71e12, "V100": 125e12, "T4": 65e12}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt2", help="gpt2 | gpt2-medium | gpt2-large | gpt2-xl | gpt2-tiny (shapes)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto", help="as train.py's (auto: bf16 on GPU)")
    p.add_argument("--quantize", choices=MODES, default="none", help="as train.py's: an int8 or nf4 frozen base")
    p.add_argument("--batch-size", type=at_least(1), default=16)
    p.add_argument("--seq-len", type=at_least(2), default=512, help="tokens per random sequence (not with --data)")
    p.add_argument("--rank", type=at_least(1), default=4, help="LoRA rank (alpha = 2 x rank, like the seed and the "
                   "anchor)")
    p.add_argument("--data", help="official-format SQuAD JSON: real sequences and prompts instead of random tokens")
    p.add_argument("--grad-accum", type=at_least(1), default=1, help="micro-batches per step; with --data, lengths "
                   "are grouped within a step, as in train.py (whose default is 10)")
    p.add_argument("--micro-batch-split", type=at_least(1), default=1, metavar="K", help="as train.py's: each "
                   "micro-batch cut into K where padding is least (with --data)")
    p.add_argument("--count-padding", type=at_least(1), metavar="STEPS", help="with --data: also count real and "
                   "padded tokens over this many steps of train.py's batching, without a model (the seed's: 1200)")
    p.add_argument("--steps", type=at_least(1), help="timed training steps (default: 20 on GPU, 1 on CPU)")
    p.add_argument("--warmup", type=at_least(0), help="untimed steps first (default: 5 on GPU, 1 on CPU)")
    p.add_argument("--compile", action="store_true", help="train through torch.compile, as train.py --compile")
    p.add_argument("--profile", action="store_true", help="also print where a few training steps spend their time "
                   "(torch.profiler, the top kernels)")
    p.add_argument("--answers", type=at_least(0), help="questions to answer (default: 512 on GPU, 32 on CPU; 0: skip)")
    p.add_argument("--answer-batch-size", type=at_least(1), default=256)
    p.add_argument("--max-new-tokens", type=at_least(1), default=32, help="at most 774: random prompts are up to 250 "
                   "tokens, in a 1024-token context")
    p.add_argument("--mixed-adapters", type=at_least(1), nargs="+", metavar="N", help="also answer with N adapters "
                   "mixed in one batch against one adapter at a time (serve.py's batching), for each N given, "
                   "e.g. 1 4 16")
    args = p.parse_args(argv)
    given = given_flags(p, argv, args)
    if args.seq_len > MAX_LEN:
        p.error(f"--seq-len cannot exceed GPT-2's {MAX_LEN}-token context")
    if args.max_new_tokens > MAX_LEN - 250:
        p.error(f"--max-new-tokens {args.max_new_tokens}: the prompts (up to 250 tokens) and the answers must fit "
                f"the {MAX_LEN}-token context; give at most {MAX_LEN - 250}")
    if args.data and not os.path.isfile(args.data):
        p.error(f"no file at --data {args.data}: give an official-format SQuAD JSON file")
    if args.data and "seq_len" in given:
        p.error("--seq-len is for random tokens: with --data the lengths are SQuAD's; drop one")
    for flag in ("micro_batch_split", "count_padding"):
        if flag in given and not args.data:
            p.error(f"--{flag.replace('_', '-')} needs --data: random sequences all have the same length")
    return args


def peak_flops(device: torch.device) -> tuple[str, float | None]:
    if device.type != "cuda":
        return "cpu", None
    name = torch.cuda.get_device_name(device)
    return name, next((flops for key, flops in PEAK_FLOPS.items() if key in name), None)


def flops_per_token(model: GPT, seq_len: int) -> float:
    """LoRA training FLOPs per token: forward 2N plus backward 2N for the input gradients only (frozen weights
    need no weight gradients: 4N instead of full fine-tuning's 6N), N = the matmul weights (all parameters but
    the position embeddings; the tied head counts once), plus attention's 12 * layers * T * C. LoRA's own
    matmuls are under 1% and left out."""
    c = model.config
    n = sum(p.numel() for p in model.parameters() if not p.requires_grad) - model.transformer.wpe.weight.numel()
    return 4 * n + 12 * c.n_layer * seq_len * c.n_embd


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def lora_config(rank: int) -> LoRAConfig:
    return LoRAConfig(rank=rank, alpha=2 * rank, dropout=LORA_DROPOUT, targets=SEED_TARGETS)


@dataclass
class TrainingSetup:
    """What the training and profile phases share: train.py's model, optimizer and steps."""
    model: GPT
    step_model: torch.nn.Module  # the model, or its torch.compile wrapper
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    steps: list[list[Batch]]


def set_up_training(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> TrainingSetup:
    model = build_model(args.model, "random", 0, BASE_DROPOUT, lora_config(args.rank), device, dtype,
                        args.quantize).train()
    optimizer = make_optimizer(model, 5e-5, (0.9, 0.999), 1e-8, 0.0, device)
    if args.compile and args.quantize != "none":  # as train.py: keep only the quantized weights saved
        torch._functorch.config.cse = False
    step_model = torch.compile(model) if args.compile else model
    if args.data:
        steps = training_steps(squad_sequences(args.data), args.batch_size, args.grad_accum, seed=0,
                               split=args.micro_batch_split)
        batches = [next(steps) for _ in range(args.warmup + args.steps)]
    else:
        g = torch.Generator().manual_seed(0)
        batches = [[collate([(torch.randint(0, 50257, (args.seq_len,), generator=g).tolist(), 0)
                             for _ in range(args.batch_size)]) for _ in range(args.grad_accum)]
                   for _ in range(args.warmup + args.steps)]
    return TrainingSetup(model, step_model, optimizer, grad_scaler(dtype), batches)


def squad_sequences(path: str) -> list[tuple[list[int], int]]:
    return training_sequences(load_squad_file(path), MAX_LEN, True, "all", seed=0)[0]


def bench_training(args: argparse.Namespace, run: TrainingSetup, device: torch.device, dtype: torch.dtype) -> dict:
    """Tokens per second over the timed steps, and how many times torch.compile compiled the model: once per
    new shape it meets (with --data the sequence lengths vary), so the count shows whether it recompiles."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    compiles_before = compiled_graphs()
    for i, micro_batches in enumerate(run.steps):
        if i == args.warmup:
            synchronize(device)
            start = time.perf_counter()
        train_step(run.step_model, micro_batches, run.optimizer, run.scaler, dtype, CLIP, device)
    synchronize(device)
    seconds = time.perf_counter() - start
    timed = [b for step in run.steps[args.warmup:] for b in step]
    tokens = sum(b.n_real for b in timed)
    mean_len = sum(b.input_ids.shape[1] for b in timed) / len(timed)
    device_name, peak = peak_flops(device)
    tokens_per_s = tokens / seconds
    return {"device": device_name, "model": args.model, "precision": precision_name(dtype),
            "batch_size": args.batch_size, "grad_accum": args.grad_accum, "micro_batch_split": args.micro_batch_split,
            "seq_len": round(mean_len), "rank": args.rank, "compile": args.compile, "quantize": args.quantize,
            "base_MB": {part: round(n / 1e6, 1) for part, n in weight_bytes(run.model).items()},
            "data": "squad" if args.data else "random", "tokens_per_s": round(tokens_per_s),
            "ms_per_step": round(1e3 * seconds / args.steps, 2),
            "padding": round(1 - tokens / sum(b.n_padded for b in timed), 4),
            "compiled_graphs": compiled_graphs() - compiles_before if args.compile else None,
            "mfu": round(tokens_per_s * flops_per_token(run.model, round(mean_len)) / peak, 4) if peak else None,
            "peak_GB": round(torch.cuda.max_memory_allocated(device) / 1e9, 2) if device.type == "cuda" else None}


def compiled_graphs() -> int:
    """Graphs torch.compile has compiled in this process so far (the first compilation and every recompilation)."""
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"]


def count_padding(args: argparse.Namespace) -> dict:
    """Real and padded tokens over --count-padding steps of train.py's batching: what a run's compute goes to."""
    steps = training_steps(squad_sequences(args.data), args.batch_size, args.grad_accum, seed=0,
                           split=args.micro_batch_split)
    real = padded = 0
    for _ in range(args.count_padding):
        micro_batches = next(steps)
        real += sum(b.n_real for b in micro_batches)
        padded += sum(b.n_padded for b in micro_batches)
    return {"steps": args.count_padding, "batch_size": args.batch_size, "grad_accum": args.grad_accum,
            "micro_batch_split": args.micro_batch_split, "real_tokens": real, "padded_tokens": padded,
            "padding": round(1 - real / padded, 4)}


def profile_steps(run: TrainingSetup, dtype: torch.dtype, device: torch.device) -> dict:
    """Where a few training steps (after the timed ones) spend their time: the table of the top operations, and
    the top ten as shares of the total in the JSON line."""
    from torch.profiler import ProfilerActivity, profile
    on_gpu = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * on_gpu) as prof:
        for micro_batches in run.steps[:3]:
            train_step(run.step_model, micro_batches, run.optimizer, run.scaler, dtype, CLIP, device)
        synchronize(device)
    sort_by = "self_cuda_time_total" if on_gpu else "self_cpu_time_total"
    events = prof.key_averages()
    print(events.table(sort_by=sort_by, row_limit=25))
    self_us = {e.key: getattr(e, sort_by) for e in events}
    total = sum(self_us.values())
    top = sorted(self_us.items(), key=lambda kv: -kv[1])[:10]
    return {"profiled_steps": len(run.steps[:3]), "clock": "cuda" if on_gpu else "cpu",
            "profiled_ms_per_step": round(total / 1e3 / len(run.steps[:3]), 2),
            "top_self_time": {name: round(us / total, 3) for name, us in top}}


def bench_answering(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict:
    """Answers per second of evaluate.py's path: base + merged adapter in half precision, batched KV-cache decoding."""
    model = build_model(args.model, "random", 0, 0.0, lora_config(args.rank), torch.device("cpu"), dtype,
                        args.quantize)
    merge_lora(model)
    model = model.to(device, dtype).eval()
    if args.data:
        examples = load_squad_file(args.data)[:args.answers]
        n_prompts = len(examples)

        def run():
            answer(model, examples, args.answer_batch_size, args.max_new_tokens, progress=False)
    else:
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(0, 50256, (int(n),), generator=g).tolist()
                   for n in torch.randint(150, 250, (args.answers,), generator=g)]
        prompts.sort(key=len, reverse=True)  # as evaluate.py batches them
        n_prompts = len(prompts)

        def run():  # random weights rarely say EOS: every answer is max_new_tokens long, like the anchor's
            for i in range(0, len(prompts), args.answer_batch_size):
                generate(model, prompts[i:i + args.answer_batch_size], args.max_new_tokens)
    run()  # warm-up: kernels, allocator
    synchronize(device)
    start = time.perf_counter()
    run()
    synchronize(device)
    seconds = time.perf_counter() - start
    return {"answers": n_prompts, "answers_per_s": round(n_prompts / seconds, 1), "answer_seconds": round(seconds, 2),
            "max_new_tokens": args.max_new_tokens, "answer_batch_size": args.answer_batch_size}


def measured(phase: str, measure) -> dict:
    """One phase's JSON line, printed as soon as it is measured; a failing phase prints its error (and its
    traceback on stderr) instead, so the phases before and after it keep their figures."""
    try:
        result = {"phase": phase, **measure()}
    except Exception as e:  # noqa: BLE001  any failure of one phase: report it, measure the next
        if not isinstance(e, (UserError, LoRAError)):  # a bug or the device's limit: its traceback, for the log
            traceback.print_exc()
        result = {"phase": phase, "error": f"{type(e).__name__}: {e}"}
    print(json.dumps(result), flush=True)
    return result


def bench_mixed_adapters(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict:
    """Answers/s of serve.py's path (lora/multi.py: the base unmerged, each row its own adapter) with N random
    adapters, for each N of --mixed-adapters: the same --answers questions, spread evenly over the adapters, answered
    (a) mixed: batches of --answer-batch-size rows whatever their adapter; (b) one adapter at a time: each
    adapter's questions in batches of their own, as a server without mixed batching must. Both must give the same
    tokens (`same_answers`)."""
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 50256, (int(n),), generator=g).tolist()
               for n in torch.randint(150, 250, (args.answers,), generator=g)]
    longest_first = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # as evaluate.py batches them
    results = []
    for n in args.mixed_adapters:
        base = load_model(args.model, "random", seed=0)
        adapted = [shared_copy(base) for _ in range(n)]
        for copy in adapted:
            apply_lora(copy, lora_config(args.rank))
            for layer in lora_layers(copy):  # a trained B is not 0: random ones, so each adapter answers its own way
                layer.lora_B.data = torch.randn(layer.lora_B.shape, generator=g) * 0.1
        model = apply_multi_lora(base, adapted).to(device, dtype).eval()
        adapter_of = [i % n for i in range(len(prompts))]

        def answer_in_batches(questions: list[int]) -> dict[int, list[int]]:
            answers = {}
            for start in range(0, len(questions), args.answer_batch_size):
                batch = questions[start:start + args.answer_batch_size]
                with adapter_per_row(model, torch.tensor([adapter_of[i] for i in batch], device=device)):
                    answers |= zip(batch, generate(model, [prompts[i] for i in batch], args.max_new_tokens))
            return answers

        def one_adapter_at_a_time() -> dict[int, list[int]]:
            answers = {}
            for a in range(n):
                answers |= answer_in_batches([i for i in longest_first if adapter_of[i] == a])
            return answers

        speeds, answers = {}, {}
        for name, run in (("mixed", lambda: answer_in_batches(longest_first)),
                          ("one_adapter_at_a_time", one_adapter_at_a_time)):
            run()  # warm-up
            synchronize(device)
            start = time.perf_counter()
            answers[name] = run()
            synchronize(device)
            speeds[name] = round(len(prompts) / (time.perf_counter() - start), 1)
        results.append({"adapters": n, "mixed_answers_per_s": speeds["mixed"],
                        "one_adapter_at_a_time_answers_per_s": speeds["one_adapter_at_a_time"],
                        "same_answers": answers["mixed"] == answers["one_adapter_at_a_time"]})
    return {"mixed_adapters": results}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = resolve_device(args.device)
    on_gpu = device.type == "cuda"
    args.steps = args.steps if args.steps is not None else (20 if on_gpu else 1)
    args.warmup = args.warmup if args.warmup is not None else (5 if on_gpu else 1)
    args.answers = args.answers if args.answers is not None else (512 if on_gpu else 32)
    dtype = resolve_precision(args.precision, device)
    phases = {}

    def training():
        run = set_up_training(args, device, dtype)
        result = bench_training(args, run, device, dtype)
        phases["setup"] = run
        return result

    def profile():
        if "setup" not in phases:
            raise RuntimeError("nothing to profile: the training phase failed")
        return profile_steps(phases.pop("setup"), dtype, device)

    results = [measured("training", training)]
    if args.profile:
        results.append(measured("profile", profile))
    phases.clear()  # free the training model before answering (gpt2-xl shapes)
    if args.count_padding:
        results.append(measured("padding", lambda: count_padding(args)))
    if args.answers:
        results.append(measured("answering", lambda: bench_answering(args, device, dtype)))
    if args.answers and args.mixed_adapters:
        results.append(measured("mixed_adapters", lambda: bench_mixed_adapters(args, device, dtype)))
    table = {k: v for r in results for k, v in r.items() if k not in ("phase", "top_self_time")}
    width = max(len(k) for k in table)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in table.items()))
    failed = [r["phase"] for r in results if "error" in r]
    if failed:
        raise SystemExit(f"error: the {', '.join(failed)} phase(s) failed; the others' figures are above")


if __name__ == "__main__":
    main()
