"""The LoRA variants: DoRA, PiSSA and LoRA+ give PEFT's numbers; checkpoints carry them; old checkpoints still load."""
import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import (IDX, SEED_LORA, TINY_SHAPE, random_hf_gpt2, randomize, rel_err, save_hub_layout, tiny_base,
                      tiny_model)
from gpt2 import GPT, from_pretrained, preset
from lora import (DoRALinear, LoRAConfig, apply_adapter, apply_lora, load_adapter, load_lora_state_dict, lora_layers,
                  lora_state_dict, loraplus_param_groups, merge_lora, parameter_report, save_adapter, unmerge_lora)

TARGETS = torch.roll(IDX, -1, dims=1)


def loss(logits):
    return F.cross_entropy(logits.flatten(0, 1), TARGETS.flatten())


def peft_gpt2(tmp_path, **lora_config):
    """The same random GPT-2 twice: ours from its Hub-layout file, and transformers' with PEFT's LoRA around its
    Conv1D projections (fan_in_fan_out). Transformers' own dropout is off, like ours."""
    from peft import LoraConfig, get_peft_model
    hf = random_hf_gpt2(**TINY_SHAPE)
    ours = from_pretrained(str(save_hub_layout(hf, tmp_path)))
    hf.config.attn_pdrop = hf.config.resid_pdrop = hf.config.embd_pdrop = 0.0
    peft = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, fan_in_fan_out=True,
                                         target_modules=["c_attn", "c_proj", "c_fc"], **lora_config))
    for module in peft.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return ours, peft


def peft_adapter_params(peft) -> dict:
    """PEFT's adapter parameters under our names: `...c_attn.lora_A.default.weight` -> `...c_attn.lora_A`."""
    return {k.removeprefix("base_model.model.").replace(".default.weight", ""): p
            for k, p in peft.named_parameters() if "lora_" in k}


# DoRA

def test_dora_same_logits_and_gradients_as_peft(tmp_path):
    ours, peft = peft_gpt2(tmp_path, use_dora=True)
    apply_lora(ours, LoRAConfig(**SEED_LORA, dora=True)).train()
    peft.train()
    randomize(ours)
    theirs = peft_adapter_params(peft)
    ours_params = {k: p for k, p in ours.named_parameters() if p.requires_grad}
    assert theirs.keys() == ours_params.keys() and len(ours_params) == 3 * 8  # A, B and m in 8 modules
    with torch.no_grad():
        for k, p in ours_params.items():
            theirs[k].copy_(p)
    logits_ours, logits_theirs = ours(IDX), peft(input_ids=IDX).logits
    assert rel_err(logits_ours, logits_theirs) < 1e-5
    loss(logits_ours).backward()
    loss(logits_theirs).backward()
    for k, p in ours_params.items():
        assert rel_err(p.grad, theirs[k].grad) < 1e-5, k


def test_dora_with_dropout_is_pefts_formula():
    """PEFT's DoRA with dropout: the frozen path sees x, the adapter and the rescaling see dropout(x). The same
    seed draws the same mask in both layers."""
    from peft import LoraConfig, get_peft_model
    linear = torch.nn.Linear(32, 48)
    ours = DoRALinear.from_linear(copy.deepcopy(linear), rank=4, alpha=8, dropout=0.3).train()
    peft = get_peft_model(torch.nn.Sequential(linear), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3, use_dora=True,
                                                                  target_modules=["0"])).train()
    with torch.no_grad():
        torch.nn.init.normal_(ours.lora_B)
        ours.lora_magnitude_vector.mul_(1.5)
        theirs = peft_adapter_params(peft)
        for k, p in ours.named_parameters():
            if p.requires_grad:
                theirs[f"0.{k}"].copy_(p)
    x = torch.randn(5, 32)
    torch.manual_seed(7)
    y_ours = ours(x)
    torch.manual_seed(7)
    y_theirs = peft(x)
    assert rel_err(y_ours, y_theirs) < 1e-6
    torch.manual_seed(8)
    assert rel_err(ours(x), y_ours) > 1e-3  # a different mask gives another output: dropout is really on


def test_dora_starts_at_the_base_model_and_merges_exactly():
    base = tiny_model()
    model = apply_lora(copy.deepcopy(base), LoRAConfig(**SEED_LORA, dora=True))
    with torch.no_grad():
        assert rel_err(model(IDX), base(IDX)) < 1e-6  # m = ||W||, B = 0: W' = W
    randomize(model)
    pretrained = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    with torch.no_grad():
        unmerged = model(IDX)
        merge_lora(model)
        merge_lora(model)
        assert rel_err(model(IDX), unmerged) < 1e-6
        unmerge_lora(model)
        unmerge_lora(model)
        assert rel_err(model(IDX), unmerged) < 1e-6
    for k, v in model.state_dict().items():
        if "lora_" not in k:
            torch.testing.assert_close(v, pretrained[k], rtol=0, atol=1e-6)


