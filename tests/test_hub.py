"""Hugging Face Hub ids as model paths and pushing an export, against a local stand-in for the Hub:
huggingface_hub takes its endpoint from HF_ENDPOINT (set here as that variable would set it), so a
small HTTP server on 127.0.0.1 answers the requests it really makes (repo info, tree, file
downloads; repo creation, pre-upload, commit)."""

import base64
import hashlib
import http.server
import json
import os
import re
import shutil
import threading

import pytest

from jaxsft import hub

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMIT = "0123456789abcdef0123456789abcdef01234567"


class HubStub(http.server.ThreadingHTTPServer):
    """Serves one model repo (`files`: path -> bytes) and accepts commits; records every request."""

    def __init__(self, repo_id, files):
        self.repo_id, self.files, self.requests, self.commits = repo_id, files, [], []
        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_port}"


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def handle_one(self):
        hub, repo = self.server, re.escape(self.server.repo_id)
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        hub.requests.append((self.command, self.path, self.headers.get("authorization")))
        if self.path == "/api/repos/create":
            return self.reply({"url": f"{hub.url}/{hub.repo_id}"})
        if re.fullmatch(f"/api/models/{repo}/revision/main", self.path):
            return self.reply({"id": hub.repo_id, "sha": COMMIT, "siblings": [{"rfilename": f} for f in hub.files]})
        if re.fullmatch(f"/api/models/{repo}/tree/{COMMIT}\\?.*", self.path):
            return self.reply([{"type": "file", "path": f, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                               for f, data in hub.files.items()])
        if m := re.fullmatch(f"/{repo}/resolve/(?:main|{COMMIT})/(.+)", self.path):
            data = hub.files[m[1]]
            return self.reply(data, {"ETag": f'"{hashlib.sha1(data).hexdigest()}"', "X-Repo-Commit": COMMIT})
        if re.fullmatch(f"/api/models/{repo}/preupload/main", self.path):
            # Every file goes inline in the commit ("regular"), as the Hub answers for small files.
            return self.reply({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                         for f in json.loads(body)["files"]]})
        if re.fullmatch(f"/api/models/{repo}/commit/main", self.path):
            hub.commits.append([json.loads(line) for line in body.decode().splitlines()])
            return self.reply({"commitUrl": f"{hub.url}/{hub.repo_id}/commit/{COMMIT}", "commitOid": COMMIT})
        self.reply({"error": "not found"}, status=404)

    do_GET = do_HEAD = do_POST = handle_one

    def reply(self, payload, headers=None, status=200):
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        for k, v in {"Content-Type": "application/json", **(headers or {})}.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def log_message(self, *args):
        pass


def model_files():
    """The demo model's config and tokenizer, a weights file, and a .bin copy that is not fetched."""
    src = os.path.join(REPO, "configs/assets/tiny-qwen2")
    files = {name: open(os.path.join(src, name), "rb").read() for name in os.listdir(src)}
    return {**files, "model.safetensors": os.urandom(5000), "pytorch_model.bin": b"never downloaded"}


