"""PEFT's adapter format both ways, and the merged model: transformers and PEFT are the oracles.

Our adapters exported here must give PEFT's model our logits, unmerged and merged; PEFT's adapters imported here
must give our model PEFT's logits; what we cannot compute must be refused by name, with the model untouched.
"""
import ast
import copy
import json
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from finetune.adapters import load_adapted_model, read_peft_adapter, save_peft_adapter
from conftest import DEV_FILE, ROOT, random_hf_gpt2, save_hub_layout
from gpt2 import GPT, GPTConfig, from_pretrained, save_pretrained
from lora import LoRAConfig, LoRAError, apply_lora, apply_peft, lora_layers, merge_lora, save_adapter
from tensorio import load_safetensors, save_safetensors

IDX = torch.randint(0, 50257, (2, 12), generator=torch.Generator().manual_seed(3))
FULL = LoRAConfig(rank=4, alpha=8.0, dropout=0.1, targets=("c_attn", "c_proj", "c_fc"))
QV_RS = LoRAConfig(rank=2, alpha=5.0, dropout=0.0, targets=("c_attn", "mlp.c_proj"), qkv="qv", rank_stabilized=True)


def rel_err(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Random nonzero A and B (B starts at zero: an adapter that does nothing would prove nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model):
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * 0.3)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.3)


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        out = model.eval()(IDX)
    return getattr(out, "logits", out)


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory):
    """A random transformers GPT-2 (3 layers: more than the 2 every test model has) and its Hub-layout folder."""
    hf = random_hf_gpt2(n_layer=3, n_head=4, n_embd=64, seed=1)
    return hf, save_hub_layout(hf, tmp_path_factory.mktemp("base"))


# --- safetensors ------------------------------------------------------------------------------------------------

def test_writer_makes_the_libraries_bytes_and_reads_back(tmp_path):
    from safetensors.torch import load_file, save_file
    g = torch.Generator().manual_seed(0)
    tensors = {"b.f32": torch.randn(3, 5, generator=g), "a.bf16": torch.randn(7, generator=g).bfloat16(),
               "f16": torch.randn(2, 3, generator=g).half(), "i64": torch.arange(5), "u8": torch.arange(3).byte(),
               "mask": torch.tensor([True, False, True]), "empty": torch.zeros(0, 4), "scalar": torch.tensor(2.5),
               "column": torch.randn(4, 6, generator=g).t()}  # not contiguous
    save_safetensors(tensors, tmp_path / "ours.safetensors", metadata={"format": "pt"})
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp_path / "lib.safetensors", metadata={"format": "pt"})
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "lib.safetensors").read_bytes()
    for read in (load_file, load_safetensors):
        loaded = read(tmp_path / "ours.safetensors")
        assert loaded.keys() == tensors.keys()
        assert all(torch.equal(loaded[k], tensors[k]) and loaded[k].dtype == tensors[k].dtype for k in tensors)


def test_writer_leaves_the_old_file_when_it_fails(tmp_path):
    path = tmp_path / "a.safetensors"
    save_safetensors({"x": torch.ones(2)}, path)
    before = path.read_bytes()
    with pytest.raises(ValueError, match="complex64"):
        save_safetensors({"x": torch.ones(2), "z": torch.ones(2, dtype=torch.complex64)}, path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]


# --- ours -> PEFT -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("config", [FULL, QV_RS, replace(FULL, dora=True), replace(FULL, init="pissa")],
                         ids=["full", "qv-rslora", "dora", "pissa"])
