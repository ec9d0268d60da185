"""Shared test fixtures: real databases (SQLite files, and PostgreSQL when configured)."""

from __future__ import annotations

import os
from typing import Any

from sqlalchemy import create_engine, text
from twisted.internet.defer import Deferred, succeed

from sitesrv.store import Store
from sitesrv.store.bootstrap import open_store, thdInitPrimary
from sitesrv.store.engine import normalise_url

POSTGRES_ENV = "SITESRV_TEST_POSTGRES_URL"
NOW = 1_800_000_000.0


def postgres_url() -> str | None:
    """The PostgreSQL URL tests may use (and wipe), or None."""
    return os.environ.get(POSTGRES_ENV) or None


def reset_postgres(url: str) -> None:
    """Drop everything in the test database's public schema."""
    engine = create_engine(normalise_url(url))
    with engine.begin() as conn:
        conn.execute(text("DROP SCHEMA public CASCADE"))
        conn.execute(text("CREATE SCHEMA public"))
    engine.dispose()


def sqlite_url(testcase: Any, name: str = "sitesrv.db") -> str:
    """A SQLite file URL in a fresh temporary directory of ``testcase``."""
    directory = testcase.mktemp()
    os.makedirs(directory)
    return f"sqlite:///{os.path.abspath(os.path.join(directory, name))}"


class StoreMixin:
    """Gives each test ``self.store``: a migrated primary database named "hq".

    Subclasses set ``backend`` to "sqlite" or "postgres"; the PostgreSQL variant skips
    unless ``SITESRV_TEST_POSTGRES_URL`` is set (CI sets it).
    """

    backend = "sqlite"
    store: Store

    def database_url(self) -> str:
        """A fresh, empty database for this test."""
        if self.backend == "sqlite":
            return sqlite_url(self)
        url = postgres_url()
        if url is None:
            raise self.skipException(  # type: ignore[attr-defined]
                f"PostgreSQL not configured: set {POSTGRES_ENV} (CI does)"
            )
        reset_postgres(url)
        return url

    def open_primary(self) -> Store:
        """Open (and migrate) a fresh primary database."""
        store = open_store(self.database_url())
        self.addCleanup(store.stop)  # type: ignore[attr-defined]
        store.write(thdInitPrimary, "hq", "USD", 2, NOW)
        return store


def run_inline(fn: Any, *args: Any, **kwargs: Any) -> Deferred[Any]:
    """Run ``fn`` now, returning a fired Deferred (a synchronous stand-in for a pool)."""
    return succeed(fn(*args, **kwargs))
