"""What a job spec's file fields may name, and where that is on disk.

- a file id (`file-…`): an upload of POST /v1/files, stored under `<data_dir>/files/`;
- an absolute path under one of the configured import roots (`XATL_IMPORT_ROOTS`): symbolic links
  are followed first, so a link that leads outside the roots is refused like the path itself;
- a Hugging Face hub id (`org/name`), fetched by the worker where the hub is reachable.

Anything else — a relative path, `..`, a path outside the roots — is refused with the field named.
Torch-free: the job routes check references at creation, and the worker resolves them again.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
FILE_ID = re.compile(r"^file-[a-f0-9]{24}$")


class BadReference(ValueError):
    """A reference a job cannot use: `param` names the spec field, `status` the HTTP status."""

    def __init__(self, message: str, *, param: str, code: str = "invalid_reference", status: int = 400):
        super().__init__(message)
        self.param, self.code, self.status = param, code, status


@dataclass(frozen=True)
class Reference:
    kind: str  # "file" | "path" | "hub"
    value: str


def classify(value: str, param: str) -> Reference:
    if FILE_ID.match(value):
        return Reference("file", value)
    if value.startswith("/"):
        return Reference("path", value)
    if HUB_ID.match(value) and ".." not in value:
        return Reference("hub", value)
    raise BadReference(
        f"{param}: {value!r} is neither a file id (file-…), an absolute path under an import root, "
        "nor a Hugging Face hub id (org/name)", param=param)


def check_path(value: str, import_roots: list[Path], param: str) -> Path:
    """The real path of `value` if it lies under an import root (and exists), else the refusal."""
    if not import_roots:
        raise BadReference(f"{param}: this server takes no local paths (no import roots are configured; "
                              "upload the file with POST /v1/files)", param=param, code="path_not_allowed")
    real = Path(value).resolve()
    if not any(real.is_relative_to(root.resolve()) for root in import_roots):
        raise BadReference(f"{param}: {value} is outside the import roots", param=param, code="path_not_allowed")
    if not real.exists():
        raise BadReference(f"{param}: {value} does not exist", param=param, code="file_not_found")
    return real


__all__ = ["FILE_ID", "HUB_ID", "Reference", "BadReference", "check_path", "classify"]
