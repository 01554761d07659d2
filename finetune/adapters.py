"""Adapters on disk in both formats, and the adapted model built from either.

- A train.py run directory: `checkpoint.pt`, this project's format (the adapter, how to rebuild the base, and the
  training state for --resume), and `adapter/`, the same adapter in PEFT's format, for everyone else.
- A PEFT adapter directory, local or a Hub repository: `adapter_config.json` + `adapter_model.safetensors`
  (see lora/peft_format.py), its base named by `base_model_name_or_path`.

    save_peft_adapter(run / "adapter", model, lora_config, "gpt2")   # ours -> PEFT
    model = load_adapted_model("user/gpt2-squad-lora")               # PEFT (or ours) -> a GPT with LoRA layers
"""
import json
import os
from pathlib import Path

import torch

from gpt2 import GPT, PRESETS, GPTConfig, UserError, load_model
from gpt2.hub import hub_file, is_repo_id
from gpt2.pretrained import HUB_MODELS
from lora import (LoRAConfig, LoRAError, apply_adapter, apply_lora, apply_peft, check_peft_config, lora_state_dict,
                  to_peft)
from lora.peft_format import CONFIG_NAME, WEIGHTS_NAME
from tensorio import atomic_write, load_safetensors, save_safetensors

from .run import CHECKPOINT, PEFT_FILES, Checkpoint, checkpoint_path, read_checkpoint


def save_peft_adapter(directory: str | os.PathLike, model: torch.nn.Module, lora_config: LoRAConfig,
                      base_model_name_or_path: str) -> Path:
    """Write `model`'s adapter as PEFT's save_pretrained does: adapter_model.safetensors, adapter_config.json.
    Each file is written atomically; the weights first, so a reader never sees a config without them."""
    config, tensors = to_peft(model, lora_config, base_model_name_or_path)
    directory = Path(directory)
    save_safetensors(tensors, directory / WEIGHTS_NAME, metadata={"format": "pt"})
    with atomic_write(directory / CONFIG_NAME, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True, allow_nan=False)
    return directory


def export_run_to_peft(run: str | os.PathLike, directory: str | os.PathLike) -> Path:
    """The adapter of a train.py run (its directory or checkpoint.pt) as a PEFT adapter directory. The base's
    weights play no part, so the model is built on the meta device (no memory, no download) and only the adapter
    gets real tensors."""
    checkpoint = read_checkpoint(run)
    lora_config = checkpoint.lora_config
    with torch.device("meta"):
        model = GPT(GPTConfig(**checkpoint.base.config))
        apply_lora(model, lora_config)
    if set(lora_state_dict(model)) != set(checkpoint.lora["adapter"]):
        raise UserError(f"{checkpoint.path}: the adapter's tensors do not match its LoRA settings; the file is "
                        f"damaged")
    model.load_state_dict(checkpoint.lora["adapter"], strict=False, assign=True)
    return save_peft_adapter(directory, model, lora_config, checkpoint.base.model)


