"""`xatl serve [--host] [--port] [--data-dir DIR] [--no-worker] [--no-migrate]`: the API, a Redis, a worker.

On one machine, one command: the database is brought to the newest schema (SQLite under the data
directory unless `XATL_DATABASE_URL` says otherwise), a Redis is started under the data directory
unless `XATL_REDIS_URL` names one, and a local worker takes jobs (unless `--no-worker`). Options
override the environment (`XATL_HOST`, `XATL_PORT`, `XATL_HOME`, `XATL_MODELS_DIR`, `XATL_PRECISION`, and the other
`XATL_` settings of `service.config.Settings`). Without `XATL_API_KEYS`, the key stored in the data
directory is used, or one is made, stored there and printed. `--sample-job DIR` submits the sample
conversion once the API is up (see `service.sample_job`). Ctrl-C stops everything in order.
In a deployment (`docker-compose.yml`) it runs as `xatl serve --no-worker --no-migrate`: Redis,
PostgreSQL and the workers are services of their own, and `xatl db upgrade` ran once before it.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to listen on (default 8000)")
    parser.add_argument("--data-dir",
                        help="the service's files: key, database, uploads, jobs, models (default ./data)")
    parser.add_argument("--models-dir", help="folder of servable models (default <data-dir>/models)")
    parser.add_argument("--import-root", action="append", default=None, metavar="DIR",
                        help="a folder whose files jobs may name by path (repeatable)")
    parser.add_argument("--precision", "--dtype", choices=["fp32", "bf16", "int8"],
                        help="weights of every served model: fp32, bf16 or int8 (CPU), over the precision each "
                        "is saved in; default: each as saved")
    parser.add_argument("--compile", choices=["auto", "on", "off"],
                        help="compile each model's decode step at load, eagerly serving meanwhile (default auto: "
                        "bf16 on a CPU with a C++ compiler, where it paid)")
    parser.add_argument("--no-worker", action="store_true", help="start no local worker (workers run elsewhere)")
    parser.add_argument("--worker-gpus", type=int, help="GPUs the local worker uses (default: all visible)")
    parser.add_argument("--no-migrate", action="store_true", help="leave the database schema alone: a deployment "
                        "runs `xatl db upgrade` once before the API and workers start (docker-compose.yml's migrate)")
    parser.add_argument("--sample-job", metavar="DIR", help="submit the sample conversion from the files in DIR "
                        "(as `xatl sample --link DIR` leaves them) once the API is up, unless its model exists")
    parser.add_argument("--sample-tokens", type=int, default=None,
                        help="the sample job's training budget in tokens (default 1.6M, about two minutes)")


def run(args: argparse.Namespace) -> int:
    import logging
    import os

    import uvicorn

    from service.config import Settings
    from service.embedded import start_redis, start_worker
    from service.keys import KEY_FILE, create_stored_key, read_stored_key
    from service.main import create_app
    from service.server import DrainingServer
    from worker.store import migrate

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for chatty in ("alembic", "httpx"):  # a line per migration plugin and per request of the sample job
        logging.getLogger(chatty).setLevel(logging.WARNING)
    given = {"host": args.host, "port": args.port, "home": args.data_dir, "models_dir": args.models_dir,
             "import_roots": args.import_root, "precision": args.precision, "compile": args.compile}
    settings = Settings(**{name: value for name, value in given.items() if value is not None})
    if "XATL_DEFAULT_QUEUE" not in os.environ and not args.no_worker and not _gpus_visible(args.worker_gpus):
        settings = settings.model_copy(update={"default_queue": "cpu"})  # this machine's worker has no GPU
    settings.home.mkdir(parents=True, exist_ok=True)
    settings.resolved_models_dir.mkdir(parents=True, exist_ok=True)
    # the key is printed when it is made; after that, where it is (keys do not belong in logs)
    if settings.api_keys:
        key, shown = settings.api_keys[0], f"{len(settings.api_keys)} from XATL_API_KEYS"
    elif (key := read_stored_key(settings.home)) is not None:
        shown = f"the one stored in {settings.home / KEY_FILE}"
    else:
        key = create_stored_key(settings.home)
        shown = f"{key}  (new, stored in {settings.home / KEY_FILE})"

    if not args.no_migrate:
        migrate(settings.resolved_database_url)
    children = []
    try:
        if not settings.redis_url:
            redis, url = start_redis(settings.home / "redis")
            children.append(redis)
            settings = settings.model_copy(update={"redis_url": url})
        if not args.no_worker:
            children.append(start_worker(settings.environment(), log=settings.home / "logs" / "worker.log",
                                         gpus=args.worker_gpus))
        base = f"http://{settings.host}:{settings.port}"
        print(f"xatl service at {base}  (API docs: {base}/docs)")
        print(f"API key: {shown}")
        print(f"models: {settings.resolved_models_dir.resolve()}")
        embedded = children and children[0].name == "redis"
        print(f"Redis: {without_password(settings.redis_url)}" + ("  (embedded, under the data directory)"
                                                                   if embedded else ""))
        if not args.no_worker:
            print(f"worker log: {settings.home / 'logs' / 'worker.log'}")
        app = create_app(settings)
        if args.sample_job:
            from service.sample_job import submit_when_ready

            submit_when_ready(base, key, args.sample_job, settings.resolved_models_dir, tokens=args.sample_tokens)
        config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="warning",
                                timeout_graceful_shutdown=int(settings.shutdown_drain_seconds) + 10)
        try:
            DrainingServer(config, app.state.registry, settings.shutdown_drain_seconds, app.state.stopping).run()
        except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled: the shutdown was orderly
            pass
    finally:
        for child in reversed(children):  # the worker first: its jobs checkpoint and go back to the queue
            child.stop(timeout=60 if child.name == "worker" else 10)
    return 0


def without_password(url: str) -> str:
    """A Redis URL fit for a log: its password (`redis://:secret@host`) replaced by `***`."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if ":" in host:  # an IPv6 address
        host = f"[{host}]"
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port is not None else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _gpus_visible(requested: int | None) -> bool:
    if requested is not None:
        return requested > 0
    from worker.cli import visible_gpus

    return visible_gpus() > 0

