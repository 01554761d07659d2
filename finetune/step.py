"""One optimizer step, the learning-rate schedule, and the eval loss."""
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from data.batching import Batch, eval_batches
from lora import loraplus_param_groups

from .precision import autocast


def make_optimizer(model: torch.nn.Module, lr: float, betas: tuple[float, float], eps: float, weight_decay: float,
                   device: torch.device, loraplus_ratio: float | None = None) -> torch.optim.AdamW:
    """AdamW over the adapter only: the frozen weights get no optimizer state (that is most of LoRA's memory
    saving). With `loraplus_ratio`, LoRA+'s two groups: B (and DoRA's magnitudes) learn that many times faster
    than A. On a GPU the fused implementation updates every tensor in one kernel."""
    params = [p for p in model.parameters() if p.requires_grad]
    if loraplus_ratio is not None:
        params = loraplus_param_groups(model, lr, loraplus_ratio, weight_decay)
    return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                             fused=device.type == "cuda")


def learning_rate(step: int, peak: float, warmup_steps: int, max_steps: int) -> float:
    """Linear warmup from 0, then linear decay to 0 at `max_steps` (transformers' linear schedule, as the seed)."""
    if step < warmup_steps:
        return peak * step / warmup_steps
    return peak * max(0.0, (max_steps - step) / max(1, max_steps - warmup_steps))


def host_to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on `device`, without waiting: pinned memory lets the copy run alongside the GPU's work, where
    `torch.tensor(..., device="cuda")` would make the CPU wait until the GPU has finished everything before it."""
    return tensor.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else tensor


def to_device(batch: Batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(host_to_device(t, device) for t in (batch.input_ids, batch.targets, batch.target_positions))


def train_step(model: torch.nn.Module, micro_batches: list[Batch], optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler | None, dtype: torch.dtype, clip: float,
               device: torch.device) -> torch.Tensor:
    """One optimizer step over the micro-batches; returns the step's summed loss (a device tensor, no sync).

    Gradient accumulation done exactly: each micro-batch's summed loss is divided by the number of target
    tokens in the WHOLE step (all micro-batches, all GPUs), so the accumulated gradient is that of the mean over
    the step's tokens, however they were split. (Averaging per micro-batch means would weight a token in a short
    micro-batch more than one in a long micro-batch; summing without dividing, as the seed's library did,
    multiplies the gradient by the number of micro-batches.) So 5 sequences x 10 accumulation steps and 50 x 1
    are the same step: on a GPU, fewer and bigger micro-batches are simply faster."""
    n_targets = sum(len(b.targets) for b in micro_batches)  # counted on the host: no wait for the GPU
    ddp = isinstance(getattr(model, "_orig_mod", model), DistributedDataParallel)
    if ddp:  # every GPU divides by the whole step's count, which only the GPUs together know
        count = host_to_device(torch.tensor(float(n_targets)), device)
        dist.all_reduce(count)
        # DDP averages gradients over GPUs; multiplying by their number turns that average back into our sum.
        scale = dist.get_world_size() / count
    else:
        scale = 1.0 / n_targets
    total = torch.zeros((), device=device)
    for i, batch in enumerate(micro_batches):
        idx, targets, positions = to_device(batch, device)
        for tensor in (idx, targets, positions):  # under --compile: sizes vary, so compile for any size at once
            torch._dynamo.maybe_mark_dynamic(tensor, 0)
        torch._dynamo.maybe_mark_dynamic(idx, 1)
        # Only the last micro-batch of a step all-reduces the gradients between GPUs.
        with model.no_sync() if ddp and i < len(micro_batches) - 1 else nullcontext():
            with autocast(device, dtype):
                loss = model(idx, targets, positions)
            (scaler.scale(loss * scale) if scaler else loss * scale).backward()
        total += loss.detach()
    if scaler:
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
    torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], clip)
    if scaler:
        scaler.step(optimizer)  # skips the step if fp16 gradients overflowed, and adjusts the scale
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total


@torch.no_grad()
def eval_loss(model: torch.nn.Module, sequences: list[tuple[list[int], int]], batch_size: int, device: torch.device,
              dtype: torch.dtype) -> float:
    """Mean loss per target token over the sequences (each GPU takes its share)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    was_training = model.training
    model.eval()
    sums = torch.zeros(2, device=device)  # loss, tokens
    for batch in eval_batches(sequences[rank::world], batch_size):
        idx, targets, positions = to_device(batch, device)
        with autocast(device, dtype):
            sums[0] += model(idx, targets, positions).float()
        sums[1] += len(batch.targets)
    if world > 1:
        dist.all_reduce(sums)
    model.train(was_training)
    return (sums[0] / sums[1]).item()