def read_peft_adapter(dir_or_repo_id: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """adapter_config.json (as a dict) and the tensors of adapter_model.safetensors, from a local directory or a
    Hub repository (downloaded once into the Hugging Face cache)."""
    if os.path.isdir(dir_or_repo_id):
        directory = Path(dir_or_repo_id)
        config_file, weights_file = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        if not config_file.is_file():
            raise UserError(f"{directory} holds neither {CHECKPOINT} (a train.py run) nor {CONFIG_NAME} (a PEFT "
                            f"adapter)")
        if not weights_file.is_file():
            old = " (only the pickled adapter_model.bin: re-save it with PEFT's default safe_serialization=True)" \
                if (directory / "adapter_model.bin").is_file() else ""
            raise UserError(f"no {WEIGHTS_NAME} in {directory}{old}")
    elif is_repo_id(dir_or_repo_id):
        config_file = hub_file(dir_or_repo_id, CONFIG_NAME, PEFT_FILES)
        weights_file = hub_file(dir_or_repo_id, WEIGHTS_NAME, PEFT_FILES)
    else:
        raise UserError(f"{dir_or_repo_id!r} is neither a directory nor a Hub repository id")
    try:
        config = json.loads(config_file.read_text())
    except ValueError as e:
        raise UserError(f"{config_file} is not valid JSON ({e})") from None
    try:
        check_peft_config(config)  # before anyone reads a field of it
    except LoRAError as e:
        raise LoRAError(f"{config_file.parent}: {e}") from None
    return config, load_safetensors(weights_file)


def load_adapted_model(checkpoint: str | Checkpoint, model_name: str | None = None, strict: bool = False) -> GPT:
    """The base model with the adapter's LoRA layers (fp32, on the CPU, not merged), from
    - a train.py run directory or its checkpoint.pt (or that checkpoint, read): the base it was trained on;
    - a PEFT adapter directory or a Hub repository id of one: the base its base_model_name_or_path names.
    `model_name` (a Hub id or a path) replaces the recorded base; its shape must fit the adapter. A run's base whose
    weights differ from those it was trained on is a warning, or with `strict` an error (a PEFT adapter records
    no fingerprint of its base)."""
    adapter = read_adapter(checkpoint)
    model = load_model(*base_model_of(adapter, model_name))
    add_adapter(model, adapter, strict)
    return model


def read_adapter(checkpoint: str | Checkpoint) -> str | Checkpoint:
    """A train.py run (its directory or checkpoint.pt) as its Checkpoint, read once; a PEFT adapter (a directory or
    a Hub id) as it was named: its files are read where they are used."""
    if isinstance(checkpoint, Checkpoint) or not checkpoint_path(checkpoint):
        return checkpoint
    return read_checkpoint(checkpoint)


def base_model_of(adapter: str | Checkpoint, model_name: str | None = None) -> tuple[str, str, int]:
    """load_model's arguments (name or path, init, seed) for the base an adapter belongs on: `model_name` if given
    (pretrained), else a run's recorded base, else a PEFT adapter's base_model_name_or_path."""
    if model_name:
        return model_name, "pretrained", 0
    if isinstance(adapter, Checkpoint):
        return adapter.base.model, adapter.base.init, adapter.base.seed
    base_name = read_peft_adapter(adapter)[0].get("base_model_name_or_path")
    if not base_name:
        raise UserError(f"{adapter} names no base model (base_model_name_or_path is empty): pass the base with "
                        f"--model")
    if base_name in PRESETS and base_name not in HUB_MODELS:  # gpt2's own advice (train.py's --init) fits no reader
        raise UserError(f"{adapter} names {base_name} as its base, a shape without pretrained weights: pass the "
                        f"base it was trained on with --model")
    return base_name, "pretrained", 0


def add_adapter(model: GPT, adapter: str | Checkpoint, strict: bool = False) -> None:
    """Give `model` the LoRA layers of a train.py run or a PEFT adapter (directory or Hub id), in place; a run's
    recorded base fingerprint is checked against `model` (a warning, or with `strict` an error)."""
    if isinstance(adapter, Checkpoint):
        apply_adapter(model, adapter.lora, strict)
    else:
        apply_peft(model, *read_peft_adapter(adapter), source=adapter)


def recorded_quantization(adapter: str | Checkpoint) -> str:
    """How the base of a train.py run was quantized ("none", "int8", "nf4"); "none" for a PEFT adapter."""
    return adapter.base.quantize if isinstance(adapter, Checkpoint) else "none"


def trained_with_eos(adapter: str | Checkpoint | None) -> bool:
    """Whether the adapter learned to write EOS after its answers (a train.py run without --no-eos). A PEFT adapter,
    a run too old to record its settings, or none, gets train.py's default: yes."""
    return not (isinstance(adapter, Checkpoint) and adapter.settings is not None and adapter.settings.no_eos)