def test_dora_trains_on_a_half_precision_base_like_lora():
    """train.py stores the frozen base in bf16 and runs under autocast: a DoRA layer must hand the next layer the
    dtype a LoRA layer does (bf16, not fp32, which LayerNorm's bf16 parameters would refuse) and stay within bf16
    rounding of the fp32 model, and m must get gradients."""
    model = apply_lora(tiny_model(), LoRAConfig(**SEED_LORA, dora=True)).train()
    randomize(model)
    with torch.no_grad():
        exact = model(IDX)
    for p in model.parameters():
        if not p.requires_grad:
            p.data = p.data.to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.transformer.h[0].mlp.c_fc(torch.randn(3, 64)).dtype == torch.bfloat16
        logits = model(IDX)
    assert rel_err(logits.float(), exact) < 0.05
    loss(logits.float()).backward()
    assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "magnitude" in n)


def test_dora_checkpoint_carries_the_magnitudes(tmp_path):
    model = apply_lora(tiny_model(), LoRAConfig(**SEED_LORA, dora=True))
    randomize(model)
    config = LoRAConfig(**SEED_LORA, dora=True)
    save_adapter(tmp_path / "a.pt", model, config, tiny_base(model))
    checkpoint = load_adapter(tmp_path / "a.pt")
    assert sum("lora_magnitude_vector" in k for k in checkpoint["adapter"]) == 8
    restored = tiny_model()
    assert apply_adapter(restored, checkpoint) == config
    with torch.no_grad():
        assert torch.equal(restored(IDX), model(IDX))


# PiSSA

def test_pissa_init_equals_pefts_and_the_model_starts_at_the_base(tmp_path):
    """The PEFT installed here transposes GPT-2's Conv1D weight before its SVD (`transpose(weight, fan_in_fan_out)`
    in pissa_init: its issue #2103 is fixed), so we compare with PEFT on GPT-2 itself; an SVD of the (in, out)
    layout would fail this test. Singular vectors are defined up to sign: compare s B A, and the residual W."""
    ours, peft = peft_gpt2(tmp_path, init_lora_weights="pissa")
    base = copy.deepcopy(ours)
    apply_lora(ours, LoRAConfig(**SEED_LORA, init="pissa"))
    with torch.no_grad():
        assert rel_err(ours(IDX), base(IDX)) < 1e-5
        for name, layer in ours.named_modules():
            if isinstance(layer, torch.nn.Linear) or not hasattr(layer, "lora_A"):
                continue
            theirs = peft.base_model.model.get_submodule(name)
            their_delta = theirs.get_delta_weight("default").T  # Conv1D (in, out) -> (out, in)
            assert rel_err(layer.delta_weight(), their_delta) < 1e-5, name
            assert rel_err(layer.weight, theirs.base_layer.weight.T) < 1e-5, name
            assert rel_err(layer.weight + layer.delta_weight(), base.get_submodule(name).weight) < 1e-6, name
            S = torch.linalg.svdvals(layer.delta_weight())  # the adapter holds W's top 4 singular values
            torch.testing.assert_close(S[:4], torch.linalg.svdvals(base.get_submodule(name).weight)[:4])


def train_a_few_steps(model, steps: int = 3) -> None:
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        loss(model(IDX)).backward()
        opt.step()
        opt.zero_grad()
    model.eval()


@pytest.mark.parametrize("variant", [dict(), dict(dora=True), dict(rank_stabilized=True),
                                     dict(dora=True, rank_stabilized=True)])
def test_saved_pissa_adapter_applies_to_the_original_base(tmp_path, variant):
    config = LoRAConfig(**SEED_LORA, init="pissa", **variant)
    model = apply_lora(tiny_model(), config)
    train_a_few_steps(model)
    save_adapter(tmp_path / "a.pt", model, config, tiny_base(model))
    checkpoint = load_adapter(tmp_path / "a.pt")
    assert checkpoint["lora_config"]["rank"] == 8 and checkpoint["lora_config"]["init"] == "default"
    restored = tiny_model()  # the original base, W and not W_res
    apply_adapter(restored, checkpoint)
    with torch.no_grad():
        trained = model(IDX)
        assert rel_err(restored(IDX), trained) < 1e-5
        merge_lora(restored)
        assert rel_err(restored(IDX), trained) < 1e-5


