"""Adapter-only checkpoints: save the A and B matrices, and what it takes to rebuild the model around them.

The one LoRA idea here: the base model is frozen, so a fine-tune is nothing but its adapters. A checkpoint holds
only the tensors whose names contain `lora_`, a few megabytes where a copy of GPT-2 is hundreds (the README and
tests/test_lora.py give the sizes), and the base is rebuilt from its name:

    save_adapter(path, model, config, base)   # torch.save of the dict below, atomically
    apply_adapter(GPT(...), load_adapter(path))  # the same LoRA layers, the same A and B, on the same base

A checkpoint is a dict saved with torch.save:
    format       "gpt2-lora/1"
    lora_config  LoRAConfig as a dict (rank, alpha, targets, ...)
    base         how to rebuild the frozen base: {"model": name or path, "init": "pretrained" | "random",
                 "seed": ..., "config": GPTConfig as a dict, "fingerprint": base_fingerprint(base model),
                 "quantize": "none" | "int8" | "nf4"}
    adapter      {"transformer.h.0.attn.c_attn.lora_A": (r, in), ...}: the only trained tensors (with DoRA also
                 "...lora_magnitude_vector": (out,))
train.py adds its own keys (step, optimizer, ...) beside these.

A PiSSA adapter is written as the plain rank-2r LoRA it amounts to on the ORIGINAL base (lora/pissa.py), with
lora_config rank 2r and init "default": whoever loads it needs to know nothing about PiSSA.
Checkpoints written before a LoRAConfig field existed lack it; the field's default then applies.

Below the idea, its hardening: a file is checked whole before the model is touched (load_adapter: the LoRA
config through LoRAConfig's own checks, the base description, every tensor finite and in range), a base of other
weights is recognised by its fingerprint, and the file is written so that a crash never leaves half of one.
"""
import hashlib
import os
import sys
from dataclasses import asdict, fields

import torch
import torch.nn as nn
from tensorio import atomic_write

from .errors import LoRAError
from .inject import LoRAConfig, install, new_lora_layers
from .pissa import lora_to_pissa, pissa_to_lora, saved_config
from .quant import MODES
from .sound import check_adapter_tensors, is_number

