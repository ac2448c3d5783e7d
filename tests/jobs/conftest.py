"""A deployment for the job tests, as real as on one machine: Redis (the one `XATL_TEST_REDIS_URL`
names, else the server `xatl serve` would embed), the job store (SQLite under the data directory,
or a fresh PostgreSQL database), the API on a real uvicorn server, and workers as real processes
(`xatl worker`), each in its own process group so that a test can kill one with its whole tree.

PostgreSQL: `XATL_TEST_POSTGRES_URL` (CI sets it) or the server on 127.0.0.1:5432; the tests that
need it are skipped when neither answers, and fail when the variable is set and it does not.
"""

import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from http_server import ServerThread
from job_fixtures import JOBS_API_KEY, write_corpus, write_donor

from service.config import Settings
from worker.store import JobStore, migrate

API_KEY = JOBS_API_KEY


@pytest.fixture
def clean_redis(redis_url):
    import redis

    client = redis.Redis.from_url(redis_url)
    client.flushdb()  # no message of an earlier test's jobs
    yield redis_url
    client.close()


@pytest.fixture(scope="session")
def postgres_server():
    """A SQLAlchemy URL of the server's maintenance database, or a skip."""
    url = os.environ.get("XATL_TEST_POSTGRES_URL") or "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
    from sqlalchemy import create_engine, text

    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except Exception as error:
        if os.environ.get("XATL_TEST_POSTGRES_URL"):
            pytest.fail(f"XATL_TEST_POSTGRES_URL={url} does not answer: {error}")
        pytest.skip(f"no PostgreSQL at {url} (set XATL_TEST_POSTGRES_URL)")
    yield engine
    engine.dispose()


@pytest.fixture
def postgres_url(postgres_server):
    """A fresh database of its own for one test, dropped after it."""
    from sqlalchemy import text

    name = f"xatl_test_{secrets.token_hex(6)}"
    with postgres_server.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    yield postgres_server.url.set(database=name).render_as_string(hide_password=False)
    with postgres_server.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="session")
def donor_dir(tmp_path_factory):
    return write_donor(tmp_path_factory.mktemp("donor"))


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.jsonl", count=120)


class Deployment:
    """One data directory, one store, one Redis; an API and any number of workers over them."""

    def __init__(self, root: Path, redis_url: str, database_url: str | None = None, **overrides):
        self.root = root
        (root / "imports").mkdir(parents=True, exist_ok=True)
        values = dict(api_keys=[API_KEY], home=root / "data", redis_url=redis_url, database_url=database_url,
                      import_roots=[root / "imports"], lease_seconds=3.0, redispatch_seconds=5.0, torch_threads=1,
                      max_prompt_tokens=512, max_tokens=256, max_batch_size=4)
        self.settings = Settings(**{**values, **overrides})
        self.settings.home.mkdir(parents=True, exist_ok=True)
        migrate(self.settings.resolved_database_url)
        self.store = JobStore(self.settings.resolved_database_url)
        self.server: ServerThread | None = None
        self.workers: list[subprocess.Popen] = []

    # the API
    def start_api(self) -> "Deployment":
        self.server = ServerThread(self.settings).__enter__()
        return self

    def stop_api(self) -> None:
        if self.server is not None:
            self.server.__exit__(None, None, None)
            self.server = None

    @property
    def url(self) -> str:
        return self.server.url

    def client(self):
        from service.client import XatlClient

        return XatlClient(self.url, API_KEY)

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)

    # workers
    def start_worker(self, name: str) -> subprocess.Popen:
        env = {**os.environ, **self.settings.environment(), "OMP_NUM_THREADS": "1"}
        log = open(self.root / f"{name}.log", "ab")  # noqa: SIM115
        worker = subprocess.Popen([sys.executable, "-m", "worker.cli", "--gpus", "0", "--name", f"{name}@test",
                                   "--loglevel", "WARNING"], env=env, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
        self.workers.append(worker)
        return worker

    def kill_tree(self, worker: subprocess.Popen) -> None:
        """SIGKILL to the worker's whole process group: it, its threads' job processes, all at once."""
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()

    def stop_workers(self) -> None:
        for worker in self.workers:
            if worker.poll() is None:
                os.killpg(worker.pid, signal.SIGTERM)
        for worker in self.workers:
            try:
                worker.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait()

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace")[-4000:] if path.is_file() else ""

    def wait_for(self, job_id: str, statuses=("succeeded", "failed", "cancelled"), timeout: float = 240) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.store.get_job(job_id)
            if job["status"] in statuses:
                return job
            time.sleep(0.25)
        raise AssertionError(f"job {job_id} still {self.store.get_job(job_id)['status']} after {timeout} s;\n"
                             + "\n".join(self.log(f"w{i}") for i in range(len(self.workers))))

    def close(self) -> None:
        self.stop_workers()
        self.stop_api()
        self.store.close()


@pytest.fixture
def deployment(tmp_path, clean_redis):
    made = []

    def make(*, redis_url: str | None = None, **overrides) -> Deployment:
        d = Deployment(tmp_path / f"d{len(made)}", redis_url or clean_redis, **overrides)
        made.append(d)
        return d

    yield make
    for d in made:
        d.close()
