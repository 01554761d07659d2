"""Many adapters on one base: loaded beside each other, unmerged, and a batch answered whose rows use different
adapters (lora/multi.py does the math).

    model, adapters = load_adapters(["runs/r4", "runs/r8"], None, torch.device("cpu"), torch.float32)
    texts, na_probs = answer_mixed(model, [example, example], rows=[0, 1], add_eos=[True, True], max_new_tokens=32)

Each adapter is loaded exactly as evaluate.py loads it (finetune/adapters.py), onto a copy of the model that
shares the base's tensors, so the base is in memory once. All adapters must belong to the same base: the same
recorded base (or --model), the same quantization, and a run's base fingerprint is checked (an error here, not a
warning: one process serves one base).
"""
import copy
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain

import torch
import torch.nn as nn

from data.squad import SquadExample
from data.prompts import prompt_tokens
from gpt2 import GPT, UserError, load_model
from lora import DoRALinear, LoRALinear, base_fingerprint
from lora.multi import adapter_per_row, apply_multi_lora
from lora.quant import quantize_base

from .adapters import add_adapter, base_model_of, read_adapter, recorded_quantization, trained_with_eos
from .answer import abstention_probabilities, answer_prompts, no_answer_prompts


@dataclass
class AdapterInfo:
    """What /v1/adapters shows of one loaded adapter; `index` is its row index in adapter_per_row."""
    name: str
    index: int
    rank: int
    targets: list[str]
    variant: str  # "lora", "dora", with " rslora" and " qv"-style parts when used
    quantize: str
    base_fingerprint: str
    add_eos: bool


def shared_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` whose parameters and buffers are the very same tensors: new modules, no new weights. An
    adapter put into the copy wraps the base's own weights, and the base itself stays plain."""
    return copy.deepcopy(model, memo={id(t): t for t in chain(model.parameters(), model.buffers())})


def describe(name: str, index: int, adapted: nn.Module, quantize: str, fingerprint: str,
             add_eos: bool) -> AdapterInfo:
    """What `adapted` (a copy of the base with one adapter's LoRA layers) is, read from its layers: a PEFT adapter
    has no LoRAConfig, and its ranks may differ per module (the largest is shown)."""
    layers = {module: m for module, m in adapted.named_modules() if isinstance(m, LoRALinear)}
    first = next(iter(layers.values()))
    variant = "dora" if isinstance(first, DoRALinear) else "lora"
    if first.scaling != first.alpha / first.rank:
        variant += " rslora"
    parts = next((layer.parts for layer in layers.values() if layer.parts), None)
    if parts:
        variant += " " + "".join(p for p, on in zip("qkv", parts) if on)
    targets = sorted({".".join(module.split(".")[-2:]) for module in layers})  # "attn.c_attn", "mlp.c_fc", ...
    return AdapterInfo(name, index, max(layer.rank for layer in layers.values()), targets, variant, quantize,
                       fingerprint, add_eos)


def load_adapters(checkpoints: Sequence[str], model_name: str | None, device: torch.device,
                  dtype: torch.dtype) -> tuple[GPT, list[AdapterInfo]]:
    """One base with every adapter of `checkpoints` beside it, unmerged (MultiLoRALinear layers), in `dtype` on
    `device`, in eval mode; and what each adapter is. Adapter i is row index i."""
    adapters = {checkpoint: read_adapter(checkpoint) for checkpoint in checkpoints}
    bases = {checkpoint: base_model_of(adapter, model_name) for checkpoint, adapter in adapters.items()}
    if len(set(bases.values())) > 1:
        listed = "; ".join(f"{checkpoint} on {base[0]} ({base[1]}, seed {base[2]})"
                           for checkpoint, base in bases.items())
        raise UserError(f"the adapters belong on different bases ({listed}): one process serves one base; start one "
                        f"per base, or give --model to put them all on one")
    modes = {checkpoint: recorded_quantization(adapter) for checkpoint, adapter in adapters.items()}
    if len(set(modes.values())) > 1:
        raise UserError(f"the adapters were trained on differently quantized bases "
                        f"({', '.join(f'{c}: {m}' for c, m in modes.items())}): serve each quantization separately")
    base = load_model(*bases[checkpoints[0]])
    fingerprint = base_fingerprint(base)  # of the base as loaded, as a run records it
    adapted, infos = [], []
    for index, checkpoint in enumerate(checkpoints):
        adapted_copy = shared_copy(base)
        add_adapter(adapted_copy, adapters[checkpoint], strict=True)
        adapted.append(adapted_copy)
        infos.append(describe(checkpoint, index, adapted_copy, modes[checkpoint], fingerprint,
                              trained_with_eos(adapters[checkpoint])))
    quantize_base(base, modes[checkpoints[0]], dtype)
    apply_multi_lora(base, adapted)
    return base.to(device, dtype).eval(), infos


@torch.no_grad()
def answer_mixed(model: GPT, examples: Sequence[SquadExample], rows: Sequence[int], add_eos: Sequence[bool],
                 max_new_tokens: int) -> tuple[list[str], list[float]]:
    """Greedy answers and no-answer probabilities of one batch: examples[i] answered by adapter rows[i] (whose run
    ended answers with EOS if add_eos[i]), all in one generation. The same as evaluate.py's answer() and
    no_answer_probability() for each adapter alone. Contexts are cut to fit as there; check them first to refuse
    instead."""
    device = model.transformer.wte.weight.device
    index = torch.tensor(rows, device=device)
    prompts, _ = prompt_tokens(examples, model.config.block_size, max_new_tokens)
    with adapter_per_row(model, index):
        texts = answer_prompts(model, prompts, max_new_tokens)
    na_probs = [0.0] * len(examples)
    for eos in set(add_eos):  # the abstention's tokens differ between runs with and without EOS: one pass each
        group = [i for i, e in enumerate(add_eos) if e == eos]
        group_prompts = no_answer_prompts([examples[i] for i in group], model.config.block_size, max_new_tokens, eos)
        with adapter_per_row(model, index[group]):
            for i, p in zip(group, abstention_probabilities(model, group_prompts, eos)):
                na_probs[i] = p
    return texts, na_probs
