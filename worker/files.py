"""Uploaded files (`POST /v1/files`): stored under a safe name, checked for their purpose, archives
unpacked safely. The same checks serve files that job specs name by path.

- `train`, `validation`: `.txt` (UTF-8 text) or `.jsonl` (one JSON object per non-empty line).
- `donor`: a llama2.c checkpoint or tokenizer `.bin`, a `.gguf` file, or a `.tar`/`.tar.gz`/`.tgz`/
  `.zip` of a Hugging Face model folder with safetensors weights. Pickles are refused, never unpickled.

Every refusal is a `FileRejected` with a `code` the API returns (see `REFUSAL_CODES`). Torch-free
and stdlib only: the routes that take uploads must not import torch. Files are read in pieces, so
a multi-GB upload is never held in memory.
"""

from __future__ import annotations

import codecs
import json
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from worker.archives import ARCHIVE_SUFFIXES, archive_suffix, empty_folder, unpack_archive
from worker.donor_files import (
    check_gguf,
    check_hf_folder,
    check_llama2c,
    check_llama2c_checkpoint,
    check_llama2c_tokenizer,
    check_safetensors,
    refuse_pickle,
)
from worker.file_policy import CHUNK_BYTES, DEFAULT_LIMITS, FileRejected, Limits, readable_size

__all__ = [
    "PURPOSES", "REFUSAL_CODES", "FileRejected", "Limits", "StoredFile", "store_upload", "safe_filename",
    "check_text", "check_jsonl", "check_llama2c", "check_llama2c_checkpoint", "check_llama2c_tokenizer", "check_gguf",
    "check_safetensors", "check_hf_folder", "check_local", "unpack_archive",
]

PURPOSES = ("train", "validation", "donor")
TEXT_SUFFIXES = (".txt", ".jsonl")
DONOR_SUFFIXES = (".bin", ".gguf", *ARCHIVE_SUFFIXES)
REFUSAL_CODES = {
    "invalid_purpose": "purpose is not one of PURPOSES (param 'purpose')",
    "unsupported_file_type": "a suffix the purpose does not take",
    "file_too_large": "the upload passed Limits.max_bytes",
    "empty_file": "a training or validation file without text",
    "not_utf8": "text that is not UTF-8 (the message gives the byte offset)",
    "binary_content": "a NUL byte in text (the message gives the byte offset)",
    "invalid_jsonl": "a line that is not a JSON object (the message gives the line)",
    "invalid_llama2c": "a .bin that is neither a llama2.c checkpoint nor tokenizer",
    "invalid_gguf": "a .gguf without the GGUF magic and a known version",
    "pickle_refused": "a pickle or torch.save file, never unpickled",
    "invalid_archive": "an archive that cannot be read, encrypted or with clashing members",
    "unsafe_archive_member": "an absolute path, '..', a link, device or fifo in an archive",
    "too_many_members": "more entries than Limits.max_members",
    "archive_too_large": "an archive unpacking past Limits.max_unpacked_bytes",
    "invalid_model_folder": "no config.json with a model_type, or no safetensors weights",
    "invalid_safetensors": "a malformed or truncated safetensors file",
}
MAX_JSONL_LINE_BYTES = 64 << 20
MAX_NAME_BYTES = 200  # below the 255 of common file systems, leaving room for suffixes the caller adds
KIND_BY_SUFFIX = {".txt": "text", ".jsonl": "jsonl", ".gguf": "gguf"}


@dataclass
class StoredFile:
    path: Path  # the stored file, or the unpacked folder for an archive
    kind: str  # "text" | "jsonl" | "llama2c_checkpoint" | "llama2c_tokenizer" | "hf_folder" | "gguf"
    bytes: int  # size of the upload as received
    details: dict  # what was learnt: {"lines": n} for jsonl, the header of a llama2.c checkpoint, ...


