"""lora.anatomy: the numbers it reports are the ones their definitions give, and the CLI works on real checkpoints."""
import math
import sys

import pytest
import torch

from conftest import SEED_LORA, TINY_SHAPE, random_hf_gpt2, save_hub_layout, tiny_base
from gpt2 import GPT, from_pretrained, preset
from lora import LoRAConfig, apply_lora, lora_layers, save_adapter
from lora.anatomy import analyse, effective_rank, main, subspace_similarity


def trained_like(rank: int = 4, seed: int = 1, **options):
    """A tiny model whose adapters have random A and B, as a trained adapter would."""
    torch.manual_seed(0)
    model = apply_lora(GPT(preset("gpt2-tiny")), LoRAConfig(**{**SEED_LORA, "rank": rank, **options}))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model):
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g))
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.05)
    return model


def save(model, path, **config):
    save_adapter(path, model, LoRAConfig(**{**SEED_LORA, **config}), tiny_base(model))
    return path


def test_rank_two_update_has_rank_two():
    """A rank-4 adapter whose B A has exactly two directions, with singular values 3 and 1."""
    model = trained_like()
    layer = model.transformer.h[0].mlp.c_fc
    U, _ = torch.linalg.qr(torch.randn(layer.out_features, 2, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(layer.in_features, 2, dtype=torch.float64))
    with torch.no_grad():
        layer.lora_B.copy_(torch.cat([U * torch.tensor([3.0, 1.0], dtype=torch.float64), torch.zeros_like(U)], 1))
        layer.lora_A.copy_(torch.cat([V.T, torch.randn(2, layer.in_features, dtype=torch.float64)]) / layer.scaling)
    checkpoint = {"lora_config": {**SEED_LORA, "qkv": "", "rank_stabilized": False}, "adapter": {
        k: v for k, v in model.state_dict().items() if "lora_" in k}}
    row = next(r for r in analyse(checkpoint) if r["module"] == "transformer.h.0.mlp.c_fc")
    sv = row["singular_values"]
    assert sv[:2] == pytest.approx([3.0, 1.0], rel=1e-5) and max(sv[2:]) < 1e-5
    p = torch.tensor([0.75, 0.25])
    assert row["rank"] == 2
    assert row["erank"] == pytest.approx(math.exp(-(p * p.log()).sum().item()), rel=1e-5)
    assert effective_rank(torch.tensor([2.0, 2.0, 0.0, 0.0])) == (2, pytest.approx(2.0))
    assert row["norm"] == pytest.approx(math.sqrt(10), rel=1e-5)


def test_subspace_similarity_of_an_adapter_with_itself_is_one_and_with_an_orthogonal_one_zero():
    A = torch.randn(4, 64)
    phi = subspace_similarity(A, A)
    torch.testing.assert_close(phi.diagonal(), torch.ones(4, dtype=torch.float64))
    Q, _ = torch.linalg.qr(torch.randn(64, 12))
    assert subspace_similarity(Q[:, :4].T, Q[:, 4:].T).abs().max() < 1e-12  # (4, 8): no shared direction
    wider = torch.cat([A, torch.randn(4, 64)])  # (8, 64): contains A's row space
    assert subspace_similarity(A, wider)[-1, -1] == pytest.approx(1.0)


def test_cli_reports_ratios_against_the_base_compares_two_runs_and_writes_a_png(tmp_path, capsys):
    hf = random_hf_gpt2(**TINY_SHAPE)
    hub = save_hub_layout(hf, tmp_path / "hub")
    model = from_pretrained(str(hub))
    base_weights = {name: m.weight.detach().clone() for name, m in model.named_modules()
                    if isinstance(m, torch.nn.Linear) and name.split(".")[-1] in ("c_attn", "c_proj", "c_fc")}
    apply_lora(model, LoRAConfig(**SEED_LORA))
    with torch.no_grad():
        for layer in lora_layers(model):
            torch.nn.init.normal_(layer.lora_B, std=0.05)
    run = tmp_path / "run"
    save(model, run / "checkpoint.pt")
    other = save(trained_like(rank=8, seed=2), tmp_path / "r8.pt", rank=8)
    main([str(run), str(other), "--base", str(hub / "model.safetensors")])
    out = capsys.readouterr().out
    name = "transformer.h.1.attn.c_proj"
    layer = model.get_submodule(name)
    expected = (layer.delta_weight().norm() / base_weights[name].norm()).item()
    line = next(line for line in out.splitlines() if line.startswith(name))
    assert float(line.split()[2]) == pytest.approx(expected, rel=1e-3)
    assert "φ(4, 8)" in out and "changed most" in out
    assert (run / "anatomy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_on_a_dora_adapter_without_matplotlib_says_how_to_get_it(tmp_path, capsys, monkeypatch):
    path = save(trained_like(dora=True), tmp_path / "dora.pt", dora=True)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    main([str(path), str(path)])
    out = capsys.readouterr().out
    assert "DoRA" in out and "pip install matplotlib" in out and not (tmp_path / "anatomy.png").exists()
    phi_rows = [line.split() for line in out.splitlines()
                if line.startswith("transformer.h.") and len(line.split()) == 3]
    assert len(phi_rows) == 8 and all(float(v) == pytest.approx(1.0) for row in phi_rows for v in row[1:])


def test_dora_weight_change_with_a_base_is_the_merged_weight_minus_the_base(tmp_path):
    """On attn.c_proj, square: only the file's other, non-square projections tell that the Hub file is (in, out)."""
    hf = random_hf_gpt2(**TINY_SHAPE)
    hub = save_hub_layout(hf, tmp_path / "hub")
    model = from_pretrained(str(hub))
    base = model.transformer.h[0].attn.c_proj.weight.detach().clone()
    apply_lora(model, LoRAConfig(**SEED_LORA, dora=True))
    layer = model.transformer.h[0].attn.c_proj
    with torch.no_grad():
        torch.nn.init.normal_(layer.lora_B, std=0.05)
        layer.lora_magnitude_vector.mul_(1.3)
    save(model, tmp_path / "a.pt", dora=True)
    from lora import load_adapter
    rows = analyse(load_adapter(tmp_path / "a.pt"), str(hub / "model.safetensors"))
    layer.merge()
    row = next(r for r in rows if r["module"] == "transformer.h.0.attn.c_proj")
    assert row["norm"] == pytest.approx((layer.weight - base).norm().item(), rel=1e-5)


def test_cli_errors_are_messages(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main([str(tmp_path / "run"), "--base", str(tmp_path / "missing.safetensors")])
    assert "no file at --base" in capsys.readouterr().err
