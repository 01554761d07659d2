"""Fine-tune GPT-2 with LoRA on SQuAD 2.0 question answering.

With no flags this is the seed notebook's recipe (gpt2, r=4, alpha=8, 1200 steps of 50 sequences) on the
Hub's data and weights:

    python train.py
    python train.py --data-dir squad/ --out runs/qa             # local train-v2.0.json / dev-v2.0.json
    python train.py --model gpt2-tiny --init random --train-file dev-v2.0.json --eval-file dev-v2.0.json \
        --max-steps 20 --warmup-steps 2 --lr 1e-2 ...             # a CPU smoke run: README.md has it whole
    torchrun --nproc_per_node=4 train.py ...                    # data parallel over 4 GPUs

Writes to --out: config.json (the effective settings), log.jsonl (every logged step and evaluation),
checkpoint.pt (adapter, settings and training state), which evaluate.py scores and --resume continues,
adapter/ (the same adapter in PEFT's format, for transformers + PEFT users) and, with --eval-answers, best/ (the
adapter of the best eval F1 so far). `python train.py --out RUN --resume` needs no other flag: it reads the run's
settings. --out must be new, empty, or a run directory. Ctrl-C or SIGTERM saves a checkpoint and exits; a second
one quits at once.
"""
import finetune.signals  # noqa: F401  first: Ctrl-C during the slow imports below quits without a traceback
import argparse
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from data.batching import training_steps
from data.prompts import LOSS_ON, training_sequences
from data.squad import examples_fingerprint, load_split
from finetune.adapters import ADAPTER_DIR, save_peft_adapter
from finetune.cli import at_least, given_flags, non_negative, positive, probability, resolve_device
from finetune.inputs import check_inputs
from finetune.model import build_model
from finetune.precision import PRECISIONS, grad_scaler, precision_name, resolve_precision
from finetune.quality import BEST, answer_quality, best_f1, describe, fixed_subset, save_best
from finetune.report import run_summary, settings_table, warmup_warning
from finetune.resume import schedule_change, stale_metrics
from finetune.signals import EXIT_CODE, StopRequest
from finetune.state import (ADAPTER_LIMIT, CHECKPOINT, check_adapter_sound, check_out_dir, check_same_content,
                            check_training_state, forget_log_after, restore, resumed_args, rng_state)
from finetune.step import eval_loss, learning_rate, make_optimizer, train_step
from gpt2 import UserError
from gpt2.files import atomic_write
from lora import INITS, LoRAConfig, VALID_TARGETS, load_adapter, parameter_report, save_adapter
from lora.quant import MODES

