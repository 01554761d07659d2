"""Every adapter file is checked whole before use: a damaged one is refused with one line that names the file and
the field, and the model it was to be loaded into is left as it was (nothing half-loaded)."""
import json
import math
import subprocess
import sys

import pytest
import torch

from conftest import DEV_FILE, ROOT, SEED_LORA, tiny_base, tiny_model
from finetune.adapters import read_peft_adapter, save_peft_adapter
from lora import (ADAPTER_LIMIT, LoRAConfig, LoRAError, apply_adapter, apply_lora, apply_peft, load_adapter,
                  lora_layers, save_adapter)
from lora.peft_format import CONFIG_NAME, WEIGHTS_NAME
from tensorio import save_safetensors

A_KEY = "transformer.h.0.attn.c_attn.lora_A"
B_KEY = "transformer.h.1.mlp.c_fc.lora_B"


def unchanged(model, before: dict) -> bool:
    return not lora_layers(model) and all(torch.equal(t, before[k]) for k, t in model.state_dict().items())


# --- our checkpoint.pt ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint_file(tmp_path_factory):
    model = tiny_model()
    base = {**tiny_base(model), "quantize": "none"}
    apply_lora(model, LoRAConfig(**SEED_LORA))
    path = tmp_path_factory.mktemp("run") / "checkpoint.pt"
    save_adapter(path, model, LoRAConfig(**SEED_LORA), base, step=1)
    return path


def spoil(part: str, key: str, value):
    """A change to one field of the checkpoint dict: checkpoint[part][key] = value."""
    def change(checkpoint):
        checkpoint[part][key] = value(checkpoint[part].get(key)) if callable(value) else value
    return change


def with_value(x: float):
    return lambda t: torch.full_like(t, x)


