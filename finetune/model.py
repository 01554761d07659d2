"""The model a run trains, and the model that answers.

Training: the frozen base is stored in half precision on the GPU. Autocast would otherwise cast every fp32 weight
again at every forward pass (it caches casts only for leaves that require grad), and keep fp32 copies besides.
A and B stay fp32.

Answering: the adapter is merged into the weights in fp32, then the model is cast once, so the merged weights are
rounded once and answering costs exactly what the base model costs.
"""

import torch

from gpt2 import GPT, load_model
from lora import LoRAConfig, apply_lora, base_fingerprint, merge_lora
from lora.quant import quantize_base

from .adapters import load_adapted_model
from .run import Checkpoint


def build_model(model: str, init: str, seed: int, base_dropout: float, lora: LoRAConfig, device: torch.device,
                dtype: torch.dtype, quantize: str = "none") -> GPT:
    """The base model (pretrained, or GPT-2's random init drawn from `seed`) with LoRA in it, on `device`; with
    `quantize` (int8, nf4) its block projections stored quantized (lora/quant.py), from the fp32 weights.
    `.base_fingerprint` identifies the base's weights, taken as loaded (see lora.base_fingerprint)."""
    gpt = load_model(model, init, seed=seed, dropout=base_dropout)
    gpt.base_fingerprint = base_fingerprint(gpt)
    apply_lora(gpt, lora)  # first: it wraps nn.Linear layers, which quantize_base then converts
    quantize_base(gpt, quantize, dtype)
    for p in gpt.parameters():
        if not p.requires_grad:
            p.data = p.data.to(dtype)
    return gpt.to(device)


def load_answerer(checkpoint: str | Checkpoint | None, model_name: str | None, device: torch.device, dtype: torch.dtype,
                  quantize: str = "none", strict: bool = False) -> GPT:
    """The model that answers, in `dtype`: the adapter of `checkpoint` (a train.py run or its Checkpoint, a PEFT
    adapter directory or its Hub id) merged into its base (or `model_name`); without a checkpoint, the base model
    alone. With `quantize`, the base is first quantized as it was in training, so the adapter meets the weights it learned
    on; merging then dequantizes each layer (lora/quant.py). A base with other weights than the run's own is a
    warning, or with `strict` an error."""
    model = load_model(model_name) if checkpoint is None else load_adapted_model(checkpoint, model_name, strict)
    quantize_base(model, quantize, dtype)
    merge_lora(model)  # in fp32, before the cast: the merged weights are rounded once
    return model.to(device, dtype).eval()
