"""Run the alembic migrations (at start-up and by ``sitesrv-admin db upgrade``)."""

from __future__ import annotations

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection

from sitesrv.store import Store


def alembic_config(connection: Connection | None = None) -> Config:
    """An alembic ``Config`` for sitesrv's migrations, bound to ``connection``."""
    cfg = Config()
    cfg.set_main_option("script_location", "sitesrv.store:migrations")
    cfg.attributes["connection"] = connection
    return cfg


def head_revision() -> str | None:
    """The newest migration this software knows."""
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def thdCurrentRevision(conn: Connection) -> str | None:
    """The migration the database is at, or None for an empty database."""
    return MigrationContext.configure(conn).get_current_revision()


def upgrade(store: Store) -> tuple[str | None, str | None]:
    """Bring the database to the newest schema; return (before, after) revisions."""
    with store.writer.begin() as conn:
        before = thdCurrentRevision(conn)
        command.upgrade(alembic_config(conn), "head")
        after = thdCurrentRevision(conn)
    return before, after
