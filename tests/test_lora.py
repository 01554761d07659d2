"""LoRA: exact at init, only A and B train, merging is free and exact, PEFT gives the same numbers."""
import copy
import random
import re

import pytest
import torch
import torch.nn.functional as F

from conftest import IDX, ROOT, SEED_LORA, TINY_SHAPE, random_hf_gpt2, rel_err, save_hub_layout, tiny_base, tiny_model
from gpt2 import GPT, from_pretrained, preset
from lora import (LoRAConfig, LoRAError, LoRALinear, apply_adapter, apply_lora, load_adapter, lora_layers,
                  lora_state_dict, merge_lora, parameter_report, save_adapter, unmerge_lora)

SEED_CONFIG = LoRAConfig(**SEED_LORA)


def randomize_adapters(model, seed: int = 1) -> None:
    """B starts at zero (ΔW = 0); give it values so that merging and parity tests compare something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.05)


def test_adapted_model_equals_base_model_at_init():
    base = tiny_model()
    adapted = apply_lora(copy.deepcopy(base), LoRAConfig(**SEED_LORA))
    with torch.no_grad():
        assert torch.equal(adapted(IDX), base(IDX))
    assert len(lora_layers(adapted)) == 4 * 2  # c_attn, attn.c_proj, c_fc, mlp.c_proj in each of 2 blocks


def test_training_changes_only_A_and_B_and_no_gradient_reaches_the_base():
    model = apply_lora(tiny_model(), LoRAConfig(**SEED_LORA)).train()
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    adapters = {k: v.clone() for k, v in lora_state_dict(model).items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    for step in range(2):
        F.cross_entropy(model(IDX).flatten(0, 1), IDX.flatten()).backward()
        assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)
        opt.step()
        opt.zero_grad()
        if step == 0:  # B = 0 gives A a zero gradient: B moves first...
            assert all(torch.equal(v, adapters[k]) for k, v in lora_state_dict(model).items() if "lora_A" in k)
    # ...and A follows once B is non-zero.
    assert all(not torch.equal(v, adapters[k]) for k, v in lora_state_dict(model).items())
    assert all(torch.equal(v, frozen[k]) for k, v in model.state_dict().items() if "lora_" not in k)


def test_merge_is_exact_idempotent_and_reversible():
    model = apply_lora(tiny_model(), LoRAConfig(**SEED_LORA))
    randomize_adapters(model)
    pretrained = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    with torch.no_grad():
        unmerged = model(IDX)
        merge_lora(model)
        merged_once = {k: v.clone() for k, v in model.state_dict().items()}
        merge_lora(model)
        assert all(torch.equal(v, merged_once[k]) for k, v in model.state_dict().items())
        assert rel_err(model(IDX), unmerged) < 1e-6
        unmerge_lora(model)
        unmerge_lora(model)
    for k, v in model.state_dict().items():
        if "lora_" not in k:
            torch.testing.assert_close(v, pretrained[k], rtol=0, atol=1e-6)


def test_merge_in_bf16_stays_within_bf16_rounding_of_the_fp32_result():
    layer = LoRALinear(256, 512, rank=8, alpha=16)
    torch.nn.init.normal_(layer.weight, std=0.02)
    torch.nn.init.normal_(layer.lora_B, std=0.05)
    pretrained = layer.weight.detach().clone()
    exact = pretrained + layer.delta_weight()
    layer.weight.data = layer.weight.data.to(torch.bfloat16)
    layer.merge()
    assert layer.weight.dtype == torch.bfloat16
    # Two roundings to bf16 (storing W, then storing W + ΔW), each within half a unit in the last place: bf16 keeps
    # 8 significant bits, so 2^-8 relative to the value rounded. Nothing else may add error.
    err = (layer.weight.float() - exact).abs()
    assert (err <= 2 ** -8 * (pretrained.abs() + exact.abs())).all()


def test_seed_config_on_gpt2_124M_trains_589824_parameters():
    with torch.device("meta"):
        model = apply_lora(GPT(preset("gpt2")), LoRAConfig(**SEED_LORA))
    assert parameter_report(model) == \
        "trainable params: 589,824 || all params: 125,029,632 || trainable%: 0.4717"


def test_same_logits_and_gradients_as_peft(tmp_path):
    from peft import LoraConfig, get_peft_model
    hf = random_hf_gpt2(**TINY_SHAPE)
    ours = apply_lora(from_pretrained(str(save_hub_layout(hf, tmp_path))), LoRAConfig(**SEED_LORA)).train()
    randomize_adapters(ours)
    peft = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, fan_in_fan_out=True,
                                         target_modules=["c_attn", "c_proj", "c_fc"])).train()
    hf.config.attn_pdrop = hf.config.resid_pdrop = hf.config.embd_pdrop = 0.0
    for module in peft.modules():  # transformers' own dropout off, like ours (config dropout 0)
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    theirs = {k.removeprefix("base_model.model.").replace(".default.weight", ""): p
              for k, p in peft.named_parameters() if "lora_" in k}
    ours_params = {k: p for k, p in ours.named_parameters() if "lora_" in k}
    assert theirs.keys() == ours_params.keys() and len(ours_params) == 2 * 8
    with torch.no_grad():
        for k, p in ours_params.items():
            theirs[k].copy_(p)
    targets = torch.roll(IDX, -1, dims=1)
    logits_ours, logits_theirs = ours(IDX), peft(input_ids=IDX).logits
    assert rel_err(logits_ours, logits_theirs) < 1e-5
    F.cross_entropy(logits_ours.flatten(0, 1), targets.flatten()).backward()
    F.cross_entropy(logits_theirs.flatten(0, 1), targets.flatten()).backward()
    for k, p in ours_params.items():
        assert rel_err(p.grad, theirs[k].grad) < 1e-4, k


def test_selective_qv_adaptation_equals_explicit_reference():
    layer = LoRALinear(16, 3 * 16, rank=2, alpha=6, parts=(True, False, True))
    torch.nn.init.normal_(layer.weight)
    torch.nn.init.normal_(layer.bias)
    torch.nn.init.normal_(layer.lora_B)
    assert layer.lora_A.shape == (2 * 2, 16) and layer.lora_B.shape == (2 * 16, 2)
    x = torch.randn(3, 5, 16)
    A_q, A_v = layer.lora_A[:2], layer.lora_A[2:]
    B_q, B_v = layer.lora_B[:16], layer.lora_B[16:]
    base = x @ layer.weight.T + layer.bias
    s = 6 / 2
    expected = base + torch.cat([s * (x @ A_q.T) @ B_q.T, torch.zeros(3, 5, 16), s * (x @ A_v.T) @ B_v.T], dim=-1)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected)
        layer.merge()
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_qkv_option_adapts_only_the_chosen_parts_of_c_attn():
    model = apply_lora(tiny_model(), LoRAConfig(rank=2, alpha=4, targets=("c_attn",), qkv="qv"))
    randomize_adapters(model)
    c_attn = model.transformer.h[0].attn.c_attn
    delta = c_attn.delta_weight()  # (3C, C)
    C = model.config.n_embd
    assert delta[:C].abs().sum() > 0 and delta[2 * C:].abs().sum() > 0
    assert torch.equal(delta[C:2 * C], torch.zeros(C, C))  # keys untouched
    assert not isinstance(model.transformer.h[0].mlp.c_fc, LoRALinear)


@pytest.mark.parametrize("options, message", [
    (dict(targets=("c_attn", "q_proj")), r"unknown LoRA target.*q_proj.*choose from c_attn, c_proj, c_fc"),
    (dict(targets=()), r"unknown LoRA target.*none given"),
    (dict(targets="c_attn"), "give a list of module names"),
    (dict(targets=("c_fc",), qkv="qv"), "add c_attn"),
    (dict(qkv="qx"), "letters q, k, v"),
    (dict(qkv="qq"), "letters q, k, v once each"),
    (dict(rank=0), "rank 0: .* at least 1"),
    (dict(rank=2.5), "rank 2.5: .* whole number"),
    (dict(alpha=float("nan")), "alpha nan: .* finite number above 0"),
    (dict(alpha=0), "alpha 0: .* above 0"),
    (dict(alpha="8"), "alpha '8'"),
    (dict(dropout=1.0), r"dropout 1.0: .* in \[0, 1\)"),
    (dict(dropout=-0.1), "dropout -0.1"),
    (dict(dora="yes"), "dora 'yes': must be true or false"),
    (dict(init="olora"), "unknown LoRA init 'olora': choose from default, pissa"),
    (dict(init="pissa", qkv="qv"), "without --qkv"),
])
def test_bad_lora_configs_are_clear_errors(options, message):
    """Every check of a LoRA setting is LoRAConfig's: refused on construction, before any model is touched."""
    with pytest.raises(LoRAError, match=message):
        LoRAConfig(**options)


