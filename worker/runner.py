"""`python -m worker.runner JOB_ID OWNER`: run one job through `xatl.pipeline`, in the child
process a worker starts for it (`worker.tasks`), and record how it went.

It turns the stored spec into the library's `PipelineSpec` (file ids and paths resolved to files
on the shared data volume), runs it in `<data_dir>/jobs/<id>/` — where an earlier attempt's
stages and checkpoints are found and reused — and publishes the model to `<models_dir>/<name>`.
Events become job events and progress; checkpoints are recorded as they are saved. It stops
between steps when the job is cancelled, when its lease is lost, or on SIGTERM (the worker is
shutting down: a checkpoint is saved and it exits `EXIT_SUSPENDED`, to be resumed).
Settings come from the environment the worker passes (`XATL_…`).
"""

from __future__ import annotations

import errno
import glob
import logging
import os
import shutil
import signal
import sys
import time
import traceback
from pathlib import Path

from pydantic import TypeAdapter

from worker.config import WorkerSettings
from worker.files import FileRejected, check_local
from worker.guard import die_with_parent
from worker.references import BadReference, check_path, classify
from worker.specs import TEXT_FIELDS, ConversionJob, JobSpec
from worker.store import JobStore

logger = logging.getLogger("xatl.runner")
STOP_POLL_SECONDS = 1.0  # how often the store is asked whether the job was cancelled
EXIT_SUSPENDED = 75  # EX_TEMPFAIL: stopped on SIGTERM with a checkpoint, to be resumed
EXIT_LEASE_LOST = 76  # another worker holds the job: nothing more was written


class JobFailed(Exception):
    def __init__(self, message: str, *, code: str, param: str | None = None):
        super().__init__(message)
        self.code, self.param = code, param


class _Stop:
    """`should_stop` for the pipeline: cancelled, lease lost, or SIGTERM — polled after every step."""

    def __init__(self, store: JobStore, job_id: str, owner: str):
        self.store, self.job_id, self.owner = store, job_id, owner
        self.reason: str | None = None
        self._checked = 0.0
        signal.signal(signal.SIGTERM, self._suspend)

    def _suspend(self, *_):
        self.reason = self.reason or "suspend"

    def __call__(self) -> bool:
        if self.reason is None and time.monotonic() - self._checked >= STOP_POLL_SECONDS:
            self._checked = time.monotonic()
            try:
                if not self.store.holds(self.job_id, self.owner):
                    self.reason = "lease lost"
                elif self.store.cancel_requested(self.job_id):
                    self.reason = "cancel"
            except Exception:  # a blip of the database must not stop training
                logger.exception("could not read the job's state")
        return self.reason is not None


class _Recorder:
    """The pipeline's events as job events, checkpoints and progress."""

    def __init__(self, store: JobStore, job_id: str, owner: str, data_dir: Path):
        self.store, self.job_id, self.owner, self.data_dir = store, job_id, owner, data_dir
        self.progress: dict = {}

    def __call__(self, event: dict) -> None:
        kind = event["event"]
        add = self.store.add_event
        if kind == "stage":
            self.progress["stage"] = event["stage"]
            details = {k: v for k, v in event.items() if k not in ("event", "time")}
            add(self.job_id, "stage", f"{event['stage']} {event['status']}", details)
        elif kind == "train":
            progress = self.progress
            progress["stage"] = event.get("stage", progress.get("stage"))
            progress.update(step=event["step"], total_steps=event["total_steps"], tokens=event["tokens"],
                            loss=event["loss"], tokens_per_second=event.get("tokens_per_second"))
            rate = event.get("tokens_per_second")
            remaining = event["total_steps"] - event["step"]
            progress["eta_seconds"] = (remaining * event["tokens"] / event["step"] / rate) if rate else None
            add(self.job_id, "metrics", f"{_prefix(event)}step {event['step']}/{event['total_steps']}: "
                f"{_loss_name(event)} {event['loss']:.4f}", {k: v for k, v in event.items() if k != "event"})
        elif kind == "eval":
            if event.get("stage", "train") == "train":  # attention transfer's is a layer error, not a loss
                self.progress["valid_loss"] = event["valid_loss"]
            add(self.job_id, "metrics", f"{_prefix(event)}step {event['step']}: validation {_loss_name(event)} "
                f"{event['valid_loss']:.4f}", {k: v for k, v in event.items() if k != "event"})
        elif kind == "checkpoint":
            path = Path(event["path"]).resolve()
            relative = str(path.relative_to(self.data_dir.resolve())) if path.is_relative_to(
                self.data_dir.resolve()) else str(path)
            stage = event.get("stage", "train")
            self.store.add_checkpoint(self.job_id, event["step"], relative, {"loss": self.progress.get("loss")},
                                      stage=stage)
            add(self.job_id, "checkpoint", f"{_prefix(event)}checkpoint at step {event['step']}",
                {"step": event["step"], "stage": stage})
        elif kind == "resume":
            add(self.job_id, "resume", f"{_prefix(event)}resumed from the checkpoint at step {event['step']}",
                {"step": event["step"], "stage": event.get("stage", "train")})
        elif kind == "unfreeze":
            add(self.job_id, "metrics", f"step {event['step']}: transferred weights unfrozen ({event['rule']})",
                {"step": event["step"], "rule": event["rule"]})
        elif kind == "published":
            add(self.job_id, "stage", "model published", {"model": Path(event["path"]).name})
        else:
            return  # the loop's done/stopped: the pipeline reports the outcome
        if kind in ("stage", "train", "eval"):
            self.store.set_progress(self.job_id, self.owner, dict(self.progress))


