"""Load on the generation service: N concurrent streams for D seconds against a GLA model on
`xatl serve` (a real server process), clients disconnecting at random, and a long prompt every few
seconds. What it measures: server errors (5xx, error events, connections the server cut), the gaps
between the chunks of running streams (inter-token latency, p50/p99; also during long prefills),
the requests left in the engine once every client has gone (`/metrics`), and the server's resident
memory after warm-up and at the end.

    python bench/reliability/load.py --streams 16 --seconds 30 --long-prompt-tokens 2048   # alone
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import XATL, XatlServer  # noqa: E402

KEY = "bench-key"
WORDS = ("once upon a time there was a little girl named lily she liked to play in the park with her dog "
         "one day the sun was bright and the birds sang the boy was happy and ran to his mom").split()


@dataclass
class Tally:
    streams: int = 0
    completed: int = 0
    disconnected: int = 0  # by the client, on purpose
    refused_429: int = 0
    server_errors: list[str] = field(default_factory=list)  # 5xx, error events, cut connections
    gaps: list[float] = field(default_factory=list)  # seconds between consecutive chunks of a stream
    gaps_during_long: list[float] = field(default_factory=list)  # those overlapping a long prompt's request
    long_prompts: int = 0
    long_prompt_seconds: list[float] = field(default_factory=list)
    long_windows: list[tuple[float, float]] = field(default_factory=list)


def prepare_model(data_dir: Path, models_dir: Path) -> str:
    """stories260K converted to gated linear attention (xatl convert), served as `stories-gla`."""
    out = models_dir / "stories-gla"
    if not (out / "config.json").is_file():
        source = data_dir / "stories260K"
        subprocess.run([str(XATL), "convert", str(source / "stories260K.bin"), "--tokenizer",
                        str(source / "tok512.bin"), "--mixer", "gla", "--out", str(out)], check=True,
                       stdout=subprocess.DEVNULL)
    return out.name


def long_prompt(model_dir: Path, tokens: int) -> str:
    """A text of about `tokens` tokens of the model's tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rng = random.Random(1)
    text = " ".join(rng.choice(WORDS) for _ in range(tokens))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][: tokens - 2]
    return tokenizer.decode(ids)


async def _stream(http: httpx.AsyncClient, model: str, tally: Tally, rng: random.Random, *, disconnect: float,
                  max_tokens: int) -> None:
    body = {"model": model, "prompt": " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 40))),
            "max_tokens": rng.randint(max_tokens // 4, max_tokens), "stream": True, "temperature": 0.8}
    leave_after = rng.randint(1, body["max_tokens"]) if rng.random() < disconnect else None
    tally.streams += 1
    try:
        async with http.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code == 429:
                tally.refused_429 += 1
                await response.aread()
                return
            if response.status_code >= 500:
                tally.server_errors.append(f"{response.status_code}: {(await response.aread())[:200]!r}")
                return
            if response.status_code != 200:
                tally.server_errors.append(f"unexpected {response.status_code}: {(await response.aread())[:200]!r}")
                return
            last, chunks = None, 0
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                payload = line.removeprefix("data: ")
                if payload == "[DONE]":
                    tally.completed += 1
                    return
                chunk = json.loads(payload)
                if "error" in chunk:
                    tally.server_errors.append(f"error event: {chunk['error'].get('message')}")
                    return
                now = time.monotonic()
                if last is not None:
                    tally.gaps.append(now - last)
                    if any(start <= now and (end is None or last <= end) for start, end in tally.long_windows):
                        tally.gaps_during_long.append(now - last)
                last = now
                chunks += 1
                if leave_after is not None and chunks >= leave_after:
                    tally.disconnected += 1
                    return  # leaving the block closes the connection mid-stream
            tally.server_errors.append("the stream ended without [DONE]")
    except httpx.HTTPError as error:
        tally.server_errors.append(f"connection: {error!r}")


async def _long_prompts(http: httpx.AsyncClient, model: str, prompt: str, every: float, until: float,
                        tally: Tally) -> None:
    while time.monotonic() + every < until:
        await asyncio.sleep(every)
        window = [time.monotonic(), None]
        tally.long_windows.append(window)  # a list: its end is set when the answer is in
        started = time.monotonic()
        try:
            response = await http.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 4})
            if response.status_code >= 500:
                tally.server_errors.append(f"long prompt {response.status_code}: {response.text[:200]}")
            elif response.status_code != 200:
                tally.server_errors.append(f"long prompt refused {response.status_code}: {response.text[:200]}")
        except httpx.HTTPError as error:
            tally.server_errors.append(f"long prompt connection: {error!r}")
        window[1] = time.monotonic()
        tally.long_prompts += 1
        tally.long_prompt_seconds.append(window[1] - started)


