"""The job store on SQLite and on PostgreSQL: migrations, idempotent creation, cursor pages,
leases that fence a worker that lost its job, cancellation, and the sweep's picks."""

import time

import pytest

from worker.store import JobStore, migrate


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'jobs.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    migrate(url)
    migrate(url)  # a second upgrade finds nothing to do
    made = JobStore(url)
    yield made
    made.close()


def _job(store, key=None, **fields):
    values = dict(type="conversion", spec={"donor": "file-x"}, queue="gpu", model="m", idempotency_key=key)
    return store.create_job(**{**values, **fields})


def test_an_idempotency_key_returns_the_job_it_made(store):
    first, created = _job(store, key="k")
    again, created_again = _job(store, key="k")
    assert created and not created_again and again["id"] == first["id"]
    assert store.count_jobs() == 1


def test_jobs_page_newest_first_with_a_cursor(store):
    ids = [_job(store)[0]["id"] for _ in range(5)]
    first = store.list_jobs(limit=2)
    assert [j["id"] for j in first.items] == ids[::-1][:2] and first.has_more
    rest = store.list_jobs(after=first.items[-1]["id"], limit=10)
    assert [j["id"] for j in rest.items] == ids[::-1][2:] and not rest.has_more
    with pytest.raises(KeyError):
        store.list_jobs(after="job-unknown")


def test_a_lease_is_held_by_one_worker_and_fences_the_one_that_lost_it(store):
    job, _ = _job(store)
    claimed = store.claim(job["id"], "worker-a", lease_seconds=0.3)
    assert claimed["status"] == "running" and claimed["attempts"] == 1
    assert store.claim(job["id"], "worker-b", lease_seconds=10) is None  # a live lease is not taken
    time.sleep(0.4)  # worker-a stops sending heartbeats
    assert [j["id"] for j in store.stale_jobs(redispatch_seconds=60)] == [job["id"]]
    store.mark_dispatched(job["id"])  # sent again ...
    assert store.stale_jobs(redispatch_seconds=60) == []
    time.sleep(0.1)  # ... and not taken: that message was lost too (a worker died holding it, prefetched)
    assert [j["id"] for j in store.stale_jobs(redispatch_seconds=0.05)] == [job["id"]]
    assert store.claim(job["id"], "worker-b", lease_seconds=10)["attempts"] == 2
    assert not store.renew(job["id"], "worker-a", 10)  # a does not get it back
    assert not store.finish(job["id"], "worker-a", "succeeded")  # nor overwrite b's outcome
    assert store.finish(job["id"], "worker-b", "succeeded", result={"model": "m"})
    done = store.get_job(job["id"])
    assert done["status"] == "succeeded" and done["lease_owner"] is None and done["result"] == {"model": "m"}
    assert store.claim(job["id"], "worker-c", 10) is None  # finished jobs are not run again


def test_one_sweep_of_several_sends_a_stale_job(store):
    job, _ = _job(store)
    store.mark_dispatched(job["id"])
    assert store.stale_jobs(redispatch_seconds=60) == []  # sent a moment ago
    stale = store.stale_jobs(redispatch_seconds=0)
    assert [j["id"] for j in stale] == [job["id"]]
    since = time.time()
    assert store.mark_dispatched(job["id"], unless_since=since)
    assert not store.mark_dispatched(job["id"], unless_since=since)  # a second sweeper backs off


def test_cancel_is_immediate_when_queued_and_cooperative_when_running(store):
    queued, _ = _job(store)
    assert store.request_cancel(queued["id"])["status"] == "cancelled"
    running, _ = _job(store)
    store.claim(running["id"], "w", 10)
    assert store.request_cancel(running["id"])["status"] == "cancelling"
    assert store.cancel_requested(running["id"])
    assert store.finish(running["id"], "w", "cancelled")
    assert store.request_cancel(running["id"])["status"] == "cancelled"  # a finished job stays as it is


def test_events_checkpoints_files_and_models(store):
    job, _ = _job(store)
    for n in range(3):
        store.add_event(job["id"], "metrics", f"step {n}", {"step": n})
    events = store.list_events(job["id"], limit=2)
    assert [e["message"] for e in events.items] == ["step 0", "step 1"] and events.has_more
    assert [e["message"] for e in store.list_events(job["id"], after=events.items[-1]["id"]).items] == ["step 2"]
    store.add_checkpoint(job["id"], 10, "jobs/x/train/checkpoints/step-00000010")
    store.add_checkpoint(job["id"], 10, "jobs/x/train/checkpoints/step-00000010")  # saved again on resume
    assert [c["step"] for c in store.list_checkpoints(job["id"])] == [10]
    store.add_file(file_id="file-1", filename="a.txt", purpose="train", bytes=3, kind="text", path="files/1/a.txt",
                   details=None)
    assert store.get_file("file-1")["filename"] == "a.txt"
    assert store.delete_file("file-1")["id"] == "file-1" and store.get_file("file-1") is None
    store.add_model("m", job["id"])
    assert store.get_model("m")["job_id"] == job["id"]
    assert store.model_in_use("m")["id"] == job["id"]  # the job is unfinished


def test_checkpoints_of_two_stages_at_the_same_step_are_two_records(store):
    job, _ = _job(store)
    store.add_checkpoint(job["id"], 2, "jobs/x/attention_transfer/checkpoints/step-00000002",
                         stage="attention_transfer")
    store.add_checkpoint(job["id"], 2, "jobs/x/train/checkpoints/step-00000002")
    store.add_checkpoint(job["id"], 2, "jobs/x/train/checkpoints/step-00000002")  # saved again on resume
    rows = store.list_checkpoints(job["id"])
    assert [(c["stage"], c["step"]) for c in rows] == [("attention_transfer", 2), ("train", 2)]  # as saved
    assert rows[0]["path"].startswith("jobs/x/attention_transfer/")


def test_the_stage_migration_keeps_the_checkpoints_a_database_has(tmp_path):
    from alembic import command
    from alembic.config import Config
    from sqlalchemy import create_engine, text

    url = f"sqlite:///{tmp_path / 'old.db'}"
    config = Config()
    config.set_main_option("script_location", str(__import__("worker").__path__[0] + "/migrations"))
    config.set_main_option("sqlalchemy.url", url)
    command.upgrade(config, "0001")
    engine = create_engine(url)
    with engine.begin() as connection:
        connection.execute(text("INSERT INTO jobs (id, type, status, spec, queue, model, created_at, "
                                "cancel_requested, attempts) VALUES ('job-1', 'conversion', 'running', '{}', 'q', "
                                "'m', 0, 0, 1)"))
        connection.execute(text("INSERT INTO checkpoints (id, job_id, step, path, created_at) "
                                "VALUES ('ckpt-1', 'job-1', 4, 'jobs/job-1/train/checkpoints/step-00000004', 0)"))
    engine.dispose()
    migrate(url)
    store = JobStore(url)
    try:
        assert [(c["id"], c["stage"], c["step"]) for c in store.list_checkpoints("job-1")] == [("ckpt-1", "train", 4)]
        store.add_checkpoint("job-1", 4, "jobs/job-1/attention_transfer/checkpoints/step-00000004",
                             stage="attention_transfer")
        assert [c["stage"] for c in store.list_checkpoints("job-1")] == ["train", "attention_transfer"]
    finally:
        store.close()
