"""What a sound adapter holds, checked on every adapter loaded: finite numbers of a size training can produce.

A NaN or an inf in A or B makes every answer garbage without a word, and a NaN alpha does the same through the
scaling; so loading refuses them, by the file and the field, before the model is touched.
"""
import torch

from .errors import LoRAError

# The largest magnitude an adapter's number may have, on save (train.py) and on load (lora/checkpoint.py,
# lora/peft_format.py). A trained adapter is a small correction to weights of order 1: Adam moves each entry by
# about the learning rate per step (5e-5 x 1200 steps = 0.06 for the seed's recipe), and even lr 1e-2 for 10,000
# steps stays far below. Entries of 1e4 make B @ A alone exceed fp16's largest number (65,504), so the adapter
# could not even be merged for half-precision answering: such a state is divergence.
ADAPTER_LIMIT = 1e4


def is_number(value) -> bool:
    """An int or a float, not a bool (JSON's true is not a rank) and not a string ("8" is not an alpha)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_adapter_tensors(tensors: dict[str, torch.Tensor], where: str) -> None:
    """Refuse a tensor of `where` (a file) that is not floating point, holds NaN or inf, or a number larger than
    ADAPTER_LIMIT in magnitude; the message names the file and the tensor."""
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            kind = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise LoRAError(f"{where}: {name} is {kind}, not a floating-point tensor: the file is damaged")
        if t.numel() == 0:
            continue
        if not torch.isfinite(t).all():
            what = "NaN" if torch.isnan(t).any() else "inf"
            raise LoRAError(f"{where}: {name} holds {what} (not finite): the adapter is damaged or its training "
                            f"diverged; use another checkpoint")
        worst = t.abs().max().item()
        if worst > ADAPTER_LIMIT:
            raise LoRAError(f"{where}: {name} holds {worst:.3g}, beyond any trained adapter (limit "
                            f"{ADAPTER_LIMIT:g}): the adapter is damaged or its training diverged")
