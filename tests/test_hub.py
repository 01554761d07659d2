"""Weights and adapters from the Hugging Face Hub, through huggingface_hub.

A local HTTP server on 127.0.0.1 stands in for the Hub (huggingface_hub's endpoint pointed at it), serving what
hf_hub_download asks for: HEAD then GET /{repo}/resolve/{revision}/{file}, with the commit and ETag headers.
No test contacts a real network address.
"""
import hashlib
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from finetune.adapters import load_adapted_model, save_peft_adapter
from conftest import ROOT, TINY_SHAPE, random_hf_gpt2, save_hub_layout
from gpt2 import UserError, from_pretrained
from lora import LoRAConfig, apply_lora

COMMIT = "0123456789abcdef0123456789abcdef01234567"
IDX = torch.randint(0, 50257, (1, 9), generator=torch.Generator().manual_seed(0))


class FakeHub:
    """Files by (repo id, file name); every request is recorded as (method, path)."""

    def __init__(self):
        self.files: dict[tuple[str, str], bytes] = {}
        self.requests: list[tuple[str, str]] = []

    def add_dir(self, repo_id: str, directory: Path) -> None:
        for path in directory.iterdir():
            self.files[(repo_id, path.name)] = path.read_bytes()

    def handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_HEAD(self):
                self.respond(body=False)

            def do_GET(self):
                self.respond(body=True)

            def respond(self, body: bool):
                hub.requests.append((self.command, self.path))
                repo_id, sep, rest = self.path.partition("/resolve/")
                filename = rest.split("/", 1)[-1].split("?")[0]
                data = hub.files.get((repo_id.strip("/"), filename))
                if data is None:
                    known = any(repo == repo_id.strip("/") for repo, _ in hub.files)
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound" if known else "RepoNotFound")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if body:
                    self.wfile.write(data)

            def log_message(self, *args):
                pass

        return Handler


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """The fake Hub, running; huggingface_hub pointed at it, with an empty cache of its own."""
    import huggingface_hub
    import huggingface_hub.constants as constants
    fake = FakeHub()
    server = ThreadingHTTPServer(("127.0.0.1", 0), fake.handler())
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{server.server_port}"
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)  # what $HF_ENDPOINT sets when huggingface_hub is imported
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    assert huggingface_hub.hf_hub_url("a/b", "c").startswith(endpoint)  # never the real Hub
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    yield fake
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    hf = random_hf_gpt2(**TINY_SHAPE, seed=4)
    return hf, save_hub_layout(hf, tmp_path_factory.mktemp("hub_base"))


def test_any_gpt2_repo_loads_through_the_hub_and_then_from_the_cache(hub, base, monkeypatch):
    import huggingface_hub.constants as constants
    _, base_dir = base
    hub.add_dir("someone/tiny-gpt2", base_dir)
    model = from_pretrained("someone/tiny-gpt2")
    with torch.no_grad():
        assert torch.equal(model(IDX), from_pretrained(str(base_dir))(IDX))
    assert ("GET", "/someone/tiny-gpt2/resolve/main/model.safetensors") in hub.requests
    hub.requests.clear()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # offline: the cache serves it, no request made
    assert from_pretrained("someone/tiny-gpt2").config.n_layer == 2 and hub.requests == []


def test_a_repo_of_another_model_type_is_refused_before_its_weights_download(hub, tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama", "num_hidden_layers": 2}')
    (tmp_path / "model.safetensors").write_bytes(b"never requested")
    hub.add_dir("someone/llama", tmp_path)
    with pytest.raises(UserError, match="someone/llama is a llama model, not a GPT-2"):
        from_pretrained("someone/llama")
    assert not any("model.safetensors" in path for _, path in hub.requests)


def test_missing_repo_and_missing_file_are_named(hub, base):
    _, base_dir = base
    with pytest.raises(UserError, match="no Hub repository 'nobody/nothing'"):
        from_pretrained("nobody/nothing")
    hub.files[("someone/config-only", "config.json")] = (base_dir / "config.json").read_bytes()
    with pytest.raises(UserError, match="someone/config-only has no model.safetensors"):
        from_pretrained("someone/config-only")
    with pytest.raises(UserError, match="neither a directory, a file, nor a Hub repository id"):
        from_pretrained("not a repo/../id")


def test_peft_adapter_from_the_hub_on_its_hub_base(hub, base, tmp_path):
    """Both the adapter and its base (named by base_model_name_or_path) come from the Hub."""
    _, base_dir = base
    hub.add_dir("someone/tiny-gpt2", base_dir)
    config = LoRAConfig(rank=2, alpha=4.0, targets=("c_attn",))
    model = apply_lora(from_pretrained(str(base_dir)), LoRAConfig(rank=2, alpha=4.0, targets=("c_attn",)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p))
    save_peft_adapter(tmp_path / "adapter", model, config, "someone/tiny-gpt2")
    hub.add_dir("someone/tiny-lora", tmp_path / "adapter")
    loaded = load_adapted_model("someone/tiny-lora")
    with torch.no_grad():
        assert torch.equal(loaded(IDX), model(IDX))


def run_offline(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home"),
           "HF_DATASETS_CACHE": str(tmp_path / "datasets")}
    env.pop("HF_HUB_CACHE", None)
    code = "from finetune.signals import install_error_handling; install_error_handling()\n" + code  # as scripts do
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_offline_with_nothing_cached_says_what_to_download_and_where(tmp_path):
    result = run_offline("import lora; from gpt2 import from_pretrained; from_pretrained('gpt2')", tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1, result.stderr  # one line
    assert "config.json of gpt2 is not in the Hugging Face cache and HF_HUB_OFFLINE is set" in result.stderr
    assert "hf download gpt2 config.json model.safetensors --local-dir DIR" in result.stderr
    assert "pass DIR instead of 'gpt2'" in result.stderr


def test_squad_from_the_hub_offline_with_nothing_cached_is_one_message(tmp_path):
    result = run_offline("from data.squad import load_squad_hub; load_squad_hub('eval')", tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: could not load rajpurkar/squad_v2") and "--data-dir" in result.stderr
