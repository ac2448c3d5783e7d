"""The Celery app: Redis as the broker, one task (`xatl.run_job`) whose payload is a job id.

Messages are acknowledged after the task returns (`acks_late`) and each worker thread takes one at
a time (prefetch 1), so a job waits in Redis, not in a busy worker. Redis's own redelivery of an
unacknowledged message (the visibility timeout) is only a backstop: a dead worker's jobs are found
by their lapsed leases in the store and sent again within a minute (`worker.tasks.sweep`).
"""

from __future__ import annotations

from celery import Celery

RUN_JOB = "xatl.run_job"
QUEUES = ("gpu", "cpu")


def make_celery(redis_url: str) -> Celery:
    app = Celery("xatl", broker=redis_url, set_as_current=False)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_ignore_result=True,
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        broker_transport_options={"visibility_timeout": 6 * 3600},
        task_default_queue="gpu",
    )
    return app


def queue_for(gpus: int | None, default_queue: str) -> str:
    """CPU jobs (`gpus: 0`) go to the cpu queue, GPU jobs to the gpu queue, the rest to the default."""
    if gpus is None:
        return default_queue
    return "cpu" if gpus == 0 else "gpu"


def dispatch(app: Celery, job_id: str, queue: str) -> None:
    app.send_task(RUN_JOB, args=[job_id], queue=queue)
