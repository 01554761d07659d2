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
from finetune.signals import install_error_handling

install_error_handling()  # first: a UserError prints one line, and Ctrl-C during the slow imports below too
import contextlib
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, replace

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from data.batching import Batch, training_steps
from data.prompts import training_sequences
from data.squad import SquadExample, examples_fingerprint, load_split
from finetune.adapters import save_peft_adapter
from finetune.cli import resolve_device
from finetune.inputs import check_inputs
from finetune.model import build_model
from finetune.precision import grad_scaler, precision_name, resolve_precision
from finetune.quality import answer_quality, describe, fixed_subset, save_best
from finetune.report import run_summary, settings_table, warmup_warning
from finetune.resume import schedule_change, stale_metrics
from finetune.run import (Base, Checkpoint, Run, check_adapter_sound, read_checkpoint, rng_state,
                          save_checkpoint)
from finetune.settings import EVAL_ANSWERS_ON_GPU, Settings, parse
from finetune.signals import EXIT_CODE, StopRequest
from finetune.step import eval_loss, learning_rate, make_optimizer, train_step
from gpt2 import GPT, UserError
from lora import ADAPTER_LIMIT, parameter_report


@dataclass(frozen=True)
class Data:
    train: list  # training sequences
    skipped: int  # training examples too long to keep
    eval: list  # eval-loss sequences: a fixed random subset with --eval-examples, the same at every evaluation
    answered: list[SquadExample]  # the eval questions answered at each evaluation (--eval-answers)
    fingerprint: str  # of the training data: --resume checks it is the same


def prepare_data(settings: Settings, device: torch.device) -> Data:
    train_examples = load_split("train", settings.data_dir, settings.train_file)
    eval_examples = load_split("eval", settings.data_dir, settings.eval_file)
    encode = dict(max_len=settings.max_len, add_eos=not settings.no_eos, loss_on=settings.loss_on, seed=settings.seed)
    train_sequences, skipped = training_sequences(train_examples, **encode)
    eval_sequences, _ = training_sequences(fixed_subset(eval_examples, settings.eval_examples), **encode)
    for name, sequences, examples in (("training", train_sequences, train_examples),
                                      ("eval", eval_sequences, eval_examples)):
        if not sequences:
            raise UserError(f"none of the {len(examples)} {name} questions fits --max-len {settings.max_len} tokens, "
                            f"even with its context cut away: raise --max-len")
    answers = settings.eval_answers if settings.eval_answers is not None else \
        EVAL_ANSWERS_ON_GPU if device.type == "cuda" else 0
    return Data(train_sequences, skipped, eval_sequences, fixed_subset(eval_examples, answers) if answers else [],
                examples_fingerprint(train_examples))


def setup_distributed(settings: Settings) -> tuple[int, int, torch.device]:
    """(rank, world size, device). Under torchrun: one process per GPU (NCCL), or per CPU process (gloo)."""
    if "RANK" not in os.environ:
        return 0, 1, resolve_device(settings.device)
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available() and settings.device != "cpu":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), device


def check_same_content(what: str, recorded: str | None, now: str, path) -> None:
    """--resume: the base model or the training data must be the run's own, wherever the files now are."""
    if recorded is not None and recorded != now:
        raise UserError(f"{path} was trained on other {what} (fingerprint {recorded}, now {now}): resume with the "
                        f"{what} the run started with, or start a new run with another --out")


@dataclass(frozen=True)
class Setup:
    """Everything fit() uses, made by main()."""
    settings: Settings  # max_steps: the step the run ends at (from --epochs too)
    run: Run
    model: GPT  # the model whose adapter is saved
    train_model: torch.nn.Module  # what takes the steps: the model, wrapped by DDP and torch.compile when asked
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    base: Base
    data: Data
    device: torch.device
    dtype: torch.dtype
    rank: int
    world: int

    @property
    def main_process(self) -> bool:
        return self.rank == 0


class LogWindow:
    """What the next log.jsonl line averages over, since the last one. The loss is summed on the device and read
    only when logged: reading it at every step would make the CPU wait for the GPU, and the GPU then wait for the
    CPU to launch the next step."""

    def __init__(self, device: torch.device):
        self.loss, self.targets, self.tokens, self.padded = torch.zeros((), device=device), 0, 0, 0
        self.start = time.perf_counter()

    def add(self, loss: torch.Tensor, micro_batches: list[Batch], world: int) -> int:
        """Count one step; returns the real tokens it trained on, over all processes."""
        self.loss += loss
        self.targets += sum(len(b.targets) for b in micro_batches)
        tokens = sum(b.n_real for b in micro_batches) * world
        self.tokens += tokens
        self.padded += sum(b.n_padded for b in micro_batches) * world
        return tokens

    def mean_loss(self) -> float:
        return self.loss.item() / self.targets  # waits for the GPU

    def tokens_per_s(self) -> float:
        return self.tokens / (time.perf_counter() - self.start)

    def record(self, step: int, lr: float) -> dict:
        return {"step": step, "loss": self.mean_loss(), "lr": lr, "tokens_per_s": self.tokens_per_s(),
                "padding": 1 - self.tokens / self.padded}


