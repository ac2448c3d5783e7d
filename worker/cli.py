"""`xatl worker [--queues gpu,cpu] [--gpus N]`: take jobs from the queue and run them.

A worker joins the Redis of `XATL_REDIS_URL` and the database of `XATL_DATABASE_URL` (or the SQLite
file under `XATL_HOME`), and takes jobs from its queues, as many at once as it has GPUs (one per
GPU), or one on a CPU. Several workers on several machines share one Redis, one database and one
data volume. SIGTERM or Ctrl-C: running jobs save a checkpoint and go back to the queue.
"""

from __future__ import annotations

import argparse
import os


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--queues", default=None,
                        help="comma-separated queues to take jobs from (default: gpu with GPUs, else gpu,cpu)")
    parser.add_argument("--gpus", type=int, default=None, help="GPUs to use, one job each (default: all visible)")
    parser.add_argument("--concurrency", type=int, default=None, help="jobs at once (default: the GPUs, or 1)")
    parser.add_argument("--name", default=None, help="the worker's name in Celery (default: xatl-<pid>@<host>)")
    parser.add_argument("--loglevel", default="INFO")


def run(args: argparse.Namespace) -> int:
    from worker.config import WorkerSettings

    settings = WorkerSettings()
    if not settings.redis_url:
        raise ValueError("set XATL_REDIS_URL to the Redis the service uses (xatl serve prints it)")
    gpus = args.gpus if args.gpus is not None else visible_gpus()
    queues = args.queues or ("gpu" if gpus else "gpu,cpu")
    concurrency = args.concurrency or max(1, gpus)
    start_worker(settings, queues=queues.split(","), gpus=gpus, concurrency=concurrency,
                 name=args.name or f"xatl-{os.getpid()}@%h", loglevel=args.loglevel)
    return 0


def start_worker(settings, *, queues: list[str], gpus: int, concurrency: int, name: str, loglevel: str = "INFO"):
    """Run a Celery worker in this process until it is told to stop."""
    import threading

    from celery import signals

    from worker.celery_app import RUN_JOB, make_celery
    from worker.store import JobStore
    from worker.tasks import SHUTTING_DOWN, run_job, start_sweeper

    app = make_celery(settings.redis_url)
    store = JobStore(settings.resolved_database_url)
    stop_sweeping = threading.Event()

    @app.task(name=RUN_JOB, acks_late=True)
    def xatl_run_job(job_id: str) -> str:
        return run_job(job_id, settings=settings, store=store, app=app, gpus=gpus)

    @signals.worker_ready.connect(weak=False)
    def _ready(**_):
        start_sweeper(store, app, settings, stop_sweeping)

    @signals.worker_shutting_down.connect(weak=False)
    def _shutting_down(**_):
        SHUTTING_DOWN.set()  # running jobs checkpoint and go back to the queue
        stop_sweeping.set()

    app.worker_main(["worker", "--pool", "threads", "--concurrency", str(concurrency), "--queues", ",".join(queues),
                     "--hostname", name, "--loglevel", loglevel, "--without-gossip", "--without-mingle",
                     "--prefetch-multiplier", "1"])


def visible_gpus() -> int:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip()])
    try:
        import subprocess

        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
        return len([line for line in listed.stdout.splitlines() if line.startswith("GPU ")])
    except (OSError, subprocess.SubprocessError):
        return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m worker.cli`: the same as `xatl worker`, without importing the library (and torch)
    into the worker's own process — only the job's child process needs them."""
    parser = argparse.ArgumentParser(prog="python -m worker.cli", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    import sys

    sys.exit(main())
