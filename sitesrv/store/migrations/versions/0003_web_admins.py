"""web admins: the administrators who may log in to the primary's admin pages

Per-server (never replicated, never in the change log): a site's admin pages use the
[web.admins] table of its config instead. Generated with alembic autogenerate against a
database at 0002.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25 14:33:16.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "web_admins",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("password_verifier", sa.String(), nullable=False),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.Column("updated_at", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_web_admins")),
        sa.UniqueConstraint("name", name=op.f("uq_web_admins_name")),
        sqlite_autoincrement=True,
    )


def downgrade() -> None:
    op.drop_table("web_admins")
