"""MultiLoRALinear: one frozen layer, many adapters, and every row of a batch with its own.

LoRA leaves W untouched, so one base can serve many adapters (S-LoRA, Punica and vLLM's multi-LoRA do this). Merging
would give each adapter its own copy of W; unmerged, the frozen matmul is shared, and only the thin low-rank path
differs per row. LoRALinear computes, for one adapter (A, B, s):

    y = x @ W.T + b  +  s * (x @ A.T) @ B.T          x: (B, T, in),  A: (r, in),  B: (out, r)

Here N adapters are stacked, and row i of the batch names its adapter a_i:

    A_all: (N, R, in)   B_all: (N, out, R)   s_all: (N,)      R = the largest rank (n*r for q|k|v parts)
    A_rows = A_all[a]   (B, R, in)           gathered per row
    B_rows = B_all[a]   (B, out, R)
    z = bmm(x, A_rows.transpose(1, 2)) * s_all[a]     (B, T, R)    the bottleneck, every row through its own A
    y = x @ W.T  +  bmm(z, B_rows.transpose(1, 2))  + b    (B, T, out)

The frozen x @ W.T is one matmul for the whole batch, whatever the adapters: that is the point. The low-rank part
is two batched matmuls of R columns, as cheap as LoRALinear's two thin ones.

- Different ranks: A is padded with zero rows and B with zero columns up to R. The extra bottleneck features are
  x @ 0 = 0 and meet zero columns of B: they add exactly 0. An adapter that does not adapt this module at all is
  all zeros (rank 0).
- q|k|v parts (`parts=(True, False, True)`): B is stored as LoRALinear.full_B(), the block-diagonal (out, n*r)
  matrix, so a parts adapter is an ordinary rank-n*r one here, and the key rows of its update stay exactly 0.
- DoRA: in evaluation DoRALinear computes y = (m / n) * (x @ W.T + s (x @ A.T) @ B.T) + b, n = ||W + s B A|| per
  output row. Nothing trains here, so m / n is a constant per adapter, computed once from each DoRALinear:
  `magnitude_scale` (N, out), 1 for plain adapters (x * 1 = x exactly), and applied per row before the bias.
- A quantized base (lora/quant.py): the frozen path dequantizes W as QuantizedLoRALinear's does.

Which row uses which adapter is set for a whole forward pass, or a whole generation, by `adapter_per_row(model,
rows)`; the model's forward signature stays as it is. Nothing here has gradients: the stacks are buffers.
"""
from collections.abc import Sequence
from contextlib import contextmanager
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .dora import DoRALinear
from .errors import LoRAError
from .layer import LoRALinear
from .quant import QuantizedLinear


class MultiLoRALinear(nn.Module):
    def __init__(self, frozen: nn.Module, adapters: Sequence[Optional[LoRALinear]]):
        """`frozen`: the base layer, an nn.Linear or a QuantizedLinear (its weight is shared, not copied).
        `adapters`: one LoRALinear (or DoRALinear) per adapter, around the same weight, or None where an adapter
        does not adapt this layer."""
        super().__init__()
        if all(layer is None for layer in adapters):
            raise LoRAError("a MultiLoRALinear needs at least one adapter")
        self.in_features, self.out_features = frozen.in_features, frozen.out_features
        if isinstance(frozen, QuantizedLinear):
            self.quantized_weight, self.compute_dtype = frozen.quantized_weight, frozen.compute_dtype
        else:
            self.weight = frozen.weight  # (out, in)
        self.bias = frozen.bias
        rank = max(layer.lora_A.shape[0] for layer in adapters if layer is not None)  # R
        A = torch.zeros(len(adapters), rank, self.in_features)  # (N, R, in), zero-padded
        B = torch.zeros(len(adapters), self.out_features, rank)  # (N, out, R), zero-padded
        scaling = torch.zeros(len(adapters))  # (N,)
        magnitude_scale = torch.ones(len(adapters), self.out_features)  # (N, out): m / n for DoRA, else 1
        with torch.no_grad():
            for i, layer in enumerate(adapters):
                if layer is None:
                    continue
                if (layer.in_features, layer.out_features) != (self.in_features, self.out_features):
                    raise LoRAError(f"adapter {i} maps {layer.in_features} -> {layer.out_features} features, the "
                                    f"base layer {self.in_features} -> {self.out_features}")
                r = layer.lora_A.shape[0]
                A[i, :r] = layer.lora_A.float()
                B[i, :, :r] = layer.full_B().float()
                scaling[i] = layer.scaling
                if isinstance(layer, DoRALinear):
                    magnitude_scale[i] = layer.lora_magnitude_vector.float() / layer.weight_norm()
        self.register_buffer("lora_A", A)
        self.register_buffer("lora_B", B)
        self.register_buffer("scaling", scaling)
        any_dora = any(isinstance(layer, DoRALinear) for layer in adapters)
        self.register_buffer("magnitude_scale", magnitude_scale if any_dora else None)
        # (B,) adapter index of each row, set by adapter_per_row. A buffer, so that it counts among the tensors a
        # captured CUDA decoding graph reads (gpt2/generate.py reuses a graph only while they are the same).
        self.register_buffer("rows", None, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rows is None or len(self.rows) != x.shape[0]:
            raise LoRAError("say which adapter each row uses: run the model inside adapter_per_row(model, rows), "
                            "with one index per row of the batch")
        if hasattr(self, "quantized_weight"):
            frozen = self.quantized_weight.linear(x, None, self.compute_dtype)  # (B, T, out): x @ Ŵ.T
        else:
            frozen = F.linear(x, self.weight)  # (B, T, out): x @ W.T, one matmul for every adapter
        A = self.lora_A[self.rows]  # (B, R, in)
        B = self.lora_B[self.rows]  # (B, out, R)
        z = torch.bmm(x, A.transpose(1, 2)) * self.scaling[self.rows, None, None]  # (B, T, R)
        y = frozen + torch.bmm(z, B.transpose(1, 2))  # (B, T, out)
        if self.magnitude_scale is not None:
            y = y * self.magnitude_scale[self.rows, None, :]  # DoRA's m / n, per row's adapter
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, adapters={len(self.scaling)}, "
                f"max_rank={self.lora_A.shape[1]}, dora={self.magnitude_scale is not None}")


def apply_multi_lora(model: nn.Module, adapted: Sequence[nn.Module]) -> nn.Module:
    """Replace every layer that any adapter adapts by a MultiLoRALinear holding all of them, in place; returns the
    model. `adapted[i]` is a copy of the model with adapter i's LoRA layers around the model's own weights (apply_lora
    on a copy sharing its tensors); adapter i is index i in adapter_per_row."""
    adapters = [{name: m for name, m in copy.named_modules() if isinstance(m, LoRALinear)} for copy in adapted]
    for name in sorted(set().union(*adapters)):
        parent_name, _, child = name.rpartition(".")
        frozen = model.get_submodule(name)
        if not isinstance(frozen, (nn.Linear, QuantizedLinear)):
            raise LoRAError(f"{name} is a {type(frozen).__name__}: give apply_multi_lora the plain base model")
        setattr(model.get_submodule(parent_name), child, MultiLoRALinear(frozen, [a.get(name) for a in adapters]))
    return model


@contextmanager
def adapter_per_row(model: nn.Module, rows: torch.Tensor):
    """Inside this block, row i of every batch the model sees uses adapter rows[i] ((B,) long, on the model's
    device)."""
    layers = [m for m in model.modules() if isinstance(m, MultiLoRALinear)]
    for layer in layers:
        layer.rows = rows
    try:
        yield
    finally:
        for layer in layers:
            layer.rows = None
