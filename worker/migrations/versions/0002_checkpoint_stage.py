"""Checkpoints name the training stage that saved them (a job may run attention transfer, then
training: both count steps from 1), so the unique key becomes (job_id, stage, step).

PostgreSQL alters the table in place (the old key found by its columns: 0001 left it unnamed);
SQLite cannot drop a constraint, so there the table is copied (batch mode, from its 0001 shape).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

OLD = sa.Table(  # the table as 0001 made it, with its unnamed keys given names to drop them by
    "checkpoints", sa.MetaData(),
    sa.Column("seq", sa.Integer(), primary_key=True, autoincrement=True),
    sa.Column("id", sa.String(40), nullable=False),
    sa.Column("job_id", sa.String(40), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
    sa.Column("step", sa.Integer(), nullable=False),
    sa.Column("path", sa.String(1000), nullable=False),
    sa.Column("metrics", sa.JSON(), nullable=True),
    sa.Column("created_at", sa.Float(), nullable=False),
    sa.UniqueConstraint("id", name="uq_checkpoints_id"),
    sa.UniqueConstraint("job_id", "step", name="uq_checkpoints_job_step"),
    sa.Index("ix_checkpoints_job_id", "job_id"),
)


def upgrade() -> None:
    stage = sa.Column("stage", sa.String(40), nullable=False, server_default="train")
    bind = op.get_bind()
    if bind.dialect.name == "sqlite":  # no ALTER of constraints: the table is copied
        with op.batch_alter_table("checkpoints", copy_from=OLD, recreate="always") as batch:
            batch.add_column(stage)
            batch.drop_constraint("uq_checkpoints_job_step", type_="unique")
            batch.create_unique_constraint("uq_checkpoints_job_stage_step", ["job_id", "stage", "step"])
        return
    old = next(c["name"] for c in sa.inspect(bind).get_unique_constraints("checkpoints")
               if c["column_names"] == ["job_id", "step"])
    op.add_column("checkpoints", stage)
    op.drop_constraint(old, "checkpoints", type_="unique")
    op.create_unique_constraint("uq_checkpoints_job_stage_step", "checkpoints", ["job_id", "stage", "step"])


def downgrade() -> None:
    op.execute(sa.text("DELETE FROM checkpoints WHERE stage <> 'train'"))
    with op.batch_alter_table("checkpoints") as batch:
        batch.drop_constraint("uq_checkpoints_job_stage_step", type_="unique")
        batch.drop_column("stage")
        batch.create_unique_constraint("uq_checkpoints_job_step", ["job_id", "step"])