def test_exported_adapter_gives_peft_our_logits(hf_base, tmp_path, config):
    from peft import PeftModel
    hf, base_dir = hf_base
    ours = apply_lora(from_pretrained(str(base_dir)), config)
    randomize(ours)
    save_peft_adapter(tmp_path / "adapter", ours, config, str(base_dir))

    peft_model = PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path / "adapter").eval()
    assert rel_err(logits(ours), logits(peft_model)) < 1e-5
    assert rel_err(logits(ours), logits(hf)) > 1e-2  # the adapter changes the model: the test can fail
    # PEFT writes the same settings back: our file says what PEFT's own would.
    peft_model.save_pretrained(tmp_path / "resaved")
    ours_json = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    theirs_json = json.loads((tmp_path / "resaved" / "adapter_config.json").read_text())
    for field, value in ours_json.items():
        same = set(value) == set(theirs_json[field]) if field == "target_modules" else value == theirs_json[field]
        assert same, field
    resaved = load_safetensors(tmp_path / "resaved" / "adapter_model.safetensors")
    exported = load_safetensors(tmp_path / "adapter" / "adapter_model.safetensors")
    assert resaved.keys() == exported.keys() and all(torch.equal(resaved[k], exported[k]) for k in resaved)

    merged = peft_model.merge_and_unload()
    merge_lora(ours)
    assert rel_err(logits(ours), logits(merged)) < 1e-5


def test_export_script_writes_both_from_a_run(hf_base, tmp_path):
    """export.py on a train.py run: --peft (built without the base's weights) and --merged."""
    import export
    from peft import PeftModel
    from transformers import GPT2LMHeadModel
    hf, base_dir = hf_base
    model = apply_lora(from_pretrained(str(base_dir)), QV_RS)
    randomize(model, seed=5)
    base = {"model": str(base_dir), "init": "pretrained", "seed": 0, "config": vars(model.config)}
    save_adapter(tmp_path / "run" / "checkpoint.pt", model, QV_RS, base, step=3)
    export.main(["--checkpoint", str(tmp_path / "run"), "--peft", str(tmp_path / "peft")])
    export.main(["--checkpoint", str(tmp_path / "run"), "--merged", str(tmp_path / "merged")])

    expected = logits(model)
    assert rel_err(logits(PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path / "peft")), expected) < 1e-5
    transformers_merged = GPT2LMHeadModel.from_pretrained(tmp_path / "merged")
    assert rel_err(logits(transformers_merged), expected) < 1e-5
    assert rel_err(logits(from_pretrained(str(tmp_path / "merged"))), expected) < 1e-5


def test_merged_model_is_the_hubs_layout(tmp_path):
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=8, vocab_size=11, block_size=16))
    apply_lora(model, LoRAConfig(rank=2, targets=("c_fc",)))
    randomize(model)
    merge_lora(model)
    save_pretrained(model, tmp_path)
    tensors = load_safetensors(tmp_path / "model.safetensors")
    assert "lm_head.weight" not in tensors and not any("lora" in k or k.startswith("transformer.") for k in tensors)
    assert tensors["h.0.mlp.c_fc.weight"].shape == (8, 32)  # Conv1D: (in, out)
    assert torch.equal(tensors["h.0.mlp.c_fc.weight"], model.transformer.h[0].mlp.c_fc.weight.t())
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "gpt2"


# --- PEFT -> ours -----------------------------------------------------------------------------------------------

def peft_adapter(hf, directory: Path, base_name: str, **options) -> torch.Tensor:
    """An adapter made and saved by PEFT with random nonzero B (init_lora_weights=False); returns its logits."""
    from peft import LoraConfig, get_peft_model
    config = LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, fan_in_fan_out=True, **options)
    torch.manual_seed(7)
    peft_model = get_peft_model(copy.deepcopy(hf), config)
    peft_model.peft_config["default"].base_model_name_or_path = base_name
    peft_model.save_pretrained(directory)
    return logits(peft_model)