def test_pissa_run_resumes_from_its_saved_adapter(tmp_path):
    """Resuming rebuilds the PiSSA model (a fresh SVD) and loads the file: A, B and W_res come back exactly. Where
    the rebuilt model's SVD differs from the file's (another machine), W_res moves to the file's."""
    model = apply_lora(tiny_model(), LoRAConfig(**SEED_LORA, init="pissa"))
    train_a_few_steps(model)
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    saved = lora_state_dict(model)
    resumed = apply_lora(tiny_model(), LoRAConfig(**SEED_LORA, init="pissa"))
    load_lora_state_dict(resumed, saved)
    assert all(torch.equal(v, trained[k]) for k, v in resumed.state_dict().items())

    elsewhere = apply_lora(tiny_model(), LoRAConfig(**SEED_LORA, init="pissa"))
    with torch.no_grad():
        for layer in lora_layers(elsewhere):  # another, consistent split W = W_res' + s B0' A0'
            layer.weight.sub_(layer.scaling * layer.initial_B @ (0.1 * layer.initial_A))
            layer.initial_A.mul_(1.1)
        load_lora_state_dict(elsewhere, saved)
        assert rel_err(elsewhere(IDX), model(IDX)) < 1e-5


# LoRA+

def test_loraplus_groups_equal_pefts(tmp_path):
    from peft.optimizers import create_loraplus_optimizer
    ours, peft = peft_gpt2(tmp_path, use_dora=True)  # with DoRA, so that the 1-D magnitudes are grouped too
    apply_lora(ours, LoRAConfig(**SEED_LORA, dora=True))
    ours_groups = loraplus_param_groups(ours, lr=1e-4, ratio=16, weight_decay=0.01)
    theirs = create_loraplus_optimizer(peft, torch.optim.AdamW, lr=1e-4, loraplus_lr_ratio=16,
                                       loraplus_weight_decay=0.01)
    name_of = {id(p): k for k, p in peft_adapter_params(peft).items()}
    their_groups = [g for g in theirs.param_groups if g["params"]]  # PEFT's embedding and no-decay groups: empty
    assert len(their_groups) == len(ours_groups) == 2
    ours_names = {id(p): k for k, p in ours.named_parameters()}
    for mine, their in zip(ours_groups, their_groups):
        assert sorted(ours_names[id(p)] for p in mine["params"]) == sorted(name_of[id(p)] for p in their["params"])
        assert (mine["lr"], mine["weight_decay"]) == (their["lr"], their["weight_decay"])
    assert ours_groups[1]["lr"] == 16 * ours_groups[0]["lr"]
    optimizer = torch.optim.AdamW(ours_groups)  # a schedule keeps the ratio through lr_ratio
    for group in optimizer.param_groups:
        group["lr"] = 3e-5 * group["lr_ratio"]
    assert [g["lr"] for g in optimizer.param_groups] == [3e-5, 16 * 3e-5]


# The configuration

@pytest.mark.parametrize("ours, theirs, extra", [
    (dict(), dict(), 0),
    (dict(rank_stabilized=True), dict(use_rslora=True), 0),
    (dict(dora=True), dict(use_dora=True), "one m per output row"),
], ids=["LoRA", "rsLoRA", "DoRA"])
def test_trainable_parameters_of_each_variant_on_gpt2_124M(ours, theirs, extra):
    """The README's table, with PEFT's counts (get_nb_trainable_parameters) as the oracle: LoRA and rsLoRA train A
    and B (so do PiSSA and LoRA+, which change only where A, B start and their learning rates); DoRA adds one
    magnitude per output row. Both models live on the meta device."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel
    with torch.device("meta"):
        model = apply_lora(GPT(preset("gpt2")), LoRAConfig(**SEED_LORA, **ours))
        hf = GPT2LMHeadModel(GPT2Config())
    peft = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, fan_in_fan_out=True,
                                         target_modules=["c_attn", "c_proj", "c_fc"], **theirs))
    trainable, total = peft.get_nb_trainable_parameters()
    assert parameter_report(model) == (f"trainable params: {trainable:,} || all params: {total:,} || "
                                       f"trainable%: {100 * trainable / total:.4f}")
    magnitudes = sum(layer.out_features for layer in lora_layers(model)) if extra else 0
    assert trainable == 589_824 + magnitudes


def test_checkpoint_saved_before_the_variants_existed_still_loads(tmp_path):
    model = apply_lora(tiny_model(), LoRAConfig(**SEED_LORA))
    randomize(model)
    save_adapter(tmp_path / "a.pt", model, LoRAConfig(**SEED_LORA), tiny_base(model))
    checkpoint = load_adapter(tmp_path / "a.pt")
    for field in ("dora", "init"):
        del checkpoint["lora_config"][field]
    restored = tiny_model()
    assert apply_adapter(restored, checkpoint) == LoRAConfig(**SEED_LORA)
    with torch.no_grad():
        assert torch.equal(restored(IDX), model(IDX))
