"""Shared test fixtures: real databases (SQLite files, and PostgreSQL when configured)."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from typing import Any

from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import make_url
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, execute, succeed
from twisted.python.failure import Failure
from twisted.test.iosim import FakeTransport, IOPump
from twisted.trial.unittest import SkipTest

from sitesrv.store import Store
from sitesrv.store.bootstrap import open_store, thdInitPrimary
from sitesrv.store.engine import normalise_url
from sitesrv.store.migrate import upgrade

POSTGRES_ENV = "SITESRV_TEST_POSTGRES_URL"
NOW = 1_800_000_000.0


def postgres_url() -> str | None:
    """The PostgreSQL URL tests may use (and wipe), or None."""
    return os.environ.get(POSTGRES_ENV) or None


def postgres_skip() -> str | None:
    """Why a PostgreSQL test class skips (``None``: it runs)."""
    if postgres_url():
        return None
    return f"set {POSTGRES_ENV} (e.g. postgresql://user:pw@127.0.0.1/db) to run on PostgreSQL"


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
            raise SkipTest(f"PostgreSQL not configured: set {POSTGRES_ENV} (CI does)")
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


# -- socket- and thread-free replication -------------------------------------------------


def _no_fsync(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.execute("PRAGMA synchronous=OFF")


class InlineStore(Store):
    """A ``Store`` that runs ``thd`` functions at once on the calling thread.

    The same transactions as the real store (writer engine with ``BEGIN IMMEDIATE``,
    reader engine), without the thread pools, so protocol tests run synchronously.
    SQLite commits skip the fsync (``synchronous=OFF``): these tests never pull the
    plug, and a hundred fsyncs a test would make them slow.
    """

    def __init__(self, url: str, readers: int = 4) -> None:
        super().__init__(url, readers=readers)
        if self.sqlite:
            for engine in {self.writer, self.reader}:
                event.listen(engine, "connect", _no_fsync)

    def runWrite(self, fn: Any, *args: Any, **kwargs: Any) -> Deferred[Any]:
        """Run ``fn(conn, ...)`` in a write transaction now."""
        return execute(self.write, fn, *args, **kwargs)

    def runRead(self, fn: Any, *args: Any, **kwargs: Any) -> Deferred[Any]:
        """Run ``fn(conn, ...)`` in a read transaction now."""
        return execute(self.read, fn, *args, **kwargs)


_migrated: list[str] = []


def _migrated_sqlite() -> str:
    """A migrated, empty SQLite file, made once per test run (migrating takes ~70 ms)."""
    if not _migrated:
        directory = tempfile.mkdtemp(prefix="sitesrv-schema-")
        atexit.register(shutil.rmtree, directory, True)
        path = os.path.join(directory, "migrated.db")
        store = Store(f"sqlite:///{path}")
        upgrade(store)
        store.stop()
        _migrated.append(path)
    return _migrated[0]


def open_inline_store(url: str) -> InlineStore:
    """``open_store`` for an ``InlineStore``: a migrated database at ``url``.

    A SQLite file starts as a copy of one migrated once, which is what migrating it
    would give, in a fraction of the time.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database:
        os.makedirs(os.path.dirname(os.path.abspath(parsed.database)), exist_ok=True)
        if not os.path.exists(parsed.database):
            shutil.copyfile(_migrated_sqlite(), parsed.database)
            return InlineStore(url)
    store = InlineStore(url)
    upgrade(store)
    return store


class Wire(IOPump):
    """An ``iosim.IOPump`` whose directions can be stalled, and that behaves like TCP
    after a close: a side that closed reads nothing more, and an exception raised by a
    protocol's ``dataReceived`` closes that connection (as the reactor does) instead of
    escaping into the test.

    ``to_server`` / ``to_client`` False hold back the bytes going that way (a stalled
    link); they are delivered once the direction is opened again.
    """

    to_server = True
    to_client = True

    def __init__(self, client: Any, server: Any, clock: Any) -> None:
        client_io = FakeTransport(
            client, isServer=False, peerAddress=IPv4Address("TCP", "192.0.2.1", 9192)
        )
        server_io = FakeTransport(
            server, isServer=True, peerAddress=IPv4Address("TCP", "192.0.2.7", 40000)
        )
        super().__init__(client, server, client_io, server_io, False, clock=clock)
        #: Exceptions that escaped a protocol's dataReceived (each closed its link).
        self.errors: list[Failure] = []
        server.makeConnection(server_io)
        client.makeConnection(client_io)

    @property
    def closed(self) -> bool:
        """Whether both sides have seen the connection close."""
        return bool(self.clientIO.disconnected and self.serverIO.disconnected)

    def _deliver(self, receiver: FakeTransport, data: bytes) -> None:
        if receiver.disconnecting:
            return  # closed: TCP stops reading
        try:
            receiver.bufferReceived(data)
        except Exception:
            self.errors.append(Failure())
            receiver.disconnecting = True

    def pump(self, debug: bool = False, advanceClock: bool = True) -> bool:
        """Move the bytes each open direction holds; then report closes."""
        if advanceClock:
            self.clock.advance(0)
        moved = False
        if self.to_server:
            data = self.clientIO.getOutBuffer()
            if data:
                moved = True
                self._deliver(self.serverIO, data)
        if self.to_client:
            data = self.serverIO.getOutBuffer()
            if data:
                moved = True
                self._deliver(self.clientIO, data)
        if moved:
            return True
        for closing, other in ((self.serverIO, self.clientIO), (self.clientIO, self.serverIO)):
            if closing.disconnecting and not closing.disconnected:
                closing.disconnected = True
                other.disconnecting = True
                other.disconnected = True
                other.reportDisconnect()
                closing.reportDisconnect()
                return True
        return False


def settle(clock: Any, wires: Any, limit: int = 100_000) -> None:
    """Pump ``wires`` and run the calls due on ``clock`` until nothing moves."""
    for _ in range(limit):
        moved = False
        for wire in wires:
            moved = wire.pump() or moved
        due = [c for c in clock.getDelayedCalls() if c.getTime() <= clock.seconds()]
        if not moved and not due:
            return
    raise AssertionError(f"the wires did not settle in {limit} rounds")
