"""Adapter-only checkpoints: the A and B matrices and what it takes to rebuild the model around them.

A checkpoint is a dict saved with torch.save:
    format       "gpt2-lora/1"
    lora_config  LoRAConfig as a dict (rank, alpha, targets, ...)
    base         how to rebuild the frozen base: {"model": name or path, "init": "pretrained" | "random",
                 "seed": ..., "config": GPTConfig as a dict, "fingerprint": base_fingerprint(base model)}
    adapter      {"transformer.h.0.attn.c_attn.lora_A": (r, in), ...}: the only trained tensors (with DoRA also
                 "...lora_magnitude_vector": (out,))
train.py adds its own keys (step, optimizer, ...) beside these. For the seed's config the adapter is 589,824
fp32 numbers (589,824 x 4 bytes, about 2.4 MB; tests/test_lora.py checks the file stays under 3 MB), against
500 MB for a full copy of GPT-2.

A PiSSA adapter is written as the plain rank-2r LoRA it amounts to on the ORIGINAL base (lora/pissa.py), with
lora_config rank 2r and init "default": whoever loads it needs to know nothing about PiSSA.
Checkpoints written before a LoRAConfig field existed lack it; the field's default then applies.
"""
import hashlib
import os
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn

from .errors import LoRAError
from .inject import LoRAConfig, apply_lora
from .pissa import lora_to_pissa, pissa_to_lora, saved_config

FORMAT = "gpt2-lora/1"
BASE_SHAPE_KEYS = ("n_layer", "n_head", "n_embd", "vocab_size")


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors (keys containing `lora_`), under the model's own module names. PiSSA layers give
    theirs as the rank-2r LoRA that applies to the original weight."""
    return pissa_to_lora(model, {k: v for k, v in model.state_dict().items() if "lora_" in k})


def load_lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load A and B (and DoRA's m) into a model that already has adapters; every key and shape must match.
    The inverse of lora_state_dict, PiSSA models included."""
    expected = lora_state_dict(model)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
             if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        raise LoRAError(f"the adapter does not fit this model's LoRA layers: {len(missing)} missing {missing[:2]}, "
                        f"{len(unexpected)} unexpected {unexpected[:2]}, {len(wrong)} of another shape {wrong[:2]}")
    model.load_state_dict(lora_to_pissa(model, state), strict=False)


def save_adapter(path: str | os.PathLike, model: nn.Module, lora_config: LoRAConfig, base: dict, **extra) -> None:
    """Write the adapter checkpoint atomically; `extra` adds keys (a training run's state)."""
    checkpoint = {"format": FORMAT, "lora_config": asdict(saved_config(lora_config)), "base": base,
                  "adapter": lora_state_dict(model), **extra}
    _atomic_save(checkpoint, path)


def _atomic_save(obj: dict, path: str | os.PathLike) -> None:
    """torch.save to a temporary file beside `path`, then rename it over `path`: a crash or Ctrl-C while
    writing leaves the previous checkpoint intact (a rename within a directory is atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        umask = os.umask(0o022)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes the file private (0600); open() would follow the umask
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def load_adapter(path: str | os.PathLike) -> dict:
    """Read a checkpoint written by save_adapter (onto the CPU)."""
    if not os.path.isfile(path):
        raise LoRAError(f"no checkpoint at {path}: give a train.py --out directory or its checkpoint.pt")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        # torch's own message suggests retrying with weights_only=False, which would run whatever code the file
        # holds: not advice to pass on about a file we cannot vouch for. Say what it is instead.
        raise LoRAError(f"{path} cannot be read as a checkpoint: the file is corrupt (for example cut short by a full "
                        f"disk or an interrupted copy) or was not written by this project") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        raise LoRAError(f"{path} is not an adapter checkpoint of this project (format {FORMAT})")
    parts = {"lora_config": dict, "base": dict, "adapter": dict}
    broken = [key for key, kind in parts.items() if not isinstance(checkpoint.get(key), kind)]
    if not broken and not isinstance(checkpoint["base"].get("config"), dict):
        broken = ["base.config"]
    if not broken and not all(isinstance(t, torch.Tensor) for t in checkpoint["adapter"].values()):
        broken = ["adapter (not all tensors)"]
    if broken:
        raise LoRAError(f"{path} is damaged: {', '.join(broken)} missing or malformed")
    return checkpoint


def base_fingerprint(model: nn.Module, samples: int = 1024) -> str:
    """A short hash that tells one base model's weights from another's of the same shape: every frozen tensor's
    name and shape, and `samples` of its values evenly spread (in fp32). Reading a few thousand numbers per
    tensor costs milliseconds, and two different trainings, or two random inits, never agree on them all. Take it
    of the base as loaded (fp32, before LoRA layers or a half-precision cast change what its numbers look like)."""
    digest = hashlib.sha256()
    for name, t in model.state_dict().items():
        if "lora_" in name:
            continue
        flat = t.detach().reshape(-1)
        n = min(samples, flat.numel())  # evenly spread from the first value to the last, in exact integers
        picks = torch.arange(n, device=flat.device) * (flat.numel() - 1) // max(n - 1, 1)
        digest.update(f"{name}{tuple(t.shape)}".encode())
        digest.update(flat[picks].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def apply_adapter(model: nn.Module, checkpoint: dict, strict: bool = False) -> LoRAConfig:
    """Give a base model the checkpoint's LoRA layers and trained A, B. A base of another shape is refused. A base
    of the right shape but other weights (another fine-tune, another seed) runs, but the adapter was not trained
    for it: a warning on stderr says so, and `strict` refuses it instead."""
    trained_on = {k: checkpoint["base"]["config"].get(k) for k in BASE_SHAPE_KEYS}
    this = {k: getattr(model.config, k) for k in BASE_SHAPE_KEYS}
    if trained_on != this:
        raise LoRAError(f"the adapter was trained on {checkpoint['base']['model']} {trained_on}, but the base model "
                        f"given has {this}: load the base it was trained on")
    recorded = checkpoint["base"].get("fingerprint")  # absent in checkpoints older than the fingerprint
    if recorded is not None and recorded != base_fingerprint(model):
        message = (f"the base model given has other weights than the one the adapter was trained on "
                   f"({checkpoint['base']['model']}, fingerprint {recorded}): its answers will not be the "
                   f"trained model's")
        if strict:
            raise LoRAError(f"{message}. Load the base it was trained on (--strict refuses any other)")
        print(f"warning: {message} (--strict refuses this)", file=sys.stderr)
    config = LoRAConfig(**{**checkpoint["lora_config"], "targets": tuple(checkpoint["lora_config"]["targets"])})
    apply_lora(model, config)
    load_lora_state_dict(model, checkpoint["adapter"])
    return config
