"""Jobs as a user runs them: real Redis, real worker processes, a real uvicorn server, the REST
API through the project's client and the official openai client. Upload, convert and train,
follow the events to the end, stream from the new model (published int8), fine-tune it (published
bf16); cancel; kill a worker's whole process tree mid-training and see another resume the job from
its checkpoint."""

import json
import time

import openai
import pytest
from job_fixtures import JOBS_API_KEY as API_KEY
from job_fixtures import conversion_spec, upload_donor


def test_upload_convert_train_follow_serve_then_fine_tune(deployment, donor_dir, corpus_file, tmp_path):
    d = deployment().start_api()
    d.start_worker("w0")
    client = d.client()
    donor = upload_donor(client, donor_dir, tmp_path)
    assert donor["kind"] == "hf_folder" and donor["purpose"] == "donor"
    corpus = client.upload(corpus_file, purpose="train")
    assert corpus["kind"] == "jsonl"

    job = client.create_job(conversion_spec(donor["id"], corpus["id"], suffix="e2e", precision="int8"))
    assert job["status"] == "queued" and job["model"].startswith("tiny-llama-gla-e2e-")
    events = list(client.follow(job["id"]))  # server-sent events until the job ends
    finished = client.job(job["id"])
    assert finished["status"] == "succeeded", (finished["error"], d.log("w0"))
    kinds = [e["type"] for e in events]
    assert kinds[0] == "status" and "stage" in kinds and "checkpoint" in kinds
    steps = [e["data"]["step"] for e in events if e["type"] == "metrics" and "total_steps" in (e["data"] or {})]
    assert steps == list(range(1, 13))
    assert finished["progress"]["step"] == 12 and finished["progress"]["total_steps"] == 12

    # the result: the gap to the donor on the same text, and the decode profile beside the donor's
    result = finished["result"]
    assert result["model"] == job["model"] and result["train"]["steps"] == 12
    assert result["evaluation"]["gap"] == pytest.approx(
        result["evaluation"]["valid_loss"] - result["evaluation"]["base_valid_loss"])
    model_rows = result["profile"]["model"]
    assert model_rows[0]["state_bytes"] == model_rows[1]["state_bytes"]
    checkpoints = d.http().get(f"/v1/jobs/{job['id']}/checkpoints").json()["data"]
    assert [c["step"] for c in checkpoints] == [4, 8]
    artifacts = {a["name"] for a in d.http().get(f"/v1/jobs/{job['id']}/artifacts").json()["data"]}
    assert artifacts == {"metrics.jsonl", "loss_curve.png", "transfer_report.json", "README.md"}
    card = d.http().get(f"/v1/jobs/{job['id']}/artifacts/README.md").text
    assert card.startswith("---\n") and "gla" in card
    assert "| weights | int8 (" in card and "| valid loss int8 (nats/token) |" in card
    # published with int8 weights: int8 on disk, and the int8 model's loss beside the float one's
    assert result["evaluation"]["valid_loss_int8"] == pytest.approx(result["evaluation"]["valid_loss"], rel=0.05)
    folder = d.settings.resolved_models_dir / job["model"]
    assert json.loads((folder / "config.json").read_text())["quantization_config"]["quant_method"] == "xatl"

    # served at once, through the OpenAI client
    openai_client = openai.OpenAI(api_key=API_KEY, base_url=d.url + "/v1", max_retries=0)
    assert {m.id: m.precision for m in openai_client.models.list().data}[job["model"]] == "int8"
    chunks = list(openai_client.completions.create(model=job["model"], prompt="the cat", max_tokens=5, stream=True,
                                                   extra_body={"ignore_eos": True}))
    assert sum(len(c.choices[0].text) > 0 for c in chunks if c.choices) >= 1
    from xatl.serving import Engine  # what the service loaded: the int8 weights as saved

    assert Engine.from_pretrained(folder, device="cpu", background=False).precision == "int8"

    # a fine-tune of the new model
    tune = client.create_job({"type": "fine_tune", "model": job["model"], "name": "tiny-tuned", "precision": "bf16",
                              "training": {"training_file": corpus["id"], "steps": 3, "batch_size": 4,
                                           "block_size": 16, "valid_fraction": 0.2},
                              "evaluation": {"contexts": [8], "decode_tokens": 3, "max_batches": 2}})
    tuned = d.wait_for(tune["id"])
    assert tuned["status"] == "succeeded", tuned["error"]
    assert "tiny-tuned" in client.models()
    assert openai_client.models.retrieve("tiny-tuned").precision == "bf16"  # trained from the int8 one, dequantised
    assert tuned["result"]["evaluation"]["base_valid_loss"] == pytest.approx(
        result["evaluation"]["valid_loss"], rel=0.2)  # its base is the model the first job made

    # a model a job made can be deleted; one in use cannot
    assert d.http().delete("/v1/models/tiny-tuned").json() == {"id": "tiny-tuned", "object": "model", "deleted": True}
    assert "tiny-tuned" not in client.models()


