"""Tests of connector discovery and the connector manager, on a ``Clock``.

Device records are added, changed and removed at a primary and replicated (inline) to
site "north", whose manager polls its replica; connector plugins are small recording
fakes, injected as the discovery function, plus the real built-in plugins for
discovery itself. A ``Server`` built in-process shows the manager's problems on
``/health`` and its connection counts in ``/metrics``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

from twisted.application.service import IService, Service
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.plugin import IPlugin
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

import connectors
from sitesrv.connectormanager import POLL_INTERVAL, REDISCOVER_INTERVAL, ConnectorManager
from sitesrv.core.devicecore import DeviceCore, InvalidOptions
from sitesrv.interfaces import IConnectorFactory, IDeviceCore
from sitesrv.plugins import UnknownConnector, find_connectors, get_connector
from sitesrv.store import Store
from sitesrv.store.bootstrap import thdInitPrimary
from sitesrv.store.changelog import thdUpdate
from sitesrv.store.devices import Device, thdAddDevice, thdDevice, thdRemoveDevice
from sitesrv.store.printers import thdAddPrinter
from sitesrv.store.schema import devices
from sitesrv.store.sites import thdAddSite
from tests.inprocess import get, make_server
from tests.support import NOW, open_inline_store, sqlite_url
from tests.test_outbox import load_snapshot, sync

SITE = "north"


class DeviceService(Service):
    """What the fake connector runs for a device: records its life; can fail to start."""

    def __init__(self, device: Device, core: IDeviceCore, log: list[tuple[str, str]]) -> None:
        self.device = device
        self.core = core
        self.log = log

    def startService(self) -> None:
        if self.device.options.get("fail") == "start":
            raise RuntimeError("port 4000 is taken")
        super().startService()
        self.log.append(("start", self.device.name))
        self.core.setConnections(int(self.device.options.get("connections", "0")))

    def stopService(self) -> None:
        super().stopService()
        self.log.append(("stop", self.device.name))


@implementer(IPlugin, IConnectorFactory)
class FakeConnector:
    """A connector plugin that records what it makes; ``fail`` makes it refuse or break."""

    description = "a connector for tests"
    options: Mapping[str, str] = {
        "port": "any text",
        "fail": "make (InvalidOptions), crash (a bug) or start (fails when started)",
        "connections": "connections to report once started",
    }

    def __init__(self, name: str) -> None:
        self.name = name
        self.log: list[tuple[str, str]] = []
        self.services: list[DeviceService] = []

    def makeService(self, device: Device, core: IDeviceCore) -> IService:
        if device.options.get("fail") == "make":
            raise InvalidOptions("fail=make is not a setting this connector accepts")
        if device.options.get("fail") == "crash":
            raise RuntimeError("connector bug")
        service = DeviceService(device, core, self.log)
        self.services.append(service)
        return service


class DiscoveryTests(SynchronousTestCase):
    """The built-in plugins are found in the connectors package and are complete."""

    def test_builtin_plugins(self) -> None:
        """card-reader and http are found, each providing IPlugin and IConnectorFactory."""
        found = find_connectors()
        self.assertLessEqual({"card-reader", "http"}, set(found))
        for name, factory in found.items():
            self.assertEqual(factory.name, name)
            self.assertTrue(IPlugin.providedBy(factory))
            self.assertTrue(verifyObject(IConnectorFactory, factory))
            self.assertIsInstance(factory.description, str)
            self.assertTrue(all(isinstance(v, str) for v in factory.options.values()))

    def test_unknown_names_the_known(self) -> None:
        """Asking for a connector nobody provides lists the ones that exist."""
        error = self.assertRaises(UnknownConnector, get_connector, "acme-terminal", connectors)
        self.assertIn("unknown connector 'acme-terminal' (known connectors: ", str(error))
        self.assertIn("card-reader", error.known)
        self.assertIs(get_connector("card-reader"), find_connectors()["card-reader"])

    def test_fake_plugin_is_complete(self) -> None:
        """The fake used below keeps the same contract."""
        self.assertTrue(verifyObject(IConnectorFactory, FakeConnector("fake")))


class ManagerFixture(SynchronousTestCase):
    """A primary with sites north and south, north's replica, and north's manager."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.primary: Store = open_inline_store(sqlite_url(self, "primary.db"))
        self.addCleanup(self.primary.stop)
        w = self.primary.write
        w(thdInitPrimary, "hq", "USD", 2, NOW)
        w(thdAddSite, SITE, NOW)
        w(thdAddSite, "south", NOW)
        w(thdAddPrinter, "north-hold", SITE, 10, 50, NOW, hold=True)
        self.add("r1")
        self.add("s1", site="south")
        self.site: Store = open_inline_store(sqlite_url(self, "site.db"))
        self.addCleanup(self.site.stop)
        load_snapshot(self.primary, self.site)
        self.fake = FakeConnector("fake")
        self.other = FakeConnector("other")
        self.plugins: dict[str, IConnectorFactory] = {"fake": self.fake, "other": self.other}
        self.counts: list[tuple[str, int]] = []
        self.manager = ConnectorManager(
            SITE,
            self.site.runRead,
            self.core,
            self.clock,
            discover=lambda: dict(self.plugins),
            on_connections=lambda name, count: self.counts.append((name, count)),
        )
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def core(self, device: Device, changed: Any) -> DeviceCore:
        # Only the reporting half of the core is used here; nothing logs in.
        return DeviceCore(
            device, cast(Any, None), cast(Any, None), self.site.runRead, self.clock, changed
        )

    def add(self, name: str, connector: str = "fake", site: str = SITE, **options: str) -> None:
        """Add a device at the primary."""
        self.primary.write(
            thdAddDevice, name, site, connector, NOW, printer=None, options=dict(options)
        )

    def change(self, name: str, **values: Any) -> None:
        """Change a device's row at the primary (as an update replicates)."""
        record = self.primary.read(thdDevice, name)
        self.primary.write(thdUpdate, devices, record.id, values, NOW)

    def replicate(self) -> None:
        """Replicate to north, and let the manager's next poll run."""
        sync(self.primary, self.site)
        self.clock.advance(POLL_INTERVAL)

    def start(self) -> None:
        self.manager.startService()
        self.addCleanup(self.manager.stopService)

    def running(self) -> list[str]:
        return sorted(self.manager.devices)

    def logged(self, text: str) -> list[str]:
        return [formatEvent(e) for e in self.events if text in formatEvent(e)]


