"""LoRA from scratch: the adapted layer (layer.py, fused.py), its settings and putting it into a model (inject.py),
adapter checkpoints (checkpoint.py), PEFT's format (peft_format.py), the checks every loaded adapter passes
(sound.py), and the variants DoRA, PiSSA, rsLoRA, LoRA+ and a quantized base. Torch and the standard library only."""
from .checkpoint import (apply_adapter, base_fingerprint, load_adapter, load_lora_state_dict, lora_state_dict,
                         recorded_config, save_adapter)
from .dora import DoRALinear
from .errors import LoRAError
from .inject import (INITS, LoRAConfig, VALID_TARGETS, apply_lora, lora_layers, mark_only_lora_as_trainable,
                     merge_lora, parameter_report, unmerge_lora)
from .layer import LoRALinear
from .loraplus import loraplus_param_groups
from .peft_format import apply_peft, check_peft_config, to_peft
from .sound import ADAPTER_LIMIT

__all__ = ["LoRALinear", "DoRALinear", "LoRAConfig", "LoRAError", "VALID_TARGETS", "INITS", "apply_lora",
           "lora_layers", "mark_only_lora_as_trainable", "merge_lora", "unmerge_lora", "parameter_report",
           "loraplus_param_groups", "lora_state_dict", "load_lora_state_dict", "save_adapter", "load_adapter",
           "apply_adapter", "recorded_config", "base_fingerprint", "to_peft", "apply_peft", "check_peft_config",
           "ADAPTER_LIMIT"]
