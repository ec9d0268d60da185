"""provider jobs: the Find-Me queue and the state of every job a print provider asked about

Site-owned (never replicated): each server keeps the jobs of the providers that talk to
it. Generated with alembic autogenerate against a database at 0001.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25 12:31:07.490147
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "provider_jobs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("uuid", sa.String(length=36), nullable=False),
        sa.Column("provider", sa.String(length=200), nullable=False),
        sa.Column("queue", sa.String(length=200), nullable=False),
        sa.Column("queue_id", sa.Integer(), nullable=True),
        sa.Column("username", sa.String(length=200), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=True),
        sa.Column("document", sa.String(length=500), nullable=False),
        sa.Column("pages", sa.Integer(), nullable=False),
        sa.Column("copies", sa.Integer(), nullable=False),
        sa.Column("colour", sa.Boolean(), nullable=False),
        sa.Column("duplex", sa.Boolean(), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("cost", sa.BigInteger(), nullable=False),
        sa.Column("state", sa.String(length=20), nullable=False),
        sa.Column("reason", sa.String(length=500), nullable=False),
        sa.Column("release_id", sa.String(length=36), nullable=True),
        sa.Column("target", sa.String(length=200), nullable=True),
        sa.Column("target_id", sa.Integer(), nullable=True),
        sa.Column("charged", sa.BigInteger(), nullable=True),
        sa.Column("provider_told", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.Column("expires_at", sa.Double(), nullable=False),
        sa.Column("updated_at", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_provider_jobs")),
        sa.UniqueConstraint("uuid", name=op.f("uq_provider_jobs_uuid")),
        sqlite_autoincrement=True,
    )
    with op.batch_alter_table("provider_jobs", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_provider_jobs_expires_at"), ["expires_at"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_provider_jobs_state"), ["state"], unique=False)
        batch_op.create_index(batch_op.f("ix_provider_jobs_user_id"), ["user_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("provider_jobs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_provider_jobs_user_id"))
        batch_op.drop_index(batch_op.f("ix_provider_jobs_state"))
        batch_op.drop_index(batch_op.f("ix_provider_jobs_expires_at"))

    op.drop_table("provider_jobs")