@pytest.mark.parametrize("options", [
    dict(r=4, lora_alpha=6, target_modules=["c_attn", "c_fc"], use_rslora=True,
         rank_pattern={"c_fc": 2}, alpha_pattern={"h.1.attn.c_attn": 3}),
    dict(r=3, lora_alpha=8, target_modules=["attn.c_proj", "mlp.c_proj"], layers_to_transform=[0, 2],
         layers_pattern="h"),
], ids=["patterns-rslora", "some-layers"])
def test_peft_adapter_imported_gives_peft_logits(hf_base, tmp_path, options):
    hf, base_dir = hf_base
    expected = peft_adapter(hf, tmp_path / "adapter", str(base_dir), **options)
    model = load_adapted_model(str(tmp_path / "adapter"))  # the base from base_model_name_or_path
    assert rel_err(logits(model), expected) < 1e-5
    assert rel_err(logits(hf), expected) > 1e-2
    merge_lora(model)
    assert rel_err(logits(model), expected) < 1e-5


def test_evaluate_scores_a_peft_adapter_directory(hf_base, tmp_path):
    """evaluate.py --checkpoint PEFT_DIR --model BASE_DIR: answers with PEFT's adapter merged into that base."""
    import evaluate
    hf, base_dir = hf_base
    peft_adapter(hf, tmp_path / "adapter", "someone/not-to-be-downloaded", r=2, lora_alpha=4,
                 target_modules=["c_attn"])
    evaluate.main(["--checkpoint", str(tmp_path / "adapter"), "--model", str(base_dir), "--eval-file", str(DEV_FILE),
                   "--limit", "3", "--max-new-tokens", "4", "--out", str(tmp_path / "m.json")])
    assert json.loads((tmp_path / "m.json").read_text())["total"] == 3
    assert len(json.loads((tmp_path / "m.predictions.json").read_text())) == 3


def test_the_readmes_sharing_snippet_runs(hf_base, tmp_path):
    """The README's ours <-> PEFT code, as written there, with its Hub names pointed at local folders (there is no
    network here): the base, a run's adapter/ and a PEFT adapter."""
    hf, base_dir = hf_base
    adapter = tmp_path / "adapter"
    peft_adapter(hf, adapter, str(base_dir), r=2, lora_alpha=4, target_modules=["c_attn"])
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Sharing adapters"):readme.index("## Evaluate")]
    (snippet,) = re.findall(r"```python\n(.*?)```", section, re.S)
    for name, local in (('"gpt2"', base_dir), ('"runs/gpt2-lora/adapter"', adapter),
                        ('"someone/gpt2-lora-squad"', adapter)):
        assert name in snippet
        snippet = snippet.replace(name, repr(str(local)))
    namespace = {}
    exec(compile(snippet, "README.md", "exec"), namespace)
    assert isinstance(namespace["model"], GPT) and len(lora_layers(namespace["model"])) == 3  # c_attn, 3 layers


def test_round_trip_through_peft_format_keeps_logits(hf_base, tmp_path):
    """Exported and imported again, onto a base given explicitly (evaluate.py's --model) rather than the one the
    adapter names (which would be a Hub download)."""
    _, base_dir = hf_base
    ours = apply_lora(from_pretrained(str(base_dir)), QV_RS)
    randomize(ours, seed=2)
    save_peft_adapter(tmp_path, ours, QV_RS, "someone/not-to-be-downloaded")
    assert rel_err(logits(load_adapted_model(str(tmp_path), str(base_dir))), logits(ours)) < 1e-6


@pytest.fixture(scope="module")
def exported(hf_base, tmp_path_factory):
    """A valid PEFT adapter (config, tensors) of the 3-layer base, to be spoiled one field at a time."""
    _, base_dir = hf_base
    model = apply_lora(from_pretrained(str(base_dir)), FULL)
    directory = save_peft_adapter(tmp_path_factory.mktemp("valid"), model, FULL, str(base_dir))
    return read_peft_adapter(str(directory))


def lora_key(module: str, matrix: str = "A") -> str:
    return f"base_model.model.{module}.lora_{matrix}.weight"