def store_upload(
    source: BinaryIO, filename: str, purpose: str, dest: Path, limits: Limits = DEFAULT_LIMITS
) -> StoredFile:
    """Stream `source` into `dest` (a new, empty folder the caller made for this file) under a safe
    version of `filename`, refusing it as soon as it passes limits.max_bytes (without reading the rest
    into memory), then check it for `purpose`; on any refusal remove what was written and raise FileRejected.

    An archive is unpacked into `dest/<its name without suffix>` and then deleted."""
    if purpose not in PURPOSES:
        raise FileRejected(f"purpose must be one of {', '.join(PURPOSES)}, not {purpose!r}",
                           code="invalid_purpose", param="purpose")
    name = safe_filename(filename)
    suffix = file_suffix(name)
    allowed = DONOR_SUFFIXES if purpose == "donor" else TEXT_SUFFIXES
    if suffix not in allowed:
        raise FileRejected(
            f"{name}: a {purpose} file must end in {', '.join(allowed)}, not {suffix or 'no suffix'}",
            code="unsupported_file_type",
        )
    dest = Path(dest)
    if not dest.is_dir() or any(dest.iterdir()):
        raise ValueError(f"{dest} must be an existing, empty folder")
    try:
        path = dest / name
        size = _write_limited(source, path, limits.max_bytes)
        kind, details, stored = _check_stored(path, suffix, limits)
    except BaseException:
        empty_folder(dest)  # a refusal, a full disk or a dropped connection: nothing half-stored stays
        raise
    return StoredFile(stored, kind, size, details)


def _write_limited(source: BinaryIO, path: Path, max_bytes: int) -> int:
    received = 0
    with open(path, "xb") as out:
        while chunk := source.read(CHUNK_BYTES):
            received += len(chunk)
            if received > max_bytes:
                raise FileRejected(f"{path.name} is larger than {readable_size(max_bytes)}, the upload limit",
                                   code="file_too_large")
            out.write(chunk)
    return received


def _check_stored(path: Path, suffix: str, limits: Limits) -> tuple[str, dict, Path]:
    if suffix == ".txt":
        return "text", check_text(path), path
    if suffix == ".jsonl":
        return "jsonl", check_jsonl(path), path
    if suffix == ".gguf":
        return "gguf", check_gguf(path), path
    if suffix == ".bin":
        return (*check_llama2c(path), path)
    folder = path.with_name(path.name[: -len(suffix)] or "model")
    unpack_archive(path, folder, limits)
    path.unlink()  # the unpacked folder is what is kept: no need for twice the disk
    return "hf_folder", check_hf_folder(folder), folder


def check_local(path: Path, purpose: str) -> str:
    """The checks of an upload for a file or folder a job names by path (under an import root), so
    that it is refused the same way — pickles unread, malformed safetensors, non-UTF-8 or binary
    text — before the library loads it. Returns its kind; `FileRejected` otherwise."""
    path = Path(path)
    if purpose == "donor":
        if path.is_dir():
            check_hf_folder(path)
            return "hf_folder"
        suffix = path.suffix.lower()
        if suffix == ".bin":
            return check_llama2c(path)[0]
        if suffix == ".gguf":
            check_gguf(path)
            return "gguf"
        if suffix == ".safetensors":
            check_safetensors(path)
            return "safetensors"
        refuse_pickle(path)
        raise FileRejected(f"{path.name}: a donor named by path is a model folder, a llama2.c .bin or a .gguf "
                           f"file, not {suffix or 'a file without suffix'}", code="unsupported_file_type")
    texts = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES
                   and not p.name.startswith(".")) if path.is_dir() else [path]
    for text in texts:  # a folder of text files (a saved `datasets` folder holds none: the library reads it)
        if text.suffix == ".jsonl":
            check_jsonl(text)
        elif text.suffix == ".txt":
            check_text(text)
        else:
            raise FileRejected(f"{text.name}: training and validation text is .txt or .jsonl, not "
                               f"{text.suffix or 'a file without suffix'}", code="unsupported_file_type")
    return "folder" if path.is_dir() else KIND_BY_SUFFIX[path.suffix]


def file_suffix(name: str) -> str:
    """The suffix that decides how a file is checked: '.tar.gz' kept whole, lower-cased."""
    return archive_suffix(name) or Path(name).suffix.lower()


def safe_filename(filename: str | None) -> str:
    """The base name of `filename` without path parts, control or invisible characters, or leading
    dots, cut to MAX_NAME_BYTES; 'upload' when nothing is left."""
    base = re.split(r"[/\\]", filename or "")[-1]
    # category C: control, format (bidi overrides that disguise a suffix), surrogates, unassigned
    base = "".join(c for c in base if not unicodedata.category(c).startswith("C"))
    base = base.strip().lstrip(".").strip()
    if len(base.encode("utf-8")) > MAX_NAME_BYTES:
        suffix = file_suffix(base)
        suffix = suffix if len(suffix) < 16 else ""
        stem = base[: len(base) - len(suffix)].encode("utf-8")[: MAX_NAME_BYTES - len(suffix)]
        base = stem.decode("utf-8", errors="ignore") + suffix
    return base or "upload"


