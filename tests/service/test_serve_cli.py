"""`xatl serve`: the options, the API key it makes and stores when none is configured, and a
service that imports no torch until a completion needs it."""

import os
import stat
import subprocess
import sys

import pytest

from service import cli
from xatl.cli import main


@pytest.fixture
def started(monkeypatch):
    """Stands in for uvicorn.run: records what would have been served."""
    calls = []
    monkeypatch.setattr("uvicorn.run", lambda app, host, port: calls.append((app, host, port)))
    monkeypatch.delenv("XATL_API_KEYS", raising=False)
    return calls


def test_serve_makes_stores_and_prints_a_key_once(tmp_path, started, capsys):
    data = tmp_path / "data"
    assert main(["serve", "--data-dir", str(data), "--port", "8123", "--host", "0.0.0.0"]) == 0
    out = capsys.readouterr().out
    key = (data / "api_key").read_text().strip()
    assert key.startswith("xatl-") and key in out
    assert stat.S_IMODE(os.stat(data / "api_key").st_mode) == 0o600
    app, host, port = started[0]
    assert (host, port) == ("0.0.0.0", 8123)
    assert app.state.api_keys == [key]
    assert app.state.registry.models_dir == data / "models"
    # the next start reuses it, without printing it again
    assert main(["serve", "--data-dir", str(data), "--models-dir", str(tmp_path / "elsewhere")]) == 0
    out = capsys.readouterr().out
    assert key not in out and "stored in" in out
    assert started[1][0].state.api_keys == [key]
    assert started[1][0].state.registry.models_dir == tmp_path / "elsewhere"


def test_keys_from_the_environment_win(tmp_path, started, monkeypatch, capsys):
    monkeypatch.setenv("XATL_API_KEYS", "one, two")
    assert main(["serve", "--data-dir", str(tmp_path)]) == 0
    assert started[0][0].state.api_keys == ["one", "two"]
    assert not (tmp_path / "api_key").exists()
    assert "2 from XATL_API_KEYS" in capsys.readouterr().out


def test_serve_is_a_command_of_xatl(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["serve", "--help"])
    assert exited.value.code == 0
    help_text = capsys.readouterr().out
    assert all(option in help_text for option in ("--host", "--port", "--data-dir", "--models-dir"))
    assert callable(cli.add_arguments) and callable(cli.run)


def test_routes_without_a_model_import_no_torch(tmp_path):
    script = f"""
import sys
from fastapi.testclient import TestClient
from service.config import Settings
from service.main import create_app
app = create_app(Settings(api_keys=["k"], data_dir={str(tmp_path)!r}))
with TestClient(app) as client:
    auth = {{"Authorization": "Bearer k"}}
    assert client.get("/health").status_code == 200
    assert client.get("/v1/models", headers=auth).json() == {{"object": "list", "data": []}}
    assert client.get("/metrics", headers=auth).status_code == 200
    assert client.post("/v1/completions", json={{"model": "none", "prompt": "x"}}, headers=auth).status_code == 404
loaded = sorted(m for m in ("torch", "transformers", "xatl") if m in sys.modules)
assert loaded == [], loaded
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
