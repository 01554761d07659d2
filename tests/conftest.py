"""Shared fixtures: offline tokenizer, the real dev set, and random GPT-2 checkpoints written like the Hub's."""
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# Offline machines keep the dev set and tiktoken's files in ../shared; $GPT2_LORA_SHARED names another such folder
# (the GPU check copies them into .gpu/, since only the repository travels to the GPU machine).
SHARED = Path(os.environ.get("GPT2_LORA_SHARED", ROOT.parent / "shared"))
sys.path.insert(0, str(ROOT))
if (SHARED / "tiktoken_cache").is_dir():
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken_cache"))


def _dev_file() -> Path:
    """The official SQuAD 2.0 dev set: from ../shared, else downloaded once into the cache."""
    if (SHARED / "squad_v2" / "dev-v2.0.json").is_file():
        return SHARED / "squad_v2" / "dev-v2.0.json"
    from tensorio import atomic_write
    path = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gpt2-lora" / "dev-v2.0.json"
    if not path.is_file():
        import urllib.request
        with urllib.request.urlopen("https://rajpurkar.github.io/SQuAD-explorer/dataset/dev-v2.0.json") as r, \
                atomic_write(path) as f:
            f.write(r.read())
    return path


DEV_FILE = _dev_file()

TINY_SHAPE = dict(n_layer=2, n_head=4, n_embd=64)  # = the gpt2-tiny preset
SEED_LORA = dict(rank=4, alpha=8, dropout=0.0, targets=("c_attn", "c_proj", "c_fc"))  # the seed's LoRA, dropout off
IDX = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(0))  # a batch of token ids
GPT2_SHAPE = dict(n_layer=12, n_head=12, n_embd=768)


def tiny_model(seed: int = 0):
    """A gpt2-tiny GPT with random weights drawn from `seed`, in eval mode."""
    from gpt2 import GPT, preset
    torch.manual_seed(seed)
    return GPT(preset("gpt2-tiny")).eval()


def tiny_base(model) -> dict:
    """A checkpoint's `base` for a tiny_model(0): how to rebuild it."""
    return {"model": "gpt2-tiny", "init": "random", "seed": 0, "config": vars(model.config)}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||."""
    return ((a - b).norm() / b.norm()).item()


def random_hf_gpt2(n_layer: int, n_head: int, n_embd: int, seed: int = 0):
    """A transformers GPT2LMHeadModel with random weights, spread wide enough that greedy choices are clear."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, initializer_range=0.1)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # transformers zeroes biases and sets LayerNorm to identity: randomise them too
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def save_hub_layout(model, directory: Path) -> Path:
    """Write `model` as the Hub's gpt2 `model.safetensors`: no `transformer.` prefix, no lm_head, with the
    `attn.bias` causal-mask buffers, written by the reference safetensors library (not by our reader's code)."""
    from safetensors.torch import save_file
    tensors = {k.removeprefix("transformer."): v.contiguous() for k, v in model.state_dict().items()
               if k != "lm_head.weight"}
    block = model.config.n_positions
    for i in range(model.config.n_layer):
        tensors[f"h.{i}.attn.bias"] = torch.tril(torch.ones(block, block)).view(1, 1, block, block)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    model.config.to_json_file(directory / "config.json")
    return directory


@pytest.fixture(scope="session")
def tiny_hf():
    return random_hf_gpt2(**TINY_SHAPE)


@pytest.fixture(scope="session")
def tiny_hub_dir(tiny_hf, tmp_path_factory):
    return save_hub_layout(tiny_hf, tmp_path_factory.mktemp("hub_tiny"))


@pytest.fixture(scope="session")
def short_dev_file(tmp_path_factory) -> Path:
    """The 16 dev questions with the shortest context + question (about 40-50 tokens), in the official format:
    cheap to train on in a CPU test."""
    import json
    from gpt2 import get_tokenizer
    enc = get_tokenizer()
    found = []
    for article in json.loads(DEV_FILE.read_text())["data"]:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                size = len(enc.encode_ordinary(paragraph["context"])) + len(enc.encode_ordinary(qa["question"]))
                found.append((size, article["title"], paragraph["context"], qa))
    found.sort(key=lambda item: item[0])
    data = {"version": "v2.0", "data": [{"title": title, "paragraphs": [{"context": context, "qas": [qa]}]}
                                        for _, title, context, qa in found[:16]]}
    path = tmp_path_factory.mktemp("squad") / "short16.json"
    path.write_text(json.dumps(data))
    return path


def randomize(model, seed: int = 1, scale: float = 0.05) -> None:
    """Random B and, for DoRA, m away from ||W||: LayerNorm would cancel constant values, and B = 0 or m = ||W||
    would leave parts of the formula untested."""
    from lora import DoRALinear, lora_layers
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * scale)
            if isinstance(layer, DoRALinear):
                layer.lora_magnitude_vector.mul_(1 + 0.2 * torch.randn(layer.out_features, generator=g))


def random_run(directory: Path, config, seed: int, quantize: str = "none", base_seed: int = 0) -> str:
    """A train.py-format run of gpt2-tiny (random init) with a random adapter (LoRAConfig `config`, random B from
    `seed`), saved as train.py saves it: cheaper than training one."""
    from gpt2 import load_model
    from lora import apply_lora, base_fingerprint, save_adapter
    model = load_model("gpt2-tiny", "random", seed=base_seed)
    fingerprint = base_fingerprint(model)
    apply_lora(model, config)
    randomize(model, seed, scale=0.5)  # adapters far enough apart to answer differently
    save_adapter(directory / "checkpoint.pt", model, config,
                 {"model": "gpt2-tiny", "init": "random", "seed": base_seed, "quantize": quantize,
                  "config": vars(model.config), "fingerprint": fingerprint})
    return str(directory)
