"""The store: SQLAlchemy Core off the reactor thread.

Functions that touch the database are named ``thd…``, run on a database thread, take a
``Connection`` as their first argument and return plain values (STYLE.md). ``Store`` runs
them in a transaction: writes on one writer thread, reads on a small reader pool.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import OperationalError
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from sitesrv.store.engine import is_sqlite, make_engines, normalise_url

T = TypeVar("T")

#: How often a write transaction that PostgreSQL aborted as a deadlock or a
#: serialisation failure is retried.
DEADLOCK_RETRIES = 5


def _is_retryable(error: OperationalError) -> bool:
    code = getattr(error.orig, "sqlstate", None)
    return code in ("40001", "40P01")


class Store:
    """A database with one writer thread and a reader pool.

    Also usable without a reactor (the admin CLI): ``write`` and ``read`` run a ``thd``
    function in a transaction on the calling thread.
    """

    def __init__(self, url: str, readers: int = 4) -> None:
        self.url = normalise_url(url)
        self.sqlite = is_sqlite(self.url)
        self.writer: Engine
        self.reader: Engine
        self.writer, self.reader = make_engines(self.url, readers=readers)
        # SQLite allows one writer at a time; PostgreSQL serialises on the change-log
        # counter row anyway, so a few writer threads are enough.
        self._writePool = ThreadPool(1, 1 if self.sqlite else 4, "sitesrv-db-write")
        self._readPool = ThreadPool(1, readers, "sitesrv-db-read")
        self._reactor: Any = None

    # -- synchronous use (CLI, tests, inside thd functions) ---------------------------

    def write(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn(conn, *args, **kwargs)`` in a write transaction on this thread."""
        for attempt in range(DEADLOCK_RETRIES + 1):
            try:
                with self.writer.begin() as conn:
                    return fn(conn, *args, **kwargs)
            except OperationalError as e:
                if self.sqlite or not _is_retryable(e) or attempt == DEADLOCK_RETRIES:
                    raise
        raise AssertionError("unreachable")

    def read(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn(conn, *args, **kwargs)`` in a read transaction on this thread."""
        with self.reader.begin() as conn:
            return fn(conn, *args, **kwargs)

    # -- asynchronous use (the server) ------------------------------------------------

    def start(self, reactor: IReactorThreads) -> None:
        """Start the thread pools; ``stop`` must be called before the reactor exits."""
        self._reactor = reactor
        self._writePool.start()
        self._readPool.start()

    def stop(self) -> None:
        """Stop the thread pools (waiting for running work) and close the engines."""
        if self._reactor is not None:
            self._writePool.stop()
            self._readPool.stop()
            self._reactor = None
        self.writer.dispose()
        if self.reader is not self.writer:
            self.reader.dispose()

    def runWrite(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> Deferred[T]:
        """Run ``fn(conn, ...)`` in a write transaction on the writer thread."""
        return deferToThreadPool(self._reactor, self._writePool, self.write, fn, *args, **kwargs)

    def runRead(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> Deferred[T]:
        """Run ``fn(conn, ...)`` in a read transaction on a reader thread."""
        return deferToThreadPool(self._reactor, self._readPool, self.read, fn, *args, **kwargs)


def thdNothing(conn: Connection) -> None:
    """A no-op, to check that the database answers."""
    conn.exec_driver_sql("SELECT 1")
