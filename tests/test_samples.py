"""The sample donor of `make run`: taken from a data folder when there, downloaded from the hub
otherwise (here from a local server that answers as the hub's file routes do), and a clear error
naming what to fetch when the hub cannot be reached."""

import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from xatl.cli import main
from xatl.samples import SAMPLE_FILES, SampleUnavailable, sample_files

CONTENT = {sample.filename: f"bytes of {sample.filename}\n".encode() * 50 for sample in SAMPLE_FILES}


class _Hub(BaseHTTPRequestHandler):
    """`/{repo}/resolve/{revision}/{file}` and `/datasets/{repo}/resolve/…`, HEAD and GET."""

    requests: list[str] = []

    def _answer(self, body: bool):
        type(self).requests.append(f"{self.command} {self.path}")
        parts = self.path.split("?")[0].split("/resolve/main/")
        content = CONTENT.get(parts[1]) if len(parts) == 2 else None
        if content is None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(content)))
        self.send_header("ETag", f'"{hashlib.sha1(content).hexdigest()}"')
        self.send_header("X-Repo-Commit", "0" * 40)
        self.end_headers()
        if body:
            self.wfile.write(content)

    def do_HEAD(self):
        self._answer(body=False)

    def do_GET(self):
        self._answer(body=True)

    def log_message(self, *args):
        pass


@pytest.fixture
def hub():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Hub.requests = []
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _data_folder(root: Path, roles=("donor", "tokenizer", "text")) -> Path:
    for sample in SAMPLE_FILES:
        if sample.role in roles:
            (root / sample.local).parent.mkdir(parents=True, exist_ok=True)
            (root / sample.local).write_bytes(b"local copy")
    return root


def test_files_in_the_data_folder_are_used_without_asking_the_hub(tmp_path, hub):
    data = _data_folder(tmp_path / "data")
    found = sample_files(data, endpoint=hub, cache_dir=tmp_path / "cache")
    assert found == {s.role: data / s.local for s in SAMPLE_FILES}
    assert _Hub.requests == []


def test_missing_files_are_downloaded_into_the_cache(tmp_path, hub):
    data = _data_folder(tmp_path / "data", roles=("text",))  # donor and tokenizer missing
    found = sample_files(data, endpoint=hub, cache_dir=tmp_path / "cache")
    assert found["text"] == data / "tinystories_val_subset" / "tinystories_val.txt"
    for role in ("donor", "tokenizer"):
        sample = next(s for s in SAMPLE_FILES if s.role == role)
        assert found[role].is_relative_to(tmp_path / "cache")
        assert found[role].read_bytes() == CONTENT[sample.filename]
    assert any("karpathy/tinyllamas/resolve/main/stories260K/tok512.bin" in r for r in _Hub.requests)


def test_the_text_comes_from_the_dataset_repository(tmp_path, hub):
    found = sample_files(None, roles=("text",), endpoint=hub, cache_dir=tmp_path / "cache")
    assert found["text"].read_bytes() == CONTENT["TinyStories-valid.txt"]
    assert any(r.startswith("GET /datasets/roneneldan/TinyStories/resolve/main/") for r in _Hub.requests)


def test_an_unreachable_hub_fails_fast_naming_the_file_and_where_to_put_it(tmp_path):
    closed = "http://127.0.0.1:9"  # the discard port: nothing listens
    with pytest.raises(SampleUnavailable) as caught:
        sample_files(tmp_path / "data", endpoint=closed, cache_dir=tmp_path / "cache")
    message = str(caught.value)
    assert "unreachable" in message
    assert "https://huggingface.co/karpathy/tinyllamas/blob/main/stories260K/stories260K.bin" in message
    assert str(tmp_path / "data" / "stories260K" / "stories260K.bin") in message
    assert "XATL_DATA_DIR" in message


def test_a_file_the_hub_does_not_have_is_the_same_clear_error(tmp_path, hub, monkeypatch):
    monkeypatch.setitem(CONTENT, "stories260K/tok512.bin", None)
    with pytest.raises(SampleUnavailable, match="tok512.bin"):
        sample_files(tmp_path, roles=("tokenizer",), endpoint=hub, cache_dir=tmp_path / "cache")


def test_cli_links_the_files_under_fixed_names(tmp_path, capsys):
    data = _data_folder(tmp_path / "data")
    assert main(["sample", "--data-dir", str(data), "--link", str(tmp_path / "sample")]) == 0
    for name in ("stories260K.bin", "tok512.bin", "tinystories_val.txt"):
        link = tmp_path / "sample" / name
        assert link.is_symlink() and link.read_bytes() == b"local copy"
    assert str(tmp_path / "sample" / "stories260K.bin") in capsys.readouterr().out