def save(s: Setup, step: int) -> None:
    """checkpoint.pt and adapter/. Every process's random state goes in, so that each continues its own stream."""
    states = [rng_state(s.device)]
    if s.world > 1:
        states = [None] * s.world
        dist.all_gather_object(states, rng_state(s.device))
    if s.main_process:
        save_checkpoint(s.run.checkpoint, s.model, s.settings, s.base, step, precision=precision_name(s.dtype),
                        optimizer=s.optimizer.state_dict(), scaler=s.scaler.state_dict() if s.scaler else None,
                        rng=states, data_fingerprint=s.data.fingerprint)
        save_peft_adapter(s.run.adapter, s.model, s.settings.lora_config(), s.settings.model)  # for PEFT users


def diverged(s: Setup, problem: str, last_saved: int | None) -> UserError:
    """Training went numerically wrong: nothing more is saved, and the last checkpoint is the way back."""
    if last_saved is None:
        return UserError(f"{problem}; nothing was saved. Start again with a lower --lr")
    return UserError(f"{problem}; not saved, so {s.run.checkpoint} holds step {last_saved}, the last good state. "
                     f"Continue from it with a lower learning rate: python train.py --out {s.run.dir} --resume "
                     f"--lr {s.settings.lr / 10:g}")


def stop_requested(stop: StopRequest, s: Setup) -> bool:
    """Whether any process was asked to stop: all of them then stop after the same step."""
    if s.world == 1:
        return stop.requested
    flag = torch.tensor(float(stop.requested), device=s.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def fit(s: Setup, start_step: int, best: float | None, stop: StopRequest) -> None:
    """The training loop, from `start_step` to the last step: a step, then logging, evaluating and saving at their
    intervals. `best` is the eval F1 to beat for best/ (--eval-answers)."""
    settings, max_steps = s.settings, s.settings.max_steps
    steps = training_steps(s.data.train, settings.micro_batch_size, settings.grad_accum, settings.seed, start_step,
                           s.rank, s.world, settings.micro_batch_split)
    bar = tqdm(total=max_steps, initial=start_step, disable=not s.main_process, dynamic_ncols=True)
    s.model.train()
    micro_batches = next(steps)
    window, shown = LogWindow(s.device), {}  # shown: the last eval F1, for the progress bar
    last_saved = start_step if settings.resume else None
    started, trained_tokens = time.perf_counter(), 0  # for the summary at the end
    for step in range(start_step, max_steps):
        lr = learning_rate(step, settings.lr, settings.warmup_steps, max_steps)
        for group in s.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_ratio", 1.0)  # LoRA+ keeps B's group at a multiple of A's
        loss = train_step(s.train_model, micro_batches, s.optimizer, s.scaler, s.dtype, settings.clip, s.device)
        trained_tokens += window.add(loss, micro_batches, s.world)
        if step + 1 < max_steps:
            micro_batches = next(steps)  # prepared on the CPU while the GPU works on this step
        done = step + 1
        bar.update(1)
        stopping = stop_requested(stop, s)
        saving = done % settings.save_every == 0 or done == max_steps or stopping
        logging = done % settings.log_every == 0 or done == max_steps
        if logging or saving:
            loss = window.mean_loss()
            if not math.isfinite(loss):
                raise diverged(s, f"the loss became {loss} by step {done}", last_saved)
            worst = check_adapter_sound(s.model) if saving else None
            if worst is not None:  # the loss was measured before this step's update: check what would be saved
                raise diverged(s, f"by step {done} the adapter holds {worst:g} (A and B must be finite and within "
                                  f"{ADAPTER_LIMIT:g}): training diverged", last_saved)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{window.tokens_per_s():,.0f}", **shown)
        if logging:
            if s.main_process:
                s.run.append_log(window.record(done, lr))
            window = LogWindow(s.device)
        if done % settings.eval_every == 0:
            value = eval_loss(s.model, s.data.eval, settings.eval_batch_size, s.device, s.dtype)
            if not math.isfinite(value):
                raise diverged(s, f"the eval loss became {value} at step {done}", last_saved)
            record = {"step": done, "eval_loss": value}
            if s.data.answered and s.main_process:
                quality = answer_quality(s.model, s.data.answered, settings.eval_batch_size, s.device, s.dtype)
                record.update(quality)
                shown["f1"] = f"{quality['f1']:.1f}"
                if best is None or quality["f1"] > best:
                    best = quality["f1"]
                    save_best(s.run, s.model, settings, s.base, done, quality)
            if s.main_process:
                s.run.append_log(record)
            bar.write(f"step {done}: eval loss {value:.4f}" + (f", {describe(record)}" if "f1" in record else ""))
        if saving:
            save(s, done)
            last_saved = done
        if stopping:
            bar.close()
            if s.main_process:
                print(run_summary(s.run, (start_step, done), time.perf_counter() - started, trained_tokens,
                                  s.device.type == "cpu"))
                print(f"stopped at step {done} of {max_steps}: saved {s.run.checkpoint}; continue with --resume")
            sys.exit(EXIT_CODE)
    bar.close()
    if s.main_process:
        print(run_summary(s.run, (start_step, max_steps), time.perf_counter() - started, trained_tokens,
                          s.device.type == "cpu"))


def setup(settings: Settings, run: Run, checkpoint: Checkpoint | None) -> tuple[Setup, int]:
    """The data, the model, its optimizer, and (with --resume) the checkpoint's state in them; then the run's
    files: config.json, and the log and best/ made to agree with the checkpoint. Returns the step to start from."""
    rank, world, device = setup_distributed(settings)
    dtype = resolve_precision(settings.precision, device)
    data = prepare_data(settings, device)
    steps_per_epoch = len(data.train) // (settings.micro_batch_size * settings.grad_accum * world)
    if settings.epochs is not None:
        settings = replace(settings, max_steps=round(settings.epochs * steps_per_epoch))
        if settings.max_steps < 1:
            raise UserError(f"--epochs {settings.epochs} of {steps_per_epoch} steps each is less than one step: "
                            f"raise it")
    torch.manual_seed(settings.seed)  # the same A matrices for the same seed
    model = build_model(settings.model, settings.init, settings.seed, settings.base_dropout, settings.lora_config(),
                        device, dtype, settings.quantize)
    optimizer = make_optimizer(model, settings.lr, settings.betas, settings.eps, settings.weight_decay, device,
                               settings.loraplus_ratio)
    scaler = grad_scaler(dtype)
    torch.manual_seed(settings.seed + rank)  # dropout masks differ between GPUs
    start_step = 0
    if checkpoint is not None:
        check_same_content("training data", checkpoint.data_fingerprint, data.fingerprint, checkpoint.path)
        check_same_content("base model", checkpoint.base.fingerprint, model.base_fingerprint, checkpoint.path)
        start_step = checkpoint.restore(model, optimizer, scaler, device)
        if start_step >= settings.max_steps:
            raise UserError(f"{checkpoint.path} is at step {start_step} already, and the run ends at step "
                            f"{settings.max_steps}: to train on, resume with a larger --max-steps")
    if rank == 0:
        run.remove_leftovers()
        if checkpoint is not None:
            run.forget_log_after(start_step)
        else:  # left by a run that stopped before its first checkpoint
            run.start_afresh()
        recorded = {**settings.as_dict(), "device": str(device), "world_size": world,
                    "precision": precision_name(dtype), "train_sequences": len(data.train),
                    "skipped_too_long": data.skipped, "eval_sequences": len(data.eval),
                    "eval_answers": len(data.answered), "steps_per_epoch": steps_per_epoch,
                    "lora": asdict(settings.lora_config()),
                    "parameters": parameter_report(model)}
        print(settings_table(recorded))
        run.write_config(recorded)
        if checkpoint is not None:
            print(f"resumed from {checkpoint.path} at step {start_step} of {settings.max_steps}")
            for note in (schedule_change(checkpoint.settings.as_dict(), settings.as_dict(), steps_per_epoch,
                                         start_step, settings.max_steps),
                         stale_metrics(run.dir, start_step)):
                if note:
                    print(note)
        warning = warmup_warning(settings.warmup_steps, settings.max_steps, settings.lr)
        if warning:
            print(warning, file=sys.stderr)
    train_model = DistributedDataParallel(model) if world > 1 else model
    if settings.compile:
        if settings.quantize != "none":  # else the compiler saves the dense weights for backward (lora/quant.py)
            torch._functorch.config.cse = False
        train_model = torch.compile(train_model)
    base = Base(settings.model, settings.init, settings.seed, vars(model.config), model.base_fingerprint,
                settings.quantize)
    return Setup(settings, run, model, train_model, optimizer, scaler, base, data, device, dtype, rank, world), \
        start_step


def main(argv: list[str] | None = None) -> None:
    settings, given = parse(argv, __doc__)
    run = Run(settings.out)
    run.check_is_ours()  # before anything is loaded: a foreign or unwritable folder fails at once
    with run.lock() if int(os.environ.get("RANK", "0")) == 0 else contextlib.nullcontext():  # rank 0 holds --out
        run.check_start(settings.resume)
        checkpoint = None
        if settings.resume:  # every part of the run checked before anything is written
            checkpoint = read_checkpoint(run.checkpoint)
            checkpoint.check_resumable()
            run.check_best()
            settings = settings.resumed(checkpoint.settings, given, run.checkpoint)
        check_inputs(settings)  # data, tokenizer, weights: all that are missing named at once, before anything loads
        s, start_step = setup(settings, run, checkpoint)
        with StopRequest() as stop:  # from here on, Ctrl-C or SIGTERM saves the run; after, the handlers are back
            fit(s, start_step, run.best_f1(), stop)
    if s.world > 1:
        dist.destroy_process_group()



if __name__ == "__main__":
    main()