def _prefix(event: dict) -> str:
    return "attention transfer " if event.get("stage") == "attention_transfer" else ""


def _loss_name(event: dict) -> str:
    return "error (mean over layers)" if event.get("stage") == "attention_transfer" else "loss"


def build_pipeline(spec, settings: WorkerSettings, store: JobStore, model_name: str):
    """The library's `PipelineSpec` for a job spec, its file references made paths."""
    from xatl.pipeline import AttentionTransferStage, ConvertStage, EvaluateStage, PipelineSpec, TrainStage
    from xatl.training import TrainConfig
    from xatl.training.attention_transfer import AttentionTransferConfig

    def local(reference: str, param: str) -> str:
        return resolve_reference(reference, param, settings, store)

    convert = base_model = None
    datasets: list[str] = []
    if isinstance(spec, ConversionJob):
        convert = ConvertStage(donor=local(spec.donor, "donor"),
                               tokenizer=local(spec.tokenizer, "tokenizer") if spec.tokenizer else None,
                               mixer=spec.mixer, attention_layers=spec.attention_layers, transfer=spec.transfer,
                               mixer_options=spec.mixer_options or None, seed=spec.seed)
    else:
        folder = settings.resolved_models_dir / spec.model
        if not (folder / "config.json").is_file():
            raise JobFailed(f"model {spec.model!r} is not served here", code="model_not_found", param="model")
        base_model = str(folder)
    stages = spec.stages if isinstance(spec, ConversionJob) else ["train"]
    train = attention_transfer = None
    if spec.training is not None and "train" in stages:
        t = spec.training
        datasets = [_file_name(f, store) for f in t.files]
        try:
            config = TrainConfig(**t.train_config())
        except ValueError as error:
            raise JobFailed(str(error), code="invalid_training", param="training") from None
        data = _text(t.model_dump(include=set(TEXT_FIELDS)), "training", local)
        train = TrainStage(config=config, data=data, freeze_initialised=t.freeze_initialised)
    if isinstance(spec, ConversionJob) and "attention_transfer" in stages:
        a = spec.attention_transfer
        text = a.text(spec.training)
        section = "attention_transfer" if a.files else "training"
        datasets += [n for f in (text["training_files"] or [text["training_file"]])
                     if (n := _file_name(f, store)) not in datasets]
        try:
            config = AttentionTransferConfig(**a.attention_transfer_config())
        except ValueError as error:
            raise JobFailed(str(error), code="invalid_attention_transfer", param="attention_transfer") from None
        attention_transfer = AttentionTransferStage(config=config, data=_text(text, section, local))
    e = spec.evaluation
    evaluate = EvaluateStage(
        data=[local(e.validation_file, "evaluation.validation_file")] if e.validation_file else None,
        max_batches=e.max_batches, lm_eval_tasks=e.lm_eval_tasks, lm_eval_limit=e.lm_eval_limit,
        contexts=e.contexts, decode_tokens=e.decode_tokens)
    device = "cpu" if spec.gpus == 0 else None
    return PipelineSpec(convert=convert, base_model=base_model, attention_transfer=attention_transfer, train=train,
                        evaluate=evaluate, name=model_name, device=device, datasets=datasets,
                        precision=spec.precision)


