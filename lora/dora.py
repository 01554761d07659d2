"""DoRALinear: LoRA with the weight's magnitude and direction trained apart.

DoRA (Liu et al., 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation") writes every output row of a weight as a
length times a unit direction, W = m * W / ||W||, and observes that full fine-tuning changes the two differently
from LoRA. So it trains them separately: the direction through the LoRA update, the length m on its own:

    W' = m * (W + s B A) / ||W + s B A||        m: (out,), initialised to ||W||, trainable
    y  = x @ W'.T + b

||.|| is the norm of each output row of the (out, in) weight: `torch.linalg.norm(W, dim=1)`, as PEFT computes it
(its `weight_norm`; the paper calls it the column norm of its (in, out) layout). At init B = 0 and m = ||W||, so
W' = W: the adapted model starts out equal to the base model, as LoRA's does. The update costs `out` more
trainable numbers per layer than LoRA's r * (in + out).

- The norm is treated as a constant in backward (paper Sec 4.3): it still follows B A in the forward pass, but
  no gradient flows through it, which saves building a weight-sized graph. It is computed under no_grad.
- The forward pass keeps LoRA's two thin matmuls for B A; only the norm needs W + s B A as one matrix, once
  per forward pass, without gradient:
      y = (m / ||W + s B A||) * (x @ W.T + s (x @ A.T) @ B.T) + b
- Dropout, as PEFT applies it: the frozen path sees x, the adapter and the rescaling see dropout(x):
      y = x @ W.T + b + (m/n - 1) * dropout(x) @ W.T + (m/n) * s * (dropout(x) @ A.T) @ B.T,   n = ||W + s B A||
  which is the formula above whenever dropout is off (evaluation, or p = 0).
- In code: DoRA keeps LoRALinear's `low_rank` and overrides `forward`, where the two paths are combined.
- Merging writes W' into W. The norm n it used is kept, so that unmerging can undo it: W = W' * n / m - s B A.

m is stored as `lora_magnitude_vector` (PEFT's name): adapter checkpoints collect every `lora_` key, so they carry
it with no other change.
"""
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layer import LoRALinear


class DoRALinear(LoRALinear):
    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, dropout: float = 0.0,
                 bias: bool = True, rank_stabilized: bool = False, parts: Optional[tuple[bool, ...]] = None):
        super().__init__(in_features, out_features, rank, alpha, dropout, bias, rank_stabilized, parts)
        self.lora_magnitude_vector = nn.Parameter(torch.ones(out_features))  # (out,): m, set from W in from_linear
        self.merged_norm: Optional[torch.Tensor] = None  # (out,): ||W + s B A|| at merge time, for unmerge

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, alpha: float, dropout: float = 0.0,
                    rank_stabilized: bool = False, parts: Optional[tuple[bool, ...]] = None) -> "DoRALinear":
        """Wrap an nn.Linear as LoRALinear does, and start m at the length of each row of W (B = 0: W' = W)."""
        dora = super().from_linear(linear, rank, alpha, dropout, rank_stabilized, parts)
        dora.lora_magnitude_vector.data = dora.weight_norm()
        return dora

    @torch.no_grad()
    def weight_norm(self) -> torch.Tensor:
        """||W + s B A|| per output row, (out,), fp32, outside autograd (the paper's detach)."""
        return torch.linalg.norm(self.weight.float() + self.delta_weight(), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """LoRALinear's two paths, combined as DoRA does: the sum rescaled to the trained length m."""
        if self.merged:
            return self.frozen(x)  # W already holds W'
        rescale = self.lora_magnitude_vector / self.weight_norm()  # (out,): m / n, gradient reaches m only
        frozen = F.linear(x, self.weight)  # (..., out): x @ W.T
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            dropped, frozen_dropped = x, frozen
        else:
            dropped = self.lora_dropout(x)
            frozen_dropped = F.linear(dropped, self.weight)  # dropout(x) @ W.T
        low_rank = self.low_rank(dropped)  # (..., out)
        y = frozen + (rescale - 1) * frozen_dropped + rescale * low_rank  # fp32: m / n - 1 is small, keep its bits
        y = y if self.bias is None else y + self.bias
        return y.to(frozen.dtype)  # under autocast, the dtype plain LoRA's layer gives (bf16), not fp32

    @torch.no_grad()
    def merge(self) -> None:
        """W <- m / ||W + ΔW|| * (W + ΔW), in fp32, rounded once to W's dtype. Idempotent."""
        if not self.merged:
            self.merged_norm = self.weight_norm()
            rescale = (self.lora_magnitude_vector.float() / self.merged_norm).unsqueeze(1)  # (out, 1)
            self.weight.copy_(rescale * (self.weight.float() + self.delta_weight()))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W <- W' * n / m - ΔW with the norm n merging used: the pretrained weight again (up to rounding)."""
        if self.merged:
            rescale = (self.lora_magnitude_vector.float() / self.merged_norm).unsqueeze(1)  # (out, 1)
            self.weight.copy_(self.weight.float() / rescale - self.delta_weight())
            self.merged, self.merged_norm = False, None
