"""The job service under load, and the README's first job timed stage by stage.

1. Latency of the job routes: `xatl serve --no-worker` (a real server process with its embedded
   Redis) and 50 concurrent clients (httpx, asyncio) that create 1,000 jobs, then list them — the
   first page, pages further on by cursor, a status filter — and read single jobs. p50/p99 per
   route, on SQLite and (where a server answers) PostgreSQL, side by side. Goal: p99 < 50 ms.
2. The first job of the README (`make run`'s sample: stories260K → gated linear attention, 1.6M
   tokens of TinyStories) on `xatl serve` with its local worker, its wall time split into queue
   wait, conversion, training, evaluation, decode profile and publishing, from the job's events.

    python bench/service/run.py                         # both (~6 min on 2 cores)
    python bench/service/run.py --skip-first-job        # the latencies alone
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import XatlServer, environment, write_results  # noqa: E402

KEY = "bench-key"


def percentiles(measured: Measured) -> dict:
    """p50/p99/max of the latencies `_load` measured, the requests per second they were served at, and
    the requests that got no answer (a connection error)."""
    ordered = sorted(measured.latencies)
    at = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"n": len(ordered), "p50_ms": 1000 * statistics.median(ordered), "p99_ms": 1000 * at(0.99),
            "max_ms": 1000 * ordered[-1], "requests_per_s": len(ordered) / measured.wall,
            "connection_errors": len(measured.failures), "connection_error_samples": measured.failures[:3]}


class Measured(NamedTuple):
    latencies: list[float]  # seconds, one per answered request
    wall: float  # seconds for them all
    failures: list[str]  # requests whose connection failed (no answer)


async def _load(url: str, requests: list[tuple[str, str, dict | None]], clients: int) -> Measured:
    """Send `requests` (method, path, json) from `clients` concurrent clients."""
    latencies: list[float] = []
    failures: list[str] = []
    queue: asyncio.Queue = asyncio.Queue()
    for request in requests:
        queue.put_nowait(request)
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, limits=limits,
                                 timeout=60) as http:
        async def client():
            while not queue.empty():
                method, path, body = queue.get_nowait()
                start = time.perf_counter()
                try:
                    response = await http.request(method, path, json=body)
                except httpx.TransportError as error:  # counted and reported, not hidden
                    failures.append(f"{method} {path}: {type(error).__name__} {error}")
                    continue
                latencies.append(time.perf_counter() - start)
                if response.status_code >= 400:
                    raise RuntimeError(f"{method} {path}: {response.status_code} {response.text[:300]}")

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        return Measured(latencies, time.perf_counter() - started, failures)


def route_latencies(data_dir: Path, args, database_url: str | None) -> dict:
    env = {"XATL_DATABASE_URL": database_url} if database_url else {}
    server = XatlServer(data_dir, key=KEY, log=data_dir.parent / f"{data_dir.name}.log", env=env)
    try:
        spec = lambda i: {"type": "conversion", "donor": "org/model", "suffix": f"b{i}"}  # noqa: E731
        creates = asyncio.run(_load(server.url, [("POST", "/v1/jobs", spec(i)) for i in range(args.jobs)],
                                    args.clients))
        listing = httpx.get(server.url + "/v1/jobs", params={"limit": 100}, headers={"Authorization": f"Bearer {KEY}"})
        ids = [job["id"] for job in listing.json()["data"]]
        reads = [("GET", "/v1/jobs?limit=20", None), ("GET", f"/v1/jobs?limit=20&after={ids[50]}", None),
                 ("GET", "/v1/jobs?limit=20&status=queued", None), ("GET", f"/v1/jobs/{ids[7]}", None)]
        rows = {"create": percentiles(creates)}
        names = ("list (first page)", "list (after a cursor)", "list (by status)", "get one")
        for name, request in zip(names, reads):
            rows[name] = percentiles(asyncio.run(_load(server.url, [request] * args.reads, args.clients)))
        # the same requests from one client at a time: what a request costs when nothing queues before it
        alone = [("POST", "/v1/jobs", spec(args.jobs + i)) for i in range(args.alone)]
        single = {"create": percentiles(asyncio.run(_load(server.url, alone, 1)))}
        for name, request in zip(names, reads):
            single[name] = percentiles(asyncio.run(_load(server.url, [request] * args.alone, 1)))
        return {"concurrent": rows, "one_client": single}
    finally:
        server.stop()


def postgres_database(url: str) -> tuple[str, callable] | None:
    from sqlalchemy import create_engine, text

    try:
        engine = create_engine(url, isolation_level="AUTOCOMMIT")
        name = f"xatl_bench_{secrets.token_hex(4)}"
        with engine.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as error:  # no server here: the SQLite figures stand alone
        print(f"PostgreSQL skipped: {error}", file=sys.stderr)
        return None

    def drop():
        with engine.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        engine.dispose()

    return engine.url.set(database=name).render_as_string(hide_password=False), drop


def first_job(root: Path, args) -> dict:
    """The sample job (`make run`) on xatl serve with its worker; wall time per stage from the events."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from service.sample_job import run_sample
    from worker.store import JobStore

    sample = root / "sample"
    sample.mkdir()
    data = Path(args.data_dir).resolve()
    for name, relative in (("stories260K.bin", "stories260K/stories260K.bin"), ("tok512.bin", "stories260K/tok512.bin"),
                           ("tinystories_val.txt", "tinystories_val_subset/tinystories_val.txt")):
        (sample / name).symlink_to(data / relative)
    server = XatlServer(root / "serve", key=KEY, log=root / "serve.log", worker=True)
    try:
        started = time.perf_counter()
        jobs = run_sample(server.url, KEY, sample, root / "serve" / "models", tokens=args.sample_tokens,
                          say=lambda line: None)
        total = time.perf_counter() - started
    finally:
        server.stop()
    store = JobStore(f"sqlite:///{(root / 'serve' / 'xatl.db').resolve()}")
    job = next(j for j in jobs if j["model"] == "stories260K-gla")
    events = store.list_events(job["id"], limit=100_000).items
    record = store.get_job(job["id"])
    running = next(e["created_at"] for e in events if e["message"].startswith("running"))
    stages = {}
    for event in events:
        if event["type"] == "stage" and event["data"] and event["data"].get("status") in ("started", "done"):
            stages.setdefault(event["data"]["stage"], {})[event["data"]["status"]] = event["created_at"]
    split = {"queue wait": running - record["created_at"]}
    split.update({stage: times["done"] - times["started"] for stage, times in stages.items() if len(times) == 2})
    split["job total (created → finished)"] = record["finished_at"] - record["created_at"]
    return {"seconds": split, "sample_tokens": args.sample_tokens, "status": job["status"],
            "error": job.get("error"), "result": {k: (job["result"] or {}).get(k) for k in ("train", "evaluation")},
            "make_run_sample_wall_s (both jobs, uploads included)": total}


