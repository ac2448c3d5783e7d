"""`/v1/files`: upload the text and donors jobs use, list, read and delete them.

`POST /v1/files` takes a multipart form with `file` and `purpose` (`train`, `validation`, `donor`).
The upload is checked before it is kept (`worker.files`): text must be UTF-8 (JSON lines one object
per line), donors llama2.c checkpoints and tokenizers, GGUF files, or `.tar`/`.zip` archives of a
Hugging Face folder with safetensors, unpacked safely; pickles are refused, never unpickled. A body
over `max_upload_bytes` is refused from its Content-Length before it is read.
"""

from __future__ import annotations

import shutil
from typing import Annotated, Literal

from fastapi import APIRouter, Form, Query, Request, UploadFile
from starlette.concurrency import run_in_threadpool

from service.deps import SettingsDep, StoreDep
from service.errors import APIError
from service.schemas.jobs import Deleted, FileList, FileObject
from worker.files import PURPOSES, FileRejected, Limits, safe_filename, store_upload
from worker.store import new_id

router = APIRouter(prefix="/v1/files", tags=["files"])


@router.post("")
async def upload_file(request: Request, file: UploadFile, purpose: Annotated[str, Form()], store: StoreDep,
                      settings: SettingsDep) -> FileObject:
    if purpose not in PURPOSES:
        raise APIError(400, f"purpose: must be one of {list(PURPOSES)}, got {purpose!r}", param="purpose",
                       code="invalid_purpose")
    file_id = new_id("file")
    folder = settings.files_dir / file_id
    folder.mkdir(parents=True)
    limits = Limits(max_bytes=settings.max_upload_bytes, max_unpacked_bytes=settings.max_unpacked_bytes)
    try:
        stored = await run_in_threadpool(store_upload, file.file, file.filename or "upload", purpose, folder, limits)
    except FileRejected as error:
        shutil.rmtree(folder, ignore_errors=True)
        status = 413 if error.code == "file_too_large" else 400
        raise APIError(status, str(error), param=error.param, code=error.code) from None
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    record = await run_in_threadpool(lambda: store.add_file(
        file_id=file_id, filename=safe_filename(file.filename or "upload"), purpose=purpose, bytes=stored.bytes,
        kind=stored.kind, path=str(stored.path.relative_to(settings.home)), details=stored.details))
    return FileObject.from_record(record)


@router.get("")
async def list_files(store: StoreDep, purpose: Literal["train", "validation", "donor"] | None = None,
                     after: Annotated[str | None, Query(min_length=1)] = None,
                     limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> FileList:
    try:
        page = await run_in_threadpool(lambda: store.list_files(purpose=purpose, after=after, limit=limit))
    except KeyError:
        raise APIError(400, f"after: no file {after}", param="after", code="invalid_cursor") from None
    return FileList(data=[FileObject.from_record(r) for r in page.items], has_more=page.has_more)


@router.get("/{file_id}")
async def get_file(file_id: str, store: StoreDep) -> FileObject:
    return FileObject.from_record(await _file(store, file_id))


@router.delete("/{file_id}")
async def delete_file(file_id: str, store: StoreDep, settings: SettingsDep) -> Deleted:
    record = await _file(store, file_id)
    users = await run_in_threadpool(_active_users, store, file_id)
    if users:
        raise APIError(409, f"file {file_id} is used by unfinished job(s) {', '.join(users)}; cancel them first",
                       param="file_id", code="file_in_use")
    await run_in_threadpool(store.delete_file, file_id)
    shutil.rmtree(settings.files_dir / file_id, ignore_errors=True)
    return Deleted(id=record["id"], object="file")


async def _file(store, file_id: str) -> dict:
    record = await run_in_threadpool(store.get_file, file_id)
    if record is None:
        raise APIError(404, f"no file {file_id}", param="file_id", code="file_not_found")
    return record


def _active_users(store, file_id: str) -> list[str]:
    """Unfinished jobs whose spec names the file (a resumed job reads its files again)."""
    return [job["id"] for job in store.active_jobs() if file_id in str(job["spec"])]