def test_cancel_a_running_job_keeps_its_checkpoint_and_the_worker_takes_the_next(deployment, donor_dir,
                                                                                  corpus_file, tmp_path):
    d = deployment().start_api()
    d.start_worker("w0")
    client = d.client()
    donor = upload_donor(client, donor_dir, tmp_path)
    corpus = client.upload(corpus_file, purpose="train")
    long = client.create_job(conversion_spec(donor["id"], corpus["id"], steps=100_000, save_every=3))
    short = client.create_job(conversion_spec(donor["id"], corpus["id"], steps=2, name="after-cancel"))
    _wait_for_step(d, long["id"], 4)
    cancelling = client.cancel(long["id"])
    assert cancelling["status"] == "cancelling"
    cancelled = d.wait_for(long["id"])
    assert cancelled["status"] == "cancelled"
    checkpoints = d.store.list_checkpoints(long["id"])
    assert checkpoints and checkpoints[-1]["step"] >= 4  # saved when it stopped
    assert (d.settings.home / checkpoints[-1]["path"]).is_dir()
    assert d.wait_for(short["id"])["status"] == "succeeded"  # the worker went on to the next job
    messages = [e["message"] for e in client.events(long["id"], limit=1000)["data"]]
    assert any("cancel requested" in m for m in messages) and any(m.startswith("cancelled") for m in messages)


def test_a_worker_killed_mid_training_is_replaced_and_the_job_resumes(deployment, donor_dir, corpus_file, tmp_path):
    d = deployment().start_api()
    first = d.start_worker("w0")
    client = d.client()
    donor = upload_donor(client, donor_dir, tmp_path)
    corpus = client.upload(corpus_file, purpose="train")
    job = client.create_job(conversion_spec(donor["id"], corpus["id"], steps=40, save_every=5))
    _wait_for_step(d, job["id"], 12)
    d.kill_tree(first)  # SIGKILL to the worker and its job's process at once
    killed_at = d.store.get_job(job["id"])["progress"]["step"]
    second = d.start_worker("w1")

    done = d.wait_for(job["id"])
    assert done["status"] == "succeeded", (done["error"], d.log("w1"))
    assert done["attempts"] == 2
    events = client.events(job["id"], limit=1000)["data"]
    resume = next(e for e in events if e["type"] == "resume")
    checkpoint_step = resume["data"]["step"]
    assert checkpoint_step % 5 == 0 and checkpoint_step <= killed_at
    after_resume = [e["data"]["step"] for e in events[events.index(resume):]
                    if e["type"] == "metrics" and "total_steps" in (e["data"] or {})]
    assert after_resume[0] == checkpoint_step + 1 and after_resume[-1] == 40  # never back past the checkpoint
    assert any("stopped sending heartbeats" in e["message"] for e in events)
    assert second.poll() is None  # the new worker lives on


def test_jobs_events_files_and_checkpoints_outlive_an_api_restart(deployment, donor_dir, corpus_file, tmp_path):
    _restart_keeps_everything(deployment(), donor_dir, corpus_file, tmp_path)


