"""Which floating-point format a run computes in.

- bf16: the frozen base stored in bfloat16 and run under bf16 autocast. Same exponent range as fp32, so no loss
  scaling is needed. GPUs from Ampere on; CPUs also run it (slowly), which lets CI test this path.
- fp16: the seed's path on a T4 (no bf16 there): float16 base, fp16 autocast, and a GradScaler, because fp16's
  narrow range flushes small gradients to zero unless the loss is scaled up first. CUDA only.
- fp32: everything in float32; the default on a CPU.
The adapter (A and B) and the optimizer state stay fp32 in every mode: updates of lr x gradient are far smaller
than one bf16 step of a weight and would round away.
"""
from contextlib import nullcontext

import torch

from gpt2 import UserError

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_precision(name: str, device: torch.device) -> torch.dtype:
    """The compute dtype for `--precision name` on `device`. auto: bf16 on GPUs that have it, fp16 on older
    GPUs (the seed's T4), fp32 on a CPU."""
    if name not in PRECISIONS:
        raise UserError(f"--precision {name}: choose one of {', '.join(PRECISIONS)}")
    on_gpu = device.type == "cuda"
    if name == "auto":
        if not on_gpu:
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    if name == "fp16" and not on_gpu:
        raise UserError("--precision fp16 needs a CUDA GPU (fp16 autocast and loss scaling are GPU paths); on a CPU "
                        "use bf16 or fp32")
    if name == "bf16" and on_gpu and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise UserError(f"{torch.cuda.get_device_name(device)} has no bf16 arithmetic: use --precision fp16 "
                        f"(with loss scaling, as the seed did on a T4) or fp32")
    return DTYPES[name]


def precision_name(dtype: torch.dtype) -> str:
    return next(name for name, d in DTYPES.items() if d == dtype)


def autocast(device: torch.device, dtype: torch.dtype, cache_enabled: bool = True):
    """Matmuls in `dtype` while A and B stay fp32 (a no-op for fp32). `cache_enabled=False` for CUDA-graph capture:
    autocast's cache of casted weights lives only as long as the autocast region, a recorded graph longer."""
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype, cache_enabled=cache_enabled)


def grad_scaler(dtype: torch.dtype) -> torch.amp.GradScaler | None:
    """fp16 only: multiplies the loss before backward and divides the gradients after, skipping steps whose
    gradients overflowed."""
    return torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
