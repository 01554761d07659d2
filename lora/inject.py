"""Putting LoRA into a model: which projections get adapters, and model-wide helpers around them.

Targets use the checkpoint's module names. In every GPT-2 block:

    attn.c_attn  (C -> 3C)  fused query | key | value
    attn.c_proj  (C -> C)   attention output
    mlp.c_fc     (C -> 4C)  MLP up-projection
    mlp.c_proj   (4C -> C)  MLP down-projection

A bare name matches every module ending in it: `c_proj` adapts both the attention and the MLP output
projections, as the seed's PEFT config did. The seed adapts c_attn, c_proj and c_fc at r=4: 4 modules x 12
blocks = 48 adapters, 589,824 trainable parameters.

Variants, each a small step from plain LoRA: `dora=True` (lora/dora.py), `init="pissa"` (lora/pissa.py),
`rank_stabilized=True` (scaling alpha / sqrt(r)); LoRA+ is an optimizer setting (lora/loraplus.py).
"""
from collections.abc import Sequence
from dataclasses import dataclass

import torch.nn as nn

from .dora import DoRALinear
from .errors import LoRAError
from .layer import LoRALinear
from .pissa import pissa_init_

VALID_TARGETS = ("c_attn", "c_proj", "c_fc", "attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
INITS = ("default", "pissa")


@dataclass
class LoRAConfig:
    rank: int = 4
    alpha: float = 8.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("c_attn", "c_proj", "c_fc")
    qkv: str = ""  # e.g. "qv": separate adapters for these parts of c_attn only; "" adapts c_attn as one matrix
    rank_stabilized: bool = False  # scaling alpha / sqrt(rank) instead of alpha / rank
    # Fields added later keep defaults that mean "as before": checkpoints saved without them load unchanged.
    dora: bool = False  # DoRA: a trainable magnitude per output row (lora/dora.py)
    init: str = "default"  # "default": A random, B = 0; "pissa": A, B from W's top singular vectors (lora/pissa.py)


def apply_lora(model: nn.Module, rank: int = 4, alpha: float = 8.0, dropout: float = 0.0,
               targets: Sequence[str] = ("c_attn", "c_proj", "c_fc"), qkv: str = "",
               rank_stabilized: bool = False, dora: bool = False, init: str = "default") -> nn.Module:
    """Replace each targeted nn.Linear by a LoRALinear (a DoRALinear with dora) around the same weights, in place,
    started as PiSSA with init="pissa"; freeze everything else. Returns the model. The arguments are LoRAConfig's
    fields: `apply_lora(model, **asdict(config))`."""
    unknown = [t for t in targets if t not in VALID_TARGETS]
    if unknown or not targets:
        raise LoRAError(f"unknown LoRA target(s) {unknown or '(none given)'}: choose from {', '.join(VALID_TARGETS)}")
    parts = None
    if qkv:
        if set(qkv) - set("qkv") or len(set(qkv)) != len(qkv):
            raise LoRAError(f"--qkv {qkv!r}: use some of the letters q, k, v once each, e.g. qv")
        if not any(t.endswith("c_attn") for t in targets):
            raise LoRAError("--qkv selects parts of c_attn: add c_attn to the targets")
        parts = tuple(p in qkv for p in "qkv")
    if init not in INITS:
        raise LoRAError(f"unknown LoRA init {init!r}: choose from {', '.join(INITS)}")
    if init == "pissa" and qkv:
        raise LoRAError("PiSSA starts from the singular vectors of whole matrices: use it without --qkv")
    wanted = [(name, module) for name, module in model.named_modules()
              if isinstance(module, nn.Linear) and any(_matches(name, t) for t in targets)]
    if not wanted:
        raise LoRAError(f"no module of this model matches the LoRA targets {tuple(targets)}")
    for name, linear in wanted:
        parent_name, _, child = name.rpartition(".")
        layer_class = DoRALinear if dora else LoRALinear
        lora = layer_class.from_linear(linear, rank, alpha, dropout, rank_stabilized,
                                       parts if child == "c_attn" else None)
        if init == "pissa":
            pissa_init_(lora)
        setattr(model.get_submodule(parent_name), child, lora)
    mark_only_lora_as_trainable(model)
    return model


def _matches(module_name: str, target: str) -> bool:
    """`transformer.h.3.mlp.c_proj` matches `c_proj` and `mlp.c_proj`, not `attn.c_proj`."""
    return module_name == target or module_name.endswith("." + target)


def lora_layers(model: nn.Module) -> list[LoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def mark_only_lora_as_trainable(model: nn.Module) -> None:
    """requires_grad only for the lora_A / lora_B matrices (and DoRA's lora_magnitude_vector): the optimizer
    sees nothing else."""
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)


def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its weight: the model then runs at exactly the base model's cost."""
    for layer in lora_layers(model):
        layer.merge()


def unmerge_lora(model: nn.Module) -> None:
    for layer in lora_layers(model):
        layer.unmerge()


def parameter_report(model: nn.Module) -> str:
    """'trainable params: 589,824 || all params: 125,029,632 || trainable%: 0.4717' (PEFT's wording)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())  # a tied parameter counts once
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"
