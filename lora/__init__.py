"""LoRA from scratch: the adapted layer, putting it into a model, and adapter-only checkpoints."""
from .checkpoint import apply_adapter, load_adapter, load_lora_state_dict, lora_state_dict, save_adapter
from .inject import (LoRAConfig, VALID_TARGETS, apply_lora, lora_layers, mark_only_lora_as_trainable, merge_lora,
                     parameter_report, unmerge_lora)
from .layer import LoRALinear

__all__ = ["LoRALinear", "LoRAConfig", "VALID_TARGETS", "apply_lora", "lora_layers", "mark_only_lora_as_trainable",
           "merge_lora", "unmerge_lora", "parameter_report", "lora_state_dict", "load_lora_state_dict",
           "save_adapter", "load_adapter", "apply_adapter"]
