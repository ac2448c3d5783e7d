"""`xatl serve` as a user runs it, a real process: it makes, stores and prints an API key once,
starts its own Redis and a local worker beside the API, stops them all on Ctrl-C, and leaves no
orphan holding a port when it is killed with SIGKILL. Its job and file routes import no torch."""

import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from service import cli
from xatl.cli import main

XATL = Path(sys.executable).with_name("xatl")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Serve:
    def __init__(self, data: Path, *args: str, env: dict | None = None):
        self.port = free_port()
        environment = {k: v for k, v in os.environ.items() if not k.startswith("XATL_")}
        self.process = subprocess.Popen(
            [str(XATL), "serve", "--data-dir", str(data), "--port", str(self.port), *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**environment, **(env or {})})
        self.lines: list[str] = []
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 90) -> "Serve":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError("xatl serve exited:\n" + self.process.stdout.read())
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.2)
        raise AssertionError("xatl serve did not answer")

    def descendants(self) -> list[psutil.Process]:
        return psutil.Process(self.process.pid).children(recursive=True)

    def output(self) -> str:
        return self.process.stdout.read()


def _gone(processes: list[psutil.Process], timeout: float = 30) -> list[psutil.Process]:
    _, alive = psutil.wait_procs(processes, timeout=timeout)
    return alive


def _port_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def test_serve_starts_redis_and_a_worker_and_ctrl_c_stops_every_child(tmp_path):
    data = tmp_path / "data"
    serve = Serve(data).wait_ready()
    key = (data / "api_key").read_text().strip()
    assert key.startswith("xatl-") and stat.S_IMODE(os.stat(data / "api_key").st_mode) == 0o600
    deadline = time.monotonic() + 30  # the worker's process starts a moment after the API
    while not any("worker" in " ".join(p.cmdline()) for p in serve.descendants()) and time.monotonic() < deadline:
        time.sleep(0.2)
    children = serve.descendants()
    commands = [" ".join(p.cmdline()) for p in children]
    assert any("redis-server" in c for c in commands), commands
    assert any("worker.cli" in c for c in commands), commands
    redis_port = int((data / "redis" / "redis.conf").read_text().split("port ")[1].split()[0])
    auth = {"Authorization": f"Bearer {key}"}
    assert httpx.get(serve.url + "/v1/jobs", headers=auth).json()["data"] == []
    assert httpx.get(serve.url + "/v1/jobs").status_code == 401
    assert httpx.get(serve.url + "/docs").status_code == 200

    serve.process.send_signal(signal.SIGINT)  # Ctrl-C
    assert serve.process.wait(timeout=90) == 0
    out = serve.output()
    assert key in out and "/docs" in out
    assert _gone(children) == []
    assert _port_free(serve.port) and _port_free(redis_port)

    # the next start reuses the stored key without printing it; SIGKILL leaves no orphan behind
    again = Serve(data, "--no-worker").wait_ready()
    children = again.descendants()
    assert children, "expected the embedded Redis"
    again.process.kill()
    again.process.wait()
    assert _gone(children) == []  # they die with their parent (PR_SET_PDEATHSIG)
    assert _port_free(again.port)
    out = again.output()
    assert key not in out and "stored in" in out


def test_keys_from_the_environment_win(tmp_path):
    serve = Serve(tmp_path, "--no-worker", env={"XATL_API_KEYS": "one, two"}).wait_ready()
    try:
        assert httpx.get(serve.url + "/v1/models", headers={"Authorization": "Bearer two"}).status_code == 200
        assert not (tmp_path / "api_key").exists()
    finally:
        serve.process.send_signal(signal.SIGINT)
        serve.process.wait(timeout=60)
    assert "2 from XATL_API_KEYS" in serve.output()


def test_serve_is_a_command_of_xatl(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["serve", "--help"])
    assert exited.value.code == 0
    help_text = capsys.readouterr().out
    assert all(option in help_text for option in ("--host", "--port", "--data-dir", "--models-dir", "--no-worker"))
    assert callable(cli.add_arguments) and callable(cli.run)


def test_the_home_folder_answers_to_xatl_home_and_never_to_xatl_data_dir(tmp_path, monkeypatch):
    from pydantic import ValidationError

    from service.config import Settings

    monkeypatch.delenv("XATL_HOME", raising=False)
    monkeypatch.setenv("XATL_DATA_DIR", str(tmp_path / "shared-data"))  # the data sets of tests and benchmarks
    settings = Settings()
    assert settings.home == Path("data")
    owned = [settings.home, settings.resolved_models_dir, settings.files_dir, settings.jobs_dir,
             Path(settings.resolved_database_url.removeprefix("sqlite:///"))]
    assert not any(path.resolve().is_relative_to(tmp_path / "shared-data") for path in owned), owned
    assert all(not value.startswith(str(tmp_path / "shared-data")) for value in settings.environment().values())
    monkeypatch.setenv("XATL_HOME", str(tmp_path / "home"))
    assert Settings().home == tmp_path / "home"
    assert Settings(home=tmp_path / "given").home == tmp_path / "given"  # `xatl serve --data-dir`
    with pytest.raises(ValidationError, match="data_dir is now `home`"):
        Settings(data_dir=tmp_path)  # the old name, which would otherwise be ignored


def test_routes_without_a_model_import_no_torch(tmp_path):
    script = f"""
import sys
from fastapi.testclient import TestClient
from service.config import Settings
from service.main import create_app
from worker.store import migrate
settings = Settings(api_keys=["k"], home={str(tmp_path)!r})
migrate(settings.resolved_database_url)
app = create_app(settings)
with TestClient(app) as client:
    auth = {{"Authorization": "Bearer k"}}
    assert client.get("/health").status_code == 200
    assert client.get("/v1/models", headers=auth).json() == {{"object": "list", "data": []}}
    assert client.get("/metrics", headers=auth).status_code == 200
    assert client.post("/v1/completions", json={{"model": "none", "prompt": "x"}}, headers=auth).status_code == 404
    text = client.post("/v1/files", headers=auth, data={{"purpose": "train"}},
                       files={{"file": ("a.txt", b"some text")}})
    assert text.status_code == 200, text.text
    job = client.post("/v1/jobs", headers=auth, json={{"type": "conversion", "donor": "org/model",
                      "training": {{"training_file": text.json()["id"], "steps": 2}}}})
    assert job.status_code == 200, job.text
    assert client.get("/v1/jobs", headers=auth).json()["data"][0]["id"] == job.json()["id"]
    assert client.get("/v1/jobs/" + job.json()["id"] + "/events", headers=auth).status_code == 200
loaded = sorted(m for m in ("torch", "transformers", "xatl") if m in sys.modules)
assert loaded == [], loaded
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
