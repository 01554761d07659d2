"""GPT-2 weights in the Hugging Face layout: loading them (from the Hub or a local path), and writing them.

Two key layouts exist. The Hub's `model.safetensors` names tensors `h.0.attn.c_attn.weight`; a model saved by
transformers' `GPT2LMHeadModel.save_pretrained` prefixes them with `transformer.` and may add `lm_head.weight`.
Both store the four projection matrices as (in, out) ("Conv1D"), the transpose of `nn.Linear`'s (out, in).
Beside the weights, transformers' `config.json` gives the shape (n_layer, n_head, n_embd, ...).
"""
import json
import os
from pathlib import Path

import torch
from tensorio import atomic_write, load_safetensors, save_safetensors

from .errors import UserError
from .hub import hub_file, is_repo_id
from .model import GPT, PRESETS, GPTConfig, preset

HUB_MODELS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")  # OpenAI's releases, by their short Hub names
MODEL_FILES = ("config.json", "model.safetensors")
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
CAUSAL_MASK_BUFFERS = (".attn.bias", ".attn.masked_bias")  # saved by old transformers versions; not weights
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")  # transformers' names for GPT-2's GELU (the tanh approximation)


def from_pretrained(name_or_path: str, dropout: float = 0.0) -> GPT:
    """A GPT with pretrained weights from
    - a Hub repository of a GPT-2: `gpt2` (or gpt2-medium, -large, -xl), `openai-community/gpt2`,
      `distilbert/distilgpt2`, a user's fine-tune: any repository whose config.json says model_type gpt2 and
      that holds model.safetensors (downloaded once into the Hugging Face cache);
    - a directory holding `model.safetensors` (and, unless it is a released size, transformers' `config.json`);
    - the path of a safetensors file.
    A local path wins over a Hub repository of the same name, except for the four short names (this project
    has a folder called gpt2): write ./gpt2 for a folder called gpt2."""
    path, config_file = _locate(name_or_path)
    tensors = _to_model_layout(load_safetensors(path), path)
    config = _config_for(tensors, config_file, path)
    config.dropout = dropout
    with torch.device("meta"):  # no memory and no random init for weights about to be replaced
        model = GPT(config)
    _check_tensors(model, tensors, path)
    model.load_state_dict(tensors, strict=False, assign=True)
    model.lm_head.weight = model.transformer.wte.weight  # loading replaced wte's Parameter: tie the head again
    return model


def _locate(name_or_path: str) -> tuple[Path, Path | None]:
    """The weights file and the config.json beside it (which may not exist)."""
    if name_or_path not in HUB_MODELS and os.path.isdir(name_or_path):
        path = Path(name_or_path) / "model.safetensors"
        if not path.is_file():
            raise UserError(f"no model.safetensors in {name_or_path}: download `config.json` and `model.safetensors` "
                            f"of a GPT-2 from the Hub (e.g. `hf download gpt2 {' '.join(MODEL_FILES)} --local-dir "
                            f"{name_or_path}`) into that directory")
        return path, path.with_name("config.json")
    if name_or_path not in HUB_MODELS and os.path.isfile(name_or_path):
        return Path(name_or_path), Path(name_or_path).with_name("config.json")
    if name_or_path in PRESETS and name_or_path not in HUB_MODELS:
        raise UserError(f"{name_or_path} has no pretrained weights: build it with random weights (--init random)")
    if not is_repo_id(name_or_path):
        raise UserError(f"{name_or_path!r} is neither a directory, a file, nor a Hub repository id (such as gpt2 or "
                        f"openai-community/gpt2-medium)")
    config_file = hub_file(name_or_path, "config.json", MODEL_FILES)
    _read_config(config_file, name_or_path)  # refuse another kind of model before downloading its weights
    return hub_file(name_or_path, "model.safetensors", MODEL_FILES), config_file


