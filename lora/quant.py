"""A quantized frozen base: the seed's 8-bit GPT-2 and QLoRA's 4-bit NormalFloat, from scratch.

LoRA never writes the base weight W (out, in); it only reads it. So W can be stored in fewer bits and turned back
into a dense matrix ("dequantized") in the compute dtype right before each matmul. Activations, A and B keep
their precision; only the storage of W shrinks. Two formats, each explained on the function that computes it:

int8 (quantize_int8): row-wise absmax, one fp32 scale per output row: 1 byte a weight, half of bf16; the storage
  half of LLM.int8(), the seed's 8-bit loading.
nf4 (quantize_nf4, quantize_absmax): QLoRA's blockwise 4-bit NormalFloat with double quantization: 4.127 bits a
  weight, 0.258 of bf16.

What stays in half precision. The biases, the LayerNorms and the embeddings. GPT-2's output head is the token
embedding wte itself (tied): one (50257, C) matrix serves the embedding lookup and the logits, and the logits feed
the loss directly. QLoRA keeps the head in 16 bits too; quantizing a tied matrix would mean changing both paths
(gpt2/loss.py's fused head), and a separate quantized head would add a copy. What that costs in bytes, for gpt2 and
gpt2-xl, is in the README ("LoRA variants and a quantized base"), counted from the tensors by tests/test_quant.py.

Frozen layers. QuantizedLinear (a projection without adapter) and QuantizedLoRALinear (LoRALinear over a quantized
W, overriding only its `frozen` path: A and B stay fp32 and train exactly as before) both compute x @ Ŵ.T + b
through DequantizedMatmul, which keeps only the quantized tensors for the backward pass and dequantizes again
there. Through plain autograd, the dense Ŵ of every layer would stay alive from forward to backward: a full
half-precision copy of the base, which is the memory quantization was meant to save. Dequantization is elementwise
and table lookups, no loop over blocks, so torch.compile can fuse it into one kernel per weight. One catch:
AOTAutograd's common-subexpression elimination sees that the backward's dequantization repeats the forward's,
merges them, and then saves the dense Ŵ for the backward after all. Compile with `torch._functorch.config.cse =
False` to keep only the quantized tensors saved (checked on the traced graphs; on an H100, gpt2-xl nf4 compiled
with CSE on peaked higher than bf16).

Merging. Merging ΔW = scaling * B @ A into a quantized W would mean re-quantizing W + ΔW, and ΔW is mostly far
below half a quantization step: rounding would erase the update. So a quantized layer never holds W + ΔW:
merge_lora replaces each QuantizedLoRALinear by its dense() copy, a plain LoRALinear over Ŵ dequantized in fp32
(QLoRA's advice for serving), and merges that: W <- Ŵ + ΔW in fp32, rounded once when the model is cast to the
compute dtype. The merged model holds the exact base the adapter was trained on, plus ΔW; unmerging gives Ŵ back
(it does not re-quantize). Projections without an adapter stay quantized.

Order: apply_lora first (it wraps nn.Linear layers), then quantize_base, then cast the remaining frozen parameters
to half precision. Quantizing is deterministic (elementwise, correctly rounded operations), so the same base
weights always give the same codes: rebuilding a model from its checkpoint rebuilds the same quantized base.
"""
import math
from itertools import chain
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .dora import DoRALinear
from .errors import LoRAError
from .layer import LoRALinear

MODES = ("none", "int8", "nf4")
PROJECTIONS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # the four matrices of every GPT-2 block
NF4_BLOCK = 64  # weights per absmax
ABSMAX_BLOCK = 256  # absmaxes per fp32 scale in double quantization
# QLoRA's NF4 data type, exactly as bitsandbytes stores it (quantize_nf4 says how it is built).
NF4_LEVELS = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
              -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
              0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
              0.7229568362236023, 1.0)
TINY = torch.finfo(torch.float32).tiny  # an all-zero row or block gets this scale: its codes are 0, not 0/0


