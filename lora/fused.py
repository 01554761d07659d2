"""Fused projections: one adapter for each chosen part of GPT-2's query | key | value matrix.

GPT-2 computes query, key and value with one matrix, c_attn (3C, C). Adapting it whole, as PEFT does, gives q,
k and v one shared A. The LoRA paper adapted Wq and Wv separately, each with its own rank-r pair.
`parts=(True, False, True)` (LoRAConfig's qkv="qv") does that: the output splits into 3 equal parts of C rows,
and each enabled part p gets its own A_p (r, C) and B_p (C, r). LoRALinear stores them stacked,

    lora_A = [A_q; A_v]   (2r, C)          lora_B = [B_q; B_v]   (2C, r)

and its forward pass stays the same two thin matmuls, with B laid out block-diagonally:

                  columns: r     r
                        ┌─────┬─────┐
    rows of q  (C)      │ B_q │  0  │            x @ A.T            (..., 2r): [x @ A_q.T, x @ A_v.T]
    rows of k  (C)      │  0  │  0  │  B_full    (x @ A.T) @ B_full.T  (..., 3C): q gets B_q's, v gets B_v's
    rows of v  (C)      │  0  │ B_v │  (3C, 2r)  and the key rows get exactly 0
                        └─────┴─────┘

    ΔW = scaling * B_full @ A   (3C, C),  zero in the key rows

B_full is as small as B (no weight-sized delta), and only B_q, B_v train: the zeros are not parameters.
"""
import torch


def check_parts(parts: tuple[bool, ...], out_features: int) -> None:
    if out_features % len(parts) or not any(parts):
        raise ValueError(f"parts {parts} must enable at least one of {len(parts)} equal output parts")


def stacked_rows(parts: tuple[bool, ...], rank: int, out_features: int) -> tuple[int, int]:
    """Rows of the stacked A (n * r) and B (n * out/parts) for n enabled parts."""
    n = sum(parts)
    return n * rank, out_features // len(parts) * n


def block_diagonal_B(lora_B: torch.Tensor, parts: tuple[bool, ...]) -> torch.Tensor:
    """The stacked (n * out/parts, r) B as B_full (out, n * r): each B_p in its part's rows and its own r
    columns, zeros elsewhere; a disabled part is rows of zeros."""
    part = lora_B.shape[0] // sum(parts)
    blocks = iter(lora_B.split(part))  # each (out/parts, r)
    empty = lora_B.new_zeros(part, 0)  # a disabled part: rows of zeros, no columns
    return torch.block_diag(*(next(blocks) if on else empty for on in parts))
