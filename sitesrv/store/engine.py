"""Database engines, set up the way the store rules in DESIGN.md ask.

SQLite: WAL journal, ``synchronous=FULL`` (a site's power can fail), foreign keys on, a
busy timeout so that ``sitesrv-admin`` in another process can write while the server runs.
The *writer* engine opens every transaction with ``BEGIN IMMEDIATE`` so that a write
transaction takes the write lock up front instead of failing half-way with "database is
locked"; the *reader* engine uses plain deferred ``BEGIN``.

PostgreSQL (psycopg 3): one ordinary pooled engine serves reads and writes.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url

BUSY_TIMEOUT_MS = 30_000


def is_sqlite(url: str) -> bool:
    """Whether a SQLAlchemy URL names a SQLite database."""
    return make_url(url).get_backend_name() == "sqlite"


def normalise_url(url: str) -> str:
    """Use psycopg 3 for plain ``postgresql://`` URLs."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def _sqlite_engine(url: str, begin: str, pool_size: int) -> Engine:
    parsed = make_url(url)
    if parsed.database in (None, "", ":memory:"):
        raise ValueError("sitesrv needs a SQLite file, not an in-memory database")
    engine = create_engine(
        url,
        pool_size=pool_size,
        max_overflow=0,
        connect_args={"check_same_thread": False, "timeout": BUSY_TIMEOUT_MS / 1000},
    )

    @event.listens_for(engine, "connect")
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let us issue BEGIN ourselves (pysqlite's own transaction handling is off).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def on_begin(conn: Any) -> None:
        conn.exec_driver_sql(begin)

    return engine


def make_engines(url: str, readers: int = 4) -> tuple[Engine, Engine]:
    """Return ``(writer, reader)`` engines for ``url``.

    On PostgreSQL both are the same pooled engine.
    """
    url = normalise_url(url)
    if is_sqlite(url):
        writer = _sqlite_engine(url, "BEGIN IMMEDIATE", pool_size=1)
        reader = _sqlite_engine(url, "BEGIN", pool_size=readers)
        return writer, reader
    engine = create_engine(url, pool_size=readers + 1, max_overflow=4, pool_pre_ping=True)
    return engine, engine
