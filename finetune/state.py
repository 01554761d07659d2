"""A run's directory and checkpoint: what a run may write, saving sound numbers only, and resuming.

A run directory (train.py --out) holds only files of this project:
    config.json       the effective settings           log.jsonl      every logged step and evaluation
    checkpoint.pt     adapter + training state         adapter/       the adapter in PEFT's format
    metrics*.json     what evaluate.py writes beside a run (metrics.json, metrics.predictions.json, ...)
A folder holding anything else (a model, another tool's files) is not a run: train.py refuses it as --out rather
than overwrite or delete what is there.

checkpoint.pt is lora's adapter checkpoint (A, B, the LoRA config, the base and its fingerprint) with the
training state beside it: the run's arguments, the step, the optimizer's moments, the fp16 loss scale, every
process's random state (dropout masks), and the fingerprint of the training data, so that a resumed run takes the
very same steps an uninterrupted one would have taken.
"""
import argparse
import fnmatch
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

from gpt2 import UserError
from gpt2.files import atomic_write, check_writable_dir
from lora import ADAPTER_LIMIT, load_lora_state_dict

from .adapters import ADAPTER_DIR, CHECKPOINT, PEFT_FILES
from .quality import BEST

# What a run directory may hold: train.py's files, evaluate.py's metrics (with their predictions and no-answer
# probabilities), the pictures of plot.py and lora.anatomy, and the folders adapter/ (PEFT's format) and best/.
RUN_FILES = ("config.json", "log.jsonl", CHECKPOINT, "metrics*.json", "*.png")
TRAINING_STATE = ("args", "step", "optimizer", "scaler", "rng")

# Flags added after the first runs were saved: an older checkpoint's args lack them.
DEFAULTS_OF_LATER_FLAGS = {"dora": False, "lora_init": "default", "loraplus_ratio": None, "quantize": "none"}
# The settings that define a run: --resume with any of them changed would be another run. The base model and
# the training data are compared by their content's fingerprint, not by the path or name that gave them.
RUN_DEFINING = ("model", "init", "rank", "alpha", "targets", "qkv", "rslora", "dora", "lora_init", "loraplus_ratio",
                "quantize", "max_len", "loss_on", "no_eos", "seed", "micro_batch_size", "grad_accum", "data_dir",
                "train_file")
COMPARED_BY_CONTENT = ("model", "data_dir", "train_file")


def _is_temporary(name: str, owner: str) -> bool:
    """A temporary file of gpt2.files.atomic_write for `owner`, left by a process killed while writing it."""
    return name.startswith(f".{owner}.") and name.endswith(".tmp")


def _is_run_file(path: Path) -> bool:
    name = path.name
    if any(_is_temporary(name, owner) for owner in ("config.json", CHECKPOINT)):
        return True
    if name == BEST:
        return path.is_dir() and all(_is_run_file(path / f) for f in os.listdir(path))
    if name == ADAPTER_DIR:
        return path.is_dir() and all(f in PEFT_FILES or any(_is_temporary(f, a) for a in PEFT_FILES)
                                     for f in os.listdir(path))
    if not path.is_file() or not any(fnmatch.fnmatchcase(name, pattern) for pattern in RUN_FILES):
        return False
    try:  # a config.json or log.jsonl of another tool must not be overwritten or deleted: check they are ours
        if name == "config.json":
            settings = json.loads(path.read_text())
            return isinstance(settings, dict) and {"lora", "max_steps", "train_sequences"} <= settings.keys()
        if name == "log.jsonl":
            records = [json.loads(line) for line in path.read_text().splitlines()]
            return all(isinstance(record, dict) and "step" in record for record in records)
    except (ValueError, UnicodeDecodeError):
        return False
    return True


