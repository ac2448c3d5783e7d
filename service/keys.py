"""The API key `xatl serve` makes when none is configured, stored under the data directory."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

KEY_FILE = "api_key"


def read_stored_key(data_dir: Path) -> str | None:
    path = data_dir / KEY_FILE
    if not path.is_file():
        return None
    return path.read_text().strip() or None


def create_stored_key(data_dir: Path) -> str:
    """A new random key, written to `<data_dir>/api_key` readable by its owner only."""
    data_dir.mkdir(parents=True, exist_ok=True)
    key = "xatl-" + secrets.token_urlsafe(32)
    path = data_dir / KEY_FILE
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(key + "\n")
    return key
