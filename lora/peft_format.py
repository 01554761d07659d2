"""Adapters in PEFT's format: what `PeftModel.save_pretrained` writes and `PeftModel.from_pretrained` reads.

A PEFT adapter directory holds two files:

    adapter_config.json        {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8,
                                "target_modules": ["c_attn", ...], "fan_in_fan_out": true, ...}
    adapter_model.safetensors  base_model.model.transformer.h.0.attn.c_attn.lora_A.weight   (r, in)
                               base_model.model.transformer.h.0.attn.c_attn.lora_B.weight   (out, r)

Module names are those of transformers' GPT2LMHeadModel, which ours mirror. transformers builds GPT-2's
projections as Conv1D (weight stored (in, out)), yet PEFT keeps A and B in nn.Linear's orientation, exactly as
LoRALinear does; `fan_in_fan_out: true` only tells PEFT to transpose ΔW when it merges into a Conv1D weight.
So the tensors cross over unchanged.

PEFT's scaling is per module: alpha / r, or alpha / sqrt(r) with `use_rslora`. A module's r and alpha are
`r` and `lora_alpha`, unless a key of `rank_pattern` / `alpha_pattern` matches the end of its name.

The q/k/v-selective adapter (`qkv="qv"`) is, seen from outside, an ordinary LoRA of c_attn with rank 2r:

    ΔW = scaling * B_full @ A,   A = [A_q; A_v] (2r, in),   B_full = [[B_q, 0], [0, 0], [0, B_v]] (3C, 2r)

It exports exactly with rank_pattern {"c_attn": 2r} and an alpha_pattern that keeps its scaling: alpha' = 2 * alpha
(alpha'/2r = alpha/r), or sqrt(2) * alpha under rsLoRA (alpha'/sqrt(2r) = alpha/sqrt(r)).

This module converts between a model and (config dict, tensors dict). Reading and writing the two files is the
caller's (finetune/adapters.py, with tensorio's safetensors reader and writer).
"""
import math
import re

import torch
import torch.nn as nn

from .dora import DoRALinear
from .errors import LoRAError
from .inject import LoRAConfig, install
from .layer import LoRALinear
from .pissa import pissa_to_lora, saved_config
from .sound import check_adapter_tensors, is_number

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PeftModel wraps a LoraModel, which wraps the transformers model
KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<matrix>[AB])\.weight")

# PEFT settings that change what the adapter computes and that LoRALinear does not do; each must be off.
UNSUPPORTED = {
    "use_dora": "DoRA (a trained magnitude per output)",
    "lora_bias": "a trained bias in lora_B",
    "modules_to_save": "whole modules trained beside the adapter",
    "trainable_token_indices": "trained rows of the token embeddings",
    "layer_replication": "layers repeated into a deeper base",
    "target_parameters": "LoRA on parameters instead of modules",
    "alora_invocation_tokens": "activated LoRA (aLoRA), on only after an invocation",
    "use_qalora": "QALoRA",
    "use_bdlora": "block-diagonal LoRA",
    "arrow_config": "Arrow routing",
    "kasa_config": "KaSA",
    "monteclora_config": "MonteCLoRA",
}
PEFT_DEFAULTS = {"r": 8, "lora_alpha": 8}  # LoraConfig's, for a config file that leaves them out
OFF = (None, False, "none", [], {})
# Initialisations that change the base weights too: the adapter then needs that changed base, not the original.
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def to_peft(model: nn.Module, config: LoRAConfig,
            base_model_name_or_path: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """adapter_config.json's content and adapter_model.safetensors' tensors for `model`'s adapters (as applied
    with `config`), the fields PEFT needs to load them onto `base_model_name_or_path`.

    DoRA exports as PEFT's DoRA (`use_dora`, plus each module's `lora_magnitude_vector`: PEFT takes the same
    per-output-row norm). PiSSA exports as the plain rank-2r LoRA it amounts to on the original base, as our own
    checkpoints do (lora/pissa.py), which is also what PEFT's own PiSSA-to-LoRA conversion writes."""
    state = pissa_to_lora(model, {})  # A and B of the PiSSA layers as plain LoRA on the original weights
    config = saved_config(config)
    tensors = {}
    for name, layer in _named_lora_layers(model):
        A = state.get(f"{name}.lora_A", layer.lora_A)  # (n*r, in)
        B = state.get(f"{name}.lora_B", layer.full_B())  # (out, n*r)
        tensors[f"{PREFIX}{name}.lora_A.weight"] = A.detach().float()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = B.detach().float()
        if isinstance(layer, DoRALinear):
            tensors[f"{PREFIX}{name}.lora_magnitude_vector"] = layer.lora_magnitude_vector.detach().float()  # (out,)
    rank_pattern, alpha_pattern = {}, {}
    if config.qkv:  # n parts, each of rank r: one rank-n*r adapter whose alpha keeps the scaling
        n = len(config.qkv)
        rank_pattern["c_attn"] = n * config.rank
        alpha_pattern["c_attn"] = config.alpha * (math.sqrt(n) if config.rank_stabilized else n)
    peft_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": config.rank,
        "lora_alpha": int(config.alpha) if float(config.alpha).is_integer() else config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": sorted(config.targets),
        "fan_in_fan_out": True,  # GPT-2's projections are Conv1D in transformers
        "bias": "none",
        "use_rslora": config.rank_stabilized,
        "use_dora": config.dora,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "modules_to_save": None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    return peft_config, tensors


def _named_lora_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]
    if not layers:
        raise LoRAError("the model has no LoRA layers to export")
    return layers


