"""The durable record of jobs, their events, uploaded files, checkpoints and the models jobs made.

SQLAlchemy 2 over SQLite (the embedded default: one file under the data directory, WAL, so that
the API and the workers read while one writes) or PostgreSQL (`XATL_DATABASE_URL`). The schema is
Alembic's (`worker/migrations/`, `migrate(url)`). Torch-free.

Leases: a worker runs a job only while it holds the job's lease (`claim`), renews it with
heartbeats (`renew`), and ends it with the job's final status (`finish`, fenced on the owner, so a
worker that lost its lease cannot overwrite what the new owner wrote). A lease that runs out — its
worker died — makes the job claimable again (`stale_jobs`), and the job resumes elsewhere from its
last checkpoint. Times are seconds since the epoch (floats) from the caller's clock.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    Float,
    ForeignKey,
    Integer,
    String,
    UniqueConstraint,
    create_engine,
    event,
    func,
    select,
    update,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

TERMINAL = ("succeeded", "failed", "cancelled")
ACTIVE = ("queued", "running", "cancelling")


class Base(DeclarativeBase):
    pass


class JobRow(Base):
    __tablename__ = "jobs"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)  # creation order
    id: Mapped[str] = mapped_column(String(40), unique=True, index=True)
    type: Mapped[str] = mapped_column(String(20))
    status: Mapped[str] = mapped_column(String(20), index=True)
    spec: Mapped[dict] = mapped_column(JSON)
    queue: Mapped[str] = mapped_column(String(40))
    model: Mapped[str] = mapped_column(String(100), index=True)  # the resulting model's name
    base_model: Mapped[str | None] = mapped_column(String(100), nullable=True, index=True)  # a fine-tune's
    idempotency_key: Mapped[str | None] = mapped_column(String(200), unique=True, nullable=True)
    created_at: Mapped[float] = mapped_column(Float)
    started_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    progress: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    result: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    error: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(200), nullable=True)
    lease_expires_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    dispatched_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class EventRow(Base):
    __tablename__ = "job_events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(40), ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[float] = mapped_column(Float)
    level: Mapped[str] = mapped_column(String(10))
    type: Mapped[str] = mapped_column(String(20))
    message: Mapped[str] = mapped_column(String(2000))
    data: Mapped[dict | None] = mapped_column(JSON, nullable=True)


class FileRow(Base):
    __tablename__ = "files"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True, index=True)
    filename: Mapped[str] = mapped_column(String(300))
    purpose: Mapped[str] = mapped_column(String(20))
    bytes: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(40))
    path: Mapped[str] = mapped_column(String(1000))  # relative to the data directory
    details: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[float] = mapped_column(Float)


class CheckpointRow(Base):
    __tablename__ = "checkpoints"
    __table_args__ = (UniqueConstraint("job_id", "stage", "step", name="uq_checkpoints_job_stage_step"),)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True)
    job_id: Mapped[str] = mapped_column(String(40), ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    stage: Mapped[str] = mapped_column(String(40), default="train", server_default="train")  # or attention_transfer
    step: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(String(1000))  # relative to the data directory
    metrics: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[float] = mapped_column(Float)


class ModelRow(Base):
    __tablename__ = "models"
    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    job_id: Mapped[str] = mapped_column(String(40))
    created_at: Mapped[float] = mapped_column(Float)


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def _plain(row) -> dict[str, Any]:
    return {column.key: getattr(row, column.key) for column in row.__table__.columns}


@dataclass
class Page:
    items: list[dict]
    has_more: bool


class JobStore:
    """All reads and writes of the job system's records; each call is its own short transaction."""

    def __init__(self, url: str):
        self.url = url
        if url.startswith("sqlite"):
            _make_parent(url)
            self.engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
            event.listen(self.engine, "connect", _sqlite_pragmas)
        else:
            self.engine = create_engine(url, pool_pre_ping=True)
        self._session = sessionmaker(self.engine, expire_on_commit=False)

    def session(self) -> Session:
        return self._session.begin()

    def close(self) -> None:
        self.engine.dispose()

    # -- jobs ---------------------------------------------------------------------------------------------
    def create_job(self, *, type: str, spec: dict, queue: str, model: str, base_model: str | None = None,
                   job_id: str | None = None, idempotency_key: str | None = None,
                   event: str | None = None) -> tuple[dict, bool]:
        """(the job, True), or (the job made earlier with the same idempotency key, False). The job is
        recorded as dispatched now — the caller sends it next; if that fails, the sweep sends it later —
        with `event` as its first event, in one transaction."""
        from sqlalchemy.exc import IntegrityError

        if idempotency_key is not None and (earlier := self.job_by_key(idempotency_key)) is not None:
            return earlier, False
        now = time.time()
        row = JobRow(id=job_id or new_id("job"), type=type, status="queued", spec=spec, queue=queue, model=model,
                     base_model=base_model, idempotency_key=idempotency_key, created_at=now, cancel_requested=False,
                     attempts=0, dispatched_at=now)
        try:
            with self.session() as session:
                session.add(row)
                if event:
                    session.flush()  # the job's row first: the event refers to it
                    session.add(EventRow(job_id=row.id, created_at=now, level="info", type="status", message=event))
        except IntegrityError:  # a concurrent create with the same key won
            if idempotency_key is not None and (earlier := self.job_by_key(idempotency_key)) is not None:
                return earlier, False
            raise
        return _plain(row), True

    def job_by_key(self, key: str) -> dict | None:
        with self.session() as session:
            row = session.scalar(select(JobRow).where(JobRow.idempotency_key == key))
            return _plain(row) if row else None

    def get_job(self, job_id: str) -> dict | None:
        with self.session() as session:
            row = session.scalar(select(JobRow).where(JobRow.id == job_id))
            return _plain(row) if row else None

    def list_jobs(self, *, after: str | None = None, limit: int = 20, status: str | None = None) -> Page:
        """Newest first; `after` is the id of the last job of the previous page."""
        with self.session() as session:
            query = select(JobRow).order_by(JobRow.seq.desc()).limit(limit + 1)
            if status:
                query = query.where(JobRow.status == status)
            if after:
                cursor = session.scalar(select(JobRow.seq).where(JobRow.id == after))
                if cursor is None:
                    raise KeyError(after)
                query = query.where(JobRow.seq < cursor)
            rows = session.scalars(query).all()
            return Page([_plain(r) for r in rows[:limit]], len(rows) > limit)

    def count_jobs(self) -> int:
        with self.session() as session:
            return session.scalar(select(func.count()).select_from(JobRow))

    def active_jobs(self) -> list[dict]:
        """Jobs not finished yet, oldest first."""
        with self.session() as session:
            rows = session.scalars(select(JobRow).where(JobRow.status.in_(ACTIVE)).order_by(JobRow.seq)).all()
            return [_plain(r) for r in rows]

    def model_in_use(self, name: str) -> dict | None:
        """An unfinished job that will publish `name` or train from it."""
        with self.session() as session:
            row = session.scalar(select(JobRow).where(JobRow.status.in_(ACTIVE),
                                                      (JobRow.model == name) | (JobRow.base_model == name)).limit(1))
            return _plain(row) if row else None

    def request_cancel(self, job_id: str) -> dict | None:
        """A queued job nobody holds is cancelled at once; a running one becomes `cancelling` and its
        worker stops it at the next step. Finished jobs are left as they are."""
        now = time.time()
        with self.session() as session:
            row = session.scalar(select(JobRow).where(JobRow.id == job_id).with_for_update())
            if row is None:
                return None
            if row.status == "queued" and (row.lease_owner is None or (row.lease_expires_at or 0) < now):
                row.status, row.finished_at, row.cancel_requested = "cancelled", now, True
                row.lease_owner = None
            elif row.status in ("queued", "running"):
                row.status, row.cancel_requested = "cancelling", True
            return _plain(row)

    def claim(self, job_id: str, owner: str, lease_seconds: float) -> dict | None:
        """Take the job's lease if nobody holds a live one; the job then runs (or, if cancelling, is
        wound up) under `owner`. None when another worker holds it or the job is finished."""
        now = time.time()
        with self.session() as session:
            claimed = session.execute(
                update(JobRow)
                .where(JobRow.id == job_id, JobRow.status.in_(ACTIVE),
                       (JobRow.lease_owner.is_(None)) | (JobRow.lease_expires_at < now))
                .values(lease_owner=owner, lease_expires_at=now + lease_seconds, attempts=JobRow.attempts + 1)
            ).rowcount
            if claimed != 1:
                return None
            row = session.scalar(select(JobRow).where(JobRow.id == job_id))
            if row.status == "queued":
                row.status = "running"
            row.started_at = row.started_at or now
            return _plain(row)

    def renew(self, job_id: str, owner: str, lease_seconds: float) -> bool:
        """Extend the lease; False when `owner` no longer holds it (it must stop at once)."""
        with self.session() as session:
            return session.execute(
                update(JobRow).where(JobRow.id == job_id, JobRow.lease_owner == owner, JobRow.status.in_(ACTIVE))
                .values(lease_expires_at=time.time() + lease_seconds)
            ).rowcount == 1

    def holds(self, job_id: str, owner: str) -> bool:
        with self.session() as session:
            return session.scalar(select(func.count()).select_from(JobRow).where(
                JobRow.id == job_id, JobRow.lease_owner == owner, JobRow.status.in_(ACTIVE))) == 1

    def finish(self, job_id: str, owner: str, status: str, *, result: dict | None = None,
               error: dict | None = None) -> bool:
        """End the job with `status` and release its lease; False (nothing written) if `owner` lost it."""
        if status not in TERMINAL:
            raise ValueError(f"a job finishes as one of {TERMINAL}, not {status!r}")
        with self.session() as session:
            return session.execute(
                update(JobRow).where(JobRow.id == job_id, JobRow.lease_owner == owner)
                .values(status=status, result=result, error=error, finished_at=time.time(), lease_owner=None,
                        lease_expires_at=None)
            ).rowcount == 1

    def release(self, job_id: str, owner: str) -> bool:
        """Give the job back unfinished (its worker is shutting down): queued again, to resume elsewhere."""
        with self.session() as session:
            row = session.scalar(select(JobRow).where(JobRow.id == job_id, JobRow.lease_owner == owner))
            if row is None:
                return False
            row.lease_owner, row.lease_expires_at = None, None
            row.status = "cancelling" if row.cancel_requested else "queued"
            return True

    def set_progress(self, job_id: str, owner: str, progress: dict) -> bool:
        with self.session() as session:
            return session.execute(
                update(JobRow).where(JobRow.id == job_id, JobRow.lease_owner == owner).values(progress=progress)
            ).rowcount == 1

    def cancel_requested(self, job_id: str) -> bool:
        with self.session() as session:
            return bool(session.scalar(select(JobRow.cancel_requested).where(JobRow.id == job_id)))

    def stale_jobs(self, *, redispatch_seconds: float) -> list[dict]:
        """Jobs to send to the queue again: those whose lease ran out (their worker died), and those
        sent `redispatch_seconds` ago that nobody has taken since (their message was lost — with
        Redis, or with a worker that died holding it unstarted, as a prefetched message)."""
        now = time.time()
        with self.session() as session:
            rows = session.scalars(select(JobRow).where(JobRow.status.in_(ACTIVE)).order_by(JobRow.seq)).all()
            return [
                _plain(row) for row in rows
                if (row.lease_owner is None or (row.lease_expires_at or 0) < now)  # nobody runs it
                and ((row.dispatched_at or 0) < now - redispatch_seconds  # sent long ago, or not since it lapsed
                     or (row.lease_owner is not None and (row.dispatched_at or 0) < row.lease_expires_at))
            ]

    def mark_dispatched(self, job_id: str, *, unless_since: float | None = None) -> bool:
        """Record that the job was just sent to the queue. With `unless_since`, only if it was not sent
        after that time — so that of several workers sweeping at once, one sends it."""
        query = update(JobRow).where(JobRow.id == job_id)
        if unless_since is not None:
            query = query.where((JobRow.dispatched_at.is_(None)) | (JobRow.dispatched_at < unless_since))
        with self.session() as session:
            return session.execute(query.values(dispatched_at=time.time())).rowcount == 1

    # -- events -------------------------------------------------------------------------------------------
    def add_event(self, job_id: str, type: str, message: str, data: dict | None = None, *,
                  level: str = "info") -> dict:
        row = EventRow(job_id=job_id, created_at=time.time(), level=level, type=type, message=message[:2000],
                       data=data)
        with self.session() as session:
            session.add(row)
        return _plain(row)

    def list_events(self, job_id: str, *, after: int | None = None, limit: int = 100) -> Page:
        """Oldest first; `after` is the number of the last event already seen."""
        with self.session() as session:
            query = select(EventRow).where(EventRow.job_id == job_id).order_by(EventRow.id).limit(limit + 1)
            if after is not None:
                query = query.where(EventRow.id > after)
            rows = session.scalars(query).all()
            return Page([_plain(r) for r in rows[:limit]], len(rows) > limit)

    # -- files --------------------------------------------------------------------------------------------
    def add_file(self, *, file_id: str, filename: str, purpose: str, bytes: int, kind: str, path: str,
                 details: dict | None) -> dict:
        row = FileRow(id=file_id, filename=filename, purpose=purpose, bytes=bytes, kind=kind, path=path,
                      details=details, created_at=time.time())
        with self.session() as session:
            session.add(row)
        return _plain(row)

    def get_file(self, file_id: str) -> dict | None:
        with self.session() as session:
            row = session.scalar(select(FileRow).where(FileRow.id == file_id))
            return _plain(row) if row else None

    def list_files(self, *, purpose: str | None = None, after: str | None = None, limit: int = 100) -> Page:
        with self.session() as session:
            query = select(FileRow).order_by(FileRow.seq.desc()).limit(limit + 1)
            if purpose:
                query = query.where(FileRow.purpose == purpose)
            if after:
                cursor = session.scalar(select(FileRow.seq).where(FileRow.id == after))
                if cursor is None:
                    raise KeyError(after)
                query = query.where(FileRow.seq < cursor)
            rows = session.scalars(query).all()
            return Page([_plain(r) for r in rows[:limit]], len(rows) > limit)

    def delete_file(self, file_id: str) -> dict | None:
        with self.session() as session:
            row = session.scalar(select(FileRow).where(FileRow.id == file_id))
            if row is None:
                return None
            session.delete(row)
            return _plain(row)

    # -- checkpoints and models ---------------------------------------------------------------------------
    def add_checkpoint(self, job_id: str, step: int, path: str, metrics: dict | None = None, *,
                       stage: str = "train") -> dict:
        """Record a checkpoint of a job's training `stage` (train, attention_transfer)."""
        with self.session() as session:
            row = session.scalar(select(CheckpointRow).where(CheckpointRow.job_id == job_id,
                                                              CheckpointRow.stage == stage, CheckpointRow.step == step))
            if row is None:  # a resumed run saves a step again: one record
                row = CheckpointRow(id=new_id("ckpt"), job_id=job_id, stage=stage, step=step, path=path,
                                    metrics=metrics, created_at=time.time())
                session.add(row)
            return _plain(row)

    def list_checkpoints(self, job_id: str) -> list[dict]:
        with self.session() as session:
            rows = session.scalars(select(CheckpointRow).where(CheckpointRow.job_id == job_id)
                                   .order_by(CheckpointRow.seq)).all()  # as saved: stage by stage
            return [_plain(r) for r in rows]

    def add_model(self, name: str, job_id: str) -> None:
        with self.session() as session:
            if session.get(ModelRow, name) is None:
                session.add(ModelRow(name=name, job_id=job_id, created_at=time.time()))

    def get_model(self, name: str) -> dict | None:
        with self.session() as session:
            row = session.get(ModelRow, name)
            return _plain(row) if row else None

    def delete_model(self, name: str) -> None:
        with self.session() as session:
            row = session.get(ModelRow, name)
            if row is not None:
                session.delete(row)


def _make_parent(url: str) -> None:
    """SQLite creates its file, not the folders above it."""
    from pathlib import Path

    from sqlalchemy.engine import make_url

    database = make_url(url).database
    if database and database != ":memory:":
        Path(database).parent.mkdir(parents=True, exist_ok=True)


def _sqlite_pragmas(connection, _record) -> None:
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")  # readers do not wait for the writer
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def migrate(url: str) -> None:
    """Bring the database at `url` to the newest schema (Alembic `upgrade head`); safe to repeat."""
    from pathlib import Path

    from alembic import command
    from alembic.config import Config

    if url.startswith("sqlite"):
        _make_parent(url)
    config = Config()
    config.set_main_option("script_location", str(Path(__file__).with_name("migrations")))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    command.upgrade(config, "head")


__all__ = ["ACTIVE", "TERMINAL", "JobStore", "Page", "migrate", "new_id"]
