"""LoRALinear: a frozen linear layer plus a trainable low-rank update.

The idea (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models"): fine-tuning changes a
pretrained weight W (out, in) by some ΔW, and that change has low "intrinsic rank". So instead of learning ΔW,
learn two thin matrices whose product is ΔW:

    ΔW = B @ A        A: (r, in),  B: (out, r),  r << min(in, out)
    y  = x @ W.T + b  +  scaling * (x @ A.T) @ B.T,        scaling = alpha / r

The layer is two paths, summed; `forward` is exactly `frozen(x) + low_rank(dropout(x))`:

    x (..., in) ─┬─ frozen:   W (out, in), b (out,) ──────────────────────── x @ W.T + b ──┐
                 │                                                                        (+)─ y (..., out)
                 └─ low_rank: dropout ─ A (r, in) ─ (..., r) ─ B (out, r) ─ × scaling ─────┘

Only A and B train: r * (in + out) numbers instead of in * out. W stays frozen, so the optimizer keeps no state
for it and no gradient is computed for it.

- Initialisation: A random (kaiming-uniform), B zero, so ΔW = 0 and the adapted model starts out exactly equal
  to the pretrained one; the gradient reaches B first (through A's random directions), then A.
- Why `scaling`: dividing by r lets r change with less retuning of the learning rate, at the small ranks the
  paper used. At larger ranks alpha / r shrinks the update as r grows; rank-stabilised LoRA (Kalajdzievski, 2023)
  uses alpha / sqrt(r) instead, which does not (`rank_stabilized=True`, the README's rsLoRA row).
- Dropout acts on the adapter's input only; the frozen path sees x unchanged.
- Training computes (x @ A.T) @ B.T: two thin matmuls through an r-wide bottleneck. Forming W + B @ A instead
  would make autograd produce a weight-sized gradient for it at every step: exactly the cost LoRA avoids.
- Inference: `merge()` adds scaling * B @ A into W once. The layer is then a plain linear layer again and
  answering costs exactly what the base model costs. `unmerge()` subtracts it back.

A variant changes one named method: a quantized base overrides `frozen` (lora/quant.py), DoRA the way the two
paths combine (lora/dora.py). `parts` gives the fused q|k|v projection of GPT-2 one adapter per part
(lora/fused.py); plain LoRA leaves it None.
"""
import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .fused import block_diagonal_B, check_parts, stacked_rows


class LoRALinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, dropout: float = 0.0,
                 bias: bool = True, rank_stabilized: bool = False, parts: Optional[tuple[bool, ...]] = None):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {rank}")
        self.in_features, self.out_features, self.rank, self.alpha = in_features, out_features, rank, alpha
        self.scaling = alpha / math.sqrt(rank) if rank_stabilized else alpha / rank
        # The frozen pretrained layer, under the names nn.Linear uses: base checkpoints load unchanged.
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)  # (out, in)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.parts = parts
        if parts is None:
            a_rows, b_rows = rank, out_features
        else:
            check_parts(parts, out_features)
            a_rows, b_rows = stacked_rows(parts, rank, out_features)
        self.lora_A = nn.Parameter(torch.empty(a_rows, in_features))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(b_rows, rank))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's default init, as in the paper's code
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, alpha: float, dropout: float = 0.0,
                    rank_stabilized: bool = False, parts: Optional[tuple[bool, ...]] = None) -> "LoRALinear":
        """Wrap an existing nn.Linear: its weight and bias become this layer's frozen ones (shared, not copied)."""
        lora = cls(linear.in_features, linear.out_features, rank, alpha, dropout, linear.bias is not None,
                   rank_stabilized, parts)
        lora.weight = linear.weight
        lora.weight.requires_grad_(False)
        if linear.bias is not None:
            lora.bias = linear.bias
            lora.bias.requires_grad_(False)
        return lora.to(linear.weight.device)  # A and B stay fp32 even when the base weight is half precision

    def frozen(self, x: torch.Tensor) -> torch.Tensor:
        """The pretrained layer: x @ W.T + b, (..., out)."""
        return F.linear(x, self.weight, self.bias)

    def low_rank(self, x: torch.Tensor) -> torch.Tensor:
        """The update: scaling * (x @ A.T) @ B.T, (..., out), through the (..., r) bottleneck."""
        return F.linear(F.linear(x, self.lora_A) * self.scaling, self.full_B())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.frozen(x)  # W already holds W + ΔW
        return self.frozen(x) + self.low_rank(self.lora_dropout(x))

    def dense(self) -> "LoRALinear":
        """This layer with its frozen W as a dense matrix, which merging adds ΔW to: itself. A quantized layer
        answers with a dense copy (lora/quant.py)."""
        return self

    def full_B(self) -> torch.Tensor:
        """B as one (out, r) matrix: B itself, or with `parts` the per-part B_p placed block-diagonally."""
        return self.lora_B if self.parts is None else block_diagonal_B(self.lora_B, self.parts)

    def delta_weight(self) -> torch.Tensor:
        """ΔW = scaling * B @ A, (out, in), in fp32. Only merging needs it as one matrix."""
        return self.scaling * (self.full_B().float() @ self.lora_A.float())

    @torch.no_grad()
    def merge(self) -> None:
        """W <- W + ΔW, computed in fp32 and rounded once to W's dtype. Idempotent."""
        if not self.merged:
            self.weight.copy_(self.weight.float() + self.delta_weight())
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W <- W - ΔW: back to the pretrained weight (up to W's rounding). Idempotent."""
        if self.merged:
            self.weight.copy_(self.weight.float() - self.delta_weight())
            self.merged = False

    def extra_repr(self) -> str:
        parts = "" if self.parts is None else f", parts={self.parts}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"alpha={self.alpha}, scaling={self.scaling:g}{parts}, merged={self.merged}")