def apply_peft(model: nn.Module, peft_config: dict, tensors: dict[str, torch.Tensor],
               source: str = "the PEFT adapter") -> list[str]:
    """Give `model` the LoRA layers of a PEFT adapter, with its A and B: each adapted nn.Linear becomes a
    LoRALinear of that module's rank and alpha. Everything is checked before the model is touched: an adapter
    that does not fit raises LoRAError, naming `source` (its directory), the file and the field or tensor, and
    leaves the model as it was. Returns the names of the adapted modules."""
    try:
        layers = _peft_layers(model, peft_config, tensors)
    except LoRAError as e:
        raise LoRAError(f"{source}: {e}") from None
    install(model, layers)
    return list(layers)


def _peft_layers(model: nn.Module, peft_config: dict, tensors: dict[str, torch.Tensor]) -> dict[str, LoRALinear]:
    """The LoRALinear of each adapted module, holding the file's A and B, not yet in the model."""
    check_peft_config(peft_config)
    check_adapter_tensors(tensors, WEIGHTS_NAME)
    layers = {}
    for name, (A, B) in _pairs(tensors).items():
        if name == "lm_head" or name.endswith(".lm_head"):
            raise LoRAError("target_modules: an adapter of lm_head is not supported (GPT-2's output head is the "
                            "token embedding matrix, which stays frozen here)")
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            raise LoRAError(f"the adapter was made for a base of another shape: it adapts {name}, which this "
                            f"model ({_depth(model)} blocks) does not have") from None
        if isinstance(linear, LoRALinear):
            raise LoRAError(f"{name} already has a LoRA adapter: load a PEFT adapter into a plain base model")
        if not isinstance(linear, nn.Linear):
            raise LoRAError(f"target_modules: {name} is a {type(linear).__name__}; only linear projections "
                            f"(c_attn, c_proj, c_fc) can be adapted here")
        if A.ndim != 2 or B.ndim != 2:
            raise LoRAError(f"{WEIGHTS_NAME}: {name}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} must "
                            f"both be matrices (2 dimensions)")
        rank = A.shape[0]
        expected_rank = _pattern_value(peft_config, "rank_pattern", "r", name)
        if rank != expected_rank or B.shape[1] != rank:
            raise LoRAError(f"{WEIGHTS_NAME}: {name}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} do not "
                            f"have the rank {expected_rank} that {CONFIG_NAME}'s r / rank_pattern give")
        if A.shape[1] != linear.in_features or B.shape[0] != linear.out_features:
            raise LoRAError(f"the adapter was made for a base of another shape: {name} maps {A.shape[1]} -> "
                            f"{B.shape[0]} features in the adapter, {linear.in_features} -> "
                            f"{linear.out_features} in this model")
        alpha = _pattern_value(peft_config, "alpha_pattern", "lora_alpha", name)
        layer = LoRALinear.from_linear(linear, rank, alpha, peft_config.get("lora_dropout", 0.0),
                                       bool(peft_config.get("use_rslora")))
        with torch.no_grad():
            layer.lora_A.copy_(A)
            layer.lora_B.copy_(B)
        layers[name] = layer
    return layers