def use_hub(monkeypatch, stub, cache=None, offline=False):
    """huggingface_hub's settings as HF_ENDPOINT, HF_HUB_CACHE and HF_HUB_OFFLINE would set them."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", stub.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", stub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    if cache:
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))


def test_a_hub_id_is_downloaded_once_then_found_offline(tmp_path, monkeypatch):
    from transformers import AutoConfig, AutoTokenizer

    stub = HubStub("someone/tiny-qwen2", model_files())
    cache = tmp_path / "hf_cache"
    use_hub(monkeypatch, stub, cache)

    path = hub.resolve_model_path("someone/tiny-qwen2")
    assert path == str(cache / "models--someone--tiny-qwen2" / "snapshots" / COMMIT)
    assert sorted(os.listdir(path)) == sorted(f for f in stub.files if f != "pytorch_model.bin")
    for name in os.listdir(path):
        assert open(os.path.join(path, name), "rb").read() == stub.files[name], name
    downloads = [p for method, p, _ in stub.requests if method == "GET" and "/resolve/" in p]
    assert len(downloads) == len(stub.files) - 1
    assert AutoConfig.from_pretrained(path).model_type == "qwen2"
    assert AutoTokenizer.from_pretrained(path)("Hello").input_ids == [9707]

    # Again with network: one look at the repo's revision, nothing downloaded.
    stub.requests.clear()
    assert hub.resolve_model_path("someone/tiny-qwen2") == path
    assert [p for _, p, _ in stub.requests if p != "/api/agent-harnesses"] == [
        "/api/models/someone/tiny-qwen2/revision/main"]
    # Offline: straight from the cache, no request at all.
    stub.requests.clear()
    use_hub(monkeypatch, stub, offline=True)
    assert hub.resolve_model_path("someone/tiny-qwen2") == path
    assert stub.requests == []
    stub.shutdown()


def test_the_plan_reads_a_hub_models_config_before_any_weight_is_downloaded(tmp_path, monkeypatch):
    """#24: `load_model_config` (what the memory plan needs) downloads the json files alone; the
    weights come with the model, after the plan."""
    from jaxsft.models import load_model_config

    stub = HubStub("someone/tiny-qwen2", model_files())
    use_hub(monkeypatch, stub, tmp_path / "hf_cache")
    assert load_model_config("someone/tiny-qwen2").vocab_size == 151936
    downloaded = [p for method, p, _ in stub.requests if method == "GET" and "/resolve/" in p]
    assert downloaded and all(p.endswith(".json") for p in downloaded), downloaded
    assert any(f.endswith(".safetensors") for f in stub.files)
    path = hub.resolve_model_path("someone/tiny-qwen2")  # the model itself: the weights now
    assert sorted(os.listdir(path)) == sorted(f for f in stub.files if f != "pytorch_model.bin")
    stub.shutdown()


def test_a_missing_hub_id_offline_says_what_to_run(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    with pytest.raises(FileNotFoundError) as error:
        hub.resolve_model_path("meta-llama/Llama-3.2-1B")
    message = str(error.value)
    assert message.startswith("'meta-llama/Llama-3.2-1B' is not a local path")
    assert "(HF_HUB_OFFLINE=1 is set)" in message
    assert "`hf download meta-llama/Llama-3.2-1B --include '*.json' '*.safetensors'" in message
    assert f"--cache-dir {tmp_path / 'hf_cache'}`" in message


def test_local_gcs_and_gguf_paths_are_not_hub_ids(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "export").mkdir(parents=True)
    for path in ("runs/export", str(tmp_path / "runs/export"), "gs://bucket/llama-1b", "models/qwen.gguf",
                 "owner/name/extra"):
        assert hub.resolve_model_path(path) == path
    assert hub.is_hub_id("meta-llama/Llama-3.2-1B") and hub.is_hub_id("runs/not-there")


def test_push_uploads_every_file_of_the_folder(tmp_path, monkeypatch):
    stub = HubStub("someone/tiny-sft", {})
    use_hub(monkeypatch, stub)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    folder = tmp_path / "hf"
    shutil.copytree(os.path.join(REPO, "configs/assets/tiny-qwen2"), folder)
    (folder / "model.safetensors").write_bytes(os.urandom(5000))
    (folder / "adapter").mkdir()
    (folder / "adapter" / "adapter_config.json").write_text("{}")

    url = hub.push_to_hub(str(folder), "someone/tiny-sft", commit_message="SFT on GSM8K")
    assert url == f"{stub.url}/someone/tiny-sft/commit/{COMMIT}"
    calls = [(method, path) for method, path, _ in stub.requests if path != "/api/agent-harnesses"]
    assert calls == [("POST", "/api/repos/create"), ("POST", "/api/models/someone/tiny-sft/preupload/main"),
                     ("POST", "/api/models/someone/tiny-sft/commit/main")]
    assert {auth for _, path, auth in stub.requests if path != "/api/agent-harnesses"} == {"Bearer hf_test_token"}
    [commit] = stub.commits
    assert commit[0] == {"key": "header", "value": {"summary": "SFT on GSM8K", "description": ""}}
    uploaded = {line["value"]["path"]: base64.b64decode(line["value"]["content"]) for line in commit[1:]}
    local = {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert uploaded == local and "adapter/adapter_config.json" in uploaded
    stub.shutdown()