def _text(text: dict, section: str, local):
    """`TrainingData` from a section's text fields (see `worker.specs.TEXT_FIELDS`), files made paths."""
    from xatl.training.run import TrainingData

    files = [text["training_file"]] if text["training_file"] else list(text["training_files"] or [])
    valid = text["validation_file"]
    return TrainingData(data=[local(f, f"{section}.training_file") for f in files],
                        valid_data=[local(valid, f"{section}.validation_file")] if valid else None,
                        valid_fraction=text["valid_fraction"], split_by=text["split_by"],
                        text_field=text["text_field"], block_size=text["block_size"])


def resolve_reference(reference: str, param: str, settings: WorkerSettings, store: JobStore) -> str:
    """A spec's file reference as what `xatl` loads: a local path, or a hub id as it is."""
    ref = classify(reference, param)
    if ref.kind == "hub":
        return ref.value
    if ref.kind == "path":
        return str(check_path(ref.value, settings.import_roots, param))
    record = store.get_file(ref.value)
    if record is None:
        raise BadReference(f"{param}: no file {ref.value}", param=param, code="file_not_found", status=404)
    return str(settings.home / record["path"])


def check_local_files(spec, settings: WorkerSettings) -> None:
    """Files and folders the spec names by path get the checks an upload gets (`worker.files`):
    a pickle is refused unread, a malformed safetensors header or config, non-UTF-8 or binary text
    is a failed job naming the field — never something the library half-loads."""
    named = []
    if isinstance(spec, ConversionJob):
        named += [("donor", spec.donor, "donor")] + ([("tokenizer", spec.tokenizer, "donor")] if spec.tokenizer else [])
    if spec.training is not None:
        named += [("training.training_file", f, "train") for f in spec.training.files]
        if spec.training.validation_file:
            named.append(("training.validation_file", spec.training.validation_file, "validation"))
    if spec.evaluation.validation_file:
        named.append(("evaluation.validation_file", spec.evaluation.validation_file, "validation"))
    for param, reference, purpose in named:
        ref = classify(reference, param)
        if ref.kind != "path":
            continue  # uploads were checked when they came; hub models are the hub's
        path = check_path(ref.value, settings.import_roots, param)
        try:
            check_local(path, purpose)
        except FileRejected as error:
            raise JobFailed(f"{param}: {error}", code=error.code, param=param) from None


def _file_name(reference: str, store: JobStore) -> str:
    if reference.startswith("file-") and (record := store.get_file(reference)) is not None:
        return record["filename"]
    return Path(reference).name if reference.startswith("/") else reference


def main(argv: list[str]) -> int:
    job_id, owner = argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    die_with_parent()  # under torchrun: go when the launcher goes
    settings = WorkerSettings()
    store = JobStore(settings.resolved_database_url)
    job = store.get_job(job_id)
    if job is None or job["lease_owner"] != owner:
        logger.error("job %s is not leased to %s", job_id, owner)
        return EXIT_LEASE_LOST
    stop = _Stop(store, job_id, owner)
    record = _Recorder(store, job_id, owner, settings.home)
    try:
        spec = TypeAdapter(JobSpec).validate_python(job["spec"])
        check_local_files(spec, settings)  # before torch is imported: a bad file fails the job in a second
        from xatl.pipeline import run_pipeline

        pipeline = build_pipeline(spec, settings, store, job["model"])
        remove_unfinished_publish(settings.resolved_models_dir, job["model"])
        result = run_pipeline(pipeline, settings.jobs_dir / job_id,
                              publish_to=settings.resolved_models_dir / job["model"], job_id=job_id,
                              on_event=record, should_stop=stop)
    except Exception as error:  # every way a job can fail ends as a failed job with a message
        return _fail(store, job_id, owner, error, settings)
    if result.stopped:
        if stop.reason == "cancel":
            store.add_event(job_id, "status", "cancelled; its checkpoints are kept")
            store.finish(job_id, owner, "cancelled")
            return 0
        return EXIT_LEASE_LOST if stop.reason == "lease lost" else EXIT_SUSPENDED
    if result.model_dir is None:  # a rank other than 0 under torchrun: rank 0 records the outcome
        return 0
    store.add_model(job["model"], job_id)
    figures = {k: v for k, v in result.to_dict().items() if k not in ("stopped", "model_dir")}
    outcome = {"model": job["model"], **figures}
    store.add_event(job_id, "status", f"succeeded: model {job['model']} is served")
    store.finish(job_id, owner, "succeeded", result=outcome)
    return 0


