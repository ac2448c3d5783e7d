"""`xatl db upgrade`: bring the job store's database to the newest schema.

Alembic's migrations, run once per deployment before the API and workers start (`docker compose`
runs it as a one-off service); safe to repeat."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["upgrade"], help="upgrade: apply every migration not yet applied")


def run(args: argparse.Namespace) -> int:
    from worker.config import WorkerSettings
    from worker.store import migrate

    settings = WorkerSettings()
    settings.home.mkdir(parents=True, exist_ok=True)
    migrate(settings.resolved_database_url)
    print(f"database at the newest schema: {_safe(settings.resolved_database_url)}")
    return 0


def _safe(url: str) -> str:
    """The URL without its password."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)