def test_apply_lora_refuses_a_model_without_the_targets():
    with pytest.raises(LoRAError, match="no module of this model matches"):
        apply_lora(torch.nn.Sequential(torch.nn.Linear(2, 2)), SEED_CONFIG)


def test_adapter_round_trip_reproduces_logits(tmp_path):
    model = apply_lora(tiny_model(), LoRAConfig(**SEED_LORA))
    randomize_adapters(model)
    save_adapter(tmp_path / "adapter.pt", model, SEED_CONFIG, tiny_base(model))
    restored = tiny_model()
    assert apply_adapter(restored, load_adapter(tmp_path / "adapter.pt")) == SEED_CONFIG
    with torch.no_grad():
        assert torch.equal(restored(IDX), model(IDX))


def test_seed_adapter_file_is_a_few_megabytes(tmp_path):
    with torch.device("meta"):
        model = GPT(preset("gpt2"))
    model.to_empty(device="cpu")
    apply_lora(model, LoRAConfig(**SEED_LORA))
    save_adapter(tmp_path / "adapter.pt", model, SEED_CONFIG, {"model": "gpt2", "config": vars(model.config)})
    size = (tmp_path / "adapter.pt").stat().st_size
    assert 589_824 * 4 < size < 3_000_000


def test_adapter_refuses_another_base_or_another_rank(tmp_path):
    model = apply_lora(tiny_model(), LoRAConfig(**SEED_LORA))
    save_adapter(tmp_path / "a.pt", model, SEED_CONFIG, {"model": "gpt2-tiny", "config": vars(model.config)})
    checkpoint = load_adapter(tmp_path / "a.pt")
    bigger = GPT(preset("gpt2-tiny").__class__(n_layer=3, n_head=4, n_embd=64))
    with pytest.raises(LoRAError, match="trained on gpt2-tiny"):
        apply_adapter(bigger, checkpoint)
    checkpoint["lora_config"]["rank"] = 8
    with pytest.raises(LoRAError, match="does not fit"):
        apply_adapter(tiny_model(), checkpoint)
    with pytest.raises(LoRAError, match="no checkpoint"):
        load_adapter(tmp_path / "missing.pt")
    (tmp_path / "broken.pt").write_bytes((tmp_path / "a.pt").read_bytes()[:1000])
    with pytest.raises(LoRAError, match="corrupt"):
        load_adapter(tmp_path / "broken.pt")


