"""The connector manager: one connector service per device record of this server's site.

Device records are replicated data (a primary serves its own site's devices too), so
they change under a running server. The manager reads the site's devices about once a
second (a small table, one cheap query) and diffs them with what runs: a new device
gets a service from its connector plugin, a removed one has its service stopped, and a
changed one (connector, options or printer) is stopped and started again.

One bad record must never stop a site: a device naming a connector no plugin provides,
with options its connector does not know or refuses, or whose connector fails to make
or start its service, is logged, listed in `ConnectorManager.problems` (``/health``)
and skipped, while the other devices keep running.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

import attrs
from twisted.application.service import IService, MultiService
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from sitesrv.core.devicecore import DeviceCore
from sitesrv.errors import SitesrvError
from sitesrv.interfaces import IConnectorFactory, IDeviceCore
from sitesrv.plugins import UnknownConnector, find_connectors
from sitesrv.store.devices import Device, thdListDevices

log = Logger()

#: How often the devices table is read.
POLL_INTERVAL = 1.0
#: An unknown connector name makes the manager look for plugins again, at most this often
#: (a vendor module installed while the server runs is found without a restart).
REDISCOVER_INTERVAL = 60.0


@attrs.frozen
class _Running:
    """A device whose connector service runs, and the core it was given."""

    device: Device
    service: IService
    core: IDeviceCore


@attrs.frozen
class _Skipped:
    """A device that was not started, and why; ``unknown`` when no plugin provided it."""

    device: Device
    why: str
    unknown: bool = False


@attrs.frozen
class DeviceState:
    """One device of this site as the status page shows it."""

    name: str
    connector: str
    printer: str | None
    #: "running" or "skipped".
    state: str
    connections: int
    #: Why it was skipped, or the problem its connector reports ("" when none).
    problem: str


def _config(device: Device) -> tuple[str, str, tuple[tuple[str, str], ...], str | None]:
    """What a connector service is made from: a change to any of it restarts the service."""
    return (device.site, device.connector, tuple(sorted(device.options.items())), device.printer)


class ConnectorManager(MultiService):
    """Runs a connector service for each device of ``site``; see the module docstring.

    ``read`` is ``Store.runRead``; ``make_core`` builds a device's ``IDeviceCore``
    (with the ``changed`` callback to call when its connections or problem change);
    ``discover`` returns the connector plugins by name (``plugins.find_connectors``,
    injected in tests). ``on_connections`` is called with a connector name and its total
    open connections whenever that changes (the metrics gauge).
    """

    def __init__(
        self,
        site: str,
        read: Callable[..., Deferred[Any]],
        make_core: Callable[[Device, Callable[[DeviceCore], None]], IDeviceCore],
        clock: Any,
        *,
        discover: Callable[[], Mapping[str, IConnectorFactory]] = find_connectors,
        interval: float = POLL_INTERVAL,
        on_connections: Callable[[str, int], None] = lambda connector, count: None,
    ) -> None:
        super().__init__()
        self.setName("connectors")
        self.site = site
        self.read = read
        self.make_core = make_core
        self.clock = clock
        self.discover = discover
        self.interval = interval
        self.on_connections = on_connections
        #: The connector plugins found, by name.
        self.factories: dict[str, IConnectorFactory] = {}
        #: The devices whose connector service runs, by name.
        self.devices: dict[str, _Running] = {}
        #: The devices skipped, by name.
        self.skipped: dict[str, _Skipped] = {}
        self._discovered_at = float("-inf")
        self._loop: LoopingCall | None = None
        self._syncing: Deferred[None] | None = None
        self._totals: dict[str, int] = {}

    # -- what /health and the metrics show -------------------------------------------

    def problems(self) -> list[str]:
        """One sentence per device that is skipped or whose connector reports a problem."""
        found = [f"device {name!r}: {s.why}" for name, s in sorted(self.skipped.items())]
        for name, running in sorted(self.devices.items()):
            problem = getattr(running.core, "problem", None)
            if problem:
                found.append(f"device {name!r} ({running.device.connector}): {problem}")
        return found

    def connections(self) -> dict[str, int]:
        """Open connections by connector name, over the running devices."""
        totals: dict[str, int] = {}
        for running in self.devices.values():
            count = int(getattr(running.core, "connections", 0))
            connector = running.device.connector
            totals[connector] = totals.get(connector, 0) + count
        return totals

    def deviceStates(self) -> list[DeviceState]:
        """Every device of this site the manager knows, running or skipped, by name."""
        states = [
            DeviceState(
                name=name,
                connector=r.device.connector,
                printer=r.device.printer,
                state="running",
                connections=int(getattr(r.core, "connections", 0)),
                problem=str(getattr(r.core, "problem", "") or ""),
            )
            for name, r in self.devices.items()
        ]
        states += [
            DeviceState(
                name=name,
                connector=s.device.connector,
                printer=s.device.printer,
                state="skipped",
                connections=0,
                problem=s.why,
            )
            for name, s in self.skipped.items()
        ]
        return sorted(states, key=lambda s: s.name)

    def known(self) -> list[str]:
        """The connector names the installed plugins provide."""
        return sorted(self.factories)

    def _countsChanged(self, _core: object = None) -> None:
        totals = self.connections()
        for connector in sorted(set(totals) | set(self._totals)):
            count = totals.get(connector, 0)
            if self._totals.get(connector, 0) != count or connector not in self._totals:
                self.on_connections(connector, count)
        self._totals = totals

    # -- the service ----------------------------------------------------------------

    def startService(self) -> None:
        """Find the plugins and start polling the devices table (at once)."""
        super().startService()
        self._rediscover()
        self._loop = LoopingCall(self.poll)
        self._loop.clock = self.clock
        d = self._loop.start(self.interval, now=True)
        d.addErrback(lambda f: log.failure("connector manager polling stopped", f))

    def stopService(self) -> Deferred[None]:
        """Stop polling, then every device's connector service."""
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self._syncing is not None:
            # Let a sync in progress finish, so that nothing starts after this.
            await self._syncing
        await _maybe(super().stopService())
        self.devices.clear()
        self._countsChanged()

    def _rediscover(self) -> None:
        self._discovered_at = self.clock.seconds()
        # A module installed since the last look must not be hidden by stale finders.
        importlib.invalidate_caches()
        try:
            self.factories = dict(self.discover())
        except Exception:
            # A broken plugin module must not stop the site: keep what was found before.
            log.failure("looking for connector plugins failed")
        log.info("connector plugins found: {known}", known=", ".join(self.known()) or "none")

    # -- polling and diffing -----------------------------------------------------------

    def poll(self) -> Deferred[None] | None:
        """Read the devices and bring the running services in line (one sync at a time)."""
        if self._syncing is not None or not self.running:
            return None
        d = Deferred.fromCoroutine(self._sync())
        self._syncing = d
        d.addErrback(
            lambda f: log.failure("reading the devices of site {site}", f, site=self.site)
        )

        def done(_: object) -> None:
            self._syncing = None

        d.addBoth(done)
        return d

    async def _sync(self) -> None:
        devices: list[Device] = await self.read(thdListDevices, self.site)
        wanted = {d.name: d for d in devices}
        for name in [n for n in self.devices if n not in wanted]:
            log.info("device {device} removed: stopping its connector", device=name)
            await self._stopDevice(name)
        for name in [n for n in self.skipped if n not in wanted]:
            log.info("device {device} removed", device=name)
            del self.skipped[name]
        unknown = [d for d in devices if d.connector not in self.factories]
        if unknown and self.clock.seconds() - self._discovered_at >= REDISCOVER_INTERVAL:
            self._rediscover()
        for device in devices:
            running = self.devices.get(device.name)
            if running is not None:
                if _config(running.device) == _config(device):
                    continue
                log.info(
                    "device {device} changed: restarting its connector ({connector})",
                    device=device.name,
                    connector=device.connector,
                )
                await self._stopDevice(device.name)
            skipped = self.skipped.get(device.name)
            if skipped is not None:
                now_known = skipped.unknown and device.connector in self.factories
                if _config(skipped.device) == _config(device) and not now_known:
                    continue
                del self.skipped[device.name]
            if not self.running:
                return
            self._startDevice(device)

    def _skip(self, device: Device, why: str, unknown: bool = False) -> None:
        self.skipped[device.name] = _Skipped(device, why, unknown)
        log.error(
            "device {device} at site {site} skipped, the others keep running: {why}",
            device=device.name,
            site=device.site,
            connector=device.connector,
            why=why,
        )

    def _startDevice(self, device: Device) -> None:
        factory = self.factories.get(device.connector)
        if factory is None:
            self._skip(device, str(UnknownConnector(device.connector, self.known())), True)
            return
        schema = dict(factory.options)
        unknown = sorted(set(device.options) - set(schema))
        if unknown:
            self._skip(
                device,
                f"unknown option(s) {', '.join(unknown)} for connector {device.connector!r} "
                f"(its options: {', '.join(sorted(schema)) or 'none'})",
            )
            return
        core = self.make_core(device, self._countsChanged)
        try:
            service = IService(factory.makeService(device, core))
        except Exception as e:
            if not isinstance(e, ValueError | SitesrvError):
                log.failure(
                    "connector {connector} failed to make a service for device {device}",
                    connector=device.connector,
                    device=device.name,
                )
            reason = str(e) or type(e).__name__
            self._skip(device, f"connector {device.connector!r} refused it: {reason}")
            return
        service.setName(f"device:{device.name}")
        try:
            service.setServiceParent(self)
        except Exception as e:
            log.failure("starting the connector of device {device}", device=device.name)
            if service in self:
                self.removeService(service)
            self._skip(device, f"connector {device.connector!r} failed to start: {e}")
            return
        self.devices[device.name] = _Running(device, service, core)
        self._countsChanged()
        log.info(
            "device {device} started with connector {connector}",
            device=device.name,
            connector=device.connector,
            printer=device.printer,
        )

    async def _stopDevice(self, name: str) -> None:
        running = self.devices.pop(name, None)
        if running is None:
            return
        try:
            await _maybe(self.removeService(running.service))
        except Exception:
            log.failure("stopping the connector of device {device}", device=name)
        self._countsChanged()


async def _maybe(result: Any) -> Any:
    """Await ``result`` if it is a Deferred (stopping a service may return one or None)."""
    if isinstance(result, Deferred):
        return await result
    return result
