"""Mixed-adapter batching: each row of one batch with its own adapter gives what that adapter gives alone."""
import json

import pytest
import torch

import bench
from conftest import DEV_FILE, random_run, randomize
from data.squad import SquadExample, load_squad_file
from finetune.answer import answer, no_answer_probability
from finetune.model import load_answerer
from finetune.multi import answer_mixed, load_adapters, shared_copy
from gpt2 import GPT, UserError, load_model
from lora import LoRAConfig, LoRAError, apply_lora
from lora.multi import adapter_per_row, apply_multi_lora
from lora.quant import quantize_base

TARGETS = ("c_attn", "c_proj", "c_fc")
VARIANTS = {  # each differs from plain LoRA in what MultiLoRALinear must get right
    "plain": LoRAConfig(rank=4, alpha=8, targets=TARGETS),
    "rank8_rslora": LoRAConfig(rank=8, alpha=8, targets=TARGETS, rank_stabilized=True),  # padding, scaling
    "qv": LoRAConfig(rank=2, alpha=4, targets=TARGETS, qkv="qv"),  # block-diagonal B
    "dora": LoRAConfig(rank=4, alpha=8, targets=TARGETS, dora=True),  # per-adapter m / ||W + sBA||
    "mlp_only": LoRAConfig(rank=4, alpha=8, targets=("c_fc",)),  # absent from the other layers: zeros there
}
IDX = torch.randint(0, 50257, (6, 12), generator=torch.Generator().manual_seed(0))


def adapted_copies(base: GPT, configs: list[LoRAConfig]) -> list[GPT]:
    """One model per adapter, each sharing the base's weights, with random non-zero B."""
    copies = []
    for seed, config in enumerate(configs, start=1):
        copy = shared_copy(base)
        apply_lora(copy, config)
        randomize(copy, seed, scale=0.5)
        copies.append(copy.eval())
    return copies


def mixed_logits(base: GPT, copies: list[GPT], rows: list[int]) -> torch.Tensor:
    apply_multi_lora(base, copies)
    with torch.no_grad(), adapter_per_row(base, torch.tensor(rows)):
        return base.eval()(IDX)  # (B, T, V): all rows in one forward pass


def test_a_mixed_batch_gives_each_adapter_its_own_logits():
    torch.manual_seed(0)
    base = load_model("gpt2-tiny", "random", seed=0)
    copies = adapted_copies(base, list(VARIANTS.values()))
    with torch.no_grad():
        alone = [copy(IDX) for copy in copies]  # each adapter's LoRALinear / DoRALinear, unmerged
    assert all((a - b).abs().max() > 1e-2 for a, b in zip(alone, alone[1:]))  # they do differ
    rows = [0, 1, 2, 3, 4, 2]
    mixed = mixed_logits(base, copies, rows)
    for row, adapter in enumerate(rows):
        torch.testing.assert_close(mixed[row], alone[adapter][row], rtol=1e-5, atol=1e-5)


def test_a_mixed_batch_over_a_quantized_base():
    base = load_model("gpt2-tiny", "random", seed=0)
    configs = [VARIANTS["plain"], VARIANTS["qv"]]
    copies = adapted_copies(base, configs)
    for copy in copies:
        quantize_base(copy, "nf4", torch.float32)  # QuantizedLoRALinear: its own nf4 copy of the same W
    with torch.no_grad():
        alone = [copy(IDX) for copy in copies]
    quantize_base(base, "nf4", torch.float32)
    apply_multi_lora(base, copies)
    rows = [1, 0, 0, 1, 1, 0]
    with torch.no_grad(), adapter_per_row(base, torch.tensor(rows)):
        mixed = base.eval()(IDX)
    for row, adapter in enumerate(rows):
        torch.testing.assert_close(mixed[row], alone[adapter][row], rtol=1e-5, atol=1e-5)


def test_rows_must_be_named():
    base = load_model("gpt2-tiny", "random", seed=0)
    apply_multi_lora(base, adapted_copies(base, [VARIANTS["plain"]]))
    with pytest.raises(LoRAError, match="adapter_per_row"):
        base(IDX)
    with pytest.raises(LoRAError, match="one index per row"), adapter_per_row(base, torch.tensor([0])):
        base(IDX)


QUESTIONS = load_squad_file(DEV_FILE)[:3] + [SquadExample("winograd", "The trophy doesn't fit into the brown "
                                                          "suitcase because it's too small.", "What is too small?", [])]


@pytest.mark.parametrize("variant", ["plain", "qv", "dora", "nf4"])
def test_answers_equal_evaluate_for_each_adapter_alone(tmp_path, variant):
    """Two adapters served together, their rows interleaved in one batch: every answer and na_prob is the one
    evaluate.py gives that adapter alone (merged into its base)."""
    config = VARIANTS["plain" if variant == "nf4" else variant]
    quantize = "nf4" if variant == "nf4" else "none"
    runs = [random_run(tmp_path / "a", config, seed=1, quantize=quantize),
            random_run(tmp_path / "b", VARIANTS["plain"], seed=2, quantize=quantize)]
    model, infos = load_adapters(runs, None, torch.device("cpu"), torch.float32)
    assert [info.quantize for info in infos] == [quantize] * 2
    rows = [0, 1] * len(QUESTIONS)
    examples = [q for q in QUESTIONS for _ in range(2)]
    texts, na_probs = answer_mixed(model, examples, rows, [True] * len(rows), max_new_tokens=8)
    for index, run in enumerate(runs):
        alone = load_answerer(run, None, torch.device("cpu"), torch.float32, quantize)
        expected = answer(alone, QUESTIONS, 4, 8, progress=False)
        expected_na = no_answer_probability(alone, QUESTIONS, 4, 8, add_eos=True, progress=False)
        assert texts[index::2] == expected
        assert na_probs[index::2] == pytest.approx(expected_na, rel=1e-4)
    assert texts[0::2] != texts[1::2]  # two adapters, two kinds of answers


def test_adapters_of_different_bases_are_refused(tmp_path):
    plain = random_run(tmp_path / "a", VARIANTS["plain"], seed=1)
    with pytest.raises(UserError, match="different bases"):
        load_adapters([plain, random_run(tmp_path / "b", VARIANTS["plain"], 2, base_seed=1)], None,
                      torch.device("cpu"), torch.float32)
    with pytest.raises(UserError, match="differently quantized"):
        load_adapters([plain, random_run(tmp_path / "c", VARIANTS["plain"], 2, quantize="int8")], None,
                      torch.device("cpu"), torch.float32)


def test_bench_answers_mixed_and_one_adapter_at_a_time_alike(capsys):
    bench.main(["--model", "gpt2-tiny", "--device", "cpu", "--batch-size", "2", "--seq-len", "64", "--answers", "8",
                "--answer-batch-size", "4", "--max-new-tokens", "4", "--mixed-adapters", "1", "4"])
    result = next(r for r in map(json.loads, (line for line in capsys.readouterr().out.splitlines()
                                              if line.startswith("{"))) if r["phase"] == "mixed_adapters")
    assert [r["adapters"] for r in result["mixed_adapters"]] == [1, 4]
    for r in result["mixed_adapters"]:
        assert r["same_answers"] is True and r["mixed_answers_per_s"] > 0 and r["one_adapter_at_a_time_answers_per_s"] > 0
