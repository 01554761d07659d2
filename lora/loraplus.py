"""LoRA+: a larger learning rate for B than for A.

LoRA+ (Hayou et al., 2024, "LoRA+: Efficient Low Rank Adaptation of Large Models") shows that with one learning
rate for both, A and B cannot both learn efficiently when the width is large: B (out, r) starts at zero and needs
larger steps than A (r, in). It sets

    lr_B = λ lr_A,        λ = loraplus_lr_ratio, e.g. 16

and nothing else changes: the model, the adapter file and the number of trained parameters are plain LoRA's.

The groups follow PEFT's `create_loraplus_optimizer`: every A at lr; every B, and every other 1-D trainable
tensor (DoRA's magnitude m), at λ lr; all with the same weight decay (PEFT's `loraplus_weight_decay`). PEFT's two
other groups stay empty for this project's models: LoRA on embeddings (here no embedding is adapted) and trainable
biases kept out of weight decay (here no bias trains).
"""
import torch.nn as nn


def loraplus_param_groups(model: nn.Module, lr: float, ratio: float, weight_decay: float = 0.0) -> list[dict]:
    """AdamW parameter groups: [A's at lr, B's (and m's) at ratio * lr]. Each group also carries `lr_ratio`
    (1 or ratio), so that a learning-rate schedule can set group["lr"] = schedule_lr * group["lr_ratio"]."""
    if ratio <= 0:
        raise ValueError(f"the LoRA+ learning-rate ratio must be positive, got {ratio}")
    a, b = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (b if "lora_B" in name or p.ndim == 1 else a).append(p)
    return [{"params": a, "lr": lr, "lr_ratio": 1.0, "weight_decay": weight_decay},
            {"params": b, "lr": lr * ratio, "lr_ratio": ratio, "weight_decay": weight_decay}]