async def _drive(url: str, model: str, *, streams: int, seconds: float, disconnect: float, max_tokens: int,
                 prompt: str, long_every: float, seed: int) -> Tally:
    tally = Tally()
    until = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=streams + 8, max_keepalive_connections=streams + 8)
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=600,
                                 limits=limits) as http:
        async def client(index: int):
            rng = random.Random(seed * 10_000 + index)
            while time.monotonic() < until:
                await _stream(http, model, tally, rng, disconnect=disconnect, max_tokens=max_tokens)

        await asyncio.gather(*(client(i) for i in range(streams)),
                             _long_prompts(http, model, prompt, long_every, until, tally))
    return tally


def _gauges(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    return sum(float(m.group(1)) for m in re.finditer(rf"^{name}{{[^}}]*}} (\S+)$", text, re.M))


def _quantiles(samples: list[float]) -> dict:
    if not samples:
        return {"n": 0}
    ordered = sorted(samples)
    at = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"n": len(ordered), "p50_ms": 1000 * statistics.median(ordered), "p99_ms": 1000 * at(0.99),
            "max_ms": 1000 * ordered[-1]}


def run_load(work: Path, data_dir: Path, *, streams: int, seconds: float, long_prompt_tokens: int, long_every: float,
             disconnect: float, max_tokens: int, threads: int, seed: int = 0) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    home = work / "home"
    model = prepare_model(data_dir, home / "models")
    prompt = long_prompt(home / "models" / model, long_prompt_tokens)
    env = {"XATL_MAX_PROMPT_TOKENS": str(long_prompt_tokens + 64), "XATL_MAX_CONCURRENT_STREAMS": str(streams + 8),
           "XATL_MAX_BATCH_SIZE": str(streams), "XATL_TORCH_THREADS": str(threads), "XATL_MAX_TOKENS": "4096"}
    server = XatlServer(home, key=KEY, log=work / "server.log", env=env)
    try:
        # warm-up: the model loaded, a few streams and one long prompt, then the memory to compare with
        asyncio.run(_drive(server.url, model, streams=min(streams, 4), seconds=5, disconnect=0.0,
                           max_tokens=16, prompt=prompt, long_every=1.0, seed=seed + 1))
        time.sleep(1)
        rss_start = server.rss_bytes()
        started = time.monotonic()
        tally = asyncio.run(_drive(server.url, model, streams=streams, seconds=seconds, disconnect=disconnect,
                                   max_tokens=max_tokens, prompt=prompt, long_every=long_every, seed=seed))
        wall = time.monotonic() - started
        deadline = time.monotonic() + 30  # the engine notices the last disconnects at its next step
        while (left := _gauges(server.url, "xatl_requests_running") + _gauges(server.url, "xatl_requests_waiting")) \
                and time.monotonic() < deadline:
            time.sleep(0.5)
        time.sleep(1)
        rss_end = server.rss_bytes()
    finally:
        server.stop()
    return {
        "settings": {"streams": streams, "seconds": seconds, "long_prompt_tokens": long_prompt_tokens,
                     "long_prompt_every_s": long_every, "disconnect_fraction": disconnect, "max_tokens": max_tokens,
                     "server_torch_threads": threads, "model": f"{model} (stories260K, attention replaced by GLA)"},
        "wall_seconds": wall, "streams_started": tally.streams, "streams_completed": tally.completed,
        "streams_disconnected_by_client": tally.disconnected, "refused_429": tally.refused_429,
        "server_errors": len(tally.server_errors), "server_error_samples": tally.server_errors[:10],
        "inter_token": _quantiles(tally.gaps), "inter_token_during_long_prompts": _quantiles(tally.gaps_during_long),
        "long_prompts": tally.long_prompts, "long_prompt_latency": _quantiles(tally.long_prompt_seconds),
        "requests_left_in_engine": left, "rss_start_bytes": rss_start, "rss_end_bytes": rss_end,
        "rss_change": rss_end / rss_start - 1,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    parser.add_argument("--work", default="/tmp/xatl-reliability-load")
    args = parser.parse_args()
    result = run_load(Path(args.work), Path(args.data_dir), **load_options(args))
    print(json.dumps(result, indent=1))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", default=os.environ.get("XATL_DATA_DIR", "../shared/data"),
                        help="the shared data folder (stories260K)")
    parser.add_argument("--streams", type=int, default=256, help="concurrent streams")
    parser.add_argument("--seconds", type=float, default=300, help="how long the load lasts")
    parser.add_argument("--long-prompt-tokens", type=int, default=16384, help="the long prompt's length")
    parser.add_argument("--long-every", type=float, default=5.0, help="seconds between long prompts")
    parser.add_argument("--disconnect", type=float, default=0.3, help="fraction of streams the client leaves early")
    parser.add_argument("--max-tokens", type=int, default=256, help="most tokens a stream asks for")
    parser.add_argument("--server-threads", type=int, default=1, help="the server's torch threads")


def load_options(args: argparse.Namespace) -> dict:
    return {"streams": args.streams, "seconds": args.seconds, "long_prompt_tokens": args.long_prompt_tokens,
            "long_every": args.long_every, "disconnect": args.disconnect, "max_tokens": args.max_tokens,
            "threads": args.server_threads}


if __name__ == "__main__":
    main()
