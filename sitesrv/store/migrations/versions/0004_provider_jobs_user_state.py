"""provider jobs: index a user's jobs by state

Every decision and release sums the user's ``releasing`` jobs, and the Find-Me list
selects their ``held`` ones. With only an index on ``user_id`` SQLite (no statistics)
read every job the user ever had; ``(user_id, state)`` finds just those in the state.
The new index also serves lookups by ``user_id`` alone, so that index goes.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25 15:20:00.000000
"""

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("provider_jobs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_provider_jobs_user_id"))
        batch_op.create_index("ix_provider_jobs_user_id_state", ["user_id", "state"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("provider_jobs", schema=None) as batch_op:
        batch_op.drop_index("ix_provider_jobs_user_id_state")
        batch_op.create_index(batch_op.f("ix_provider_jobs_user_id"), ["user_id"], unique=False)
