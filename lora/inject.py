"""Putting LoRA into a model: which projections get adapters, and model-wide helpers around them.

    model = apply_lora(GPT(preset("gpt2")), LoRAConfig(rank=4, alpha=8, targets=("c_attn", "c_proj", "c_fc")))

Targets use the checkpoint's module names. In every GPT-2 block:

    attn.c_attn  (C -> 3C)  fused query | key | value
    attn.c_proj  (C -> C)   attention output
    mlp.c_fc     (C -> 4C)  MLP up-projection
    mlp.c_proj   (4C -> C)  MLP down-projection

A bare name matches every module ending in it: `c_proj` adapts both the attention and the MLP output
projections, as the seed's PEFT config did. The seed adapts c_attn, c_proj and c_fc at r=4: 4 modules in each
of GPT-2's 12 blocks (tests/test_lora.py counts the adapters and their trainable numbers).

Variants, each a small step from plain LoRA: `dora=True` (lora/dora.py), `init="pissa"` (lora/pissa.py),
`rank_stabilized=True` (scaling alpha / sqrt(r)); LoRA+ is an optimizer setting (lora/loraplus.py).
"""
import math
from dataclasses import dataclass

import torch.nn as nn

from .dora import DoRALinear
from .errors import LoRAError
from .layer import LoRALinear
from .pissa import pissa_init_
from .sound import is_number

VALID_TARGETS = ("c_attn", "c_proj", "c_fc", "attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
INITS = ("default", "pissa")


@dataclass
class LoRAConfig:
    """What to adapt and how. Every check of a LoRA setting lives in __post_init__, so a LoRAConfig that exists
    can be applied: the flags of train.py, a checkpoint's recorded config and a test's all meet the same checks."""
    rank: int = 4
    alpha: float = 8.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("c_attn", "c_proj", "c_fc")
    qkv: str = ""  # e.g. "qv": separate adapters for these parts of c_attn only; "" adapts c_attn as one matrix
    rank_stabilized: bool = False  # scaling alpha / sqrt(rank) instead of alpha / rank
    # Fields added later keep defaults that mean "as before": checkpoints saved without them load unchanged.
    dora: bool = False  # DoRA: a trainable magnitude per output row (lora/dora.py)
    init: str = "default"  # "default": A random, B = 0; "pissa": A, B from W's top singular vectors (lora/pissa.py)

    def __post_init__(self):
        if type(self.rank) is not int or self.rank < 1:
            raise LoRAError(f"rank {self.rank!r}: the LoRA rank must be a whole number of at least 1 (--rank)")
        if not is_number(self.alpha) or not math.isfinite(self.alpha) or self.alpha <= 0:
            raise LoRAError(f"alpha {self.alpha!r}: the LoRA alpha must be a finite number above 0 (--alpha)")
        if not is_number(self.dropout) or not 0 <= self.dropout < 1:
            raise LoRAError(f"dropout {self.dropout!r}: the LoRA dropout must be a number in [0, 1) "
                            f"(--lora-dropout)")
        if isinstance(self.targets, str) or not isinstance(self.targets, (tuple, list)):
            raise LoRAError(f"targets {self.targets!r}: give a list of module names, e.g. ('c_attn', 'c_fc')")
        self.targets = tuple(self.targets)  # a checkpoint's JSON-like dict holds a list
        unknown = [t for t in self.targets if t not in VALID_TARGETS]
        if unknown or not self.targets:
            raise LoRAError(f"unknown LoRA target(s) {unknown or '(none given)'}: choose from "
                            f"{', '.join(VALID_TARGETS)}")
        if not isinstance(self.qkv, str) or set(self.qkv) - set("qkv") or len(set(self.qkv)) != len(self.qkv):
            raise LoRAError(f"--qkv {self.qkv!r}: use some of the letters q, k, v once each, e.g. qv")
        if self.qkv and not any(t.endswith("c_attn") for t in self.targets):
            raise LoRAError("--qkv selects parts of c_attn: add c_attn to the targets")
        for flag, value in (("rank_stabilized", self.rank_stabilized), ("dora", self.dora)):
            if not isinstance(value, bool):
                raise LoRAError(f"{flag} {value!r}: must be true or false")
        if self.init not in INITS:
            raise LoRAError(f"unknown LoRA init {self.init!r}: choose from {', '.join(INITS)}")
        if self.init == "pissa" and self.qkv:
            raise LoRAError("PiSSA starts from the singular vectors of whole matrices: use it without --qkv")

    def parts(self, module_name: str):
        """The q|k|v parts that get their own adapter in this module (lora/fused.py), or None: one adapter."""
        return tuple(p in self.qkv for p in "qkv") if self.qkv and module_name.endswith("c_attn") else None


def apply_lora(model: nn.Module, config: LoRAConfig) -> nn.Module:
    """Replace each targeted nn.Linear by a LoRALinear (a DoRALinear with dora) around the same weights, in place,
    started as PiSSA with init="pissa"; freeze everything else. Returns the model."""
    install(model, new_lora_layers(model, config))
    return model


def new_lora_layers(model: nn.Module, config: LoRAConfig) -> dict[str, LoRALinear]:
    """The LoRA layer of each targeted nn.Linear, by module name, around its weights (shared, not copied), not yet
    in the model: a loader can fill them and check the fit before the model changes. PiSSA's init writes the
    residual into the shared weights at once."""
    wanted = [(name, module) for name, module in model.named_modules()
              if isinstance(module, nn.Linear) and any(_matches(name, t) for t in config.targets)]
    if not wanted:
        raise LoRAError(f"no module of this model matches the LoRA targets {config.targets}")
    layer_class = DoRALinear if config.dora else LoRALinear
    layers = {}
    for name, linear in wanted:
        layers[name] = layer_class.from_linear(linear, config.rank, config.alpha, config.dropout,
                                               config.rank_stabilized, config.parts(name))
        if config.init == "pissa":
            pissa_init_(layers[name])
    return layers


def install(model: nn.Module, layers: dict[str, nn.Module]) -> None:
    """Put each layer in the model under its module name, and train only the adapters."""
    for name, layer in layers.items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer)
    mark_only_lora_as_trainable(model)


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
    """Fold every adapter into its weight: the model then runs at exactly the base model's cost. A layer whose W is
    stored quantized is first replaced by its dense() copy: W + ΔW rounded back to 4 or 8 bits would lose ΔW."""
    for name, layer in [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]:
        dense = layer.dense()
        if dense is not layer:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, dense)
        dense.merge()


def unmerge_lora(model: nn.Module) -> None:
    for layer in lora_layers(model):
        layer.unmerge()


def parameter_report(model: nn.Module) -> str:
    """'trainable params: 589,824 || all params: 125,029,632 || trainable%: 0.4717' (PEFT's wording)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())  # a tied parameter counts once
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"
