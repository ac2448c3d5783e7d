"""Files a job names by path, under an import root, get the checks an upload gets — in the worker,
before torch is loaded: a pickle donor is refused and never unpickled, a safetensors header length
of 2^63, a truncated safetensors file or a broken config fails the job naming the field, as do
non-UTF-8 or binary training text; a path swapped for a symbolic link out of the roots after the job
was accepted is refused when the job runs. The worker lives on and runs a good job after them.
(Uploads: tests/worker/test_files.py and tests/jobs/test_job_requests.py.)"""

import json
import shutil
import struct

import torch
from job_fixtures import conversion_spec


class Plant:
    """Unpickling this creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_hostile_files_named_by_path_fail_their_jobs_clearly_and_the_worker_goes_on(deployment, donor_dir,
                                                                                     corpus_file, tmp_path):
    d = deployment().start_api()
    root = d.settings.import_roots[0]
    marker = tmp_path / "unpickled"
    good_text = root / "corpus.jsonl"
    shutil.copy(corpus_file, good_text)
    donors = {}
    for name, damage in (("good", None), ("huge-header", "header"), ("truncated", "cut"), ("bad-config", "config")):
        folder = root / name
        shutil.copytree(donor_dir, folder)
        weights = folder / "model.safetensors"
        if damage == "header":
            weights.write_bytes(struct.pack("<Q", 2**63) + weights.read_bytes()[8:])
        elif damage == "cut":
            weights.write_bytes(weights.read_bytes()[:-100])
        elif damage == "config":
            (folder / "config.json").write_text("{oops")
        donors[name] = str(folder)
    torch.save(Plant(marker), root / "evil.bin")
    torch.save({"weights": Plant(marker)}, root / "evil.pt")
    (root / "latin1.txt").write_bytes("un café noir, s'il vous plaît".encode("latin-1"))
    (root / "binary.jsonl").write_bytes(b'{"text": "a"}\n\x00\x01\x02\xff')
    (root / "texts").mkdir()
    (root / "texts" / "ok.txt").write_text("fine text\n")
    (root / "texts" / "bad.txt").write_bytes(b"fine until \xc3\x28 here")
    (root / "swapped.jsonl").write_text('{"text": "accepted when the job was made"}\n')
    outside = tmp_path / "outside.jsonl"
    outside.write_text('{"text": "not for jobs"}\n')

    def job(donor: str, text: str = str(good_text), **extra) -> dict:
        spec = conversion_spec(donor, text, steps=2, save_every=0, **extra)
        response = d.http().post("/v1/jobs", json=spec)
        assert response.status_code == 200, response.text
        return response.json()

    cases = [  # (job, code, param, words in the message)
        (job(str(root / "evil.bin")), "pickle_refused", "donor", "never unpickle"),
        (job(str(root / "evil.pt")), "pickle_refused", "donor", "pickle"),
        (job(donors["huge-header"]), "invalid_safetensors", "donor", "header length of 9223372036854775808"),
        (job(donors["truncated"]), "invalid_safetensors", "donor", "truncated"),
        (job(donors["bad-config"]), "invalid_model_folder", "donor", "config.json"),
        (job(donors["good"], str(root / "latin1.txt")), "not_utf8", "training.training_file", "byte offset 6"),
        (job(donors["good"], str(root / "binary.jsonl")), "binary_content", "training.training_file", "NUL byte"),
        (job(donors["good"], str(root / "texts")), "not_utf8", "training.training_file", "bad.txt"),
        (job(donors["good"], str(root / "swapped.jsonl")), "path_not_allowed", "training.training_file", "outside"),
    ]
    (root / "swapped.jsonl").unlink()
    (root / "swapped.jsonl").symlink_to(outside)  # after the API accepted the job, before a worker runs it
    good = job(donors["good"], suffix="after-hostile")
    worker = d.start_worker("w0")

    for made, code, param, words in cases:
        failed = d.wait_for(made["id"])
        assert failed["status"] == "failed", (code, failed)
        error = failed["error"]
        assert (error["code"], error["param"]) == (code, param), error
        assert words in error["message"] and error["message"].startswith(param), error
        events = d.http().get(f"/v1/jobs/{made['id']}/events", params={"limit": 100}).json()["data"]
        assert not any(e["type"] == "stage" for e in events)  # refused before the pipeline began
    assert not marker.exists()  # nothing was unpickled
    assert d.wait_for(good["id"])["status"] == "succeeded", d.log("w0")
    assert worker.poll() is None and len(d.workers) == 1  # one worker did all of it
    assert json.loads((d.settings.resolved_models_dir / good["model"] / "config.json").read_text())
