"""The worker's side of a job: claim its lease, run it in a child process, keep the lease alive,
and wind up whatever way the child ends. Torch-free: the child (`worker.runner`) imports torch.

    run_job(job_id)          # the Celery task `xatl.run_job`, in one of the worker's threads
    sweep(store, app, …)     # every few seconds in each worker: re-send jobs whose worker died

Why a child process: a CUDA error, an out-of-memory kill or a leak in training ends the child and
fails the job, not the worker, and the memory goes back to the operating system with it. The
child gets SIGKILL if the worker dies (PR_SET_PDEATHSIG, `worker.guard`), so no orphan trains on unwatched; the
job's lease then lapses and another worker resumes it from its last checkpoint.

How the child ends: 0 — it recorded the job's final status itself; `EXIT_SUSPENDED` — it saved a
checkpoint on SIGTERM (the worker is shutting down), and the job goes back to the queue; anything
else — it died, and the job fails with what is known.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

from worker.celery_app import dispatch, queue_for
from worker.config import WorkerSettings
from worker.runner import EXIT_LEASE_LOST, EXIT_SUSPENDED
from worker.store import TERMINAL, JobStore

logger = logging.getLogger(__name__)

SHUTTING_DOWN = threading.Event()  # set when the worker begins a warm shutdown
_gpu_slots: dict[int, int] = {}  # worker thread → GPU index
_gpu_lock = threading.Lock()


def run_job(job_id: str, *, settings: WorkerSettings, store: JobStore, app, gpus: int = 0) -> str:
    """Run one job to its end (or give it back); returns what happened, for the log."""
    owner = f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}:{uuid.uuid4().hex[:8]}"
    job = store.claim(job_id, owner, settings.lease_seconds)
    if job is None:
        current = store.get_job(job_id)
        return "unknown job" if current is None else f"not claimed (status {current['status']}, held elsewhere or done)"
    if job["status"] == "cancelling" and not job["progress"]:  # cancelled before it ever ran
        store.add_event(job_id, "status", "cancelled before it started")
        store.finish(job_id, owner, "cancelled")
        return "cancelled"
    attempt = job["attempts"]
    store.add_event(job_id, "status", f"running on {socket.gethostname()} (attempt {attempt})",
                    {"attempt": attempt, "worker": owner})
    child = _start_child(job_id, owner, settings, job["spec"].get("gpus"), gpus)
    outcome = _watch(child, job_id, owner, settings, store)
    if outcome == "suspended":
        if store.release(job_id, owner):
            store.add_event(job_id, "status", "the worker is shutting down: checkpoint saved, job queued again")
            _redispatch(app, store, job_id, settings)
        return "suspended"
    if outcome == "lease lost":
        store.add_event(job_id, "status", f"worker {owner} lost the job's lease and stopped", level="warning")
        return outcome
    final = store.get_job(job_id)
    if final["status"] not in TERMINAL:  # the child died without recording an end
        code = child.returncode
        reason = (f"signal {-code} ({signal.Signals(-code).name})" if code < 0 else f"exit status {code}")
        hint = " — killed, perhaps for memory" if code == -signal.SIGKILL else ""
        error = {"code": "training_process_died", "message": f"the job's process ended with {reason}{hint}",
                 "param": None}
        store.add_event(job_id, "error", error["message"], level="error")
        store.finish(job_id, owner, "failed", error=error)
        return "failed"
    return final["status"]


def _start_child(job_id: str, owner: str, settings: WorkerSettings, spec_gpus: int | None,
                 worker_gpus: int) -> subprocess.Popen:
    env = {**os.environ, **settings.environment(), "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "worker.runner", job_id, owner]
    if worker_gpus and spec_gpus != 0:
        wanted = max(1, spec_gpus or 1)
        first = _gpu_slot()
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str((first + i) % worker_gpus) for i in range(wanted))
        if wanted > 1:  # data-parallel on this machine's GPUs
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                       str(wanted), "-m", "worker.runner", job_id, owner]
    else:  # a CPU job, or a worker without GPUs
        env["CUDA_VISIBLE_DEVICES"] = ""
    guarded = [sys.executable, "-m", "worker.guard", str(os.getpid()), *command]
    return subprocess.Popen(guarded, env=env)


def _watch(child: subprocess.Popen, job_id: str, owner: str, settings: WorkerSettings, store: JobStore) -> str:
    """Heartbeat the lease while the child runs; tell it to stop when the worker shuts down."""
    interval = max(0.2, settings.lease_seconds / 3)
    suspending = False
    while True:
        try:
            child.wait(timeout=interval)
            break
        except subprocess.TimeoutExpired:
            pass
        try:
            alive = store.renew(job_id, owner, settings.lease_seconds)
        except Exception:  # the database is briefly unreachable: keep training, the lease has slack
            logger.exception("could not renew the lease of %s", job_id)
            continue
        if not alive:
            if store.get_job(job_id)["status"] in TERMINAL:  # the child finished the job and is exiting
                child.wait()
                break
            child.kill()  # another worker holds the job now: this copy must not write another step
            child.wait()
            return "lease lost"
        if SHUTTING_DOWN.is_set() and not suspending:
            child.send_signal(signal.SIGTERM)  # save a checkpoint and exit (torchrun passes it to its ranks)
            suspending = True
    if child.returncode == EXIT_SUSPENDED or (suspending and store.get_job(job_id)["status"] not in TERMINAL):
        return "suspended"
    if child.returncode == EXIT_LEASE_LOST:
        return "lease lost"
    return "ended"


def _gpu_slot() -> int:
    """A GPU index per worker thread: thread k of a worker with N GPUs trains on GPU k."""
    with _gpu_lock:
        thread = threading.get_ident()
        if thread not in _gpu_slots:
            _gpu_slots[thread] = len(_gpu_slots)
        return _gpu_slots[thread]


def _redispatch(app, store: JobStore, job_id: str, settings: WorkerSettings) -> None:
    job = store.get_job(job_id)
    dispatch(app, job_id, job["queue"])
    store.mark_dispatched(job_id)


def sweep(store: JobStore, app, settings: WorkerSettings) -> list[str]:
    """Send again the jobs whose worker died (lease lapsed) or whose message was lost (queued too long)."""
    sent = []
    for job in store.stale_jobs(redispatch_seconds=settings.redispatch_seconds):
        # first sent again when its lease lapses; then, like a queued job, whenever the last message sent
        # has not been taken for redispatch_seconds (a worker that died holding it unstarted lost it)
        lapsed = job["lease_owner"] is not None and (job["dispatched_at"] or 0) < job["lease_expires_at"]
        since = job["lease_expires_at"] if lapsed else time.time() - settings.redispatch_seconds
        if not store.mark_dispatched(job["id"], unless_since=since):
            continue  # another worker's sweep sent it a moment ago
        if lapsed:
            store.add_event(job["id"], "status", f"worker {job['lease_owner']} stopped sending heartbeats; "
                            "the job is queued again and resumes from its last checkpoint", level="warning")
        dispatch(app, job["id"], job["queue"] or queue_for(job["spec"].get("gpus"), settings.default_queue))
        sent.append(job["id"])
    return sent


def start_sweeper(store: JobStore, app, settings: WorkerSettings, stop: threading.Event) -> threading.Thread:
    interval = max(0.5, min(settings.lease_seconds / 3, 10.0))

    def loop():
        while not stop.wait(interval):
            try:
                for job_id in sweep(store, app, settings):
                    logger.warning("re-sent job %s (its worker died or its message was lost)", job_id)
            except Exception:
                logger.exception("the sweep of stale jobs failed; trying again")

    thread = threading.Thread(target=loop, name="xatl-sweeper", daemon=True)
    thread.start()
    return thread


__all__ = ["SHUTTING_DOWN", "run_job", "start_sweeper", "sweep"]
