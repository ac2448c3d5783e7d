"""Settings shared by the worker and the service, from the environment (prefix `XATL_`).

One data directory (`XATL_HOME`, default `./data`) holds everything a deployment keeps: the
database (SQLite, unless `XATL_DATABASE_URL` names PostgreSQL), uploaded files (`files/`), each
job's working folder with its checkpoints (`jobs/<id>/`), and the published models (`models/`).
Several workers on several machines share it (a shared volume), one Redis and one database.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class WorkerSettings(BaseSettings):
    # an empty variable is an unset one (docker compose passes `${XATL_TORCH_THREADS:-}` as "")
    model_config = SettingsConfigDict(env_prefix="XATL_", extra="ignore", env_ignore_empty=True)

    # `home`, read from XATL_HOME alone: a field named `data_dir` (even aliased, with populate_by_name)
    # also answered to XATL_DATA_DIR, the data sets' folder, and put a deployment's files there
    home: Path = Field(Path("data"), description="the deployment's files (the data directory)")
    models_dir: Path | None = Field(None, description="published models; default: <home>/models")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default: SQLite at <home>/xatl.db")
    redis_url: str | None = Field(None, description="Celery's broker; default (xatl serve): an embedded Redis")
    import_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=list, description="folders whose files jobs may name by path (comma-separated)")
    default_queue: str = Field("gpu", description="queue of jobs that ask for no particular device")
    lease_seconds: float = Field(30.0, gt=0, description="a job whose worker sent no heartbeat for this long "
                                 "is taken over by another worker")
    redispatch_seconds: float = Field(120.0, gt=0, description="a queued job nobody took for this long is "
                                      "sent to the queue again (a message lost with Redis)")
    max_upload_bytes: int = Field(1 << 30, ge=1, description="largest file accepted by POST /v1/files")
    max_unpacked_bytes: int = Field(8 << 30, ge=1, description="most an uploaded archive may unpack to")

    @model_validator(mode="before")
    @classmethod
    def _no_data_dir(cls, values):
        # the field's old name: ignored like any unknown name, it would leave the deployment in ./data
        if isinstance(values, dict) and "data_dir" in values:
            raise ValueError("data_dir is now `home` (env XATL_HOME)")
        return values

    @field_validator("import_roots", mode="before")
    @classmethod
    def _split_roots(cls, value):
        if isinstance(value, str):
            return [Path(part.strip()) for part in value.split(",") if part.strip()]
        return value

    @property
    def resolved_models_dir(self) -> Path:
        return self.models_dir if self.models_dir is not None else self.home / "models"

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.home / 'xatl.db').resolve()}"

    @property
    def files_dir(self) -> Path:
        return self.home / "files"

    @property
    def jobs_dir(self) -> Path:
        return self.home / "jobs"

    def environment(self) -> dict[str, str]:
        """These settings as `XATL_` variables, for the processes a worker or `xatl serve` starts."""
        values = {
            "XATL_HOME": str(self.home.resolve()), "XATL_MODELS_DIR": str(self.resolved_models_dir.resolve()),
            "XATL_DATABASE_URL": self.resolved_database_url, "XATL_DEFAULT_QUEUE": self.default_queue,
            "XATL_LEASE_SECONDS": str(self.lease_seconds), "XATL_REDISPATCH_SECONDS": str(self.redispatch_seconds),
            "XATL_IMPORT_ROOTS": ",".join(str(p.resolve()) for p in self.import_roots),
            "XATL_MAX_UPLOAD_BYTES": str(self.max_upload_bytes),
            "XATL_MAX_UNPACKED_BYTES": str(self.max_unpacked_bytes),
        }
        if self.redis_url:
            values["XATL_REDIS_URL"] = self.redis_url
        return values
