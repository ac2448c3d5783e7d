"""`/v1/jobs`: create a conversion or fine-tune job, list and read jobs, cancel one, follow its
events (`?stream=true`: server-sent events until it ends), its checkpoints and its artifacts.

Creating a job checks everything that can be checked without torch — the spec's fields, the files
it names, the model it fine-tunes, the name it will publish — stores it and sends its id to the
queue; it returns at once with `status: "queued"`. An `Idempotency-Key` header makes a retried
create return the job the first one made. If the queue cannot be reached the job is still stored,
and a worker's sweep sends it later. This module imports neither torch nor the worker's tasks.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import FileResponse, StreamingResponse
from pydantic import TypeAdapter, ValidationError
from starlette.concurrency import run_in_threadpool

from service.deps import SettingsDep, StoreDep
from service.errors import APIError, error_body, validation_error
from service.schemas.jobs import (
    Artifact,
    ArtifactList,
    Checkpoint,
    CheckpointList,
    Job,
    JobEvent,
    JobEventList,
    JobList,
)
from worker.celery_app import queue_for
from worker.references import BadReference, check_path, classify
from worker.specs import ConversionJob, FineTuneJob, JobSpec, default_model_name
from worker.store import TERMINAL, new_id

logger = logging.getLogger(__name__)
JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelling", "cancelled"]
router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

SPEC = TypeAdapter(JobSpec)
ARTIFACTS = {  # name → media type
    "metrics.jsonl": "application/x-ndjson",
    "loss_curve.png": "image/png",
    "transfer_report.json": "application/json",
    "README.md": "text/markdown",
}
FILE_FIELDS = {  # spec field → the upload purposes it takes
    "donor": ("donor",), "tokenizer": ("donor",), "training.training_file": ("train",),
    "training.validation_file": ("validation", "train"), "evaluation.validation_file": ("validation", "train"),
    "attention_transfer.training_file": ("train",), "attention_transfer.validation_file": ("validation", "train"),
}
POLL_SECONDS = 0.5


@router.post("")
async def create_job(request: Request, store: StoreDep, settings: SettingsDep,
                     idempotency_key: Annotated[str | None, Header(max_length=200)] = None) -> Job:
    try:
        body = await request.json()
    except ValueError as error:
        raise APIError(400, f"the request body is not valid JSON: {error}", code="json_invalid") from None
    try:
        spec = SPEC.validate_python(body)
    except ValidationError as error:
        raise validation_error(error, union_tags=("conversion", "fine_tune")) from None
    canonical = spec.model_dump(mode="json")
    if idempotency_key is not None:
        earlier = await run_in_threadpool(store.job_by_key, idempotency_key)
        if earlier is not None:
            if earlier["spec"] != canonical:
                raise APIError(409, "this Idempotency-Key was used for another job body", param="Idempotency-Key",
                               code="idempotency_key_reused")
            return Job.from_record(earlier)
    job_id = new_id("job")
    queue = queue_for(spec.gpus, settings.default_queue)
    record, created = await run_in_threadpool(_create, spec, canonical, job_id, queue, idempotency_key, store,
                                              settings)
    if created:
        await run_in_threadpool(_dispatch, request, job_id, queue)
    return Job.from_record(record)


@router.get("")
async def list_jobs(store: StoreDep, after: Annotated[str | None, Query(min_length=1)] = None,
                    limit: Annotated[int, Query(ge=1, le=100)] = 20, status: JobStatus | None = None) -> JobList:
    try:
        page = await run_in_threadpool(lambda: store.list_jobs(after=after, limit=limit, status=status))
    except KeyError:
        raise APIError(400, f"after: no job {after}", param="after", code="invalid_cursor") from None
    return JobList(data=[Job.from_record(r) for r in page.items], has_more=page.has_more)


@router.get("/{job_id}")
async def get_job(job_id: str, store: StoreDep) -> Job:
    return Job.from_record(await _job(store, job_id))


@router.post("/{job_id}/cancel")
async def cancel_job(job_id: str, store: StoreDep) -> Job:
    await _job(store, job_id)
    record = await run_in_threadpool(store.request_cancel, job_id)
    if record["status"] == "cancelled" and record["finished_at"] and not record["started_at"]:
        await run_in_threadpool(store.add_event, job_id, "status", "cancelled before it started")
    elif record["status"] == "cancelling":
        await run_in_threadpool(store.add_event, job_id, "status", "cancel requested: stopping at the next step")
    return Job.from_record(record)


@router.get("/{job_id}/events", response_model=None)
async def list_events(job_id: str, request: Request, store: StoreDep,
                      after: Annotated[str | None, Query(min_length=1)] = None,
                      limit: Annotated[int, Query(ge=1, le=1000)] = 100,
                      stream: bool = False) -> JobEventList | StreamingResponse:
    """Oldest first. `after`: the id of the last event seen. `stream=true`: every event from `after` on as
    server-sent events (`data: {event}`), then `data: [DONE]` once the job has ended."""
    await _job(store, job_id)
    cursor = _event_cursor(after)
    if stream:
        return StreamingResponse(_follow(request, store, job_id, cursor), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    page = await run_in_threadpool(lambda: store.list_events(job_id, after=cursor, limit=limit))
    return JobEventList(data=[JobEvent.from_record(r) for r in page.items], has_more=page.has_more)


@router.get("/{job_id}/checkpoints")
async def list_checkpoints(job_id: str, store: StoreDep) -> CheckpointList:
    await _job(store, job_id)
    rows = await run_in_threadpool(store.list_checkpoints, job_id)
    return CheckpointList(data=[Checkpoint(id=r["id"], job_id=job_id, stage=r["stage"], step=r["step"],
                                           created_at=int(r["created_at"]), metrics=r["metrics"]) for r in rows])


@router.get("/{job_id}/artifacts")
async def list_artifacts(job_id: str, store: StoreDep, settings: SettingsDep) -> ArtifactList:
    job = await _job(store, job_id)
    found = [(name, path) for name in ARTIFACTS if (path := _artifact(settings, job, name)) is not None]
    return ArtifactList(data=[Artifact(name=name, bytes=path.stat().st_size,
                                       url=f"/v1/jobs/{job_id}/artifacts/{name}") for name, path in found])


@router.get("/{job_id}/artifacts/{name}", response_model=None)
async def get_artifact(job_id: str, name: str, store: StoreDep, settings: SettingsDep) -> FileResponse:
    job = await _job(store, job_id)
    if name not in ARTIFACTS:
        raise APIError(404, f"no artifact {name!r}; jobs have {sorted(ARTIFACTS)}", param="name",
                       code="artifact_not_found")
    path = _artifact(settings, job, name)
    if path is None:
        raise APIError(404, f"job {job_id} has no {name} (yet)", param="name", code="artifact_not_found")
    return FileResponse(path, media_type=ARTIFACTS[name], filename=name)


# -- helpers ------------------------------------------------------------------------------------------------

async def _job(store, job_id: str) -> dict:
    record = await run_in_threadpool(store.get_job, job_id)
    if record is None:
        raise APIError(404, f"no job {job_id}", param="job_id", code="job_not_found")
    return record


def _create(spec, canonical: dict, job_id: str, queue: str, idempotency_key: str | None, store, settings):
    """Check, then store the job with its first event: one trip to a worker thread, two to the database."""
    name = _check(spec, job_id, store, settings)
    base = spec.model if isinstance(spec, FineTuneJob) else None
    return store.create_job(job_id=job_id, type=spec.type, spec=canonical, queue=queue, model=name, base_model=base,
                            idempotency_key=idempotency_key, event=f"queued on {queue}")


def _check(spec: ConversionJob | FineTuneJob, job_id: str, store, settings) -> str:
    """Refuse now what a worker would refuse later; return the name the job will publish."""
    for field, reference in _references(spec):
        try:
            ref = classify(reference, field)
            if ref.kind == "path":
                check_path(ref.value, settings.import_roots, field)
            elif ref.kind == "file":
                record = store.get_file(ref.value)
                if record is None:
                    raise BadReference(f"{field}: no file {ref.value}", param=field, code="file_not_found", status=404)
                purposes = FILE_FIELDS.get(field.split("[")[0], ())
                if purposes and record["purpose"] not in purposes:
                    raise BadReference(f"{field}: file {ref.value} was uploaded for {record['purpose']!r}, this field "
                                       f"takes a file uploaded for {' or '.join(map(repr, purposes))}", param=field,
                                       code="wrong_file_purpose")
        except BadReference as error:
            raise APIError(error.status, str(error), param=error.param, code=error.code) from None
    models = settings.resolved_models_dir
    if isinstance(spec, FineTuneJob) and not (models / spec.model / "config.json").is_file():
        raise APIError(404, f"model: no model {spec.model!r} is served here", param="model", code="model_not_found")
    donor_name = None
    if isinstance(spec, ConversionJob):
        donor_name = spec.donor
        if spec.donor.startswith("file-") and (record := store.get_file(spec.donor)) is not None:
            donor_name = record["filename"]
    name = default_model_name(spec, job_id, donor_name)
    if (models / name).exists() or store.model_in_use(name) is not None:
        raise APIError(409, f"name: a model named {name!r} exists or is being made", param="name",
                       code="model_exists")
    return name


def _references(spec) -> list[tuple[str, str]]:
    found = []
    if isinstance(spec, ConversionJob):
        found.append(("donor", spec.donor))
        if spec.tokenizer:
            found.append(("tokenizer", spec.tokenizer))
    if spec.training is not None:
        found += [("training.training_file", f) for f in spec.training.files]
        if spec.training.validation_file:
            found.append(("training.validation_file", spec.training.validation_file))
    if isinstance(spec, ConversionJob) and spec.attention_transfer is not None:
        found += [("attention_transfer.training_file", f) for f in spec.attention_transfer.files]
        if spec.attention_transfer.validation_file:
            found.append(("attention_transfer.validation_file", spec.attention_transfer.validation_file))
    if spec.evaluation.validation_file:
        found.append(("evaluation.validation_file", spec.evaluation.validation_file))
    return found


def _dispatch(request: Request, job_id: str, queue: str) -> None:
    try:
        request.app.state.dispatch(job_id, queue)
    except Exception as error:  # the queue is unreachable: the job is stored, and a worker's sweep sends it later
        logger.warning("could not send job %s to the queue %s (%s); it stays queued", job_id, queue, error)


def _event_cursor(after: str | None) -> int | None:
    if after is None:
        return None
    try:
        return int(after.removeprefix("event-"))
    except ValueError:
        raise APIError(400, f"after: {after!r} is not an event id (event-<n>)", param="after",
                       code="invalid_cursor") from None


async def _follow(request: Request, store, job_id: str, cursor: int | None):
    """Server-sent events of the job, from `cursor` on, until it has ended and every event is sent —
    or until the server begins to shut down: then an error event says where to follow again from."""
    idle = 0.0
    stopping = request.app.state.stopping
    while True:
        page = await run_in_threadpool(store.list_events, job_id, after=cursor, limit=500)
        for record in page.items:
            cursor = record["id"]
            yield f"data: {JobEvent.from_record(record).model_dump_json()}\n\n"
        if page.has_more:
            continue
        job = await run_in_threadpool(store.get_job, job_id)
        if job["status"] in TERMINAL:
            # events written just before the final status are read above; one more look catches a last one
            last = await run_in_threadpool(store.list_events, job_id, after=cursor, limit=500)
            for record in last.items:
                yield f"data: {JobEvent.from_record(record).model_dump_json()}\n\n"
            yield "data: [DONE]\n\n"
            return
        if await request.is_disconnected():
            return
        if stopping.is_set():
            since = f"after=event-{cursor}" if cursor is not None else "the start"
            error = error_body(f"the server is shutting down; follow the job again from {since}", "server_error",
                               code="server_shutting_down")
            yield f"data: {json.dumps(error)}\n\ndata: [DONE]\n\n"
            return
        await asyncio.sleep(POLL_SECONDS)
        idle += POLL_SECONDS
        if idle >= 15:  # a comment keeps proxies from closing a quiet stream
            idle = 0.0
            yield ": keep-alive\n\n"


def _artifact(settings, job: dict, name: str) -> Path | None:
    """An artifact from the published model, or from the job's folder while it runs."""
    candidates = [settings.resolved_models_dir / job["model"] / name]
    work = settings.jobs_dir / job["id"]
    candidates += [work / "model" / name, work / "train" / name, work / "converted" / name]
    return next((path for path in candidates if path.is_file()), None)


__all__ = ["router"]
