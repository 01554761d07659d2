"""A quantized frozen base: NF4's levels, error bounds, exact packing, a quantized GPT-2 that answers and trains
like the dequantized one, the bytes it saves, determinism, and merging by dequantizing first."""
import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import IDX, SEED_LORA, rel_err, tiny_base
from gpt2 import GPT, from_pretrained, generate, load_model, preset
from lora import (LoRAConfig, LoRAError, LoRALinear, apply_adapter, apply_lora, load_adapter, lora_layers, merge_lora,
                  save_adapter, unmerge_lora)
from lora.quant import (ABSMAX_BLOCK, NF4_BLOCK, NF4_LEVELS, PROJECTIONS, QuantizedLinear, QuantizedLoRALinear,
                        QuantizedWeight, pack_4bit, quantize_base, unpack_4bit, weight_bytes)

MODES = ("int8", "nf4")
# From the QLoRA paper's code (bitsandbytes, functional.py, the "nf4" table): the reference NF4_LEVELS must equal.
PAPER_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
             -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
             0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
             0.7229568362236023, 1.0]
LARGEST_GAP = max(b - a for a, b in zip(PAPER_NF4, PAPER_NF4[1:]))  # 0.3038, between -1 and -0.6962


def spread_weight(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Gaussian weights whose rows differ in scale by 100x, plus an all-zero row: scales must be per row/block."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * torch.logspace(-3, -1, rows)[:, None]
    w[rows // 2] = 0
    return w


def randomize_adapters(model, seed: int = 1) -> None:
    """A and B drawn from `seed` (B starts at zero): gradients reach A, merging has something to merge, and two
    models given the same seed have the same adapters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model):
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * 0.1)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.05)


def with_dequantized_weights(reference, quantized) -> None:
    """Give `reference` (an unquantized copy) the weights `quantized` really computes with: W := Ŵ, in fp32."""
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if isinstance(module, QuantizedWeight):
                reference.get_submodule(name.rpartition(".")[0]).weight.copy_(module.dequantize(torch.float32))


def test_nf4_levels_are_the_papers_and_follow_from_its_construction():
    assert list(NF4_LEVELS) == PAPER_NF4
    # 8 positive and 7 negative standard-normal quantiles, an exact zero, divided by the largest (module docstring).
    offset = 0.9677083
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9)[:-1].double())
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8)[:-1].double())
    levels = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative]).sort().values
    torch.testing.assert_close(levels / levels.max(), torch.tensor(PAPER_NF4, dtype=torch.float64), atol=1e-6, rtol=0)


def test_4bit_packing_round_trip_is_exact():
    codes = torch.randint(0, 16, (2 * 1000,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    packed = pack_4bit(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (1000,)
    assert packed[0] == codes[0] * 16 + codes[1]  # the first code in the high nibble
    assert torch.equal(unpack_4bit(packed), codes)


def test_int8_error_is_at_most_half_a_step_of_each_row():
    w = spread_weight(64, 96)
    q = QuantizedWeight(w, "int8")
    assert q.codes.dtype == torch.int8 and q.codes.abs().max() == 127
    step = w.abs().amax(dim=1, keepdim=True) / 127  # (out, 1): each row's own scale
    error = (q.dequantize(torch.float32) - w).abs()
    assert (error <= step / 2 * (1 + 1e-5) + 1e-12).all()
    assert error[w.shape[0] // 2].max() == 0  # the all-zero row stays zero (no 0/0)


@pytest.mark.parametrize("shape", [(70, 50), (300, 128)])  # 3,500 weights: padded blocks; 600 blocks: 3 groups
def test_nf4_picks_the_nearest_level_and_error_is_bounded_per_block(shape):
    w = spread_weight(*shape)
    q = QuantizedWeight(w, "nf4")
    n_blocks = -(-w.numel() // NF4_BLOCK)
    assert q.codes.dtype == torch.uint8 and q.codes.numel() == n_blocks * NF4_BLOCK // 2
    blocks = F.pad(w.flatten(), (0, n_blocks * NF4_BLOCK - w.numel())).view(n_blocks, NF4_BLOCK)
    absmax = blocks.abs().amax(dim=1, keepdim=True)  # (n_blocks, 1): c_b
    # Codes: the level nearest to W / c_b, found here by brute force over the 16 levels.
    nearest = (blocks / absmax.clamp(min=1e-30))[..., None].sub(torch.tensor(PAPER_NF4)).abs().argmin(dim=-1)
    assert torch.equal(unpack_4bit(q.codes).view(n_blocks, NF4_BLOCK).long(), nearest)
    # Double quantization moves c_b by at most half a step of its group of 256: max |c - mean| / 127 / 2.
    centred = F.pad(absmax.flatten() - absmax.mean(), (0, -n_blocks % ABSMAX_BLOCK)).view(-1, ABSMAX_BLOCK)
    absmax_error = (centred.abs().amax(dim=1) / 254).repeat_interleave(ABSMAX_BLOCK)[:n_blocks, None]
    # Bound used: |Ŵ - W| <= largest gap / 2 * c_b + |ĉ_b - c_b|   (|level| <= 1), plus fp32 rounding.
    bound = LARGEST_GAP / 2 * absmax + absmax_error * (1 + 1e-4) + 1e-7 * absmax.max()
    error = F.pad((q.dequantize(torch.float32) - w).flatten(), (0, n_blocks * NF4_BLOCK - w.numel()))
    assert (error.view(n_blocks, NF4_BLOCK).abs() <= bound).all()


def quantized_pair(hub_dir, mode, lora=None):
    """The same random GPT-2, once quantized and once unquantized with W := Ŵ: they must compute the same thing."""
    model = from_pretrained(str(hub_dir)).eval()
    if lora:
        apply_lora(model, LoRAConfig(**lora))
        randomize_adapters(model)
    reference = copy.deepcopy(model)
    quantize_base(model, mode, torch.float32)
    with_dequantized_weights(reference, model)
    return model, reference


@pytest.mark.parametrize("mode, weight_tolerance", [("int8", 0.01), ("nf4", 0.1)])
def test_quantized_gpt2_computes_with_the_dequantized_weights_and_stays_close(tiny_hub_dir, mode, weight_tolerance):
    model, reference = quantized_pair(tiny_hub_dir, mode, SEED_LORA)
    original = apply_lora(from_pretrained(str(tiny_hub_dir)).eval(), LoRAConfig(**SEED_LORA))
    randomize_adapters(original)
    # Stated tolerances. Weights: relative (Frobenius) error under 1% for int8, 10% for nf4; for Gaussian weights
    # 8 bits give about absmax / 127 / sqrt(12) = 0.7%, 4 bits about 9%. Logits: under 3x the largest weight error
    # (two blocks of projection errors add up; measured 1.7x to 2x).
    weight_error = max(rel_err(reference.get_submodule(name).weight, original.get_submodule(name).weight)
                       for name, _ in original.named_modules() if name.endswith(PROJECTIONS))
    assert weight_error < weight_tolerance
    with torch.no_grad():
        logits = model(IDX)
        torch.testing.assert_close(logits, reference(IDX), atol=1e-5, rtol=1e-5)
        assert rel_err(logits, original(IDX)) < 3 * weight_error
        # In bf16 on the CPU: the scales stay fp32 through .to(bfloat16), and the logits follow within bf16 rounding.
        half = apply_lora(from_pretrained(str(tiny_hub_dir)), LoRAConfig(**SEED_LORA))
        quantize_base(half, mode, torch.bfloat16)
        randomize_adapters(half)
        half.to(torch.bfloat16).eval()
        assert all(t.dtype in (torch.int8, torch.uint8, torch.float32)
                   for m in half.modules() if isinstance(m, QuantizedWeight) for t in m.buffers())
        assert rel_err(half(IDX).float(), logits) < 0.02


@pytest.mark.parametrize("mode", MODES)
def test_batched_greedy_answers_equal_one_by_one_on_a_quantized_model(tiny_hub_dir, mode):
    model = quantize_base(from_pretrained(str(tiny_hub_dir)).eval(), mode, torch.float32)
    prompts = [[464, 3290, 318], [15496, 995, 11, 616, 1438, 318, 257, 1332], [40]]
    batched = generate(model, prompts, max_new_tokens=8, eos_id=-1)
    assert batched == [generate(model, [p], max_new_tokens=8, eos_id=-1)[0] for p in prompts]


@pytest.mark.parametrize("mode", MODES)
def test_only_A_and_B_get_gradients_and_they_equal_the_dequantized_models(tiny_hub_dir, mode):
    # c_attn and c_fc adapted; attn.c_proj and mlp.c_proj stay plain QuantizedLinear: the gradient must pass them.
    lora = dict(rank=4, alpha=8, targets=("c_attn", "c_fc"))
    model, reference = quantized_pair(tiny_hub_dir, mode, lora)
    assert {type(m) for m in model.modules()} >= {QuantizedLoRALinear, QuantizedLinear}
    grads = []
    for m in (model.train(), reference.train()):
        F.cross_entropy(m(IDX).flatten(0, 1), IDX.flatten()).backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    assert sorted(grads[0]) == sorted(n for n, _ in model.named_parameters() if "lora_" in n)
    assert all(g.abs().max() > 0 for g in grads[0].values())  # A too: B is random
    assert not any(t.requires_grad for t in model.buffers())
    for name, g in grads[0].items():
        torch.testing.assert_close(g, grads[1][name], atol=1e-6, rtol=1e-4)


def projection_bytes_by_layout(config, mode: str) -> int:
    """Bytes of one model's four projections, from each format's layout (module docstring), not from tensors."""
    C, total = config.n_embd, 0
    for out_features, in_features in ((3 * C, C), (C, C), (4 * C, C), (C, 4 * C)):
        n = out_features * in_features
        if mode == "none":
            total += 2 * n  # bf16
        elif mode == "int8":
            total += n + 4 * out_features  # int8 codes, one fp32 scale a row
        else:
            blocks = -(-n // NF4_BLOCK)
            groups = -(-blocks // ABSMAX_BLOCK)
            total += blocks * NF4_BLOCK // 2 + groups * ABSMAX_BLOCK + 4 * groups + 4 + 4 * 16  # codes, j_b, t_g, μ, levels
    return total * config.n_layer


@pytest.mark.parametrize("name", ["gpt2", "gpt2-xl"])
def test_base_weight_bytes_counted_from_the_tensors(name):
    """Full models of the real shapes, on the meta device: tensors with shapes and dtypes but no data (fast)."""
    counted = {}
    for mode in ("none", *MODES):
        with torch.device("meta"):
            model = GPT(preset(name)).to(torch.bfloat16)
            counted[mode] = weight_bytes(quantize_base(model, mode, torch.bfloat16))
        assert counted[mode]["projections"] == projection_bytes_by_layout(model.config, mode)
    bf16 = counted["none"]
    assert bf16["embeddings"] == 2 * (model.config.vocab_size + model.config.block_size) * model.config.n_embd
    for mode, ratio in (("int8", (0.50, 0.51)), ("nf4", (0.257, 0.28))):
        assert ratio[0] <= counted[mode]["projections"] / bf16["projections"] <= ratio[1]
        assert {k: v for k, v in counted[mode].items() if k != "projections"} == \
               {k: v for k, v in bf16.items() if k != "projections"}  # embeddings, biases, LayerNorms unchanged


@pytest.mark.parametrize("mode", MODES)
def test_quantizing_the_same_base_twice_gives_identical_codes(mode):
    first, second = (quantize_base(load_model("gpt2-tiny", "random", seed=0), mode, torch.float32) for _ in range(2))
    stored = [dict(m.named_buffers()) for m in (first, second)]
    assert stored[0].keys() == stored[1].keys() and len(stored[0]) >= 4 * 2 * 2
    assert all(torch.equal(t, stored[1][k]) for k, t in stored[0].items())


def test_checkpoint_round_trip_rebuilds_the_same_quantized_base(tmp_path):
    """What evaluate.py will do: load the base, apply the adapter (apply_lora wraps nn.Linear), then quantize."""
    model = apply_lora(load_model("gpt2-tiny", "random", seed=0), LoRAConfig(**SEED_LORA))
    quantize_base(model, "nf4", torch.float32)
    randomize_adapters(model)
    save_adapter(tmp_path / "adapter.pt", model, LoRAConfig(**SEED_LORA),
                 {**tiny_base(model), "quantize": "nf4"})
    checkpoint = load_adapter(tmp_path / "adapter.pt")
    restored = load_model("gpt2-tiny", "random", seed=0)
    apply_adapter(restored, checkpoint)
    quantize_base(restored, checkpoint["base"]["quantize"], torch.float32)
    with torch.no_grad():
        assert torch.equal(restored.eval()(IDX), model.eval()(IDX))


@pytest.mark.parametrize("mode", MODES)
def test_merge_dequantizes_then_adds_the_update(tiny_hub_dir, mode):
    model, reference = quantized_pair(tiny_hub_dir, mode, SEED_LORA)
    quantized = model.transformer.h[0].attn.c_attn
    dequantized = quantized.quantized_weight.dequantize(torch.float32)
    with pytest.raises(LoRAError, match="merge_lora"):
        quantized.merge()  # a quantized layer never holds W + ΔW
    with torch.no_grad():
        before = model(IDX)
        merge_lora(model)
        merge_lora(model)  # idempotent
        layer = model.transformer.h[0].attn.c_attn  # replaced by a plain LoRALinear over Ŵ, sharing A and B
        assert type(layer) is LoRALinear and layer.lora_A is quantized.lora_A and layer.weight.dtype == torch.float32
        assert not layer.weight.requires_grad
        assert torch.equal(layer.weight, dequantized + layer.delta_weight())  # Ŵ + ΔW, not re-quantized
        torch.testing.assert_close(model(IDX), before, atol=1e-5, rtol=1e-5)
        unmerge_lora(model)
        torch.testing.assert_close(layer.weight, dequantized, atol=1e-6, rtol=0)
        torch.testing.assert_close(model(IDX), before, atol=1e-5, rtol=1e-5)
    # In half precision the merged layers hold Ŵ + ΔW in fp32 until the model is cast: rounded once.
    half = apply_lora(from_pretrained(str(tiny_hub_dir)), LoRAConfig(**SEED_LORA))
    quantize_base(half, mode, torch.bfloat16)
    merge_lora(half)
    assert not any(isinstance(m, QuantizedLoRALinear) for m in half.modules())


def test_misuse_is_a_clear_error(tiny_hub_dir):
    model = apply_lora(from_pretrained(str(tiny_hub_dir)), LoRAConfig(**SEED_LORA))
    assert quantize_base(model, "none", torch.float32) is model
    assert not any(isinstance(m, QuantizedWeight) for m in model.modules())
    with pytest.raises(ValueError, match="int8, nf4"):
        quantize_base(model, "fp4", torch.float32)
    merge_lora(model)
    with pytest.raises(ValueError, match="unmerge first"):
        quantize_base(model, "nf4", torch.float32)
    unmerge_lora(model)
    quantize_base(model, "nf4", torch.float32)
    with pytest.raises(ValueError, match="quantized already"):
        quantize_base(model, "int8", torch.float32)
    assert sum(name.endswith(PROJECTIONS) for name, _ in model.named_modules()) == 4 * 2
