"""The store: SQLAlchemy Core off the reactor thread.

Functions that touch the database are named ``thd…``, run on a database thread, take a
``Connection`` as their first argument and return plain values (STYLE.md). ``Store`` runs
them in a transaction: writes on one writer thread, reads on a small reader pool.

On SQLite, writes that queue up while the writer is busy are committed together (*group
commit*): each runs in its own savepoint of one transaction, so one that fails is undone
alone, and all of them are durable with one fsync instead of one each. Nobody hears of a
write before the transaction holding it has committed.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

import attrs
from sqlalchemy import Connection, Engine
from sqlalchemy.exc import OperationalError
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from sitesrv.store.engine import is_sqlite, make_engines, normalise_url

T = TypeVar("T")

#: How often a write transaction that PostgreSQL aborted as a deadlock or a
#: serialisation failure is retried.
DEADLOCK_RETRIES = 5
#: Most writes committed in one SQLite transaction.
GROUP_MAX = 64


@attrs.define
class _Write:
    """A write waiting for the writer thread, and who waits for its result."""

    fn: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    done: Deferred[Any]


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
        self._queue: deque[_Write] = deque()
        self._writing = False

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
        """Run ``fn(conn, ...)`` in a write transaction on the writer thread (on SQLite
        perhaps with others queued with it: see the module docstring)."""
        if not self.sqlite:
            return deferToThreadPool(
                self._reactor, self._writePool, self.write, fn, *args, **kwargs
            )
        done: Deferred[T] = Deferred()
        self._queue.append(_Write(fn, args, kwargs, done))
        if not self._writing:
            self._writeNext()
        return done

    def _writeNext(self) -> None:
        """Send the queued writes (up to ``GROUP_MAX``) to the writer thread as one group."""
        if not self._queue:
            self._writing = False
            return
        self._writing = True
        group = [self._queue.popleft() for _ in range(min(GROUP_MAX, len(self._queue)))]
        d = deferToThreadPool(self._reactor, self._writePool, self._thdWriteGroup, group)
        d.addBoth(self._written, group)

    def _thdWriteGroup(self, group: list[_Write]) -> list[tuple[bool, Any]]:
        if len(group) == 1:
            # Alone: no savepoint needed; its failure is its transaction's.
            w = group[0]
            try:
                return [(True, self.write(w.fn, *w.args, **w.kwargs))]
            except Exception:
                return [(False, Failure())]
        outcomes: list[tuple[bool, Any]] = []
        with self.writer.begin() as conn:
            for w in group:
                savepoint = conn.begin_nested()
                try:
                    result = w.fn(conn, *w.args, **w.kwargs)
                except Exception:
                    savepoint.rollback()
                    outcomes.append((False, Failure()))
                else:
                    savepoint.commit()
                    outcomes.append((True, result))
        return outcomes

    def _written(self, outcomes: list[tuple[bool, Any]] | Failure, group: list[_Write]) -> None:
        """Tell each waiter (all fail when the commit did), then send the next group."""
        for i, w in enumerate(group):
            if isinstance(outcomes, Failure):
                w.done.errback(outcomes)
            elif outcomes[i][0]:
                w.done.callback(outcomes[i][1])
            else:
                w.done.errback(outcomes[i][1])
        self._writeNext()

    def runRead(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> Deferred[T]:
        """Run ``fn(conn, ...)`` in a read transaction on a reader thread."""
        return deferToThreadPool(self._reactor, self._readPool, self.read, fn, *args, **kwargs)


def thdNothing(conn: Connection) -> None:
    """A no-op, to check that the database answers."""
    conn.exec_driver_sql("SELECT 1")
