"""A running server (primary or site): the service tree built from a config.

store → (replication) → gate → front-ends, as a ``MultiService``. Listeners come from
endpoint strings in the config, so TCP, TLS, interfaces and ports are the user's choice.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy.exc import SQLAlchemyError
from twisted.application import strports
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorThreads, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from twisted.web.resource import Resource
from zope.interface import implementer

import sitesrv
from sitesrv.cardnumber import CardNormaliser
from sitesrv.config import Config
from sitesrv.connectormanager import ConnectorManager, DeviceState
from sitesrv.core.auth import Authenticator, AuthFailed, FailureThrottle
from sitesrv.core.devicecore import DeviceCore
from sitesrv.core.findme import FindMe
from sitesrv.errors import Invalid
from sitesrv.failover import Failover, FailoverObserver
from sitesrv.interfaces import IStatusSource
from sitesrv.metrics import MeasuredGate, Metrics
from sitesrv.providers.server import ProviderService
from sitesrv.replication.primary import PrimaryReplication
from sitesrv.replication.site import SiteReplication, link_endpoint
from sitesrv.sitehealth import SKEW_WARNING, SiteMonitor, skew_problem
from sitesrv.store import Store
from sitesrv.store.admins import check_admin
from sitesrv.store.bootstrap import open_store, thdInitPrimary
from sitesrv.store.devices import Device
from sitesrv.store.jobqueue import thdCountByState
from sitesrv.store.outbox import thdPendingCount, thdPrune
from sitesrv.store.replica import thdReplicaState
from sitesrv.tls import TLSError
from sitesrv.web import xmlrpc
from sitesrv.web.metrics import MeasuredSite, MetricsResource
from sitesrv.web.pages import NoIcon, Sessions
from sitesrv.web.release import ReleaseStation
from sitesrv.web.root import make_root
from sitesrv.web.sitehealth import SitesHealthResource
from sitesrv.web.status import DemoPage, LoginPage, LogoutPage, StatusPage

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
        self._prune: LoopingCall | None = None
        # This server's own registry: the demo runs two servers in one process.
        self.metrics = Metrics(config.role, config.name)
        self.sites: SiteMonitor | None = None
        self.failover: Failover | None = None
        self.observer: FailoverObserver | None = None
        self.replication: PrimaryReplication | SiteReplication | None = None
        if config.role == "primary":
            self._setUpPrimary()
        else:
            self._setUpSite()
        self.gate = MeasuredGate(
            role=config.role,
            site=config.name,
            authenticator=self.authenticator,
            read=store.runRead,
            write=store.runWrite,
            clock=reactor,
            failover=self.failover,
            recorded=self._outboxChanged,
            metrics=self.metrics,
        )
        # The Find-Me queue, and the print providers whose jobs it holds (port 9191).
        self.findme = FindMe(
            self.gate,
            store.runRead,
            store.runWrite,
            reactor,
            hold_seconds=config.providers.hold_hours * 3600.0,
        )
        self.findme.setServiceParent(self)
        self.findme.on_event = lambda event: self.metrics.jobs.labels(event=event).inc()
        self.providers = ProviderService(
            self.findme,
            self.gate,
            store.runRead,
            config.name,
            reactor,
            heartbeat=config.providers.heartbeat,
        )
        self.findme.links = self.providers
        self.providers.setServiceParent(self)
        strports.service(
            config.listen.providers, self.providers.factory(), reactor=reactor
        ).setServiceParent(self)
        # A connector service for each device of this server's own site (in both roles).
        self.connectors = ConnectorManager(
            config.name,
            store.runRead,
            self._deviceCore,
            reactor,
            on_connections=lambda name, n: self.metrics.connector_connections.labels(name).set(n),
        )
        self.connectors.setServiceParent(self)
        root = make_root(self, self.gate, store.runRead, reactor, self.findme)
        self._mountMonitoring(root)
        self._mountPages(root)
        self.site = MeasuredSite(root, self.metrics)
        self.web = strports.service(config.listen.web, self.site, reactor=reactor)
        self.web.setServiceParent(self)

    def _setUpPrimary(self) -> None:
        config = self.config
        replication = PrimaryReplication(
            self.store,
            config.name,
            self.reactor,
            heartbeat=config.replication.heartbeat,
            changelog_max_age=config.replication.changelog_max_age_days * 86400.0,
            reactor=self.reactor,
        )
        replication.setServiceParent(self)
        replication.check_password = self._checkPasswordForSite
        self.replication = replication
        self.sites = SiteMonitor(
            self.store.runRead,
            lambda: replication.sessions,
            self.reactor,
            grace=config.web.site_grace,
            started_at=self.started_at,
            outbox=lambda: {n: s.outbox_pending for n, s in replication.sessions.items()},
        )
        listener = strports.service(
            config.replication_endpoint, replication.factory(), reactor=self.reactor
        )
        listener.setServiceParent(self)

    def _setUpSite(self) -> None:
        config = self.config
        assert config.primary is not None
        self.failover = Failover(self.reactor)
        self.observer = FailoverObserver(self.failover)
        self.failover.core.listeners.append(self.metrics.transition)
        try:
            endpoint = link_endpoint(config.primary, self.reactor)
        except TLSError as e:
            raise StartupError(str(e)) from None
        replication = SiteReplication(
            self.store,
            config.name,
            config.primary,
            self.observer,
            self.reactor,
            endpoint,
            max_backoff=config.replication.max_backoff,
        )
        replication.setServiceParent(self)
        self.replication = replication
        self.authenticator.remote_password = replication.checkPassword

    def _deviceCore(self, device: Device, changed: Callable[[DeviceCore], None]) -> DeviceCore:
        """The core API a device's connector gets."""
        return DeviceCore(
            device, self.gate, self.findme, self.store.runRead, self.reactor, changed
        )

    def _checkPasswordForSite(self, username: str, password: str, device: str) -> Deferred[bool]:
        async def check() -> bool:
            try:
                await self.authenticator.password(username, password, device)
            except AuthFailed:
                return False
            return True

        return Deferred.fromCoroutine(check())

    def _mountMonitoring(self, root: Resource) -> None:
        """``/metrics``, ``/health/sites`` and (primary, token set) ``/rpc/api/xmlrpc``."""
        root.putChild(b"metrics", MetricsResource(self, self.metrics))
        root.getStaticEntity(b"health").putChild(b"sites", SitesHealthResource(self.sites))
        if self.config.role != "primary":
            return
        try:
            token = xmlrpc.read_api_token(self.config.web)
        except ValueError as e:
            raise StartupError(str(e)) from None
        if token is not None:
            api = xmlrpc.PaperCutAPI(
                token,
                self.store.runRead,
                self.store.runWrite,
                self.reactor,
                self.config.name,
                normaliser=self.authenticator.normaliser,
            )
            xmlrpc.mount(root, api)

    def _mountPages(self, root: Resource) -> None:
        """The status page ``/`` (with its login) and the release station ``/release``."""
        self.sessions = sessions = Sessions(self.reactor)
        self.status_page = StatusPage(sessions, self, self.store.runRead, self.reactor)
        throttle = FailureThrottle(self.reactor)
        root.putChild(b"", self.status_page)
        root.putChild(b"login", LoginPage(sessions, self.checkAdmin, throttle, self.config.role))
        root.putChild(b"logout", LogoutPage(sessions))
        root.putChild(b"favicon.ico", NoIcon())
        root.putChild(b"demo", DemoPage(sessions, self.status_page))
        root.putChild(
            b"release",
            ReleaseStation(sessions, self.gate, self.findme, self.store.runRead, self.config.name),
        )

    def checkAdmin(self, name: str, password: str) -> Deferred[bool]:
        """Whether ``name`` and ``password`` are an administrator's: from the config's
        ``[web.admins]``, and on the primary also those made with ``admin add``."""
        return Deferred.fromCoroutine(
            check_admin(
                name,
                password,
                config_admins=self.config.web.admins,
                read=self.store.runRead if self.config.role == "primary" else None,
                run_cpu=self.runCPU,
            )
        )

    def deviceStates(self) -> list[DeviceState]:
        """This site's devices and their connectors (for the status page)."""
        return self.connectors.deviceStates()

    def providersConnected(self) -> frozenset[str]:
        """The print providers connected now (for the status page)."""
        return self.providers.connected()

    def _outboxChanged(self) -> None:
        if isinstance(self.replication, SiteReplication):
            self.replication.outboxChanged()

    def pruneOutbox(self) -> Deferred[int]:
        """Delete outbox records the primary applied longer ago than the retention time."""
        keep = self.config.replication.outbox_retention_days * 86400.0
        return self.store.runWrite(thdPrune, self.reactor.seconds() - keep)

    def runCPU(self, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        """Run CPU-heavy ``fn(*args)`` on the CPU thread pool."""
        return deferToThreadPool(self.reactor, self.cpu, fn, *args)

    def startService(self) -> None:
        """Start the thread pools, then replication and the listeners."""
        self.store.start(self.reactor)
        self.cpu.start()
        if self.failover is not None:
            # A site with a complete replica serves at once, offline until connected.
            state = self.store.read(thdReplicaState)
            if state.complete:
                self.failover.inputs.replicaFound(
                    f"complete replica at position {state.position} stored"
                )
                self.failover.core.last_sync = state.last_sync
        super().startService()
        if self.config.role == "site":
            self._prune = LoopingCall(self.pruneOutbox)
            self._prune.clock = self.reactor
            self._prune.start(600.0, now=False)
        log.info(
            "sitesrv {version} started as {role} {name!r}; web on {web}",
            version=sitesrv.__version__,
            role=self.config.role,
            name=self.config.name,
            web=self.config.listen.web,
        )

    async def _stop(self) -> None:
        if self._prune is not None and self._prune.running:
            self._prune.stop()
        await super().stopService()
        self.cpu.stop()
        self.store.stop()

    def stopService(self) -> Deferred[None]:
        """Stop the listeners, then the thread pools."""
        return Deferred.fromCoroutine(self._stop())

    # -- IStatusSource -------------------------------------------------------------------

    def mode(self) -> str:
        """The server's mode: a primary is always online; a site's comes from failover."""
        return "online" if self.failover is None else self.failover.mode

    def serving(self) -> bool:
        """Whether requests are answered in the current mode."""
        return self.failover is None or self.failover.serving()

    def status(self) -> Deferred[dict[str, Any]]:
        """What ``/health`` reports."""
        return Deferred.fromCoroutine(self._status())

    async def _status(self) -> dict[str, Any]:
        status: dict[str, Any] = {
            "role": self.config.role,
            "name": self.config.name,
            "version": sitesrv.__version__,
            "protocol_version": sitesrv.PROTOCOL_VERSION,
            "mode": self.mode(),
            "since": self.started_at,
            # Site-only facts; on the primary each site's are under "sites".
            "last_sync": None,
            "position": None,
            "lag": None,
            "outbox_pending": None,
            "clock_skew": None,
            "problems": [],
        }
        if isinstance(self.replication, PrimaryReplication) and self.sites is not None:
            report = await self.sites.report()
            status.update(
                position=report.head,
                sites=[s.asdict() for s in report.sites],
                problems=report.problems(),
            )
        if self.failover is not None and self.observer is not None:
            assert isinstance(self.replication, SiteReplication)
            core = self.failover.core
            skew = self.observer.skew
            problems = list(self.observer.problems)
            if skew is not None and abs(skew) > SKEW_WARNING:
                problems.append(skew_problem(skew, "this site"))
            status.update(
                since=core.since,
                last_sync=core.last_sync,
                position=(await self.store.runRead(thdReplicaState)).position,
                lag=self.replication.lag(),
                clock_skew=skew,
                problems=problems,
                transitions=[
                    {"at": t.at, "from": t.old, "to": t.new, "input": t.input, "reason": t.reason}
                    for t in core.history
                ],
                outbox_pending=await self.store.runRead(thdPendingCount),
            )
        status["problems"] = [*status["problems"], *self.connectors.problems()]
        # Print providers connected now, and this server's provider jobs by state.
        status["providers"] = sorted(self.providers.connected())
        status["jobs"] = await self.store.runRead(thdCountByState)
        return status


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
        first = str(getattr(e, "orig", None) or e).strip().splitlines()[0]
        raise StartupError(f"cannot open database {config.database}: {first}") from None
    except OSError as e:
        raise StartupError(f"cannot create the database directory: {e}") from None
    except Invalid as e:
        raise StartupError(f"{config.path}: {e}") from None
    if config.role == "primary" and config.listen.replication is None:
        for path in (config.tls.key, config.tls.cert):
            if not os.path.exists(path):
                raise StartupError(
                    f"{path} is missing: the replication port uses TLS by default; create "
                    f"it with `sitesrv-admin --config {config.path} tls init --hostname HOST "
                    f"--out {os.path.dirname(path)}` or set listen.replication"
                )
    return Server(config, store, reactor)