class LifecycleTests(ManagerFixture):
    """Devices are started, restarted and stopped as their records change."""

    def test_starts_its_own_sites_devices(self) -> None:
        """At start the manager runs north's devices, and never south's."""
        self.start()
        self.assertEqual(self.running(), ["r1"])
        self.assertEqual(self.fake.log, [("start", "r1")])
        self.assertEqual(self.manager.problems(), [])

    def test_added_changed_removed(self) -> None:
        """Within a poll of replication: added → started; changed → restarted with the
        new record; removed → stopped. Unchanged devices are left alone."""
        self.start()
        self.add("r2", port="4000")
        self.replicate()
        self.assertEqual(self.running(), ["r1", "r2"])
        self.change("r2", options='{"port": "4001"}')
        self.replicate()
        self.assertEqual(self.fake.services[-1].device.options, {"port": "4001"})
        self.primary.write(thdRemoveDevice, "r1", NOW)
        self.replicate()
        self.assertEqual(self.running(), ["r2"])
        self.assertEqual(
            self.fake.log,
            [("start", "r1"), ("start", "r2"), ("stop", "r2"), ("start", "r2"), ("stop", "r1")],
        )
        self.clock.advance(POLL_INTERVAL * 5)
        self.assertEqual(len(self.fake.log), 5)

    def test_connector_changed(self) -> None:
        """A device moved to another connector is stopped in one and started in the other."""
        self.start()
        self.change("r1", connector="other")
        self.replicate()
        self.assertEqual((self.fake.log[-1], self.other.log), (("stop", "r1"), [("start", "r1")]))

    def test_stop_stops_every_device(self) -> None:
        self.add("r2")
        self.replicate()
        self.start()
        self.successResultOf(self.manager.stopService())
        self.assertEqual(sorted(self.fake.log[2:]), [("stop", "r1"), ("stop", "r2")])
        self.assertEqual(self.running(), [])
        self.clock.advance(POLL_INTERVAL * 3)
        self.assertEqual(len(self.fake.log), 4)