def check_peft_config(peft_config: dict) -> None:
    """adapter_config.json's types and ranges, and that it asks for nothing LoRALinear does not compute."""
    if not isinstance(peft_config, dict):
        raise LoRAError(f"{CONFIG_NAME} holds a {type(peft_config).__name__}, not a JSON object")

    def refuse(field, what):
        raise LoRAError(f"{CONFIG_NAME}: {field} {peft_config[field]!r}: {what}")

    if type(peft_config.get("r", 1)) is not int or peft_config.get("r", 1) < 1:
        refuse("r", "the rank must be a whole number >= 1")
    alpha = peft_config.get("lora_alpha", 1)
    if not is_number(alpha) or not math.isfinite(alpha) or alpha <= 0:
        refuse("lora_alpha", "must be a finite number above 0")
    dropout = peft_config.get("lora_dropout", 0.0)
    if not is_number(dropout) or not 0 <= dropout < 1:
        refuse("lora_dropout", "must be a number in [0, 1)")
    for flag in ("use_rslora", "fan_in_fan_out", "inference_mode"):
        if not isinstance(peft_config.get(flag, False), bool):
            refuse(flag, "must be true or false")
    if not isinstance(peft_config.get("base_model_name_or_path") or "", str):
        refuse("base_model_name_or_path", "must name the base model (a string)")
    targets = peft_config.get("target_modules") or []
    if isinstance(targets, str):
        _check_regex(targets, "target_modules")
    elif not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        refuse("target_modules", "must be a list of module names, or one regular expression")
    for patterns, valid, what in (("rank_pattern", lambda v: type(v) is int and v >= 1, "whole numbers >= 1"),
                                  ("alpha_pattern", lambda v: is_number(v) and math.isfinite(v) and v > 0,
                                   "finite numbers above 0")):
        pattern_dict = peft_config.get(patterns) or {}
        if not isinstance(pattern_dict, dict):
            refuse(patterns, "must be an object {module name pattern: value}")
        for key, value in pattern_dict.items():
            _check_regex(key, f"{patterns} key")
            if not valid(value):
                raise LoRAError(f"{CONFIG_NAME}: {patterns} {key!r}: {value!r}: its values must be {what}")
    _check_supported(peft_config)


def _check_regex(pattern: str, field: str) -> None:
    try:
        re.compile(pattern)
    except re.error as e:
        raise LoRAError(f"{CONFIG_NAME}: {field} {pattern!r} is not a regular expression ({e})") from None


def _check_supported(peft_config: dict) -> None:
    if peft_config.get("peft_type") != "LORA":
        raise LoRAError(f"{CONFIG_NAME}: peft_type {peft_config.get('peft_type')!r}: only LoRA adapters "
                        f"(peft_type LORA) load here")
    for field, what in UNSUPPORTED.items():
        if peft_config.get(field) not in OFF:
            raise LoRAError(f"{CONFIG_NAME}: {field} {peft_config[field]!r}: {what} is not supported here; export "
                            f"the adapter from PEFT without it")
    if peft_config.get("bias", "none") != "none":
        raise LoRAError(f"{CONFIG_NAME}: bias {peft_config['bias']!r}: trained biases are not supported here "
                        f"(bias 'none' only)")
    init = str(peft_config.get("init_lora_weights", True)).lower()
    if init.startswith(BASE_CHANGING_INITS):
        raise LoRAError(f"{CONFIG_NAME}: init_lora_weights {peft_config['init_lora_weights']!r}: this adapter needs "
                        f"the base weights its initialisation changed; convert it to a plain LoRA with PEFT's "
                        f"save_pretrained(..., path_initial_model_for_weight_conversion=...)")
    targets = peft_config.get("target_modules") or []
    for target in [targets] if isinstance(targets, str) else targets:
        if target.split(".")[-1] in ("wte", "wpe", "lm_head"):
            raise LoRAError(f"{CONFIG_NAME}: target_modules {target!r}: adapters of the embeddings or lm_head are "
                            f"not supported here, only of c_attn, c_proj and c_fc")


def _pairs(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module name: (A, B)} from the file's keys; any other key is refused by name."""
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        match = KEY.fullmatch(key)
        if match is None:
            what = "an embedding adapter" if "lora_embedding" in key else "not a LoRA matrix of a linear layer"
            raise LoRAError(f"{WEIGHTS_NAME} holds {key}: {what}, which is not supported here")
        found.setdefault(match["module"], {})[match["matrix"]] = t
    if not found:
        raise LoRAError(f"{WEIGHTS_NAME} holds no LoRA matrices")
    for name, ab in found.items():
        if set(ab) != {"A", "B"}:
            raise LoRAError(f"{WEIGHTS_NAME} has lora_{''.join(ab)} but not both lora_A and lora_B "
                            f"for {name}")
    return {name: (ab["A"], ab["B"]) for name, ab in found.items()}


def _pattern_value(peft_config: dict, patterns: str, field: str, module_name: str):
    """A module's r or alpha by PEFT's rule: the value of the first key of the pattern dict that matches the end of
    the module name (a regex, after a dot), else the config's value for every module."""
    for pattern, value in (peft_config.get(patterns) or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module_name):
            return value
    return peft_config.get(field, PEFT_DEFAULTS[field])


def _depth(model: nn.Module) -> int:
    return sum(1 for name, _ in model.named_modules() if re.fullmatch(r"(.*\.)?h\.\d+", name))