@pytest.mark.parametrize("change, field", [
    (spoil("adapter", A_KEY, with_value(math.nan)), f"adapter: {A_KEY} holds NaN"),
    (spoil("adapter", B_KEY, with_value(-math.inf)), f"adapter: {B_KEY} holds inf"),
    (spoil("adapter", B_KEY, with_value(2 * ADAPTER_LIMIT)), f"{B_KEY} holds 2e\\+04, beyond"),
    (spoil("adapter", A_KEY, lambda t: t.long()), f"{A_KEY} is torch.int64, not a floating-point tensor"),
    (spoil("lora_config", "alpha", math.nan), "lora_config: alpha nan"),
    (spoil("lora_config", "dropout", 1.5), r"lora_config: dropout 1.5: .* in \[0, 1\)"),
    (spoil("lora_config", "rank", 0), "lora_config: rank 0"),
    (spoil("lora_config", "rank", "4"), "lora_config: rank '4'"),
    (spoil("lora_config", "targets", ["c_attn", "wte"]), r"lora_config: unknown LoRA target\(s\) \['wte'\]"),
    (spoil("lora_config", "qkv", "qq"), "lora_config: --qkv 'qq'"),
    (spoil("lora_config", "init", "pissa"), "lora_config init 'pissa'"),
    (spoil("lora_config", "scale", 2.0), r"lora_config has unknown field\(s\) \['scale'\]"),
    (spoil("base", "model", 7), "base.model 7"),
    (spoil("base", "seed", "0"), "base.seed '0'"),
    (spoil("base", "init", "zeros"), "base.init 'zeros'"),
    (spoil("base", "quantize", "fp4"), "base.quantize 'fp4'"),
    (spoil("base", "config", [2, 4, 64]), r"base.config \[2, 4, 64\]"),
    (lambda c: c["base"]["config"].update(n_layer=-2), "base.config.n_layer -2"),
    (lambda c: c["base"]["config"].update(n_embd="64"), "base.config.n_embd '64'"),
    (lambda c: c["base"]["config"].update(dropout=math.nan), "base.config.dropout nan"),
    (lambda c: c["base"]["config"].update(heads=4), "base.config.heads 4: is not a GPTConfig field"),
    (lambda c: c["base"]["config"].pop("n_head"), "base.config .*lacks n_head"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_a_damaged_checkpoint_is_refused_by_file_and_field(checkpoint_file, tmp_path, change, field):
    checkpoint = torch.load(checkpoint_file, weights_only=True)
    change(checkpoint)
    damaged = tmp_path / "checkpoint.pt"
    torch.save(checkpoint, damaged)
    model = tiny_model()
    before = {k: t.clone() for k, t in model.state_dict().items()}
    with pytest.raises(LoRAError, match=field) as refused:
        apply_adapter(model, load_adapter(damaged))
    assert str(refused.value).startswith(str(damaged)) and "\n" not in str(refused.value)
    assert unchanged(model, before)


def test_an_adapter_that_does_not_fit_leaves_the_model_as_it_was(checkpoint_file):
    checkpoint = load_adapter(checkpoint_file)
    checkpoint["adapter"][A_KEY] = checkpoint["adapter"][A_KEY][:2]  # rank 2 where the config says 4
    model = tiny_model()
    before = {k: t.clone() for k, t in model.state_dict().items()}
    with pytest.raises(LoRAError, match=rf"does not fit.*1 of another shape \['{A_KEY} \(2, 64\) vs \(4, 64\)'\]"):
        apply_adapter(model, checkpoint)
    assert unchanged(model, before)


def test_evaluate_refuses_a_nan_adapter_in_one_line(checkpoint_file, tmp_path):
    checkpoint = torch.load(checkpoint_file, weights_only=True)
    checkpoint["adapter"][A_KEY][0, 0] = math.nan
    run = tmp_path / "run"
    run.mkdir()
    torch.save(checkpoint, run / "checkpoint.pt")
    result = subprocess.run([sys.executable, "evaluate.py", "--checkpoint", str(run), "--eval-file", str(DEV_FILE),
                             "--limit", "1", "--device", "cpu"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert f"{A_KEY} holds NaN (not finite)" in result.stderr and str(run) in result.stderr
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt"]  # nothing written


# --- a PEFT adapter directory ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def peft_dir(tmp_path_factory):
    model = tiny_model()
    config = LoRAConfig(rank=2, alpha=4.0, targets=("c_attn", "c_fc"))
    apply_lora(model, config)
    return save_peft_adapter(tmp_path_factory.mktemp("peft"), model, config, "gpt2-tiny")


PEFT_A = "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"
PEFT_B = "base_model.model.transformer.h.1.mlp.c_fc.lora_B.weight"


@pytest.mark.parametrize("config_change, tensor_change, field", [
    (dict(r="2"), None, f"{CONFIG_NAME}: r '2': the rank must be a whole number"),
    (dict(r=0), None, f"{CONFIG_NAME}: r 0"),
    (dict(r=True), None, f"{CONFIG_NAME}: r True"),
    (dict(lora_alpha=math.nan), None, f"{CONFIG_NAME}: lora_alpha nan: must be a finite number"),
    (dict(lora_alpha="4"), None, f"{CONFIG_NAME}: lora_alpha '4'"),
    (dict(lora_dropout=1.5), None, rf"{CONFIG_NAME}: lora_dropout 1.5: must be a number in \[0, 1\)"),
    (dict(lora_dropout=[0.1]), None, rf"{CONFIG_NAME}: lora_dropout \[0.1\]"),
    (dict(use_rslora="yes"), None, f"{CONFIG_NAME}: use_rslora 'yes': must be true or false"),
    (dict(target_modules={"c_attn": 1}), None, f"{CONFIG_NAME}: target_modules .*must be a list"),
    (dict(target_modules="(c_attn"), None, f"{CONFIG_NAME}: target_modules '\\(c_attn' is not a regular expression"),
    (dict(rank_pattern=["c_fc", 2]), None, f"{CONFIG_NAME}: rank_pattern .*must be an object"),
    (dict(rank_pattern={"c_fc": "2"}), None, f"{CONFIG_NAME}: rank_pattern 'c_fc': '2': its values must be whole"),
    (dict(rank_pattern={"c_[fc": 2}), None, f"{CONFIG_NAME}: rank_pattern key 'c_\\[fc' is not a regular"),
    (dict(alpha_pattern={"c_fc": math.inf}), None, f"{CONFIG_NAME}: alpha_pattern 'c_fc': inf: its values must be"),
    (dict(base_model_name_or_path=["gpt2"]), None, f"{CONFIG_NAME}: base_model_name_or_path"),
    (dict(), {PEFT_A: with_value(math.nan)}, f"{WEIGHTS_NAME}: {PEFT_A} holds NaN"),
    (dict(), {PEFT_B: with_value(math.inf)}, f"{WEIGHTS_NAME}: {PEFT_B} holds inf"),
    (dict(), {PEFT_B: with_value(1e5)}, f"{WEIGHTS_NAME}: {PEFT_B} holds 1e\\+05, beyond"),
    (dict(), {PEFT_A: torch.flatten}, rf"{WEIGHTS_NAME}: transformer.h.0.attn.c_attn: lora_A \(128,\) .* must"),
    (dict(), {PEFT_A: lambda t: t.int()}, f"{WEIGHTS_NAME}: {PEFT_A} is torch.int32, not a floating-point"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_a_damaged_peft_adapter_is_refused_by_file_and_field(peft_dir, tmp_path, config_change, tensor_change, field):
    config, tensors = read_peft_adapter(str(peft_dir))
    config = {**config, **config_change}
    for key, change in (tensor_change or {}).items():
        tensors[key] = change(tensors[key])
    damaged = tmp_path / "adapter"
    damaged.mkdir()
    (damaged / CONFIG_NAME).write_text(json.dumps(config))  # NaN and inf as Python's json writes them
    save_safetensors(tensors, damaged / WEIGHTS_NAME)
    model = tiny_model()
    before = {k: t.clone() for k, t in model.state_dict().items()}
    with pytest.raises(LoRAError, match=field) as refused:
        apply_peft(model, *read_peft_adapter(str(damaged)), source=str(damaged))
    assert str(refused.value).startswith(str(damaged)) and "\n" not in str(refused.value)
    assert unchanged(model, before)


def test_a_peft_config_that_is_not_an_object_is_refused_by_name(tmp_path):
    (tmp_path / CONFIG_NAME).write_text("[4, 8]")
    save_safetensors({PEFT_A: torch.zeros(2, 64)}, tmp_path / WEIGHTS_NAME)
    with pytest.raises(LoRAError, match=f"^{tmp_path}: {CONFIG_NAME} holds a list, not a JSON object$"):
        read_peft_adapter(str(tmp_path))