@pytest.mark.parametrize("config_change, tensor_change, message", [
    (dict(use_dora=True), None, "use_dora True: DoRA"),
    (dict(lora_bias=True), None, "lora_bias True"),
    (dict(modules_to_save=["lm_head"]), None, "modules_to_save"),
    (dict(trainable_token_indices=[5]), None, "trainable_token_indices"),
    (dict(bias="lora_only"), None, "bias 'lora_only'"),
    (dict(init_lora_weights="pissa"), None, "init_lora_weights 'pissa'.*path_initial_model_for_weight_conversion"),
    (dict(peft_type="IA3"), None, "peft_type 'IA3'"),
    (dict(target_modules=["c_attn", "wte"]), None, "target_modules 'wte'"),
    (dict(), {lora_key("lm_head"): torch.zeros(4, 64), lora_key("lm_head", "B"): torch.zeros(50257, 4)},
     "target_modules: an adapter of lm_head"),
    (dict(), {"base_model.model.transformer.wte.lora_embedding_A": torch.zeros(4, 50257)}, "an embedding adapter"),
    (dict(), {lora_key("transformer.h.5.attn.c_attn"): torch.zeros(4, 64),
              lora_key("transformer.h.5.attn.c_attn", "B"): torch.zeros(192, 4)},
     "base of another shape: it adapts transformer.h.5.attn.c_attn, which this model .3 blocks."),
    (dict(), {lora_key("transformer.h.2.mlp.c_fc"): torch.zeros(4, 32)},
     r"base of another shape.*32 -> 256.*64 -> 256"),
    (dict(rank_pattern={"c_fc": 2}), None, r"transformer.h.0.mlp.c_fc: lora_A \(4, 64\).*rank 2"),
], ids=lambda v: str(v)[:30] if isinstance(v, str) else None)
def test_unsupported_adapters_are_refused_by_name_and_nothing_is_loaded(hf_base, exported, config_change,
                                                                      tensor_change, message):
    _, base_dir = hf_base
    config, tensors = exported
    model = from_pretrained(str(base_dir))
    before = logits(model)
    with pytest.raises(LoRAError, match=message):
        apply_peft(model, {**config, **config_change}, {**tensors, **(tensor_change or {})})
    assert not lora_layers(model) and torch.equal(logits(model), before)


def test_adapter_from_a_larger_base_is_refused_whole(hf_base, exported):
    """The 3-layer adapter onto a 2-layer model: layers 0 and 1 would fit, layer 2 does not; none is loaded."""
    config, tensors = exported
    model = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=64))
    with pytest.raises(LoRAError, match="transformer.h.2.* which this model .2 blocks. does not have"):
        apply_peft(model, config, tensors)
    assert not lora_layers(model)


# --- lora/ stands alone -----------------------------------------------------------------------------------------

def test_lora_imports_only_torch_and_the_standard_library():
    """...and tensorio, the file code it shares with gpt2/, which imports only those two itself; and matplotlib,
    the optional extra, which lora/anatomy.py imports only to draw its heatmap."""
    for file in sorted([*(ROOT / "lora").glob("*.py"), *(ROOT / "tensorio").glob("*.py")]):
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                modules = [node.module]
            else:
                continue  # relative imports: lora itself
            for module in modules:
                top = module.split(".")[0]
                allowed = top == "tensorio" and file.parent.name == "lora" or (
                    file.name == "anatomy.py" and top == "matplotlib")
                assert top == "torch" or top in sys.stdlib_module_names or allowed, f"{file} imports {module}"


def test_no_lora_module_shadows_the_standard_library():
    """A module named like a standard one (lora/inspect.py once) breaks `python lora/that.py`: torch imports the
    standard module and gets ours."""
    assert not [f.stem for f in (ROOT / "lora").glob("*.py") if f.stem in sys.stdlib_module_names]


def test_lora_errors_print_one_line_beside_gpt2s(tmp_path):
    """Both packages' user errors print as one line in a script (which installs the error handling first)."""
    script = ("from finetune.signals import install_error_handling; install_error_handling()\n"
              "import gpt2, lora, torch, sys\n"
              "lora.LoRAConfig(targets=('q_proj',))\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: unknown LoRA target(s) ['q_proj']")