def markdown(results: dict) -> str:
    lines = ["# The job service", "", f"## Route latency: {results['settings']['clients']} concurrent clients, "
             f"{results['settings']['jobs']} jobs created, then {results['settings']['reads']} reads per route", "",
             "| database | route | n | p50 (ms) | p99 (ms) | max (ms) | requests/s | no answer | goal p99 < 50 ms "
             "| one client: p50 (ms) | one client: requests/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for database, measured in results["latency"].items():
        for route, row in measured["concurrent"].items():
            alone = measured["one_client"][route]
            met = "met" if row["p99_ms"] < 50 else f"missed ({row['p99_ms'] / 50:.1f}x)"
            lines.append(f"| {database} | {route} | {row['n']} | {row['p50_ms']:.1f} | {row['p99_ms']:.1f} | "
                         f"{row['max_ms']:.1f} | {row['requests_per_s']:.0f} | {row['connection_errors']} | {met} | "
                         f"{alone['p50_ms']:.1f} | {alone['requests_per_s']:.0f} |")
    lines += ["", f"With {results['settings']['clients']} requests always outstanding, a request waits behind the "
              "others: by Little's law its latency is about clients / throughput, so a p99 under 50 ms at "
              f"{results['settings']['clients']} clients needs well over {results['settings']['clients'] / 0.05:,.0f} "
              "requests/s from the one API process."]
    if "first_job" in results:
        job = results["first_job"]
        lines += ["", f"## The README's first job (stories260K → GLA, {job['sample_tokens']:,} training tokens)", "",
                  f"Status: {job['status']}" + (f" ({job['error']})" if job.get("error") else "") + ".", "",
                  "| part | seconds |", "|---|---|"]
        lines += [f"| {part} | {seconds:.1f} |" for part, seconds in job["seconds"].items()]
        evaluation = job["result"]["evaluation"] or {}
        if "valid_loss" in evaluation:
            lines += ["", f"Validation loss {evaluation['valid_loss']:.3f} nats/token against the donor's "
                      f"{evaluation['base_valid_loss']:.3f} on the same held-out text."]
    lines += ["", f"Load average at the start: {results['load_average_at_start']}."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--reads", type=int, default=1000, help="requests per read route")
    parser.add_argument("--alone", type=int, default=200, help="requests per route from a single client")
    parser.add_argument("--postgres", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres",
                        help="a PostgreSQL server's maintenance database ('' to skip)")
    parser.add_argument("--skip-first-job", action="store_true")
    parser.add_argument("--sample-tokens", type=int, default=1_600_000)
    parser.add_argument("--data-dir", default=os.environ.get("XATL_DATA_DIR", "../shared/data"))
    args = parser.parse_args()
    results = {"settings": {"jobs": args.jobs, "clients": args.clients, "reads": args.reads},
               "load_average_at_start": os.getloadavg(), "latency": {}}
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        results["latency"]["SQLite"] = route_latencies(root / "sqlite", args, None)
        made = postgres_database(args.postgres) if args.postgres else None
        if made is not None:
            url, drop = made
            try:
                results["latency"]["PostgreSQL"] = route_latencies(root / "postgres", args, url)
            finally:
                drop()
        write_results("service", results, markdown(results))  # the latencies stand even if the job fails
        if not args.skip_first_job:
            results["first_job"] = first_job(root, args)
    results["environment"] = environment()
    folder = write_results("service", results, markdown(results))
    print((folder / "README.md").read_text())


if __name__ == "__main__":
    main()
