"""A fresh clone works without network: the tokenizer comes from the repository's own BPE files, and the
repository is an installable package."""
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile

import pytest
import tiktoken

import train
from conftest import DEV_FILE, ROOT
from gpt2 import EOS_ID, UserError, get_tokenizer

PACKAGES = ("gpt2", "lora", "tensorio", "data", "finetune")


def test_the_shipped_bpe_files_build_tiktokens_gpt2_encoding():
    ours, theirs = get_tokenizer(), tiktoken.get_encoding("gpt2")  # theirs: from TIKTOKEN_CACHE_DIR (conftest)
    assert ours.n_vocab == theirs.n_vocab == 50257
    assert all(ours.decode_single_token_bytes(i) == theirs.decode_single_token_bytes(i) for i in range(50257))
    assert ours.encode("Hello world") == [15496, 995]
    text = DEV_FILE.read_text(encoding="utf-8")[:200_000]  # contexts, questions, JSON punctuation, unicode
    assert ours.encode_ordinary(text) == theirs.encode_ordinary(text)
    assert ours.encode("a<|endoftext|>", allowed_special="all") == [64, EOS_ID]


def requirement_lines(path) -> list[str]:
    lines = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
    return [line for line in lines if line and not line.startswith("-r")]


def test_the_package_installs_the_five_packages_with_the_bpe_files_and_the_requirements(tmp_path):
    """`pip install -e .` reads the same pyproject.toml as a wheel build: build one, offline, from a copy of the
    repository (the build writes beside its sources), and look inside."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["dependencies"] == requirement_lines(ROOT / "requirements.txt")
    assert set(requirement_lines(ROOT / "requirements-test.txt")) <= set(project["optional-dependencies"]["tests"])
    source = tmp_path / "source"
    for name in PACKAGES:
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(source),
                    "-w", str(tmp_path / "wheel")], check=True, capture_output=True)
    (wheel,) = (tmp_path / "wheel").glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names if not name.startswith("gpt2_lora-")} == set(PACKAGES)
    assert {"gpt2/bpe/vocab.bpe", "gpt2/bpe/encoder.json", "gpt2/bpe/LICENSE", "lora/layer.py"} <= set(names)


def test_train_names_every_missing_input_at_once(tmp_path):
    (tmp_path / "model").mkdir()
    with pytest.raises(UserError) as error:
        train.main(["--model", str(tmp_path / "model"), "--train-file", str(tmp_path / "train.json"),
                    "--eval-file", str(tmp_path / "dev.json"), "--out", str(tmp_path / "run")])
    message = str(error.value)
    assert message.startswith("3 input(s) missing: ") and "\n" not in message
    for missing in ("training data (no file at", "train.json", "eval data (no file at", "dev.json",
                    f"no {tmp_path / 'model' / 'model.safetensors'}"):
        assert missing in message
    assert not (tmp_path / "run" / "config.json").exists()


def test_train_offline_with_nothing_cached_is_one_message_naming_each_missing_piece(tmp_path):
    """The default run (Hub data and weights) with HF_HUB_OFFLINE=1 and an empty cache: no download attempt, no
    retries, one line."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home"),
           "HF_DATASETS_CACHE": str(tmp_path / "datasets")}
    env.pop("HF_HUB_CACHE", None)
    result = subprocess.run([sys.executable, "train.py", "--out", str(tmp_path / "run")], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("error: 3 input(s) missing (HF_HUB_OFFLINE is set): the training data")
    assert "the eval data" in result.stderr and "the base model gpt2 (not in the Hugging Face cache" in result.stderr
