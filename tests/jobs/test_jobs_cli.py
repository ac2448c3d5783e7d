"""`xatl jobs` against a real server: upload, create, list, get, cancel, events (followed to the
end), with the address and key from the environment; errors as one line and exit status 2. One
run is a real process, as a user types it; the rest run the same `main` in this process (a new
process spends seconds importing the library)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from job_fixtures import JOBS_API_KEY as API_KEY

from xatl.cli import main

XATL = Path(sys.executable).with_name("xatl")


@pytest.fixture
def api(deployment, monkeypatch):
    d = deployment().start_api()
    monkeypatch.setenv("XATL_URL", d.url)
    monkeypatch.setenv("XATL_API_KEY", API_KEY)
    return d


def jobs(capsys, *args) -> tuple[int, str, str]:
    code = main(["jobs", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def test_the_jobs_command_line(api, corpus_file, tmp_path, capsys):
    code, out, _ = jobs(capsys, "upload", corpus_file, "--purpose", "train")
    assert code == 0
    file_id = json.loads(out)["id"]
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"type": "conversion", "donor": "org/model", "name": "from-cli",
                                "training": {"training_file": file_id, "steps": 2}}))
    code, out, _ = jobs(capsys, "create", spec)
    job = json.loads(out)
    assert code == 0 and job["status"] == "queued" and job["model"] == "from-cli"

    code, out, _ = jobs(capsys, "list")
    assert job["id"] in out and "queued" in out
    assert json.loads(jobs(capsys, "get", job["id"])[1])["id"] == job["id"]
    assert json.loads(jobs(capsys, "cancel", job["id"])[1])["status"] == "cancelled"
    code, out, _ = jobs(capsys, "events", job["id"], "--follow")
    assert code == 1  # the job did not succeed
    assert "cancelled before it started" in out and out.rstrip().endswith("cancelled")

    code, _, err = jobs(capsys, "get", "job-nope")
    assert code == 2 and err.startswith("xatl jobs: error: 404") and "job_not_found" in err


def test_as_a_user_types_it(api):
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("XATL_")}, "XATL_URL": api.url}
    listed = subprocess.run([str(XATL), "jobs", "list", "--api-key", API_KEY], capture_output=True, text=True,
                            env=env, timeout=120)
    assert listed.returncode == 0 and listed.stdout == ""  # no jobs yet
    refused = subprocess.run([str(XATL), "jobs", "list", "--api-key", "wrong"], capture_output=True, text=True,
                             env=env, timeout=120)
    assert refused.returncode == 2 and refused.stderr.startswith("xatl jobs: error: 401")