class ProblemTests(ManagerFixture):
    """One bad record is reported and skipped; the others keep running."""

    def test_unknown_connector(self) -> None:
        """An unknown connector is logged and shown with the known names; once a plugin
        provides it (looked for again after a while) the device starts."""
        self.add("m1", connector="acme-terminal")
        self.replicate()
        self.start()
        self.assertEqual(self.running(), ["r1"])
        problem = "device 'm1': unknown connector 'acme-terminal' (known connectors: fake, other)"
        self.assertEqual(self.manager.problems(), [problem])
        self.assertEqual(
            self.logged("skipped"),
            [
                "device m1 at site north skipped, the others keep running: unknown connector "
                "'acme-terminal' (known connectors: fake, other)"
            ],
        )
        self.add("r2")
        self.replicate()
        self.assertEqual(self.running(), ["r1", "r2"])
        self.assertEqual(len(self.logged("skipped")), 1)  # logged once, not every poll
        self.plugins["acme-terminal"] = FakeConnector("acme-terminal")
        self.clock.advance(REDISCOVER_INTERVAL)
        self.assertEqual(self.running(), ["m1", "r1", "r2"])
        self.assertEqual(self.manager.problems(), [])

    def test_bad_options_and_failing_connectors(self) -> None:
        """Unknown options, refused options, a connector bug and a service that fails to
        start: each reported, the others run; a fixed record starts."""
        self.add("b1", colour="blue")
        self.add("b2", fail="make")
        self.add("b3", fail="crash")
        self.add("b4", fail="start")
        self.replicate()
        self.start()
        self.assertEqual(self.running(), ["r1"])
        self.assertEqual(
            self.manager.problems(),
            [
                "device 'b1': unknown option(s) colour for connector 'fake' (its options: "
                "connections, fail, port)",
                "device 'b2': connector 'fake' refused it: fail=make is not a setting this "
                "connector accepts",
                "device 'b3': connector 'fake' refused it: connector bug",
                "device 'b4': connector 'fake' failed to start: port 4000 is taken",
            ],
        )
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)
        self.change("b1", options="{}")
        self.primary.write(thdRemoveDevice, "b2", NOW)
        self.replicate()
        self.assertEqual(self.running(), ["b1", "r1"])
        self.assertEqual(len(self.manager.problems()), 2)

    def test_reported_problems_and_connections(self) -> None:
        """What a running connector reports shows in problems() and the connection totals."""
        self.add("r2", connections="3")
        self.add("o1", connector="other", connections="2")
        self.replicate()
        self.start()
        self.assertEqual(self.manager.connections(), {"fake": 3, "other": 2})
        self.assertEqual(dict(self.counts), {"fake": 3, "other": 2})
        self.manager.devices["r1"].core.reportProblem("cannot listen on tcp:4000: in use")
        self.assertEqual(
            self.manager.problems(),
            ["device 'r1' (fake): cannot listen on tcp:4000: in use"],
        )
        self.primary.write(thdRemoveDevice, "r2", NOW)
        self.replicate()
        self.assertEqual(self.counts[-1], ("fake", 0))

    def test_read_failure_keeps_running(self) -> None:
        """A failed read of the devices is logged; the next poll works again."""
        self.start()
        real = self.manager.read
        self.manager.read = lambda *a, **kw: real(_broken)
        self.clock.advance(POLL_INTERVAL)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.manager.read = real
        self.add("r2")
        self.replicate()
        self.assertEqual(self.running(), ["r1", "r2"])


def _broken(conn: Any) -> None:
    raise ZeroDivisionError("database unavailable")


class ServerTests(SynchronousTestCase):
    """The manager runs in a Server of either role, visible on /health and /metrics."""

    def test_primary_serves_its_own_devices(self) -> None:
        server = make_server(self)
        w = server.store.write
        w(thdAddPrinter, "hq-hold", "hq", 10, 50, NOW, hold=True)
        w(
            thdAddDevice,
            "reader",
            "hq",
            "card-reader",
            NOW,
            printer="hq-hold",
            options={"listen": "tcp:4000:interface=127.0.0.1"},
        )
        w(thdAddDevice, "mfd", "hq", "http", NOW, printer="hq-hold")
        w(thdAddDevice, "terminal", "hq", "acme-terminal", NOW, printer="hq-hold")
        server.connectors.startService()
        self.addCleanup(server.connectors.stopService)
        self.assertEqual(sorted(server.connectors.devices), ["mfd", "reader"])
        self.assertEqual(server.reactor.tcpServers[0][0], 4000)
        [problem] = get(server, "/health").json["problems"]
        self.assertRegex(
            problem,
            r"^device 'terminal': unknown connector 'acme-terminal' \(known connectors: "
            r".*card-reader.*http.*\)$",
        )
        factory = server.reactor.tcpServers[0][1]
        protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5000))
        protocol.makeConnection(StringTransport())
        metrics = get(server, "/metrics").text
        self.assertIn('sitesrv_connector_connections{connector="card-reader"} 1.0', metrics)