class NotAnAdapter:
    """A class torch's safe loader does not know: the case where torch advises retrying with weights_only=False."""


def test_an_unreadable_checkpoint_gets_no_unsafe_advice(tmp_path):
    (tmp_path / "random.pt").write_bytes(random.Random(0).randbytes(4096))
    torch.save({"adapter": NotAnAdapter()}, tmp_path / "foreign.pt")
    for name in ("random.pt", "foreign.pt"):
        with pytest.raises(LoRAError) as error:
            load_adapter(tmp_path / name)
        assert "weights_only" not in str(error.value)  # retrying so would run the file's code
        assert "corrupt" in str(error.value) and "not written by this project" in str(error.value)


def test_base_fingerprint_samples_every_tensor_to_its_last_value():
    """gpt2's token embedding has 38,597,376 values: sample positions must stay exact integers up to the last one
    (fp32 arithmetic rounds 38,597,375 up, out of range), and a change there must change the fingerprint."""
    from lora.checkpoint import base_fingerprint
    wte = torch.nn.Embedding(50257, 768)
    before = base_fingerprint(wte)
    with torch.no_grad():
        wte.weight[-1, -1] += 1.0
    assert base_fingerprint(wte) != before


def test_the_readmes_lora_snippet_runs(capsys):
    """The README's "How LoRA works here" code, exactly as written there."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## How LoRA works here"):readme.index("## Layout")]
    (snippet,) = re.findall(r"```python\n(.*?)```", section, re.S)
    exec(compile(snippet, "README.md", "exec"), {})
    assert "trainable params: " in capsys.readouterr().out
