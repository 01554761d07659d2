"""PiSSA: start LoRA on the weight's principal components, and train those.

LoRA starts from ΔW = 0 with random A: the first steps only find directions. PiSSA (Meng et al., 2024, "PiSSA:
Principal Singular Values and Singular Vectors Adaptation of Large Language Models") gives the adapter the part of
W that matters most, and freezes the rest:

    W = U S V^T                                      (SVD of the (out, in) weight, fp32)
    A = sqrt(S_r / s) V_r^T    (r, in)                top-r singular values and vectors; s = scaling,
    B = U_r sqrt(S_r / s)      (out, r)               so that s B A = U_r S_r V_r^T
    W_res = W - s B A                                 the frozen weight becomes the residual

At init W_res + s B A = W: the model still equals the base model (up to fp32 rounding). The layer is an ordinary
LoRALinear (or DoRALinear) from then on; only where A and B start, and what W holds, differ.

The adapter no longer fits the original base: it was trained on W_res, not W. After training

    W_res + s B A = W + s (B A - B0 A0) = W + s [B, -B0] @ [A; A0]

so the change to the ORIGINAL W is a plain LoRA of rank 2r, A' = [A; A0] (2r, in), B' = [B, -B0] (out, 2r), with
the same scaling (alpha doubled, or times sqrt 2 for rsLoRA). This is PEFT's PiSSA -> LoRA conversion
(`path_initial_model_for_weight_conversion`, `subtract_mutated_init`). `lora_state_dict` gives a PiSSA model's
adapter in this form, so the file `save_adapter` writes applies to the original base like any LoRA adapter;
`load_lora_state_dict` takes A, B and A0, B0 back out of it to resume training.

GPT-2's checkpoint stores its projections (in, out) ("Conv1D"): an SVD of that layout without transposing gives A
and B swapped and transposed (PEFT issue #2103). Here every projection is an nn.Linear (out, in) already.
"""
import math
from dataclasses import replace

import torch
import torch.nn as nn

from .dora import DoRALinear
from .layer import LoRALinear


@torch.no_grad()
def pissa_init_(layer: LoRALinear) -> None:
    """Set A, B from W's top-r singular triplets and W to the residual; remember A0, B0 for saving."""
    weight = layer.weight.float()  # (out, in)
    U, S, Vh = torch.linalg.svd(weight, full_matrices=False)  # U (out, k), S (k,), Vh (k, in), S descending
    r = layer.rank
    root = torch.sqrt(S[:r] / layer.scaling)  # (r,)
    layer.lora_A.copy_(root[:, None] * Vh[:r])  # (r, in)
    layer.lora_B.copy_(U[:, :r] * root[None, :])  # (out, r)
    layer.weight.copy_(weight - layer.delta_weight())
    # Buffers, not parameters, and left out of the state dict: they only serve the conversion at save time.
    layer.register_buffer("initial_A", layer.lora_A.detach().clone(), persistent=False)
    layer.register_buffer("initial_B", layer.lora_B.detach().clone(), persistent=False)
    if isinstance(layer, DoRALinear):  # m = the length of the weight the layer now computes, as PEFT sets it
        layer.lora_magnitude_vector.copy_(layer.weight_norm())


def pissa_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """The layers initialised by pissa_init_, by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear) and hasattr(m, "initial_A")}


def pissa_to_lora(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter state with each PiSSA layer's (A, B) replaced by the rank-2r ([A; A0], [B, -B0]) that applies
    to the original weight. Unchanged for a model without PiSSA layers."""
    state = dict(state)
    for name, layer in pissa_layers(model).items():
        state[f"{name}.lora_A"] = torch.cat([layer.lora_A.detach(), layer.initial_A], dim=0)  # (2r, in)
        state[f"{name}.lora_B"] = torch.cat([layer.lora_B.detach(), -layer.initial_B], dim=1)  # (out, 2r)
    return state


@torch.no_grad()
def lora_to_pissa(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of pissa_to_lora, to resume training: the state with A, B of rank r again. Where the file's
    A0, B0 differ from this model's own SVD (another machine's library may round it differently),
    W_res is first moved to the file's residual, W - s B0 A0. The state must have pissa_to_lora's keys and shapes."""
    state = dict(state)
    for name, layer in pissa_layers(model).items():
        A_all, B_all, r = state[f"{name}.lora_A"], state[f"{name}.lora_B"], layer.rank
        A0, B0 = A_all[r:].to(layer.initial_A.device), -B_all[:, r:].to(layer.initial_B.device)  # a CPU file
        if not (torch.equal(A0, layer.initial_A) and torch.equal(B0, layer.initial_B)):
            original = layer.weight.float() + layer.scaling * (layer.initial_B @ layer.initial_A)
            layer.weight.copy_(original - layer.scaling * (B0 @ A0))
            layer.initial_A.copy_(A0)
            layer.initial_B.copy_(B0)
        state[f"{name}.lora_A"], state[f"{name}.lora_B"] = A_all[:r], B_all[:, :r]
    return state


def saved_config(config):
    """The LoRAConfig of the converted adapter: rank 2r, the same scaling, a plain LoRA on the original base."""
    if config.init != "pissa":
        return config
    same_scaling = math.sqrt(2) if config.rank_stabilized else 2  # alpha / sqrt(r) or alpha / r stays the same
    return replace(config, rank=2 * config.rank, alpha=config.alpha * same_scaling, init="default")