# --- int8 ------------------------------------------------------------------------------------------------------

def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise absmax (one scale per output channel): codes (out, in) int8 and the scale of each row (out,) fp32.

      s_i  = max_j |W_ij| / 127                       (out,) fp32
      Q_ij = round(W_ij / s_i)  in [-127, 127]          (out, in) int8
      Ŵ_ij = s_i * Q_ij,      |Ŵ_ij - W_ij| <= s_i / 2   (half a step; the row's largest weight is exact)
    1 byte a weight plus 4 bytes a row: half of bf16.

    The seed loaded GPT-2 through bitsandbytes' LLM.int8() (Dettmers et al., 2022). That method stores W exactly
    like this, but it also quantizes the activations X row-wise (one scale per token) and multiplies in int8. Its
    key idea is the outlier decomposition: in large models a few hidden features (columns of X) reach values 20x
    the rest, and an int8 scale stretched over them would flatten every other feature of that token. So the input
    columns O where any |X_tj| >= 6 are taken out and multiplied in 16 bits:
        Y = X[:, O] @ W[:, O].T  (fp16)   +   s_x s_w * (Q_x @ Q_w.T)  over the other columns  (int8, int32 sums)
    We quantize the weight only: X stays in the compute dtype and Ŵ feeds an ordinary half-precision matmul. This is
    the storage half of LLM.int8() with the same weight error, and without activation error there are no outliers
    to rescue, so we leave the decomposition out.
    """
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=TINY) / 127  # (out,)
    codes = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)  # (out, in)
    return codes, scale


def dequantize_int8(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (codes.float() * scale[:, None]).to(dtype)  # (out, in): one product in fp32, rounded once to dtype


# --- nf4 -------------------------------------------------------------------------------------------------------

def pack_4bit(codes: torch.Tensor) -> torch.Tensor:
    """(n,) uint8 codes in 0..15, n even -> (n/2,) bytes: codes[2i] in the high nibble, codes[2i+1] in the low."""
    return codes[0::2] << 4 | codes[1::2]


def unpack_4bit(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack((packed >> 4, packed & 15), dim=-1).flatten()  # (2n,) uint8


def quantize_absmax(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Double quantization: (n_blocks,) positive fp32 absmaxes -> int8 codes (padded to groups of 256), the step
    of each group (n_groups,) fp32, and their mean (1,) fp32.

    fp32 absmaxes would cost 32/64 = 0.5 bits a weight. QLoRA stores them in 8 bits, in blocks
    of 256. Absmaxes are all positive, so they are centred first. Exactly what we do, per weight matrix:
      μ    = mean of all c_b (summed in float64, so the result does not depend on the summation order)   1 fp32
      t_g  = max |c_b - μ| over group g of 256 absmaxes, / 127                                          fp32 each
      j_b  = round((c_b - μ) / t_g)  in [-127, 127]                                                     int8 each
      ĉ_b  = μ + t_g * j_b,      |ĉ_b - c_b| <= t_g / 2
    The paper uses an 8-bit float format here (bitsandbytes' dynamic map); we use linear int8, the same size and the
    same rule as the int8 format above. The codes k are chosen with the exact c_b (as bitsandbytes does), so
        |Ŵ - W| <= 0.3038 / 2 * c_b + t_g / 2.
    Cost: 4 + 8/64 + 32/(64 * 256) = 4.127 bits a weight, 0.258 of bf16 (0.281 without double quantization).
    """
    mean = absmax.double().mean().float().reshape(1)
    centred = F.pad(absmax - mean, (0, -absmax.numel() % ABSMAX_BLOCK)).view(-1, ABSMAX_BLOCK)  # (n_groups, 256)
    step = centred.abs().amax(dim=1).clamp(min=TINY) / 127  # (n_groups,)
    codes = torch.round(centred / step[:, None]).clamp(-127, 127).to(torch.int8).flatten()
    return codes, step, mean


def dequantize_absmax(codes: torch.Tensor, step: torch.Tensor, mean: torch.Tensor, n_blocks: int) -> torch.Tensor:
    return (codes.view(-1, ABSMAX_BLOCK).float() * step[:, None]).flatten()[:n_blocks] + mean  # (n_blocks,)


def quantize_nf4(weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Blockwise 4-bit NormalFloat (QLoRA, Dettmers et al., 2023): packed codes (n_blocks * 32,) uint8, then
    quantize_absmax's three tensors (the absmaxes, double-quantized).

    W is flattened (row-major) and cut into blocks of 64 consecutive weights (zero-padded at the end if needed).
      c_b  = max |W| over block b                        one absmax per 64 weights
      k    = index of the level q_k nearest to W / c_b   4 bits; two codes per byte, the first in the high nibble
      Ŵ    = q_k * ĉ_b                                   ĉ_b: c_b after double quantization (quantize_absmax)
    The 16 levels q_0..q_15 (NF4_LEVELS) are quantiles of the standard normal, so that normally distributed weights
    fall into every level equally often, normalised to [-1, 1] and with an exact 0: 8 positive levels at the
    quantiles linspace(δ, 1/2, 9)[:-1], 7 negative ones at the negated quantiles linspace(δ, 1/2, 8)[:-1], plus 0,
    then divided by the largest; δ = 0.9677083 = ((1 - 1/30) + (1 - 1/32)) / 2 (bitsandbytes' create_normal_map).
    Rounding to the nearest level errs by at most half the largest gap between adjacent levels (that gap is
    0.3038, between -1 and -0.6962) times c_b.
    """
    flat = weight.detach().float().flatten()
    blocks = F.pad(flat, (0, -flat.numel() % NF4_BLOCK)).view(-1, NF4_BLOCK)  # (n_blocks, 64)
    absmax = blocks.abs().amax(dim=1)  # (n_blocks,)
    levels = torch.tensor(NF4_LEVELS, device=weight.device)
    midpoints = (levels[1:] + levels[:-1]) / 2  # (15,): the level nearest to x is the bucket x falls into
    codes = torch.bucketize(blocks / absmax.clamp(min=TINY)[:, None], midpoints).to(torch.uint8)  # (n_blocks, 64)
    return (pack_4bit(codes.flatten()), *quantize_absmax(absmax))


def dequantize_nf4(packed: torch.Tensor, absmax_codes: torch.Tensor, absmax_step: torch.Tensor,
                   absmax_mean: torch.Tensor, levels: torch.Tensor, shape: tuple[int, int],
                   dtype: torch.dtype) -> torch.Tensor:
    n_blocks = packed.numel() * 2 // NF4_BLOCK
    absmax = dequantize_absmax(absmax_codes, absmax_step, absmax_mean, n_blocks)  # (n_blocks,)
    values = levels[unpack_4bit(packed).long()].view(n_blocks, NF4_BLOCK) * absmax[:, None]  # (n_blocks, 64)
    return values.flatten()[:math.prod(shape)].view(shape).to(dtype)  # (out, in)


def dequantize(mode: str, tensors: tuple[torch.Tensor, ...], shape: tuple[int, int], dtype: torch.dtype):
    return dequantize_int8(*tensors, dtype) if mode == "int8" else dequantize_nf4(*tensors, shape, dtype)


# --- frozen quantized layers -----------------------------------------------------------------------------------

class DequantizedMatmul(torch.autograd.Function):
    """y = x @ Ŵ.T + b for a frozen quantized W. The backward pass dequantizes again for grad_x = grad_y @ Ŵ, so the
    dense Ŵ lives only during its own matmul. No gradient for W or b: they are frozen."""

    @staticmethod
    def forward(ctx, x, bias, mode, shape, dtype, *tensors):
        ctx.mode, ctx.shape, ctx.x_dtype = mode, shape, x.dtype
        ctx.save_for_backward(*tensors)
        return F.linear(x, dequantize(mode, tensors, shape, dtype), bias)  # (..., out)

    @staticmethod
    def backward(ctx, grad_y):
        weight = dequantize(ctx.mode, ctx.saved_tensors, ctx.shape, grad_y.dtype)  # (out, in)
        grad_x = (grad_y @ weight).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None  # (..., in)
        return (grad_x, None, None, None, None) + (None,) * len(ctx.saved_tensors)


class QuantizedWeight(nn.Module):
    """A frozen weight (out, in) stored as int8 or nf4 buffers (no parameters: nothing here trains)."""

    def __init__(self, weight: torch.Tensor, mode: str):
        super().__init__()
        self.mode, self.shape = mode, tuple(weight.shape)
        if mode == "int8":
            names, tensors = ("codes", "scale"), quantize_int8(weight)
        elif mode == "nf4":
            names, tensors = ("codes", "absmax_codes", "absmax_step", "absmax_mean"), quantize_nf4(weight)
        else:
            raise ValueError(f"quantization mode must be 'int8' or 'nf4', not {mode!r}")
        for name, t in zip(names, tensors):
            self.register_buffer(name, t)
        self.names = names
        if mode == "nf4":  # the table codes index into, on the weight's device
            self.register_buffer("levels", torch.tensor(NF4_LEVELS, device=weight.device), persistent=False)
            self.names += ("levels",)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, name) for name in self.names)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize(self.mode, self.tensors(), self.shape, dtype)  # (out, in)

    def linear(self, x: torch.Tensor, bias: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """x @ Ŵ.T + bias with Ŵ dequantized to `dtype`."""
        return DequantizedMatmul.apply(x, bias, self.mode, self.shape, dtype, *self.tensors())

    def _apply(self, fn, recurse=True):
        # model.to(torch.bfloat16) casts every floating-point buffer. Rounded, the fp32 scales would give another
        # base than the one the adapter was trained on: they follow the device only.
        fp32 = {name: t for name, t in self._buffers.items() if t is not None and t.dtype == torch.float32}
        super()._apply(fn, recurse)
        for name, t in fp32.items():
            self._buffers[name] = t.to(self._buffers[name].device)
        return self

    def extra_repr(self) -> str:
        return f"mode={self.mode}, shape={self.shape}"


class QuantizedLinear(nn.Module):
    """A frozen linear layer whose weight is stored quantized: for the projections that get no adapter."""

    def __init__(self, linear: nn.Linear, mode: str, compute_dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features, self.compute_dtype = linear.in_features, linear.out_features, compute_dtype
        self.quantized_weight = QuantizedWeight(linear.weight, mode)
        self.bias = linear.bias  # stays as it is (cast to half precision with the rest of the base)
        if self.bias is not None:
            self.bias.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantized_weight.linear(x, self.bias, self.compute_dtype)  # (..., out)


class QuantizedLoRALinear(LoRALinear):
    """LoRALinear over a quantized W: the frozen path dequantizes, A and B train exactly as in LoRALinear."""

    @classmethod
    def from_lora(cls, lora: LoRALinear, mode: str, compute_dtype: torch.dtype) -> "QuantizedLoRALinear":
        """The same adapter (A, B, bias and dropout shared, not copied) over W quantized."""
        if lora.merged:
            raise ValueError("this LoRALinear is merged: quantizing W + ΔW would lose ΔW to rounding; unmerge first")
        layer = _sharing_adapter(cls, lora)
        layer.quantized_weight = QuantizedWeight(lora.weight, mode)
        layer.compute_dtype = compute_dtype
        return layer

    def frozen(self, x: torch.Tensor) -> torch.Tensor:
        """x @ Ŵ.T + b, Ŵ dequantized for this matmul only: the one path a quantized base changes."""
        return self.quantized_weight.linear(x, self.bias, self.compute_dtype)  # (..., out)

    def dense(self) -> LoRALinear:
        """The same adapter (A, B, bias and dropout shared) over Ŵ dequantized in fp32: what merging adds ΔW to."""
        layer = _sharing_adapter(LoRALinear, self)
        layer.weight = nn.Parameter(self.quantized_weight.dequantize(torch.float32), requires_grad=False)
        return layer

    def merge(self) -> None:
        raise LoRAError("a quantized layer cannot hold W + ΔW: merge_lora(model) replaces it by its dense() "
                        "layer and merges that")


def _sharing_adapter(layer_class: type, lora: LoRALinear) -> LoRALinear:
    """A layer of `layer_class` with `lora`'s A, B, bias, dropout and scaling (shared, not copied), and no frozen
    weight yet: the caller gives it one."""
    with torch.device("meta"):  # an empty shell: no memory and no random draws; its tensors are replaced below
        layer = layer_class(lora.in_features, lora.out_features, lora.rank, lora.alpha, bias=lora.bias is not None,
                            parts=lora.parts)
    layer.scaling, layer.lora_dropout = lora.scaling, lora.lora_dropout
    layer.lora_A, layer.lora_B, layer.bias = lora.lora_A, lora.lora_B, lora.bias
    del layer.weight
    return layer


def quantize_base(model: nn.Module, mode: str, compute_dtype: torch.dtype) -> nn.Module:
    """Store the four projections of every GPT-2 block quantized (mode "int8" or "nf4"; "none" leaves the model
    as it is), in place; returns the model. LoRALinear layers keep their adapter (QuantizedLoRALinear), plain
    nn.Linear ones become QuantizedLinear. Call it after apply_lora and before casting the rest of the frozen base
    to `compute_dtype`, the dtype the weights are dequantized to (that of the matmuls: bf16/fp16 on GPU)."""
    if mode not in MODES:
        raise ValueError(f"quantization mode must be one of {', '.join(MODES)}, not {mode!r}")
    if mode == "none":
        return model
    projections = [(name, m) for name, m in model.named_modules() if name.endswith(PROJECTIONS)]
    if not projections:
        raise ValueError(f"no GPT-2 projection ({', '.join(PROJECTIONS)}) found in this model")
    for name, module in projections:
        if isinstance(module, (QuantizedLoRALinear, QuantizedLinear)):
            raise ValueError(f"{name} is quantized already")
        if isinstance(module, DoRALinear) or hasattr(module, "initial_A"):
            raise ValueError(f"{name}: DoRA's weight norm and PiSSA's residual need the dense weight; quantize a "
                             f"base with plain LoRA layers")
        if isinstance(module, LoRALinear):
            quantized = QuantizedLoRALinear.from_lora(module, mode, compute_dtype)
        elif isinstance(module, nn.Linear):
            quantized = QuantizedLinear(module, mode, compute_dtype)
        else:
            raise ValueError(f"{name} is a {type(module).__name__}: quantize_base converts nn.Linear and LoRALinear")
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, quantized)
    return model


def weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of the frozen base, counted from its tensors: `projections` (the stored weights of the four block
    matrices, quantized or not), `embeddings` (wte, which is also the tied output head and counts once, and wpe),
    `other` (biases, LayerNorms). LoRA's A and B are not part of the base and are left out."""
    counts = {"projections": 0, "embeddings": 0, "other": 0}
    seen = set()
    for module_name, module in model.named_modules():
        for name, t in chain(module.named_parameters(recurse=False), module.named_buffers(recurse=False)):
            if id(t) in seen or name.startswith("lora_"):
                continue
            seen.add(id(t))
            if isinstance(module, nn.Embedding):
                part = "embeddings"
            elif isinstance(module, QuantizedWeight) or (module_name.endswith(PROJECTIONS) and name == "weight"):
                part = "projections"
            else:
                part = "other"
            counts[part] += t.numel() * t.element_size()
    return counts