def test_the_same_with_postgresql(deployment, postgres_url, donor_dir, corpus_file, tmp_path):
    _restart_keeps_everything(deployment(database_url=postgres_url), donor_dir, corpus_file, tmp_path)


def _restart_keeps_everything(d, donor_dir, corpus_file, tmp_path):
    d.start_api()
    d.start_worker("w0")
    client = d.client()
    donor = upload_donor(client, donor_dir, tmp_path)
    corpus = client.upload(corpus_file, purpose="train")
    job = client.create_job(conversion_spec(donor["id"], corpus["id"], steps=6, save_every=3))
    d.wait_for(job["id"])
    before = {path: d.http().get(path).json() for path in (
        "/v1/files", f"/v1/jobs/{job['id']}", f"/v1/jobs/{job['id']}/events?limit=1000",
        f"/v1/jobs/{job['id']}/checkpoints", "/v1/jobs")}
    d.stop_api()
    d.start_api()
    after = {path: d.http().get(path).json() for path in before}
    assert after == before
    assert before[f"/v1/jobs/{job['id']}"]["status"] == "succeeded"
    assert len(before[f"/v1/jobs/{job['id']}/checkpoints"]["data"]) == 1  # step 3 (the last step saves the model)


def _wait_for_step(d, job_id: str, step: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        progress = d.store.get_job(job_id)["progress"] or {}
        if progress.get("step", 0) >= step:
            return
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not reach step {step}: {d.log('w0')}")


def test_events_page_and_follow_from_a_cursor(deployment, donor_dir, corpus_file, tmp_path):
    d = deployment().start_api()
    d.start_worker("w0")
    client = d.client()
    corpus = client.upload(corpus_file, purpose="train")
    donor = upload_donor(client, donor_dir, tmp_path)
    job = client.create_job(conversion_spec(donor["id"], corpus["id"], steps=4, save_every=0))
    d.wait_for(job["id"])
    every = client.events(job["id"], limit=1000)["data"]
    first = client.events(job["id"], limit=3)
    assert first["has_more"] and first["data"] == every[:3]
    rest = list(client.follow(job["id"], after=first["data"][-1]["id"]))
    assert rest == every[3:]
    assert json.dumps(every)  # JSON-ready


def test_a_conversion_with_attention_transfer_then_training(deployment, donor_dir, corpus_file, tmp_path):
    d = deployment().start_api()
    d.start_worker("w0")
    client = d.client()
    donor = upload_donor(client, donor_dir, tmp_path)
    corpus = client.upload(corpus_file, purpose="train")
    spec = conversion_spec(donor["id"], corpus["id"], steps=4, save_every=2, suffix="at",
                           stages=["attention_transfer", "train"],
                           attention_transfer={"steps": 4, "batch_size": 4, "lr": 1e-2, "save_every": 2,
                                               "log_every": 1})
    job = client.create_job(spec)
    events = list(client.follow(job["id"]))
    finished = client.job(job["id"])
    assert finished["status"] == "succeeded", (finished["error"], d.log("w0"))

    stages = [e["message"] for e in events if e["type"] == "stage"]
    assert stages.index("attention_transfer started") < stages.index("attention_transfer done") \
        < stages.index("train started") < stages.index("train done")
    steps = [(e["data"]["stage"], e["data"]["step"]) for e in events
             if e["type"] == "metrics" and "total_steps" in (e["data"] or {})]
    assert steps == [("attention_transfer", s) for s in range(1, 5)] + [("train", s) for s in range(1, 5)]
    first = next(e for e in events if e["type"] == "metrics")
    assert first["message"].startswith("attention transfer step 1/4") and set(first["data"]["layer_losses"]) == {
        "0", "1"}
    checkpoints = d.http().get(f"/v1/jobs/{job['id']}/checkpoints").json()["data"]
    assert [(c["stage"], c["step"]) for c in checkpoints] == [("attention_transfer", 2), ("train", 2)]
    result = finished["result"]
    assert result["attention_transfer"]["steps"] == 4 and result["train"]["steps"] == 4
    assert finished["progress"]["stage"] == "publish" and finished["progress"]["step"] == 4
    assert job["model"] in client.models()