# -- training text -----------------------------------------------------------------------------


def check_text(path: Path) -> dict:
    """`{"lines": n}` of a UTF-8 text file, read in pieces; `FileRejected` for non-UTF-8 or binary
    content (naming the byte offset) or an empty file."""
    path = Path(path)
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = lines = 0
    last = b""
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            pending = len(decoder.getstate()[0])  # bytes of a character cut by the previous piece
            nul = chunk.find(b"\0")
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as error:
                if nul < 0 or error.start - pending < nul:
                    raise _not_utf8(path, offset - pending + error.start) from None
            if nul >= 0:
                raise FileRejected(f"{path.name} is binary, not text: a NUL byte at byte offset {offset + nul}",
                                   code="binary_content")
            lines += chunk.count(b"\n")
            offset += len(chunk)
            last = chunk[-1:]
        pending = len(decoder.getstate()[0])
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:  # the file ends inside a character
            raise _not_utf8(path, offset - pending) from None
    if offset == 0:
        raise FileRejected(f"{path.name} is empty", code="empty_file")
    return {"lines": lines + (last != b"\n")}


def _not_utf8(path: Path, offset: int) -> FileRejected:
    return FileRejected(f"{path.name} is not UTF-8 text: invalid byte(s) at byte offset {offset}", code="not_utf8")


_ESCAPED_SURROGATE = re.compile(rb"\\u[dD][89abcdefABCDEF]")
_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean",
               type(None): "null"}


def check_jsonl(path: Path) -> dict:
    """`{"lines": records, "fields": [...]}` of a JSON-lines file: UTF-8, one JSON object per
    non-empty line. `fields`: the keys whose value is a string in every record (the candidates for
    a job's text field). `FileRejected` naming the first bad line."""
    path = Path(path)
    records = 0
    fields: set[str] | None = None
    offset = 0
    with open(path, "rb") as f:
        for number, line in enumerate(iter(lambda: f.readline(MAX_JSONL_LINE_BYTES + 1), b""), 1):
            where = f"{path.name} line {number}"
            if len(line) > MAX_JSONL_LINE_BYTES:
                raise FileRejected(f"{where} is longer than {readable_size(MAX_JSONL_LINE_BYTES)}",
                                   code="invalid_jsonl")
            nul = line.find(b"\0")
            if nul >= 0:
                raise FileRejected(f"{where} holds a NUL byte (at byte offset {offset + nul}): binary, not text",
                                   code="binary_content")
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as error:
                raise FileRejected(f"{where} is not UTF-8: invalid byte(s) at byte offset {offset + error.start}",
                                   code="not_utf8") from None
            offset += len(line)
            if not text.strip():
                continue
            record = _parse_json_line(text, where)
            if _ESCAPED_SURROGATE.search(line):  # "\ud800" is valid JSON but no text a tokenizer takes
                try:
                    json.dumps(record, ensure_ascii=False).encode("utf-8")
                except UnicodeEncodeError:
                    raise FileRejected(f"{where} holds a lone surrogate escape (like \\ud800): not text",
                                       code="invalid_jsonl") from None
            strings = {key for key, value in record.items() if isinstance(value, str)}
            fields = strings if fields is None else fields & strings
            records += 1
    if not records:
        raise FileRejected(f"{path.name} holds no JSON lines", code="empty_file")
    return {"lines": records, "fields": sorted(fields)}


def _parse_json_line(text: str, where: str) -> dict:
    try:
        record = json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as error:
        raise FileRejected(f"{where} is not valid JSON ({error.msg} at column {error.colno})",
                           code="invalid_jsonl") from None
    except (ValueError, RecursionError) as error:  # NaN/Infinity, or nesting deeper than the parser goes
        raise FileRejected(f"{where} is not valid JSON ({error or 'nested too deeply'})",
                           code="invalid_jsonl") from None
    if not isinstance(record, dict):
        raise FileRejected(f"{where} is a JSON {_JSON_TYPES.get(type(record), 'value')}, not an object",
                           code="invalid_jsonl")
    return record


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not JSON")