FORMAT = "gpt2-lora/1"
BASE_SHAPE_KEYS = ("n_layer", "n_head", "n_embd", "vocab_size")


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors (keys containing `lora_`), under the model's own module names. PiSSA layers give
    theirs as the rank-2r LoRA that applies to the original weight."""
    return pissa_to_lora(model, {k: v for k, v in model.state_dict().items() if "lora_" in k})


def save_adapter(path: str | os.PathLike, model: nn.Module, lora_config: LoRAConfig, base: dict, **extra) -> None:
    """Write the adapter checkpoint atomically; `extra` adds keys (a training run's state)."""
    checkpoint = {"format": FORMAT, "lora_config": asdict(saved_config(lora_config)), "base": base,
                  "adapter": lora_state_dict(model), **extra}
    with atomic_write(path) as f:  # a crash or Ctrl-C while writing leaves the previous checkpoint intact
        torch.save(checkpoint, f)


def apply_adapter(model: nn.Module, checkpoint: dict, strict: bool = False) -> LoRAConfig:
    """Give a base model the checkpoint's LoRA layers and trained A, B; returns its LoRAConfig. Everything is
    checked before the model changes. A base of another shape is refused. A base of the right shape but other
    weights (another fine-tune, another seed) runs, but the adapter was not trained for it: a warning on stderr
    says so, and `strict` refuses it instead."""
    _check_base_fits(model, checkpoint["base"], strict)
    config = recorded_config(checkpoint)
    layers = new_lora_layers(model, config)
    _check_fit({f"{name}.{key}": t for name, layer in layers.items() for key, t in layer.state_dict().items()
                if "lora_" in key}, checkpoint["adapter"])
    for name, layer in layers.items():
        layer.load_state_dict({key.removeprefix(f"{name}."): t for key, t in checkpoint["adapter"].items()
                               if key.startswith(f"{name}.")}, strict=False)
    install(model, layers)
    return config


def load_lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load A and B (and DoRA's m) into a model that already has adapters; every key and shape must match.
    The inverse of lora_state_dict, PiSSA models included."""
    _check_fit(lora_state_dict(model), state)
    model.load_state_dict(lora_to_pissa(model, state), strict=False)


def _check_fit(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> None:
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
             if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        raise LoRAError(f"the adapter does not fit this model's LoRA layers: {len(missing)} missing {missing[:2]}, "
                        f"{len(unexpected)} unexpected {unexpected[:2]}, {len(wrong)} of another shape {wrong[:2]}")


def recorded_config(checkpoint: dict, where: str = "the checkpoint") -> LoRAConfig:
    """The checkpoint's LoRAConfig, through the checks every LoRA setting meets (LoRAConfig.__post_init__)."""
    recorded = checkpoint["lora_config"]
    unknown = sorted(set(recorded) - {f.name for f in fields(LoRAConfig)})
    missing = [key for key in ("rank", "alpha", "targets") if key not in recorded]
    if unknown or missing:
        raise LoRAError(f"{where}: lora_config has {'unknown' if unknown else 'no'} field(s) {unknown or missing}: "
                        f"the file is damaged or not this project's")
    try:
        config = LoRAConfig(**recorded)
    except LoRAError as e:
        raise LoRAError(f"{where}: lora_config: {e}") from None
    if config.init != "default":
        raise LoRAError(f"{where}: lora_config init {config.init!r}: a checkpoint records its adapter as plain LoRA "
                        f"(init 'default'); the file is damaged")
    return config


def _check_base_fits(model: nn.Module, base: dict, strict: bool) -> None:
    trained_on = {k: base["config"].get(k) for k in BASE_SHAPE_KEYS}
    this = {k: getattr(model.config, k) for k in BASE_SHAPE_KEYS}
    if trained_on != this:
        raise LoRAError(f"the adapter was trained on {base['model']} {trained_on}, but the base model given has "
                        f"{this}: load the base it was trained on")
    recorded = base.get("fingerprint")  # absent in checkpoints older than the fingerprint
    if recorded is not None and recorded != base_fingerprint(model):
        message = (f"the base model given has other weights than the one the adapter was trained on "
                   f"({base['model']}, fingerprint {recorded}): its answers will not be the trained model's")
        if strict:
            raise LoRAError(f"{message}. Load the base it was trained on (--strict refuses any other)")
        print(f"warning: {message} (--strict refuses this)", file=sys.stderr)


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


# --- reading a checkpoint: every part checked before use ---------------------------------------------------------

def load_adapter(path: str | os.PathLike) -> dict:
    """Read a checkpoint written by save_adapter (onto the CPU), checked whole: a damaged part is refused with
    one line naming the file and the field."""
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
    if broken:
        raise LoRAError(f"{path} is damaged: {', '.join(broken)} missing or malformed")
    recorded_config(checkpoint, str(path))
    _check_base(checkpoint["base"], path)
    check_adapter_tensors(checkpoint["adapter"], f"{path}: adapter")
    return checkpoint


# What train.py records of the base's GPTConfig: each a whole number >= 1, and the dropout a probability.
BASE_CONFIG_SIZES = ("n_layer", "n_head", "n_embd", "vocab_size", "block_size")


def _check_base(base: dict, path) -> None:
    """The base description: its name, how it was made, its shape, its fingerprint and quantization."""
    def refuse(field, value, what):
        raise LoRAError(f"{path}: base.{field} {value!r}: {what}; the file is damaged")

    if not isinstance(base.get("model"), str) or not base["model"]:
        refuse("model", base.get("model"), "must name the base model")
    if "init" in base and base["init"] not in ("pretrained", "random"):
        refuse("init", base["init"], "must be 'pretrained' or 'random'")
    if "seed" in base and (type(base["seed"]) is not int or base["seed"] < 0):
        refuse("seed", base["seed"], "must be a whole number >= 0")
    for field in ("fingerprint", "quantize"):
        if field in base and not isinstance(base[field], str):
            refuse(field, base[field], "must be a string")
    if base.get("quantize", "none") not in MODES:
        refuse("quantize", base["quantize"], f"must be one of {', '.join(MODES)}")
    config = base.get("config")
    if not isinstance(config, dict):
        refuse("config", config, "must be the base's GPTConfig as a dict")
    for key, value in config.items():
        if key in BASE_CONFIG_SIZES:
            if type(value) is not int or value < 1:
                refuse(f"config.{key}", value, "must be a whole number >= 1")
        elif key == "dropout":
            if not is_number(value) or not 0 <= value < 1:
                refuse("config.dropout", value, "must be a number in [0, 1)")
        else:
            refuse(f"config.{key}", value, "is not a GPTConfig field")
    missing = [key for key in BASE_SHAPE_KEYS if key not in config]
    if missing:
        refuse("config", config, f"lacks {', '.join(missing)}")

