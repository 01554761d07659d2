"""LoRALinear: a frozen linear layer plus a trainable low-rank update.

The idea (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models"): fine-tuning changes a
pretrained weight W (out, in) by some ΔW, and that change has low "intrinsic rank". So instead of learning ΔW,
learn two thin matrices whose product is ΔW:

    ΔW = B @ A        A: (r, in),  B: (out, r),  r << min(in, out)
    y  = x @ W.T + b  +  scaling * (x @ A.T) @ B.T,        scaling = alpha / r

Only A and B train: r * (in + out) numbers instead of in * out (for GPT-2's c_fc, 4 * (768 + 3072) = 15,360
instead of 2,359,296). W stays frozen, so the optimizer keeps no state for it and no gradient is computed for it.

- Initialisation: A random (kaiming-uniform), B zero, so ΔW = 0 and the adapted model starts out exactly equal
  to the pretrained one; the gradient reaches B first (through A's random directions), then A.
- Why `scaling`: with alpha fixed, changing r does not change the size of the update much, so the learning
  rate need not be retuned per rank. Rank-stabilised LoRA (Kalajdzievski, 2023) uses alpha / sqrt(r) instead.
- Dropout acts on the adapter's input only; the frozen path sees x unchanged.
- Training computes (x @ A.T) @ B.T: two thin matmuls through an r-wide bottleneck. Forming W + B @ A instead
  would make autograd produce a weight-sized gradient for it at every step: exactly the cost LoRA avoids.
- Inference: `merge()` adds scaling * B @ A into W once. The layer is then a plain linear layer again and
  answering costs exactly what the base model costs. `unmerge()` subtracts it back.

Fused projections. GPT-2 computes query, key and value with one matrix, c_attn (3 * C, C). Adapting it
whole, as PEFT does, gives q, k and v one shared A. The LoRA paper adapted Wq and Wv separately, each with its
own rank-r pair. `parts=(True, False, True)` does that: the output splits into 3 equal parts, and each enabled
part p gets its own A_p (r, in) and B_p (out/3, r). Stacked, A is (2r, in) and B (2 * out/3, r), and

    ΔW = B_full @ A,   B_full = [[B_q, 0], [0, 0], [0, B_v]]   (out, 2r)

so the forward pass is the same two thin matmuls; B_full is as small as B (no weight-sized delta).
"""
import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


class LoRALinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, dropout: float = 0.0,
                 bias: bool = True, rank_stabilized: bool = False, parts: Optional[tuple[bool, ...]] = None):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {rank}")
        if parts is not None and (out_features % len(parts) or not any(parts)):
            raise ValueError(f"parts {parts} must enable at least one of {len(parts)} equal output parts")
        self.in_features, self.out_features, self.rank, self.alpha = in_features, out_features, rank, alpha
        self.parts = parts
        self.scaling = alpha / math.sqrt(rank) if rank_stabilized else alpha / rank
        # The frozen pretrained layer, under the names nn.Linear uses: base checkpoints load unchanged.
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)  # (out, in)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        n_adapters = 1 if parts is None else sum(parts)
        adapted_out = out_features if parts is None else out_features // len(parts) * n_adapters
        self.lora_A = nn.Parameter(torch.empty(n_adapters * rank, in_features))  # (r, in), or stacked (n*r, in)
        self.lora_B = nn.Parameter(torch.zeros(adapted_out, rank))  # (out, r), or stacked (n * out/parts, r)
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

    def full_B(self) -> torch.Tensor:
        """B as one (out, n*r) matrix: B itself, or the per-part B_p placed block-diagonally (zeros elsewhere)."""
        if self.parts is None:
            return self.lora_B
        part = self.out_features // len(self.parts)
        blocks = iter(self.lora_B.split(part))  # each (out/parts, r)
        empty = self.lora_B.new_zeros(part, 0)  # a disabled part: rows of zeros, no columns
        return torch.block_diag(*(next(blocks) if on else empty for on in self.parts))

    def delta_weight(self) -> torch.Tensor:
        """ΔW = scaling * B_full @ A, (out, in), in fp32. Only merging needs it as one matrix."""
        return self.scaling * (self.full_B().float() @ self.lora_A.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)  # (..., out): the frozen path
        if self.merged:
            return y  # W already holds W + ΔW
        z = F.linear(self.lora_dropout(x), self.lora_A) * self.scaling  # (..., n*r): the low-rank bottleneck
        return y + F.linear(z, self.full_B())  # (..., out)

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
