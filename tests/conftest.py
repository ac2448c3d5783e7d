"""Shared fixtures. The shared data folder comes from XATL_DATA_DIR: tests that need it are
skipped when it is unset, and fail when it is set but a file they need is missing."""

import os
from pathlib import Path

import pytest
import torch

# Servers the tests start load tiny models on a shared 2-core machine: compiling their decode step in
# the background (the service's default, XATL_COMPILE=auto) would only compete with the tests for the
# cores. tests/serving/test_compiled.py tests compiling itself.
os.environ.setdefault("XATL_COMPILE", "off")


@pytest.fixture(autouse=True)
def one_thread():
    """The models in tests are tiny: threads only add overhead, and on a busy 2-core machine
    OpenMP's waiting threads slow a forward pass down by an order of magnitude."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """A Redis for the tests that need one: XATL_TEST_REDIS_URL's, or one started here (its own port
    and folder) as `xatl serve` starts its embedded Redis. Each test using it flushes its database."""
    given = os.environ.get("XATL_TEST_REDIS_URL")
    if given:  # then give the tests a database of their own (e.g. /15)
        yield given
        return
    from service.embedded import start_redis

    child, url = start_redis(tmp_path_factory.mktemp("redis"))
    yield url
    child.stop(5)


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
