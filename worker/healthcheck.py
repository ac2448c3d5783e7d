"""`python -m worker.healthcheck`: exit 0 when a Celery worker of this host answers a ping.

The worker images' and docker-compose.yml's healthcheck. A ping is answered by the worker's own
consumer (its remote-control mailbox in Redis), so a worker whose threads are all busy with jobs
still answers, and one that lost Redis or hangs does not. Every worker on the broker hears the
ping; only a reply from this host (`<name>@<hostname>`, the container) counts. Torch-free.
"""

from __future__ import annotations

import socket
import sys


def answering_workers(redis_url: str, timeout: float = 3.0) -> list[str]:
    """The names of the workers on `redis_url` that answered a ping within `timeout` seconds."""
    import redis

    from worker.celery_app import make_celery

    # Redis itself first, with a short timeout: Celery would keep retrying an unreachable broker
    redis.Redis.from_url(redis_url, socket_connect_timeout=timeout, socket_timeout=timeout).ping()

    app = make_celery(redis_url)
    try:
        replies = app.control.ping(timeout=timeout) or []
    finally:
        app.close()
    return sorted(name for reply in replies for name in reply)


def main() -> int:
    from worker.config import WorkerSettings

    settings = WorkerSettings()
    if not settings.redis_url:
        print("unhealthy: XATL_REDIS_URL is not set", file=sys.stderr)
        return 1
    host = socket.gethostname()
    try:
        names = answering_workers(settings.redis_url)
    except Exception as error:  # the broker unreachable, a refused password: unhealthy, said in one line
        print(f"unhealthy: no answer from Redis: {error}", file=sys.stderr)
        return 1
    if not any(name.endswith(f"@{host}") for name in names):
        print(f"unhealthy: no worker of {host} answered a ping (answered: {names or 'none'})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
