"""Hugging Face Hub ids for model_dir / adapter_dir / Embedder.from_pretrained, resolved from a
pre-filled Hub cache in offline mode (huggingface_hub's own layout: models--ORG--NAME with
blobs, snapshots/<commit> links and refs/main); a local directory of the same name wins; an id
that does not resolve is an error naming the key. `export.push_to_hub` uploads the export and
its card to a local stand-in for the Hub's upload API, which really receives the files."""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import os
import pathlib
import subprocess
import sys
import threading

import huggingface_hub
import numpy as np
import pytest
from huggingface_hub import constants
from huggingface_hub.file_download import repo_folder_name

from g2e import Embedder, hub
from tests import assets

REPO = pathlib.Path(__file__).resolve().parents[1]
HUB_ID = "g2e-test/tiny-qwen2-vl"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
TEXTS = ["a red circle", "a photo of a dog"]


def fill_hub_cache(cache: pathlib.Path, repo_id: str, folder: pathlib.Path) -> pathlib.Path:
    """Puts `folder`'s files into the Hub cache `cache` as huggingface_hub stores a download:
    content-addressed blobs, snapshots/<commit>/<file> linking to them, refs/main naming the
    commit. Returns the snapshot folder."""
    storage = cache / repo_folder_name(repo_id=repo_id, repo_type="model")
    snapshot = storage / "snapshots" / COMMIT
    (storage / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for path in sorted(folder.iterdir()):
        data = path.read_bytes()
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / path.name).symlink_to(os.path.relpath(blob, snapshot))
    (storage / "refs").mkdir()
    (storage / "refs" / "main").write_text(COMMIT)
    return snapshot


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return assets.tiny_checkpoint(tmp_path_factory.mktemp("hub_ckpt"), seed=11)[1]


@pytest.fixture
def offline_cache(tmp_path, checkpoint, monkeypatch):
    """A Hub cache holding HUB_ID (the tiny checkpoint), offline mode on."""
    cache = tmp_path / "hub_cache"
    snapshot = fill_hub_cache(cache, HUB_ID, checkpoint)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return snapshot


def test_a_hub_id_resolves_from_the_offline_cache(offline_cache, checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert pathlib.Path(hub.local_dir(HUB_ID, "model_dir")) == offline_cache.resolve()
    from_hub = Embedder.from_pretrained(HUB_ID, **{"eval.batch_size": 1})
    from_dir = Embedder.from_pretrained(checkpoint, **{"eval.batch_size": 1})
    np.testing.assert_array_equal(from_hub.encode(TEXTS), from_dir.encode(TEXTS))


def test_a_local_directory_wins_over_the_hub_id(offline_cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    local = tmp_path / HUB_ID
    local.mkdir(parents=True)
    assert hub.local_dir(HUB_ID, "model_dir") == HUB_ID  # the relative directory, as given


def test_an_id_that_does_not_resolve_names_the_key(offline_cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(hub.HubError) as error:
        Embedder.from_pretrained(HUB_ID, adapter_dir="g2e-test/no-such-adapter")
    message = str(error.value)
    assert "--config.adapter_dir" in message and "g2e-test/no-such-adapter" in message
    assert "HF_HUB_OFFLINE" in message
    with pytest.raises(hub.HubError, match=r"--config.model_dir: '/no/such/dir' is not a dir"):
        hub.local_dir("/no/such/dir", "model_dir")


class _HubStandIn(http.server.BaseHTTPRequestHandler):
    """The endpoints `HfApi.create_repo` and `HfApi.upload_folder` call (without hf_xet): repo
    creation, README metadata validation, preupload (every file 'regular') and the NDJSON
    commit, whose base64 files it stores in `received`."""

    received: dict[str, bytes] = {}
    created: list[dict] = []
    token: str = ""

    def log_message(self, *args):  # keep pytest's output clean
        pass

    def _reply(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.headers.get("Authorization") != f"Bearer {self.token}":
            return self._reply(401, {"error": "Invalid credentials"})
        if self.path == "/api/repos/create":
            request = json.loads(body)
            self.created.append(request)
            host, port = self.server.server_address[:2]
            url = f"http://{host}:{port}/{request['organization']}/{request['name']}"
            return self._reply(200, {"url": url})
        if self.path == "/api/validate-yaml":
            return self._reply(200, {})
        if "/preupload/" in self.path:
            files = json.loads(body)["files"]
            modes = [
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files
            ]
            return self._reply(200, {"files": modes})
        if "/commit/" in self.path:
            for line in body.decode().splitlines():
                operation = json.loads(line)
                if operation["key"] == "file":
                    value = operation["value"]
                    self.received[value["path"]] = base64.b64decode(value["content"])
            host, port = self.server.server_address[:2]
            url = f"http://{host}:{port}/g2e-test/pushed/commit/{COMMIT}"
            return self._reply(200, {"commitUrl": url, "commitOid": COMMIT})
        return self._reply(404, {"error": f"no such endpoint {self.path}"})


@pytest.fixture
def hub_stand_in():
    _HubStandIn.received, _HubStandIn.created, _HubStandIn.token = {}, [], "hf_test_token"
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HubStandIn)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_export_pushes_the_model_and_its_card(checkpoint, tmp_path, hub_stand_in):
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=1",
        JAX_PLATFORMS="cpu",
        HF_ENDPOINT=hub_stand_in,
        HF_TOKEN="hf_test_token",
        HF_HUB_OFFLINE="0",
        HF_HUB_DISABLE_TELEMETRY="1",
    )
    command = [
        sys.executable,
        "-m",
        "g2e.main",
        f"--config={REPO / 'configs' / 'embed.py'}",
        "--config.stages=export",
        f"--config.model_dir={checkpoint}",
        "--config.workdir=work",
        "--config.export.push_to_hub=g2e-test/pushed",
    ]
    result = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert [(c["organization"], c["name"]) for c in _HubStandIn.created] == [("g2e-test", "pushed")]
    exported = tmp_path / "work" / "export" / "hf"
    files = {p.name: p.read_bytes() for p in exported.iterdir()}
    assert "README.md" in files and any(name.endswith(".safetensors") for name in files)
    assert _HubStandIn.received == files


def test_a_refused_upload_names_the_key(tmp_path, hub_stand_in, monkeypatch):
    monkeypatch.setattr(constants, "ENDPOINT", hub_stand_in)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_wrong_token")
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "token"))
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "README.md").write_text("# card\n")
    with pytest.raises(hub.HubError, match=r"--config.export.push_to_hub=g2e-test/pushed: the"):
        hub.push_folder(tmp_path / "folder", "g2e-test/pushed", message="test")
    assert _HubStandIn.received == {}


def test_push_to_hub_is_validated_at_start_up():
    from g2e import configuration, main

    config = configuration.base_config()
    config.model_dir, config.stages = "/some/model", "export"
    config.export.push_to_hub = "my-org/g2e-2b"
    configuration.validate(config, main.STAGE_NAMES)
    config.export.push_to_hub = "https://huggingface.co/my-org/g2e-2b"
    with pytest.raises(configuration.ConfigError, match=r"--config.export.push_to_hub: is "):
        configuration.validate(config, main.STAGE_NAMES)
