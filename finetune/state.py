"""A run's checkpoint: the adapter plus everything needed to continue exactly where it stopped.

checkpoint.pt is lora's adapter checkpoint (A, B, the LoRA config, the base) with the training state beside it:
the run's arguments, the step, the optimizer's moments, the fp16 loss scale, and every process's random state
(dropout masks), so that a resumed run takes the very same steps an uninterrupted one would have taken.
"""
import argparse
from pathlib import Path

import torch
import torch.distributed as dist

from gpt2 import UserError
from lora import load_adapter, load_lora_state_dict, lora_state_dict

# Flags added after the first runs were saved: an older checkpoint's args lack them.
DEFAULTS_OF_LATER_FLAGS = {"dora": False, "lora_init": "default", "loraplus_ratio": None, "quantize": "none"}
# The settings that define a run: --resume with any of them changed would be another run.
RUN_DEFINING = ("model", "init", "rank", "alpha", "targets", "qkv", "rslora", "dora", "lora_init", "loraplus_ratio",
                "quantize", "max_len", "loss_on", "no_eos", "seed", "micro_batch_size", "grad_accum", "data_dir", "train_file")


def rng_state(device: torch.device) -> dict:
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def check_resumable(checkpoint: dict, args: argparse.Namespace, path: Path) -> None:
    """--resume continues the same run: the model, the adapter and the data recipe must be the ones it had."""
    before = checkpoint["args"]
    changed = [f"--{k.replace('_', '-')} {before.get(k)} -> {getattr(args, k)}" for k in RUN_DEFINING
               if before.get(k, DEFAULTS_OF_LATER_FLAGS.get(k)) != getattr(args, k)]
    if changed:
        raise UserError(f"{path} was trained with other settings ({'; '.join(changed)}): resume with the same "
                        f"ones, or start a new run with another --out")


def restore(path: Path, args: argparse.Namespace, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
            scaler: torch.amp.GradScaler | None, device: torch.device) -> int:
    """Load a run's adapter and training state for --resume; returns the step to continue from."""
    checkpoint = load_adapter(path)
    check_resumable(checkpoint, args, path)
    load_lora_state_dict(model, checkpoint["adapter"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    if scaler and checkpoint["scaler"]:
        scaler.load_state_dict(checkpoint["scaler"])
    states = checkpoint["rng"]
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if len(states) == world:  # the same number of processes: each continues its own random stream
        set_rng_state(states[rank], device)
    return checkpoint["step"]
