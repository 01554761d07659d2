"""The speed levers change where the time goes, never the math: each is checked against the plain path on CPU."""
import importlib
import itertools

import torch

from conftest import DEV_FILE
from data.batching import collate, least_padding_split, training_steps
from data.prompts import training_sequences
from data.squad import load_squad_file
from finetune.model import build_model
from finetune.step import train_step
from gpt2 import GPT, generate, preset
from lora import LoRAConfig, lora_layers

generate_module = importlib.import_module("gpt2.generate")  # the package exports the function by that name
loss_module = importlib.import_module("gpt2.loss")
SEED_LORA = LoRAConfig(rank=4, alpha=8, dropout=0.0, targets=("c_attn", "c_proj", "c_fc"))


def padded_size(lengths: list[int], sizes: list[int]) -> int:
    starts = [0, *itertools.accumulate(sizes)][:-1]
    return sum(size * lengths[start] for start, size in zip(starts, sizes))


def test_least_padding_split_finds_the_best_cuts():
    g = torch.Generator().manual_seed(0)
    for n, pieces in [(1, 1), (6, 1), (6, 2), (7, 3), (9, 4), (5, 5), (3, 4)]:
        lengths = sorted(torch.randint(1, 300, (n,), generator=g).tolist(), reverse=True)
        sizes = least_padding_split(lengths, pieces)
        assert sum(sizes) == n and len(sizes) == min(pieces, n) and min(sizes) >= 1
        every_split = [[b - a for a, b in zip((0, *cuts), (*cuts, n))]
                       for cuts in itertools.combinations(range(1, n), min(pieces, n) - 1)]
        assert padded_size(lengths, sizes) == min(padded_size(lengths, s) for s in every_split)


def dev_sequences(n: int) -> list:
    return training_sequences(load_squad_file(DEV_FILE)[:n], 1024, True, "all", seed=0)[0]


def test_split_steps_hold_the_same_sequences_with_less_padding():
    sequences = dev_sequences(200)
    plain, split = training_steps(sequences, 20, 1, seed=3), training_steps(sequences, 20, 1, seed=3, split=2)
    for _ in range(10):
        whole, pieces = next(plain), next(split)
        assert len(whole) == 1 and len(pieces) == 2
        assert sorted(whole[0].targets.tolist()) == sorted(torch.cat([b.targets for b in pieces]).tolist())
        assert sum(b.n_real for b in pieces) == whole[0].n_real
        assert sum(b.n_padded for b in pieces) <= whole[0].n_padded
        assert sum(len(b.input_ids) for b in pieces) == len(whole[0].input_ids)


def test_a_split_step_has_the_unsplit_steps_loss_and_gradient():
    """Exact accumulation: the same step cut in 1 or 3 micro-batches gives the same loss and the same update."""
    sequences = dev_sequences(60)
    whole = next(training_steps(sequences, 12, 1, seed=0))
    pieces = next(training_steps(sequences, 12, 1, seed=0, split=3))
    assert len(pieces) == 3

    def one_step(micro_batches):
        torch.manual_seed(0)
        model = build_model("gpt2-tiny", "random", 0, 0.0, SEED_LORA, torch.device("cpu"), torch.float32)
        with torch.no_grad():
            for layer in lora_layers(model):  # random B: B = 0 would give A no gradient
                layer.lora_B.copy_(torch.randn_like(layer.lora_B) * 0.02)
        params = {k: p for k, p in model.named_parameters() if p.requires_grad}
        before = {k: p.detach().clone() for k, p in params.items()}
        sgd = torch.optim.SGD(params.values(), lr=1.0)  # the update is minus the (clipped) gradient
        loss = train_step(model, micro_batches, sgd, None, torch.float32, 1e9, torch.device("cpu"))
        return loss, {k: before[k] - p.detach() for k, p in params.items()}

    (loss_whole, update_whole), (loss_split, update_split) = one_step(whole), one_step(pieces)
    assert torch.allclose(loss_whole, loss_split, rtol=1e-5)
    for k, u in update_whole.items():
        assert u.abs().max() > 0 and torch.allclose(update_split[k], u, rtol=1e-4, atol=1e-7), k


def test_batches_of_the_same_shape_reuse_one_cache_and_decode_as_with_a_new_one():
    """generate() keeps the last batch's KV cache (and on a GPU the decoding graph recorded on it): a batch of the
    same size and rounded length empties and reuses it, and must decode exactly as with a cache of its own."""
    torch.manual_seed(0)
    model = GPT(preset("gpt2-tiny")).eval()
    g = torch.Generator().manual_seed(1)
    batches = [[torch.randint(0, 50256, (n,), generator=g).tolist() for n in lengths]
               for lengths in ([30, 7, 12], [28, 20, 3], [5, 9], [29, 1, 17])]
    fresh = []
    for prompts in batches:  # each with a cache of its own
        generate_module._last_decoding.clear()
        fresh.append(generate(model, prompts, max_new_tokens=6, eos_id=-1))
    generate_module._last_decoding.clear()
    caches = []
    for prompts, expected in zip(batches, fresh):
        assert generate(model, prompts, max_new_tokens=6, eos_id=-1) == expected
        caches.append(generate_module._last_decoding[model].cache)
    assert caches[1] is caches[0]  # 3 rows, 36 slots rounded to 64: the same shapes
    assert caches[2] is not caches[1] and caches[3] is not caches[2]  # 2 rows: a new cache; then 3 rows again


def test_compiled_training_compiles_once_for_every_batch_shape(monkeypatch):
    """--data batches vary in rows, length and target count (and so in the loss's number of slices): one
    compilation must serve them all. Dynamo's own tracing (backend "eager") counts graphs without the slow compiler."""
    from torch._dynamo.utils import counters
    monkeypatch.setattr(loss_module, "ROWS_PER_SLICE", 64)  # several slices per batch, a different count for each
    torch._dynamo.reset()
    model = build_model("gpt2-tiny", "random", 0, 0.1, SEED_LORA, torch.device("cpu"), torch.float32)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    compiled = torch.compile(model, backend="eager")
    g = torch.Generator().manual_seed(0)
    before = counters["stats"]["unique_graphs"]
    for rows, length in [(2, 40), (2, 56), (3, 70), (5, 100), (4, 130), (2, 30)]:
        batch = collate([(torch.randint(0, 50000, (length - i,), generator=g).tolist(), 0) for i in range(rows)])
        train_step(compiled, [batch], optimizer, None, torch.float32, 1.0, torch.device("cpu"))
    assert counters["stats"]["unique_graphs"] - before == 1
