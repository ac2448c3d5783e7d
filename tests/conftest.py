"""Shared fixtures. The shared data folder comes from XATL_DATA_DIR: tests that need it are
skipped when it is unset, and fail when it is set but a file they need is missing."""

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def data_dir() -> Path:
    root = os.environ.get("XATL_DATA_DIR")
    if not root:
        pytest.skip("XATL_DATA_DIR is not set")
    path = Path(root)
    if not path.is_dir():
        pytest.fail(f"XATL_DATA_DIR={root} is not a directory")
    return path


@pytest.fixture(scope="session")
def data_file(data_dir):
    """`data_file("stories260K/tok512.bin")`: the path, failing the test when the file is missing."""

    def resolve(relative: str) -> Path:
        path = data_dir / relative
        if not path.is_file():
            pytest.fail(f"{path} is missing (XATL_DATA_DIR is set)")
        return path

    return resolve
