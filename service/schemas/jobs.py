"""`/v1/jobs` and `/v1/files` bodies, in the shapes of OpenAI's fine-tuning and files APIs."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel


class JobError(BaseModel):
    code: str
    message: str
    param: str | None = None


class Job(BaseModel):
    id: str
    object: Literal["job"] = "job"
    type: Literal["conversion", "fine_tune"]
    status: Literal["queued", "running", "succeeded", "failed", "cancelling", "cancelled"]
    model: str  # the model the job publishes (servable once it has succeeded)
    created_at: int
    started_at: int | None = None
    finished_at: int | None = None
    attempts: int  # workers that took it up (more than one after a worker died)
    spec: dict[str, Any]
    progress: dict[str, Any] | None = None  # step, total_steps, tokens, loss, valid_loss, tokens_per_second, eta
    result: dict[str, Any] | None = None  # model, transfer, train, evaluation, profile
    error: JobError | None = None

    @classmethod
    def from_record(cls, record: dict) -> Job:
        times = {k: int(record[k]) if record[k] is not None else None
                 for k in ("created_at", "started_at", "finished_at")}
        return cls(id=record["id"], type=record["type"], status=record["status"], model=record["model"],
                   attempts=record["attempts"], spec=record["spec"], progress=record["progress"],
                   result=record["result"], error=record["error"], **times)


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Job]
    has_more: bool


class JobEvent(BaseModel):
    id: str  # event-<n>; pass it as `after` to read on from it
    object: Literal["job.event"] = "job.event"
    created_at: int
    level: Literal["info", "warning", "error"]
    type: str  # status, stage, metrics, checkpoint, resume, error
    message: str
    data: dict[str, Any] | None = None

    @classmethod
    def from_record(cls, record: dict) -> JobEvent:
        return cls(id=f"event-{record['id']}", created_at=int(record["created_at"]), level=record["level"],
                   type=record["type"], message=record["message"], data=record["data"])


class JobEventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobEvent]
    has_more: bool


class Checkpoint(BaseModel):
    id: str
    object: Literal["job.checkpoint"] = "job.checkpoint"
    job_id: str
    stage: str = "train"  # the training stage that saved it: train or attention_transfer
    step: int
    created_at: int
    metrics: dict[str, Any] | None = None


class CheckpointList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Checkpoint]
    has_more: bool = False


class Artifact(BaseModel):
    name: str
    bytes: int
    url: str


class ArtifactList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Artifact]


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: Literal["train", "validation", "donor"]
    status: Literal["processed"] = "processed"
    kind: str  # text, jsonl, llama2c_checkpoint, llama2c_tokenizer, hf_folder, gguf
    details: dict[str, Any] | None = None

    @classmethod
    def from_record(cls, record: dict) -> FileObject:
        return cls(id=record["id"], bytes=record["bytes"], created_at=int(record["created_at"]),
                   filename=record["filename"], purpose=record["purpose"], kind=record["kind"],
                   details=record["details"])


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    has_more: bool


class Deleted(BaseModel):
    id: str
    object: str
    deleted: bool = True
