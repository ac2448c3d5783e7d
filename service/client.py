"""A small client of the xatl REST API (httpx): files, jobs, their events, completions. Used by
`xatl jobs` and by `xatl serve --sample-job`; a user's scripts can use it too.

    client = XatlClient("http://127.0.0.1:8000", api_key)
    donor = client.upload("stories260K.bin", purpose="donor")
    job = client.create_job({"type": "conversion", "donor": donor["id"], ...})
    for event in client.follow(job["id"]):
        print(event["message"])
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx


class APIFailure(Exception):
    """An error answer of the API: its status and envelope."""

    def __init__(self, status: int, error: dict):
        super().__init__(f"{status} {error.get('code') or error.get('type')}: {error.get('message')}")
        self.status, self.error = status, error


class XatlClient:
    def __init__(self, base_url: str, api_key: str, *, timeout: float = 60.0):
        self.http = httpx.Client(base_url=base_url.rstrip("/"), headers={"Authorization": f"Bearer {api_key}"},
                                 timeout=timeout)

    def _json(self, response: httpx.Response) -> dict:
        if response.status_code >= 400:
            try:
                error = response.json()["error"]
            except (ValueError, KeyError, TypeError):
                error = {"message": response.text[:500], "type": "http_error"}
            raise APIFailure(response.status_code, error)
        return response.json()

    # -- files -----------------------------------------------------------------------------------------------
    def upload(self, path: str | Path, *, purpose: str) -> dict:
        path = Path(path)
        with open(path, "rb") as handle:
            return self._json(self.http.post("/v1/files", data={"purpose": purpose},
                                             files={"file": (path.name, handle)}, timeout=None))

    def files(self, purpose: str | None = None) -> list[dict]:
        return self._json(self.http.get("/v1/files", params={"purpose": purpose} if purpose else {}))["data"]

    # -- jobs ------------------------------------------------------------------------------------------------
    def create_job(self, spec: dict, *, idempotency_key: str | None = None) -> dict:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._json(self.http.post("/v1/jobs", json=spec, headers=headers))

    def job(self, job_id: str) -> dict:
        return self._json(self.http.get(f"/v1/jobs/{job_id}"))

    def jobs(self, *, status: str | None = None, limit: int = 20, after: str | None = None) -> dict:
        params = {k: v for k, v in {"status": status, "limit": limit, "after": after}.items() if v is not None}
        return self._json(self.http.get("/v1/jobs", params=params))

    def cancel(self, job_id: str) -> dict:
        return self._json(self.http.post(f"/v1/jobs/{job_id}/cancel"))

    def events(self, job_id: str, *, after: str | None = None, limit: int = 100) -> dict:
        params = {"limit": limit, **({"after": after} if after else {})}
        return self._json(self.http.get(f"/v1/jobs/{job_id}/events", params=params))

    def follow(self, job_id: str, *, after: str | None = None) -> Iterator[dict]:
        """Every event of the job from `after` on, as they happen, until the job has ended. An error
        event (the server shutting down) raises `APIFailure`; follow again from the last event's id."""
        params = {"stream": "true", **({"after": after} if after else {})}
        with self.http.stream("GET", f"/v1/jobs/{job_id}/events", params=params, timeout=None) as response:
            if response.status_code >= 400:
                response.read()
                self._json(response)
            for line in response.iter_lines():
                if not line.startswith("data: "):
                    continue  # blank separators and keep-alive comments
                payload = line.removeprefix("data: ")
                if payload == "[DONE]":
                    return
                event = json.loads(payload)
                if "error" in event:  # the server is shutting down: follow again from the last event seen
                    raise APIFailure(503, event["error"])
                yield event

    # -- models and completions ------------------------------------------------------------------------------
    def models(self) -> list[str]:
        return [m["id"] for m in self._json(self.http.get("/v1/models"))["data"]]

    def complete(self, model: str, prompt: str, **options) -> Iterator[str]:
        """The completion's text as it streams."""
        body = {"model": model, "prompt": prompt, "stream": True, **options}
        with self.http.stream("POST", "/v1/completions", json=body, timeout=None) as response:
            if response.status_code >= 400:
                response.read()
                self._json(response)
            for line in response.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunk = json.loads(line.removeprefix("data: "))
                    if "error" in chunk:
                        raise APIFailure(500, chunk["error"])
                    if chunk.get("choices"):
                        yield chunk["choices"][0]["text"]

    def close(self) -> None:
        self.http.close()


__all__ = ["APIFailure", "XatlClient"]
