"""`xatl jobs create SPEC.json | list | get ID | cancel ID | events ID [--follow]`: jobs over REST.

The service's address and key come from `--url`/`--api-key`, else `XATL_URL` / `XATL_API_KEY`, else
`http://127.0.0.1:8000` and the key `xatl serve` stored in `./data/api_key`. `create --follow` and
`events --follow` show the job's events as they happen, with a progress bar while it trains.
`xatl jobs upload FILE --purpose train|validation|donor` uploads a file and prints its id.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["create", "list", "get", "cancel", "events", "upload"])
    parser.add_argument("target", nargs="?", help="SPEC.json (create), a job id, or a file (upload)")
    parser.add_argument("--url", default=None, help="the service (default $XATL_URL or http://127.0.0.1:8000)")
    parser.add_argument("--api-key", default=None, help="default $XATL_API_KEY or ./data/api_key")
    parser.add_argument("--follow", action="store_true", help="create/events: follow the job until it ends")
    parser.add_argument("--status", help="list: only jobs with this status")
    parser.add_argument("--limit", type=int, default=20)
    parser.add_argument("--purpose", choices=["train", "validation", "donor"], help="upload: what the file is for")
    parser.add_argument("--idempotency-key", help="create: a retried create with the same key makes no second job")


def run(args: argparse.Namespace) -> int:
    from service.client import APIFailure, XatlClient
    from xatl.cli import CLIError

    url = args.url or os.environ.get("XATL_URL", "http://127.0.0.1:8000")
    key = args.api_key or os.environ.get("XATL_API_KEY") or _stored_key()
    if not key:
        raise CLIError("no API key: pass --api-key, set XATL_API_KEY, or run where `xatl serve` stored data/api_key")
    client = XatlClient(url, key)
    try:
        return _act(client, args)
    except APIFailure as failure:
        raise CLIError(str(failure)) from None
    except OSError as error:  # connection refused and friends
        raise CLIError(f"{url}: {error}") from None
    finally:
        client.close()


def _act(client, args) -> int:
    from xatl.cli import CLIError

    needs_target = {"create", "get", "cancel", "events", "upload"}
    if args.action in needs_target and not args.target:
        raise CLIError(f"`xatl jobs {args.action}` needs " + ("SPEC.json" if args.action == "create" else
                                                               "a file" if args.action == "upload" else "a job id"))
    if args.action == "upload":
        if not args.purpose:
            raise CLIError("upload needs --purpose train, validation or donor")
        _print(client.upload(args.target, purpose=args.purpose))
    elif args.action == "create":
        spec = json.loads(Path(args.target).read_text())
        job = client.create_job(spec, idempotency_key=args.idempotency_key)
        _print(job)
        if args.follow:
            return _follow(client, job["id"])
    elif args.action == "list":
        for job in client.jobs(status=args.status, limit=args.limit)["data"]:
            progress = job["progress"] or {}
            step = f"{progress.get('step', '-')}/{progress.get('total_steps', '-')}" if progress else ""
            print(f"{job['id']}  {job['type']:<10} {job['status']:<10} {job['model']:<32} {step}")
    elif args.action == "get":
        _print(client.job(args.target))
    elif args.action == "cancel":
        _print(client.cancel(args.target))
    elif args.action == "events":
        if args.follow:
            return _follow(client, args.target)
        for event in client.events(args.target, limit=1000)["data"]:
            print(f"{event['id']:>12}  {event['level']:<7} {event['message']}")
    return 0


def _follow(client, job_id: str) -> int:
    from tqdm import tqdm

    bar = None
    for event in client.follow(job_id):
        data = event.get("data") or {}
        if event["type"] == "metrics" and "total_steps" in data:
            if bar is None:
                bar = tqdm(total=data["total_steps"], unit="step", dynamic_ncols=True)
            bar.update(data["step"] - bar.n)
            bar.set_postfix(loss=f"{data.get('loss', 0):.3f}")
            continue
        line = f"{event['level']:<7} {event['message']}"
        (bar.write(line) if bar else print(line))
    if bar is not None:
        bar.close()
    job = client.job(job_id)
    print(f"{job_id}: {job['status']}" + (f" — {job['error']['message']}" if job.get("error") else ""))
    return 0 if job["status"] == "succeeded" else 1


def _print(value: dict) -> None:
    json.dump(value, sys.stdout, indent=1)
    print()


def _stored_key() -> str | None:
    path = Path("data") / "api_key"
    return path.read_text().strip() if path.is_file() else None