def check_out_dir(out: Path, resume: bool) -> None:
    """--out must be writable and new, empty, or a run directory; --resume needs a checkpoint there, and a new
    run needs none. Checked before anything is loaded or written."""
    check_writable_dir(out, "--out")
    if out.is_dir():
        foreign = sorted(name for name in os.listdir(out) if not _is_run_file(out / name))
        if foreign:
            raise UserError(f"--out {out} holds files that are not a train.py run's ({', '.join(foreign[:4])}"
                            f"{', ...' if len(foreign) > 4 else ''}); a run would overwrite its config.json and "
                            f"log.jsonl. Choose a new or empty folder for --out")
    checkpoint = out / CHECKPOINT
    if resume and not checkpoint.is_file():
        raise UserError(f"nothing to resume: no {checkpoint}")
    if not resume and checkpoint.is_file():
        raise UserError(f"{out} already holds a run: continue it with --resume, or choose another --out")


def check_training_state(checkpoint: dict, path: Path) -> None:
    missing = [key for key in TRAINING_STATE if key not in checkpoint]
    if missing or not isinstance(checkpoint["args"], dict):
        raise UserError(f"{path} holds an adapter but no training state ({', '.join(missing) or 'args'} missing): "
                        f"it cannot be resumed; start a new run with another --out")


def resumed_args(checkpoint: dict, args: argparse.Namespace, given: set[str], path: Path) -> argparse.Namespace:
    """The settings of the run being resumed: the checkpoint's own, with the flags written on this command line
    in their place (--max-steps, --lr, --eval-every, --device, ...). A flag that would make it another run is
    refused, except the base and the data, which are checked by content once loaded."""
    before = checkpoint["args"]
    changed = [f"--{k.replace('_', '-')} {before.get(k)} -> {getattr(args, k)}" for k in RUN_DEFINING
               if k in given and k not in COMPARED_BY_CONTENT
               and before.get(k, DEFAULTS_OF_LATER_FLAGS.get(k)) != getattr(args, k)]
    if changed:
        raise UserError(f"{path} was trained with other settings ({'; '.join(changed)}): resume with the same "
                        f"ones (or with none: --resume reads them from the checkpoint), or start a new run with "
                        f"another --out")
    settings = {**vars(args), **before, **{k: getattr(args, k) for k in given}, "out": args.out, "resume": True}
    if "max_steps" in given:  # --max-steps and --epochs exclude each other: the one given wins
        settings["epochs"] = None
    return argparse.Namespace(**settings)


def check_same_content(what: str, recorded: str | None, now: str, path: Path) -> None:
    """--resume: the base model or the training data must be the run's own, wherever the files now are."""
    if recorded is not None and recorded != now:
        raise UserError(f"{path} was trained on other {what} (fingerprint {recorded}, now {now}): resume with the "
                        f"{what} the run started with, or start a new run with another --out")


def check_adapter_sound(model: torch.nn.Module) -> float | None:
    """None if every trainable number is finite and within ADAPTER_LIMIT; else the worst magnitude found (a
    single device-to-host read, done only when saving)."""
    worst = torch.stack([p.detach().abs().max() for p in model.parameters() if p.requires_grad]).max().item()
    return None if worst <= ADAPTER_LIMIT else worst  # NaN fails the comparison too


def rng_state(device: torch.device) -> dict:
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def restore(checkpoint: dict, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
            scaler: torch.amp.GradScaler | None, device: torch.device) -> int:
    """Load a run's adapter and training state for --resume; returns the step to continue from."""
    load_lora_state_dict(model, checkpoint["adapter"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    if scaler and checkpoint["scaler"]:
        scaler.load_state_dict(checkpoint["scaler"])
    states = checkpoint["rng"]
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if len(states) == world:  # the same number of processes: each continues its own random stream
        set_rng_state(states[rank], device)
    return checkpoint["step"]


def forget_log_after(log_file: Path, step: int) -> None:
    """Drop log.jsonl's lines after the checkpoint's step (logged before a crash or a refused save): the resumed
    run logs those steps again, and the log must tell each step once."""
    if log_file.is_file():
        lines = log_file.read_text().splitlines(keepends=True)
        kept = [line for line in lines if json.loads(line)["step"] <= step]
        if kept != lines:
            with atomic_write(log_file, "w") as f:
                f.writelines(kept)
