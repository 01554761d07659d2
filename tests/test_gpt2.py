"""GPT-2 is the reference model: same logits and same greedy tokens as transformers' GPT2LMHeadModel."""

import pytest
import torch

from conftest import GPT2_SHAPE, TINY_SHAPE, random_hf_gpt2, save_hub_layout
from gpt2 import EOS_ID, GPT, UserError, generate, get_tokenizer, preset
from gpt2.pretrained import from_pretrained
from tensorio import FileError


def hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    """Reference greedy decoding: the full forward pass of transformers' model, one token at a time."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, hf(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0, len(prompt):].tolist()


@pytest.fixture(scope="module", params=["tiny", "124M"])
def hf_and_dirs(request, tmp_path_factory):
    """A random transformers model and the same weights saved in both layouts our loader must read."""
    hf = random_hf_gpt2(**(TINY_SHAPE if request.param == "tiny" else GPT2_SHAPE))
    root = tmp_path_factory.mktemp(f"gpt2_{request.param}")
    hf.save_pretrained(root / "save_pretrained")  # `transformer.` prefix, config.json
    return hf, {"hub": save_hub_layout(hf, root / "hub"), "save_pretrained": root / "save_pretrained"}


@pytest.mark.parametrize("layout", ["hub", "save_pretrained"])
def test_logits_and_greedy_tokens_match_transformers(hf_and_dirs, layout):
    hf, dirs = hf_and_dirs
    model = from_pretrained(str(dirs[layout])).eval()
    assert (model.config.n_layer, model.config.n_head, model.config.n_embd) == \
        (hf.config.n_layer, hf.config.n_head, hf.config.n_embd)
    idx = torch.randint(0, 50257, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(idx), hf(idx).logits
    assert ((ours - theirs).norm() / theirs.norm()).item() < 1e-5
    prompt = get_tokenizer().encode("The trophy doesn't fit into the brown suitcase because")
    assert generate(model, [prompt], max_new_tokens=20, eos_id=-1)[0] == hf_greedy(hf, prompt, 20)


def test_kv_cache_decoding_equals_full_recomputation(tiny_hub_dir):
    model = from_pretrained(str(tiny_hub_dir)).eval()
    prompt = list(range(100, 117))
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            ids.append(model(torch.tensor([ids]))[0, -1].argmax().item())
    assert generate(model, [prompt], max_new_tokens=12, eos_id=-1)[0] == ids[len(prompt):]


def test_batch_of_different_lengths_equals_one_by_one(tiny_hub_dir):
    model = from_pretrained(str(tiny_hub_dir)).eval()
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 50256, (n,), generator=g).tolist() for n in (3, 40, 17, 1, 25)]
    batched = generate(model, prompts, max_new_tokens=10, eos_id=-1)
    assert batched == [generate(model, [p], max_new_tokens=10, eos_id=-1)[0] for p in prompts]


def test_rows_stop_at_eos_or_stop_sequence_and_exclude_it(tiny_hub_dir):
    model = from_pretrained(str(tiny_hub_dir)).eval()
    prompt = list(range(200, 210))
    free = generate(model, [prompt], max_new_tokens=12, eos_id=-1)[0]
    assert generate(model, [prompt], max_new_tokens=12, eos_id=free[5])[0] == free[:free.index(free[5])]
    stop = free[6:8]
    first = next(i for i in range(len(free) - 1) if free[i:i + 2] == stop)
    assert generate(model, [prompt], max_new_tokens=12, stop_sequences=[stop], eos_id=-1)[0] == free[:first]
    # A batch in which one row stops early: the other row is not cut short.
    other = list(range(300, 305))
    batched = generate(model, [prompt, other], max_new_tokens=12, eos_id=free[0])
    assert batched == [[], generate(model, [other], max_new_tokens=12, eos_id=free[0])[0]]


def test_prompt_that_cannot_fit_the_context_is_a_clear_error():
    model = GPT(preset("gpt2-tiny"))
    with pytest.raises(ValueError, match="shorten it"):
        generate(model, [[1] * 1000], max_new_tokens=30)


def test_random_init_follows_gpt2():
    model = GPT(preset("gpt2-tiny"))
    block = model.transformer.h[0]
    assert block.mlp.c_fc.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert block.mlp.c_proj.weight.std().item() == pytest.approx(0.02 / (2 * 2) ** 0.5, rel=0.05)
    assert block.attn.c_proj.weight.std().item() == pytest.approx(0.02 / (2 * 2) ** 0.5, rel=0.05)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert torch.equal(block.attn.c_attn.bias, torch.zeros_like(block.attn.c_attn.bias))


def test_summed_loss_at_chosen_positions_equals_cross_entropy_of_full_logits():
    model = GPT(preset("gpt2-tiny")).eval()
    idx = torch.randint(0, 50257, (3, 9))
    positions = torch.tensor([0, 4, 10, 26])  # flat indices into the 3 * 9 positions
    targets = torch.tensor([5, 7, 11, 13])
    logits = model(idx).view(27, -1)[positions]
    expected = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
    assert torch.allclose(model(idx, targets, positions), expected, rtol=1e-6)


def test_tokenizer():
    enc = get_tokenizer()
    assert enc.encode("Hello world") == [15496, 995]
    assert EOS_ID == enc.eot_token == 50256


def _corrupt(tiny_hub_dir, tmp_path, edit):
    from safetensors.torch import load_file, save_file
    tensors = load_file(tiny_hub_dir / "model.safetensors")
    edit(tensors)
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((tiny_hub_dir / "config.json").read_text())
    return tmp_path


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("h.1.mlp.c_fc.weight"), r"1 missing: transformer\.h\.1\.mlp\.c_fc\.weight"),
    (lambda t: t.update({"h.1.mlp.extra": torch.zeros(3)}), r"1 unexpected: transformer\.h\.1\.mlp\.extra"),
    (lambda t: t.update({"h.0.ln_1.weight": torch.zeros(65)}), r"wrong shape: transformer\.h\.0\.ln_1\.weight"),
])
def test_loader_names_what_does_not_fit(tiny_hub_dir, tmp_path, edit, message):
    with pytest.raises(UserError, match=message):
        from_pretrained(str(_corrupt(tiny_hub_dir, tmp_path, edit)))


def test_loader_reports_truncated_and_missing_files(tiny_hub_dir, tmp_path):
    data = (tiny_hub_dir / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:len(data) // 2])
    with pytest.raises(FileError, match="truncated"):  # tensorio's reader says what is wrong with the file
        from_pretrained(str(tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no model.safetensors"):
        from_pretrained(str(tmp_path / "empty"))
    with pytest.raises(UserError, match="neither a directory"):
        from_pretrained(str(tmp_path / "no_such_dir"))


def test_checkpoint_of_unknown_size_needs_its_config(tmp_path):
    other = save_hub_layout(random_hf_gpt2(n_layer=3, n_head=4, n_embd=64), tmp_path / "other")
    assert from_pretrained(str(other)).config.n_layer == 3  # config.json gives the number of heads
    (other / "config.json").unlink()
    with pytest.raises(UserError, match="3 layers of width 64 match no GPT-2 size"):
        from_pretrained(str(other))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_head_cross_entropy_matches_the_textbook_version_and_its_gradients(dtype, monkeypatch):
    import gpt2.loss
    monkeypatch.setattr(gpt2.loss, "ROWS_PER_SLICE", 5)  # several slices, the last one partial
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(13, 32, generator=g, requires_grad=True)
    weight = (torch.randn(1000, 32, generator=g) * 0.3).to(dtype)
    targets = torch.randint(0, 1000, (13,), generator=g)
    ours = gpt2.loss.head_cross_entropy(hidden, weight, targets)
    (grad_ours,) = torch.autograd.grad(3.0 * ours, hidden)
    textbook = torch.nn.functional.cross_entropy((hidden.to(dtype) @ weight.T).float(), targets, reduction="sum")
    (grad_textbook,) = torch.autograd.grad(3.0 * textbook, hidden)
    tolerance = 1e-6 if dtype == torch.float32 else 1e-2  # bf16: gradients are rounded to 8 significant bits
    torch.testing.assert_close(ours, textbook, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad_ours, grad_textbook, rtol=tolerance, atol=tolerance * grad_textbook.abs().max())