def _read_config(config_file: Path, where: str | Path) -> dict:
    """transformers' config.json, refused unless it describes a GPT-2 this model computes exactly."""
    try:
        config = json.loads(Path(config_file).read_text())
    except ValueError as e:
        raise UserError(f"{config_file} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise UserError(f"{config_file} is not a transformers config (a JSON object with model_type, n_layer, ...)")
    if config.get("model_type", "gpt2") != "gpt2":
        raise UserError(f"{where} is a {config['model_type']} model, not a GPT-2 (its config.json says model_type "
                        f"{config['model_type']!r})")
    if config.get("activation_function", "gelu_new") not in TANH_GELUS:
        raise UserError(f"{where} uses activation_function {config['activation_function']!r}; this GPT-2 computes "
                        f"GPT-2's tanh GELU only")
    return config


def _to_model_layout(tensors: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """Rename to this model's keys, transpose Conv1D weights to (out, in), drop mask buffers, check the tie."""
    out = {}
    for key, t in tensors.items():
        if key.endswith(CAUSAL_MASK_BUFFERS):
            continue
        name = key if key.startswith(("transformer.", "lm_head.")) else "transformer." + key
        if name.endswith(CONV1D_WEIGHTS) and t.dim() == 2:
            t = t.t()
        out[name] = t.float().contiguous() if t.is_floating_point() else t
    head, wte = out.pop("lm_head.weight", None), out.get("transformer.wte.weight")
    if head is not None and wte is not None and not torch.equal(head, wte):
        raise UserError(f"{path} has an output head that differs from its token embeddings; GPT-2 ties them")
    return out


def _config_for(tensors: dict[str, torch.Tensor], config_file: Path | None, path: Path) -> GPTConfig:
    """The shape of the checkpoint: from config.json; without one, read off the weights, with the heads (which
    the weights cannot tell) of the released GPT-2 of that depth and width."""
    if config_file is not None and config_file.is_file():
        c = _read_config(config_file, path)
        sizes = {k: c.get(k) for k in ("n_layer", "n_head", "n_embd")}
        if not all(type(v) is int and v > 0 for v in sizes.values()) or sizes["n_embd"] % sizes["n_head"]:
            raise UserError(f"{config_file}: {sizes} is not a GPT-2 shape (positive integers, n_embd a multiple of "
                            f"n_head)")
        return GPTConfig(n_layer=c["n_layer"], n_head=c["n_head"], n_embd=c["n_embd"],
                         vocab_size=c.get("vocab_size", 50257), block_size=c.get("n_positions", 1024))
    wte, wpe = tensors.get("transformer.wte.weight"), tensors.get("transformer.wpe.weight")
    if wte is None or wpe is None:
        raise UserError(f"{path} is not a GPT-2 checkpoint: it has no wte.weight / wpe.weight tensors")
    n_layer = len({k.split(".")[2] for k in tensors if k.startswith("transformer.h.")})
    same_shape = [PRESETS[name] for name in HUB_MODELS  # the released sizes only: guessing is safe there
                  if (PRESETS[name].n_layer, PRESETS[name].n_embd) == (n_layer, wte.shape[1])]
    if not same_shape:
        raise UserError(f"{path}: {n_layer} layers of width {wte.shape[1]} match no GPT-2 size; put "
                        f"transformers' config.json (with n_head) beside it")
    return GPTConfig(n_layer=n_layer, n_head=same_shape[0].n_head, n_embd=wte.shape[1], vocab_size=wte.shape[0],
                     block_size=wpe.shape[0])


def _check_tensors(model: GPT, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Every expected tensor present, nothing left over, every shape right; otherwise say what differs."""
    expected = {k: v.shape for k, v in model.state_dict().items() if k != "lm_head.weight"}
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    wrong = [f"{k} {tuple(tensors[k].shape)} (expected {tuple(s)})" for k, s in expected.items()
             if k in tensors and tensors[k].shape != s]
    problems = [f"{len(found)} {what}: {', '.join(found[:3])}{', ...' if len(found) > 3 else ''}"
                for what, found in (("missing", missing), ("unexpected", unexpected), ("of the wrong shape", wrong))
                if found]
    if problems:
        c = model.config
        raise UserError(f"{path} does not fit a GPT-2 with {c.n_layer} layers, {c.n_head} heads and width "
                        f"{c.n_embd}; tensors " + "; ".join(problems))


def save_pretrained(model: GPT, directory: str | os.PathLike) -> Path:
    """Write `model` as the Hub's GPT-2 files, for transformers' `GPT2LMHeadModel.from_pretrained(directory)` and
    for `from_pretrained` here: `model.safetensors` (the Hub's names, Conv1D weights as (in, out), no lm_head:
    it is tied to wte) and `config.json`. Only the tensors of a plain GPT are written: a LoRA model's adapters
    must be merged into its weights first (lora.merge_lora), or they are left out."""
    with torch.device("meta"):
        names = [k for k in GPT(model.config).state_dict() if k != "lm_head.weight"]
    state = model.state_dict()
    tensors = {}
    for name in names:
        t = state[name].detach()
        if name.endswith(CONV1D_WEIGHTS):
            t = t.t()  # (out, in) -> the Hub's (in, out)
        tensors[name.removeprefix("transformer.")] = t.contiguous()
    directory = Path(directory)
    save_safetensors(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    c = model.config
    config = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_layer": c.n_layer, "n_head": c.n_head,
              "n_embd": c.n_embd, "vocab_size": c.vocab_size, "n_positions": c.block_size, "n_ctx": c.block_size,
              "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
              "resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1,  # GPT-2's training dropouts
              "initializer_range": 0.02, "bos_token_id": 50256, "eos_token_id": 50256, "tie_word_embeddings": True}
    with atomic_write(directory / "config.json", "w") as f:
        json.dump(config, f, indent=2, allow_nan=False)
    return directory


def load_model(name_or_path: str, init: str = "pretrained", seed: int = 0, dropout: float = 0.0) -> GPT:
    """The base model for a run: pretrained weights, or (`init="random"`) GPT-2's initialisation of a preset's
    shape drawn on the CPU from `seed`, so that the same seed rebuilds the same weights later (evaluate.py)."""
    if init == "pretrained":
        return from_pretrained(name_or_path, dropout)
    if init != "random":
        raise UserError(f"init must be 'pretrained' or 'random', not {init!r}")
    config = preset(name_or_path)
    config.dropout = dropout
    with torch.random.fork_rng(devices=[]):  # leave the caller's random state alone
        torch.manual_seed(seed)
        return GPT(config)
