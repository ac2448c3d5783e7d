"""The first job a new user sees (`make run`, i.e. `xatl serve --sample-job data/sample`): the
sample donor stories260K and TinyStories text uploaded through the REST API, then two jobs —
the donor rebuilt as it is (`stories260K`, attention) and its linear-cost conversion trained
briefly (`stories260K-gla`, gated linear attention, Q/K/V transferred) — followed to the end, and
a completion streamed from the new model. Each job carries an Idempotency-Key, so a second
`make run` submits nothing twice; a model that exists already is left alone.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import httpx

from service.client import APIFailure, XatlClient

logger = logging.getLogger("xatl.sample")
SAMPLE_TOKENS = 1_600_000  # about two minutes on two CPU cores; TinyStories-like text after it
SAMPLE_MODELS = ("stories260K", "stories260K-gla")


def sample_specs(donor: str, tokenizer: str, text: str, *, tokens: int = SAMPLE_TOKENS) -> list[dict]:
    rebuilt = {"type": "conversion", "donor": donor, "tokenizer": tokenizer, "mixer": "attention",
               "transfer": "xatl", "name": "stories260K",
               "evaluation": {"validation_file": text, "contexts": [128, 512], "max_batches": 20}}
    linear = {
        "type": "conversion", "donor": donor, "tokenizer": tokenizer, "mixer": "gla", "transfer": "xatl+qkv",
        "name": "stories260K-gla",
        "training": {"training_file": text, "split_by": "block", "valid_fraction": 0.05, "tokens": tokens,
                     "block_size": 256, "batch_size": 16, "lr": 3e-3, "warmup_steps": 30, "save_every": 100,
                     "log_every": 20},
        "evaluation": {"contexts": [128, 512], "max_batches": 20},
    }
    return [rebuilt, linear]


def run_sample(base_url: str, api_key: str, folder: str | Path, models_dir: Path, *, tokens: int = SAMPLE_TOKENS,
               say=print) -> list[dict]:
    """Upload the sample files, submit the sample jobs, follow them; the finished jobs."""
    folder = Path(folder)
    client = XatlClient(base_url, api_key)
    try:
        if all((models_dir / name).is_dir() for name in SAMPLE_MODELS):
            say("the sample models exist already: stories260K, stories260K-gla")
            return []
        say("uploading the sample donor and text ...")
        donor = client.upload(folder / "stories260K.bin", purpose="donor")["id"]
        tokenizer = client.upload(folder / "tok512.bin", purpose="donor")["id"]
        text = client.upload(folder / "tinystories_val.txt", purpose="train")["id"]
        finished = []
        for spec in sample_specs(donor, tokenizer, text, tokens=tokens):
            if (models_dir / spec["name"]).is_dir():
                continue
            job = client.create_job(spec, idempotency_key=f"sample-{spec['name']}-{tokens}")
            say(f"job {job['id']}: {spec['name']} ({spec['mixer']}) queued")
            for event in client.follow(job["id"]):
                if event["type"] != "metrics" or "validation" in event["message"] or _every(event, 100):
                    say(f"  {job['id'][:12]}… {event['message']}")
            job = client.job(job["id"])
            say(f"job {job['id']}: {job['status']}" + (f" — {job['error']['message']}" if job["error"] else ""))
            finished.append(job)
        if finished and finished[-1]["status"] == "succeeded":
            evaluation = finished[-1]["result"].get("evaluation") or {}
            if "valid_loss" in evaluation:
                say(f"stories260K-gla: validation loss {evaluation['valid_loss']:.3f} nats/token "
                    f"(the donor: {evaluation.get('base_valid_loss', float('nan')):.3f})")
            text_out = "".join(client.complete("stories260K-gla", "Once upon a time", max_tokens=60, temperature=0))
            say(f"stories260K-gla writes: Once upon a time{text_out}")
        return finished
    finally:
        client.close()


def _every(event: dict, steps: int) -> bool:
    step = (event.get("data") or {}).get("step")
    return isinstance(step, int) and step % steps == 0


def submit_when_ready(base_url: str, api_key: str, folder: str, models_dir: Path,
                      tokens: int | None = None) -> threading.Thread:
    """Run the sample in a background thread once the API answers (the server starts after this call)."""

    def wait_then_run():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{base_url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        try:
            run_sample(base_url, api_key, folder, models_dir, tokens=tokens or SAMPLE_TOKENS,
                       say=lambda line: print(line, flush=True))
        except (APIFailure, httpx.HTTPError, OSError) as error:
            logger.error("the sample job could not run: %s", error)

    thread = threading.Thread(target=wait_then_run, name="xatl-sample-job", daemon=True)
    thread.start()
    return thread


__all__ = ["run_sample", "sample_specs", "submit_when_ready"]
