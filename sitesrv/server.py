"""A running server (primary or site): the service tree built from a config.

store → (replication) → gate → front-ends, as a ``MultiService``. Listeners come from
endpoint strings in the config, so TCP, TLS, interfaces and ports are the user's choice.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy.exc import SQLAlchemyError
from twisted.application import strports
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorThreads, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from twisted.web.server import Site
from zope.interface import implementer

import sitesrv
from sitesrv.cardnumber import CardNormaliser
from sitesrv.config import Config
from sitesrv.core.auth import Authenticator, FailureThrottle
from sitesrv.interfaces import IStatusSource
from sitesrv.store import Store
from sitesrv.store.bootstrap import open_store, thdInitPrimary
from sitesrv.web.root import make_root

T = TypeVar("T")

log = Logger()


class StartupError(Exception):
    """The server cannot start; ``str()`` is one line for the administrator."""


@implementer(IStatusSource)
class Server(MultiService):
    """The root service of one sitesrv process (one role)."""

    def __init__(self, config: Config, store: Store, reactor: Any) -> None:
        super().__init__()
        self.config = config
        self.store = store
        self.reactor = reactor
        self.started_at = reactor.seconds()
        # scrypt and PDF page counting run here, never on the reactor thread.
        self.cpu = ThreadPool(1, 2, "sitesrv-cpu")
        self.authenticator = Authenticator(
            read=store.runRead,
            throttle=FailureThrottle(reactor),
            verify=self.runCPU,
            normaliser=CardNormaliser(),
        )
        self.web = strports.service(config.listen.web, Site(make_root(self)), reactor=reactor)
        self.web.setServiceParent(self)

    def runCPU(self, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        """Run CPU-heavy ``fn(*args)`` on the CPU thread pool."""
        return deferToThreadPool(self.reactor, self.cpu, fn, *args)

    def startService(self) -> None:
        """Start the thread pools, then the listeners."""
        self.store.start(self.reactor)
        self.cpu.start()
        super().startService()
        log.info(
            "sitesrv {version} started as {role} {name!r}; web on {web}",
            version=sitesrv.__version__,
            role=self.config.role,
            name=self.config.name,
            web=self.config.listen.web,
        )

    async def _stop(self) -> None:
        await super().stopService()  # type: ignore[misc]
        self.cpu.stop()
        self.store.stop()

    def stopService(self) -> Deferred[None]:
        """Stop the listeners, then the thread pools."""
        return Deferred.fromCoroutine(self._stop())

    # -- IStatusSource -------------------------------------------------------------------

    def mode(self) -> str:
        """The server's mode: a primary is always online; a site has no replica yet."""
        return "online" if self.config.role == "primary" else "unsynced"

    def serving(self) -> bool:
        """Whether requests are answered in the current mode."""
        return self.mode() not in ("unsynced", "revoked")

    def status(self) -> dict[str, Any]:
        """What ``/health`` reports."""
        return {
            "role": self.config.role,
            "name": self.config.name,
            "version": sitesrv.__version__,
            "protocol_version": sitesrv.PROTOCOL_VERSION,
            "mode": self.mode(),
            "since": self.started_at,
            "problems": [],
        }


def make_server(config: Config, reactor: IReactorTime | IReactorThreads) -> Server:
    """Open and migrate the database and build the service tree for ``config``."""
    try:
        store = open_store(config.database)
        if config.role == "primary":
            store.write(
                thdInitPrimary,
                config.name,
                config.currency,
                config.decimals,
                reactor.seconds(),  # type: ignore[union-attr]
            )
    except SQLAlchemyError as e:
        first = str(e.orig if getattr(e, "orig", None) else e).strip().splitlines()[0]
        raise StartupError(f"cannot open database {config.database}: {first}") from None
    except OSError as e:
        raise StartupError(f"cannot create the database directory: {e}") from None
    return Server(config, store, reactor)