EVAL_ANSWERS_ON_GPU = 200  # --eval-answers' default on a GPU: seconds per evaluation; on a CPU, 0


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, set[str]]:
    """The settings, and which of them were written on the command line (--resume keeps the run's for the rest)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model", default="gpt2", help="gpt2 | gpt2-medium | gpt2-large | gpt2-xl, a directory holding "
                   "model.safetensors, or (with --init random) gpt2-tiny")
    g.add_argument("--init", choices=("pretrained", "random"), default="pretrained",
                   help="random: the architecture with GPT-2's random initialisation (offline runs, benchmarks)")
    g.add_argument("--base-dropout", type=probability, default=0.1,
                   help="dropout inside the frozen model while training (transformers' GPT-2 default, as the seed)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (GPU; slower start)")
    g.add_argument("--quantize", choices=MODES, default="none",
                   help="store the frozen block projections in int8 (row-wise absmax, like the seed's 8-bit GPT-2) "
                   "or QLoRA's 4-bit NF4 (lora/quant.py); embeddings, the tied head and LayerNorms stay as they are")
    g.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="auto: bf16 on GPUs that have it, else fp16 with loss scaling; fp32 on a CPU")
    g = p.add_argument_group("LoRA")
    g.add_argument("--rank", type=at_least(1), default=4)
    g.add_argument("--alpha", type=positive, default=8.0)
    g.add_argument("--lora-dropout", type=probability, default=0.2)
    g.add_argument("--targets", nargs="+", default=["c_attn", "c_proj", "c_fc"], metavar="NAME", choices=VALID_TARGETS,
                   help=f"projections to adapt: {', '.join(VALID_TARGETS)}")
    g.add_argument("--qkv", default="", help="adapt only these parts of c_attn, each with its own A and B (e.g. qv)")
    g.add_argument("--rslora", action="store_true", help="rank-stabilised scaling alpha / sqrt(rank)")
    g.add_argument("--dora", action="store_true",
                   help="DoRA: also train each output row's magnitude (Liu et al., 2024; lora/dora.py)")
    g.add_argument("--lora-init", choices=INITS, default="default",
                   help="pissa: start A, B from W's top-r singular vectors, W -> the residual (Meng et al., 2024)")
    g.add_argument("--loraplus-ratio", type=positive, metavar="λ",
                   help="LoRA+: B's learning rate is λ times A's (Hayou et al., 2024; e.g. 16)")
    g = p.add_argument_group("data")
    g.add_argument("--data-dir", help="directory holding train-v2.0.json and dev-v2.0.json (default: the Hub)")
    g.add_argument("--train-file", help="official-format SQuAD 2.0 JSON to train on")
    g.add_argument("--eval-file", help="official-format SQuAD 2.0 JSON for the eval loss")
    g.add_argument("--max-len", type=at_least(1), default=1024, help="tokens per sequence; the context is shortened to fit")
    g.add_argument("--loss-on", choices=LOSS_ON, default="all",
                   help="all: every token, like the seed; answer: only the answer and EOS")
    g.add_argument("--no-eos", action="store_true", help="no EOS after the answer (the seed's model never stops)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=positive, default=5e-5)
    g.add_argument("--weight-decay", type=non_negative, default=0.0)
    g.add_argument("--betas", type=probability, nargs=2, default=[0.9, 0.999])
    g.add_argument("--eps", type=positive, default=1e-8)
    g.add_argument("--warmup-steps", type=at_least(0), default=100)
    length = g.add_mutually_exclusive_group()
    length.add_argument("--max-steps", type=at_least(1), default=1200, help="optimizer steps (default 1200, the "
                        "seed's)")
    length.add_argument("--epochs", type=positive, help="train this many passes over the data instead")
    g.add_argument("--micro-batch-size", type=at_least(1), default=5, help="sequences per forward pass (per GPU)")
    g.add_argument("--grad-accum", type=at_least(1), default=10, help="micro-batches per optimizer step")
    g.add_argument("--clip", type=positive, default=1.0, help="gradient norm clipping")
    g.add_argument("--seed", type=at_least(0), default=42)
    g = p.add_argument_group("evaluation, logging and checkpoints")
    g.add_argument("--eval-every", type=at_least(1), default=200, help="steps between eval-loss measurements")
    g.add_argument("--eval-examples", type=at_least(1), help="eval loss on this many eval questions (default: all)")
    g.add_argument("--eval-answers", type=at_least(0), metavar="N", help="also answer this many eval questions (a "
                   f"fixed random set) at each evaluation: EM, F1, abstentions, and best/ (default: "
                   f"{EVAL_ANSWERS_ON_GPU} on a GPU, 0 on a CPU)")
    g.add_argument("--eval-batch-size", type=at_least(1), default=32)
    g.add_argument("--save-every", type=at_least(1), default=200, help="steps between checkpoints")
    g.add_argument("--log-every", type=at_least(1), default=10, help="steps between log.jsonl lines")
    g.add_argument("--out", default="runs/gpt2-lora", help="run directory: new, empty, or a run to --resume")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint, with its "
                   "settings; flags given replace them (--max-steps, --lr, ...) unless they would change the run")
    g.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    args = p.parse_args(argv)
    if args.quantize != "none" and (args.dora or args.lora_init == "pissa"):
        p.error("--quantize takes plain LoRA: DoRA's weight norm and PiSSA's residual need the dense weight")
    if args.max_len > 1024:
        p.error("--max-len cannot exceed GPT-2's 1024-token context")
    if args.qkv and (set(args.qkv) - set("qkv") or len(set(args.qkv)) != len(args.qkv)):
        p.error(f"--qkv {args.qkv!r}: use some of the letters q, k, v once each, e.g. qv")
    if args.data_dir and args.train_file and args.eval_file:
        p.error("--data-dir is unused when --train-file and --eval-file are both given: drop one")
    return args, given_flags(p, argv, args)


def lora_config_from(args: argparse.Namespace) -> LoRAConfig:
    return LoRAConfig(rank=args.rank, alpha=args.alpha, dropout=args.lora_dropout, targets=tuple(args.targets),
                      qkv=args.qkv, rank_stabilized=args.rslora, dora=args.dora, init=args.lora_init)


def prepare_data(args: argparse.Namespace) -> tuple[list, int, list, list, str]:
    """Training sequences, how many examples were too long to keep, the eval-loss sequences (a fixed random subset
    with --eval-examples, the same at every evaluation), all the eval questions, and the training data's
    fingerprint."""
    train_examples = load_split("train", args.data_dir, args.train_file)
    eval_examples = load_split("eval", args.data_dir, args.eval_file)
    encode = dict(max_len=args.max_len, add_eos=not args.no_eos, loss_on=args.loss_on, seed=args.seed)
    train_sequences, skipped = training_sequences(train_examples, **encode)
    eval_sequences, _ = training_sequences(fixed_subset(eval_examples, args.eval_examples), **encode)
    for name, sequences, examples in (("training", train_sequences, train_examples),
                                      ("eval", eval_sequences, eval_examples)):
        if not sequences:
            raise UserError(f"none of the {len(examples)} {name} questions fits --max-len {args.max_len} tokens, even "
                            f"with its context cut away: raise --max-len")
    return train_sequences, skipped, eval_sequences, eval_examples, examples_fingerprint(train_examples)


def setup_distributed(args: argparse.Namespace) -> tuple[int, int, torch.device]:
    """(rank, world size, device). Under torchrun: one process per GPU (NCCL), or per CPU process (gloo)."""
    if "RANK" not in os.environ:
        return 0, 1, resolve_device(args.device)
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available() and args.device != "cpu":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), device


def main(argv: list[str] | None = None) -> None:
    args, given = parse_args(argv)
    out = Path(args.out)
    checkpoint_path = out / CHECKPOINT
    check_out_dir(out, args.resume)  # before anything is loaded: a foreign or unwritable folder fails at once
    if args.resume:
        checkpoint = load_adapter(checkpoint_path)
        check_training_state(checkpoint, checkpoint_path)
        args = resumed_args(checkpoint, args, given, checkpoint_path)
    check_inputs(args)  # data, tokenizer, weights: all that are missing named at once, before anything loads
    rank, world, device = setup_distributed(args)
    main_process = rank == 0
    dtype = resolve_precision(args.precision, device)

    train_sequences, skipped, eval_sequences, eval_examples, data_fingerprint = prepare_data(args)
    eval_answers = args.eval_answers if args.eval_answers is not None else \
        EVAL_ANSWERS_ON_GPU if device.type == "cuda" else 0
    answer_examples = fixed_subset(eval_examples, eval_answers) if eval_answers > 0 else []
    steps_per_epoch = len(train_sequences) // (args.micro_batch_size * args.grad_accum * world)
    max_steps = round(args.epochs * steps_per_epoch) if args.epochs is not None else args.max_steps
    if max_steps < 1:
        raise UserError(f"--epochs {args.epochs} of {steps_per_epoch} steps each is less than one step: raise it")

    torch.manual_seed(args.seed)  # the same A matrices for the same seed
    model = build_model(args.model, args.init, args.seed, args.base_dropout, lora_config_from(args), device, dtype,
                        args.quantize)
    optimizer = make_optimizer(model, args.lr, tuple(args.betas), args.eps, args.weight_decay, device,
                               args.loraplus_ratio)
    scaler = grad_scaler(dtype)
    torch.manual_seed(args.seed + rank)  # dropout masks differ between GPUs
    start_step = 0
    if args.resume:
        check_same_content("training data", checkpoint.get("data_fingerprint"), data_fingerprint, checkpoint_path)
        check_same_content("base model", checkpoint["base"].get("fingerprint"), model.base_fingerprint,
                           checkpoint_path)
        start_step = restore(checkpoint, model, optimizer, scaler, device)
        if start_step >= max_steps:
            raise UserError(f"{checkpoint_path} is at step {start_step} already, and the run ends at step {max_steps}: "
                            f"to train on, resume with a larger --max-steps")
        if main_process:
            forget_log_after(out / "log.jsonl", start_step)
    else:  # left by a run that stopped before its first checkpoint
        (out / "log.jsonl").unlink(missing_ok=True)
        shutil.rmtree(out / BEST, ignore_errors=True)
    best = best_f1(out)  # the F1 to beat

    settings = {**vars(args), "max_steps": max_steps, "device": str(device), "world_size": world,
                "precision": precision_name(dtype), "train_sequences":
                len(train_sequences), "skipped_too_long": skipped, "eval_sequences": len(eval_sequences),
                "eval_answers": len(answer_examples),
                "steps_per_epoch": steps_per_epoch, "lora": asdict(lora_config_from(args)),
                "parameters": parameter_report(model)}
    stop = StopRequest()  # from here on, Ctrl-C or SIGTERM saves the run
    if main_process:
        print(settings_table(settings))
        with atomic_write(out / "config.json", "w") as f:
            json.dump(settings, f, indent=2)
        if args.resume:
            print(f"resumed from {checkpoint_path} at step {start_step} of {max_steps}")
            for note in (schedule_change(checkpoint["args"], vars(args), steps_per_epoch, start_step, max_steps),
                         stale_metrics(out, start_step)):
                if note:
                    print(note)
        warning = warmup_warning(args.warmup_steps, max_steps, args.lr)
        if warning:
            print(warning, file=sys.stderr)

    train_model = DistributedDataParallel(model) if world > 1 else model
    if args.compile:
        if args.quantize != "none":  # else the compiler saves the dense weights for backward (lora/quant.py)
            torch._functorch.config.cse = False
        train_model = torch.compile(train_model)
    base = {"model": args.model, "init": args.init, "seed": args.seed, "quantize": args.quantize,
            "config": vars(model.config), "fingerprint": model.base_fingerprint}
    last_saved = start_step if args.resume else None

    def diverged(problem: str) -> UserError:
        """Training went numerically wrong: nothing more is saved, and the last checkpoint is the way back."""
        if last_saved is None:
            return UserError(f"{problem}; nothing was saved. Start again with a lower --lr")
        return UserError(f"{problem}; not saved, so {checkpoint_path} holds step {last_saved}, the last good state. "
                         f"Continue from it with a lower learning rate: python train.py --out {out} --resume "
                         f"--lr {args.lr / 10:g}")

    def save(step: int) -> None:
        nonlocal last_saved
        states = [rng_state(device)]
        if world > 1:  # every process's random state, so that each continues its own stream
            states = [None] * world
            dist.all_gather_object(states, rng_state(device))
        if main_process:
            save_adapter(checkpoint_path, model, lora_config_from(args), base, args=vars(args), step=step,
                         precision=precision_name(dtype),
                         optimizer=optimizer.state_dict(), scaler=scaler.state_dict() if scaler else None, rng=states,
                         data_fingerprint=data_fingerprint)
            save_peft_adapter(out / ADAPTER_DIR, model, lora_config_from(args), args.model)  # for PEFT users
        last_saved = step

    def log(record: dict) -> None:
        if main_process:
            with open(out / "log.jsonl", "a") as f:
                f.write(json.dumps(record, allow_nan=False) + "\n")  # valid JSON: the NaN guards run first

    steps = training_steps(train_sequences, args.micro_batch_size, args.grad_accum, args.seed, start_step, rank, world)
    bar = tqdm(total=max_steps, initial=start_step, disable=not main_process, dynamic_ncols=True)
    model.train()
    micro_batches = next(steps)

    def new_window() -> dict:  # what the next log.jsonl line averages over; the loss stays on the device
        return {"loss": torch.zeros((), device=device), "targets": 0, "tokens": 0, "padded": 0,
                "start": time.perf_counter()}

    window = new_window()
    shown = {}  # the last eval F1, for the progress bar
    started, trained_tokens = time.perf_counter(), 0  # for the summary at the end
    for step in range(start_step, max_steps):
        lr = learning_rate(step, args.lr, args.warmup_steps, max_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_ratio", 1.0)  # LoRA+ keeps B's group at a multiple of A's
        # No .item() here: reading the loss would make the CPU wait for the GPU at every step, and the GPU would
        # then wait for the CPU to launch the next one. The loss is read only when logging and saving.
        window["loss"] += train_step(train_model, micro_batches, optimizer, scaler, dtype, args.clip, device)
        window["targets"] += sum(len(b.targets) for b in micro_batches)
        tokens = sum(b.n_real for b in micro_batches) * world
        window["tokens"] += tokens
        trained_tokens += tokens
        window["padded"] += sum(b.n_padded for b in micro_batches) * world
        if step + 1 < max_steps:
            micro_batches = next(steps)  # prepared on the CPU while the GPU works on this step
        done = step + 1
        bar.update(1)
        stopping = stop.requested
        if world > 1:
            flag = torch.tensor(float(stopping), device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stopping = bool(flag.item())
        saving = done % args.save_every == 0 or done == max_steps or stopping
        if done % args.log_every == 0 or saving:
            loss = window["loss"].item() / window["targets"]  # waits for the GPU
            if not math.isfinite(loss):
                raise diverged(f"the loss became {loss} by step {done}")
            worst = check_adapter_sound(model) if saving else None
            if worst is not None:  # the loss was measured before this step's update: check what would be saved
                raise diverged(f"by step {done} the adapter holds {worst:g} (A and B must be finite and within "
                               f"{ADAPTER_LIMIT:g}): training diverged")
            elapsed = time.perf_counter() - window["start"]
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{window['tokens'] / elapsed:,.0f}", **shown)
        if done % args.log_every == 0 or done == max_steps:
            log({"step": done, "loss": loss, "lr": lr, "tokens_per_s": window["tokens"] / elapsed,
                 "padding": 1 - window["tokens"] / window["padded"]})
            window = new_window()
        if done % args.eval_every == 0:
            value = eval_loss(model, eval_sequences, args.eval_batch_size, device, dtype)
            if not math.isfinite(value):
                raise diverged(f"the eval loss became {value} at step {done}")
            record = {"step": done, "eval_loss": value}
            if answer_examples and main_process:
                quality = answer_quality(model, answer_examples, args.eval_batch_size, device, dtype)
                record.update(quality)
                shown["f1"] = f"{quality['f1']:.1f}"
                if best is None or quality["f1"] > best:
                    best = quality["f1"]
                    save_best(out, model, lora_config_from(args), base, vars(args), done, quality)
            log(record)
            bar.write(f"step {done}: eval loss {value:.4f}" + (f", {describe(quality)}" if "f1" in record else ""))
        if saving:
            save(done)
        if stopping:
            bar.close()
            if main_process:
                print(run_summary(out, (start_step, done), time.perf_counter() - started, trained_tokens,
                                  device.type == "cpu"))
                print(f"stopped at step {done} of {max_steps}: saved {checkpoint_path}; continue with --resume")
            sys.exit(EXIT_CODE)
    bar.close()
    if main_process:
        print(run_summary(out, (start_step, max_steps), time.perf_counter() - started, trained_tokens,
                          device.type == "cpu"))
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
