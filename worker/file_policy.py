"""What an uploaded file may be: the limits it must keep and the refusal it gets otherwise.

Shared by `worker.files` (the public module) and the helpers it re-exports from; stdlib only.
"""

from __future__ import annotations

from dataclasses import dataclass

CHUNK_BYTES = 1 << 20  # read and write uploads and archive members in pieces of this size


class FileRejected(ValueError):
    """An upload that is refused: `code` a short snake_case reason, `param` the request field ('file' or 'purpose')."""

    def __init__(self, message: str, *, code: str, param: str = "file"):
        super().__init__(message)
        self.message = message
        self.code = code
        self.param = param

    def __reduce__(self):  # keyword-only fields: the default (type, args) would lose them
        return _rebuild_rejection, (self.message, self.code, self.param)


def _rebuild_rejection(message: str, code: str, param: str) -> FileRejected:
    return FileRejected(message, code=code, param=param)


@dataclass(frozen=True)
class Limits:
    max_bytes: int = 1 << 30  # the upload itself
    max_unpacked_bytes: int = 8 << 30  # what an archive may unpack to
    max_members: int = 10_000  # entries in an archive

    def __post_init__(self):
        for name in ("max_bytes", "max_unpacked_bytes", "max_members"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f"Limits.{name} must be a positive int, got {getattr(self, name)!r}")


DEFAULT_LIMITS = Limits()  # a frozen instance: safe as a default argument


def readable_size(n: int) -> str:
    """`1073741824` -> `'1 GiB'`: for messages a user reads."""
    if n < 1024:
        return f"{n} bytes"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024 or unit == "TiB":
            return f"{n:.4g} {unit}"
