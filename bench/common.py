"""What every benchmark records beside its numbers: the machine, the versions, the command."""

from __future__ import annotations

import json
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
REPO = RESULTS.parents[1]
XATL = Path(sys.executable).with_name("xatl")  # the CLI of the environment the benchmark runs in


def by_cpu_capability(name: str) -> str:
    """`name/<the vector instructions torch's CPU kernels use here>` ("avx2", "avx512", ...): results
    that depend on them (int8 and bf16 kernels most) are kept per kind of CPU, not overwritten."""
    return f"{name}/{torch.backends.cpu.get_cpu_capability().lower()}"


def relative_paths(text: str) -> str:
    """Paths of this machine as a reader elsewhere can follow them: relative to the repository
    (`bench/...`) or to the folder beside it (`../shared/...`)."""
    return text.replace(f"{REPO}/", "").replace(f"{REPO.parent}/", "../")


def environment() -> dict:
    try:
        import transformers

        transformers_version = transformers.__version__
    except ImportError:  # pragma: no cover
        transformers_version = None
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit = None
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
        "git_commit": commit,
        "machine": {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
                    "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                    "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers_version},
        "torch_threads": torch.get_num_threads(),
    }


def write_results(name: str, payload: dict, markdown: str) -> Path:
    """Write `results/<name>/results.json` and `results/<name>/README.md`; return the folder."""
    folder = RESULTS / name
    folder.mkdir(parents=True, exist_ok=True)
    env = payload.setdefault("environment", environment())
    (folder / "results.json").write_text(relative_paths(json.dumps(payload, indent=1) + "\n"))
    header = (
        f"Command: `{env['command']}` (commit {env['git_commit']}, {env['date']})\n\n"
        f"Machine: {env['machine']['cpu']} ({env['machine'].get('cpu_capability', '?')}), "
        f"{env['machine']['cores']} cores, "
        f"GPU: {env['machine']['gpu'] or 'none'}; torch {env['versions']['torch']} "
        f"({env['torch_threads']} threads), transformers {env['versions']['transformers']}\n\n"
    )
    (folder / "README.md").write_text(relative_paths(header + markdown.rstrip() + "\n"))
    return folder


def timed(fn, *, sync=None) -> float:
    """Seconds one call of `fn` takes."""
    start = time.perf_counter()
    fn()
    if sync:
        sync()
    return time.perf_counter() - start


class XatlServer:
    """`xatl serve` in a process of its own on a free port, with the data directory `home`, API key
    `key`, none of the caller's XATL_* variables but `env`, and its output in `log`; with `worker`,
    its local Celery worker too (else `--no-worker`)."""

    def __init__(self, home: Path, *, key: str, log: Path, worker: bool = False, env: dict | None = None,
                 start_timeout: float = 180):
        import httpx

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        environment = {k: v for k, v in os.environ.items() if not k.startswith("XATL_")}
        environment.update({"XATL_API_KEYS": key, **(env or {})})
        args = [str(XATL), "serve", "--data-dir", str(home), "--port", str(self.port)]
        self.log = open(log, "w")  # noqa: SIM115 (closed by stop)
        self.process = subprocess.Popen(args + ([] if worker else ["--no-worker"]), env=environment,
                                        stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + start_timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"xatl serve did not answer /health within {start_timeout:.0f} s (its log: {log})")

    def rss_bytes(self) -> int:
        """Resident memory of the server and its children (the embedded Redis, the worker)."""
        total = 0
        for pid in [self.process.pid, *_children(self.process.pid)]:
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
            except OSError:
                pass
        return total

    def stop(self) -> None:
        """SIGINT (a graceful shutdown), killed after 120 s."""
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


def _children(pid: int) -> list[int]:
    try:
        found = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    return [int(p) for p in found] + [c for p in found for c in _children(int(p))]
