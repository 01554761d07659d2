"""Loading the official GPT-2 weights: from the Hugging Face Hub (downloaded once into a cache) or a local file.

Two key layouts exist. The Hub's `model.safetensors` names tensors `h.0.attn.c_attn.weight`; a model saved by
transformers' `GPT2LMHeadModel.save_pretrained` prefixes them with `transformer.` and may add `lm_head.weight`.
Both store the four projection matrices as (in, out) ("Conv1D"), the transpose of `nn.Linear`'s (out, in).
"""
import json
import os
import urllib.error
import urllib.request
from pathlib import Path

import torch
from tqdm import tqdm

from .errors import UserError
from .files import atomic_write
from .model import GPT, PRESETS, GPTConfig, preset
from .safetensors import load_safetensors

HUB_MODELS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
HUB_URL = "https://huggingface.co/{name}/resolve/main/model.safetensors"
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
CAUSAL_MASK_BUFFERS = (".attn.bias", ".attn.masked_bias")  # saved by old transformers versions; not weights


def cache_dir() -> Path:
    """Where downloaded weights live: $GPT2_CACHE_DIR, else ~/.cache/gpt2-lora."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gpt2-lora"
    return Path(os.environ.get("GPT2_CACHE_DIR", default))


def download(name: str) -> Path:
    """The cached `model.safetensors` of a Hub model, downloaded with a progress bar if not cached yet."""
    dest = cache_dir() / name / "model.safetensors"
    if dest.exists():
        return dest
    url = HUB_URL.format(name=name)
    try:
        with urllib.request.urlopen(url, timeout=30) as response, atomic_write(dest) as f, \
                tqdm(total=int(response.headers.get("Content-Length", 0)) or None, unit="B", unit_scale=True,
                     desc=f"downloading {name}") as bar:
            while chunk := response.read(1 << 20):
                f.write(chunk)
                bar.update(len(chunk))
            if bar.total and bar.n != bar.total:
                raise urllib.error.URLError(f"the connection closed after {bar.n} of {bar.total} bytes")
    except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
        reason = getattr(e, "reason", e)
        raise UserError(f"could not download {url} ({reason}). Without network: fetch that file on a machine "
                        f"that has it, put it in a directory, and pass the directory instead of '{name}' "
                        f"(GPT.from_pretrained('/path/to/dir'), or --model /path/to/dir)") from None
    return dest


def from_pretrained(name_or_path: str, dropout: float = 0.0) -> GPT:
    """A GPT with pretrained weights: a Hub name (gpt2, gpt2-medium, gpt2-large, gpt2-xl), a directory holding
    `model.safetensors` (and optionally transformers' `config.json`), or the path of a safetensors file.
    Hub names win over same-named local folders: write ./gpt2 for a folder called gpt2."""
    if name_or_path in HUB_MODELS:
        path, config_file = download(name_or_path), None
    elif os.path.isdir(name_or_path):
        path, config_file = Path(name_or_path) / "model.safetensors", Path(name_or_path) / "config.json"
    elif os.path.isfile(name_or_path):
        path, config_file = Path(name_or_path), Path(name_or_path).with_name("config.json")
    elif name_or_path in PRESETS:
        raise UserError(f"{name_or_path} has no pretrained weights: build it with random weights (--init random)")
    else:
        raise UserError(f"{name_or_path!r} is neither a directory, a file, nor a Hub model "
                        f"({', '.join(HUB_MODELS)})")
    if not path.is_file():
        raise UserError(f"no model.safetensors in {name_or_path}: download one from "
                        f"{HUB_URL.format(name='gpt2')} (or gpt2-medium, ...) into that directory")
    tensors = _to_model_layout(load_safetensors(path), path)
    config = _config_for(tensors, config_file, PRESETS.get(name_or_path), path)
    config.dropout = dropout
    with torch.device("meta"):  # no memory and no random init for weights about to be replaced
        model = GPT(config)
    _check_tensors(model, tensors, path)
    model.load_state_dict(tensors, strict=False, assign=True)
    model.lm_head.weight = model.transformer.wte.weight  # loading replaced wte's Parameter: tie the head again
    return model


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


def _config_for(tensors: dict[str, torch.Tensor], config_file: Path | None, preset: GPTConfig | None,
                path: Path) -> GPTConfig:
    """The shape of the checkpoint. Heads cannot be read off the weights: they come from a preset or config.json."""
    if preset is not None:
        return GPTConfig(**vars(preset))
    wte, wpe = tensors.get("transformer.wte.weight"), tensors.get("transformer.wpe.weight")
    if wte is None or wpe is None:
        raise UserError(f"{path} is not a GPT-2 checkpoint: it has no wte.weight / wpe.weight tensors")
    n_layer = len({k.split(".")[2] for k in tensors if k.startswith("transformer.h.")})
    if config_file is not None and config_file.is_file():
        n_head = json.loads(config_file.read_text())["n_head"]
    else:
        same_shape = [PRESETS[name] for name in HUB_MODELS  # the released sizes only: guessing is safe there
                      if (PRESETS[name].n_layer, PRESETS[name].n_embd) == (n_layer, wte.shape[1])]
        if not same_shape:
            raise UserError(f"{path}: {n_layer} layers of width {wte.shape[1]} match no GPT-2 size; put "
                            f"transformers' config.json (with n_head) beside it")
        n_head = same_shape[0].n_head
    return GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=wte.shape[1], vocab_size=wte.shape[0],
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