def remove_unfinished_publish(models_dir: Path, model: str) -> None:
    """The hidden staging folders an earlier attempt, killed while publishing, left beside the models
    (never listed, but taking space). The job's lease makes this attempt the only one writing them."""
    for staging in models_dir.glob(f".{glob.escape(model)}.*.partial"):
        shutil.rmtree(staging, ignore_errors=True)


def _fail(store: JobStore, job_id: str, owner: str, error: Exception, settings: WorkerSettings) -> int:
    storage = storage_problem(error, settings)
    if storage is not None:
        (code, message), param = storage, None
    elif isinstance(error, JobFailed | BadReference):
        code, param = error.code, error.param
    elif type(error).__name__ == "OutOfMemoryError":
        code, param = "out_of_memory", None
    elif isinstance(error, ValueError | FileNotFoundError | NotADirectoryError | KeyError):
        code, param = "invalid_job", None  # the library's word on a spec it cannot run
    else:
        code, param = "internal_error", None
    if storage is None:
        message = str(error) or type(error).__name__
    logger.error("job %s failed:\n%s", job_id, traceback.format_exc())
    store.add_event(job_id, "error", message, {"code": code, "param": param}, level="error")
    store.finish(job_id, owner, "failed", error={"code": code, "message": message, "param": param})
    return 0


STORAGE_ERRORS = {  # errno → (code, what it means for the data directory)
    errno.ENOSPC: ("storage_full", "is full"), errno.EDQUOT: ("storage_full", "is over its quota"),
    errno.EROFS: ("storage_unwritable", "cannot be written (a read-only file system)"),
    errno.EACCES: ("storage_unwritable", "cannot be written (permission denied)"),
    errno.EPERM: ("storage_unwritable", "cannot be written (operation not permitted)"),
    errno.ENOTDIR: ("storage_unwritable", "cannot be written (a file stands where a folder should be)"),
}
ONLY_INSIDE = (errno.EACCES, errno.EPERM, errno.ENOTDIR)  # elsewhere (an import root, say), not a storage problem
STORAGE_TEXT = {"No space left on device": errno.ENOSPC, "Disk quota exceeded": errno.EDQUOT,
                "Read-only file system": errno.EROFS}  # as torch's and safetensors' own errors put it


def storage_problem(error: BaseException, settings: WorkerSettings) -> tuple[str, str] | None:
    """(code, message) when `error` comes from the data directory being full or unwritable — however
    deep in the library it was raised, and whether or not as an `OSError` — else None."""
    found, seen, chain = None, error, 0
    while seen is not None and found is None and chain < 20:  # a chain of causes (a cycle stops at 20)
        if isinstance(seen, OSError) and seen.errno in STORAGE_ERRORS:
            found = seen.errno, seen.filename
        else:
            found = next(((number, None) for text, number in STORAGE_TEXT.items() if text in str(seen)), None)
        seen, chain = seen.__cause__ or seen.__context__, chain + 1
    if found is None:
        return None
    number, filename = found
    code, meaning = STORAGE_ERRORS[number]
    roots = [("data directory", settings.home.resolve()),
             ("models directory", settings.resolved_models_dir.resolve())]
    where, what = "data directory", ""
    if filename is not None:
        path = Path(os.fsdecode(filename)).resolve()
        inside = [(name, root) for name, root in roots if path.is_relative_to(root)]
        if not inside:
            return None if number in ONLY_INSIDE else (code, str(error))
        where, root = inside[-1]  # the models directory lies inside the data directory by default
        what = f": {path.relative_to(root)} could not be written"
    return code, f"the {where} {meaning}{what}; the job stopped and its checkpoints are kept"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
