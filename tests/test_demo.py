"""The demo, as a newcomer runs it: ``twistd -n sitesrv --demo``.

`DemoRunTests` and `DemoCommandTests` run the demo on its real, fixed loopback ports
(9101, 9191-9195, 9291-9294, 9631): they are skipped when one of those is taken, and
they run one after the other, each stopping everything before it ends.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
from contextlib import redirect_stdout
from typing import Any

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers

from sitesrv import demo
from sitesrv.demoparts import DemoPrinter, StartWhen
from sitesrv.secrets import check_verifier
from sitesrv.store import Store, admins
from sitesrv.store.jobs import thdListJobs
from sitesrv.store.users import thdListUsers
from tests.processes import (
    TWISTD,
    get_health,
    reactor,
    twistd_unavailable,
    wait_for,
)

#: Every port the demo listens on.
DEMO_PORTS = (
    demo.PRINTER_PORT,
    9191,
    demo.REPLICATION_PORT,
    9193,
    demo.LINK_PROXY_PORT,
    9291,
    9293,
    demo.CARD_READER_PORT,
    demo.IPP_PORT,
)


def _taken_port() -> int | None:
    """A demo port something else listens on (or holds), or None."""
    for port in DEMO_PORTS:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return port
    return None


class _InTempDirectory:
    """Run the test in a fresh directory, as a newcomer runs the demo."""

    def enterTempDirectory(self, test: Any) -> None:
        directory = os.path.abspath(test.mktemp())
        os.makedirs(directory)
        cwd = os.getcwd()
        os.chdir(directory)
        test.addCleanup(os.chdir, cwd)


class DemoSetUpTests(SynchronousTestCase, _InTempDirectory):
    """make_demo prepares ./var/demo once, and is idempotent."""

    def setUp(self) -> None:
        self.enterTempDirectory(self)

    def make(self) -> tuple[demo.Demo, str]:
        out = io.StringIO()
        with redirect_stdout(out):
            service = demo.make_demo(MemoryReactorClock())
        for server in (service.primary, service.site):
            self.addCleanup(server.store.stop)
        return service, out.getvalue()

    def test_first_start(self) -> None:
        """Configs, certificates, token, device and provider keys and demo users are made."""
        service, sheet = self.make()
        for path in (
            "primary.toml",
            "branch.toml",
            "tls/ca.crt",
            "tls/server.key",
            "branch/token",
            "branch/mfd.key",
            "branch/provider.key",
        ):
            self.assertTrue(os.path.exists(os.path.join("var", "demo", path)), path)
        store: Store = service.primary.store
        names = [u.username for u in store.read(thdListUsers)]
        self.assertEqual(names, ["alice", "bob", "carol"])
        with open(os.path.join("var", "demo", "branch", "mfd.key")) as f:
            key = f.read().strip()
        # The sheet's commands use the real key and the real config paths.
        self.assertIn(f"Bearer {key}", sheet)
        self.assertIn("sitesrv-admin --config var/demo/primary.toml user list", sheet)
        for secret in ("token", "provider.key"):
            mode = os.stat(os.path.join("var", "demo", "branch", secret)).st_mode
            self.assertEqual(mode & 0o077, 0, secret)

    def test_sheet(self) -> None:
        """The sheet names the status pages, the release station, the printer, the outage."""
        _, sheet = self.make()
        for text in (
            "http://127.0.0.1:9193/",
            "http://127.0.0.1:9293/release",
            "admin / admin-pass",
            "card 1001 + PIN 1234",
            "ipp://127.0.0.1:9631/ipp/print/branch-colour",
            '"Simulate outage"',
            '"Restore link"',
        ):
            self.assertIn(text, sheet)

    def test_admin_logins(self) -> None:
        """admin / admin-pass is an administrator at the primary and at the site."""
        service, _ = self.make()
        verifier = service.primary.store.read(admins.thdAdminVerifier, "admin")
        assert verifier is not None
        self.assertTrue(check_verifier("admin-pass", verifier))
        site_admins = service.site.config.web.admins
        self.assertTrue(check_verifier("admin-pass", site_admins["admin"]))
        self.assertFalse(check_verifier("wrong", site_admins["admin"]))
        # Seeded once.
        service, _ = self.make()
        self.assertEqual(
            [a.name for a in service.primary.store.read(admins.thdListAdmins)], ["admin"]
        )

    def test_site_link_through_proxy(self) -> None:
        """The site reaches the primary through the demo's fault proxy."""
        service, _ = self.make()
        config = service.site.config
        assert config.primary is not None
        self.assertEqual(config.primary.endpoint, f"tcp:127.0.0.1:{demo.LINK_PROXY_PORT}")
        self.assertEqual(service.proxy.proxy.targetPort, demo.REPLICATION_PORT)
        self.assertEqual(
            service.provider.config.printers, {"branch-colour": "socket://127.0.0.1:9101"}
        )

    def test_controls_cut_and_restore(self) -> None:
        """The controls cut and heal the proxy, and say whether it is cut."""
        service, _ = self.make()
        controls = service.controls
        self.assertFalse(controls.linkCut())
        self.successResultOf(controls.cutLink())
        self.assertTrue(controls.linkCut())
        self.successResultOf(controls.restoreLink())
        self.assertFalse(controls.linkCut())

    def test_controls_attached(self) -> None:
        """Both status pages get the controls."""
        service, _ = self.make()
        for server in (service.primary, service.site):
            self.assertIs(server.status_page.demo, service.controls)

    def test_second_start_keeps_data(self) -> None:
        """Starting again reuses what is there: no second seeding, same keys."""
        self.make()
        with open(os.path.join("var", "demo", "branch", "mfd.key")) as f:
            key = f.read()
        with open(os.path.join("var", "demo", "branch", "provider.key")) as f:
            provider_key = f.read()
        service, sheet = self.make()
        with open(os.path.join("var", "demo", "branch", "mfd.key")) as f:
            self.assertEqual(f.read(), key)
        with open(os.path.join("var", "demo", "branch", "provider.key")) as f:
            self.assertEqual(f.read(), provider_key)
        self.assertEqual(len(service.primary.store.read(thdListUsers)), 3)
        self.assertIn(key.strip(), sheet)

    def test_lost_provider_key(self) -> None:
        """A deleted provider key file is replaced by a new key at the next start."""
        self.make()
        path = os.path.join("var", "demo", "branch", "provider.key")
        with open(path) as f:
            old = f.read()
        os.remove(path)
        self.make()
        with open(path) as f:
            self.assertNotEqual(f.read(), old)


class DemoPartsTests(SynchronousTestCase):
    """The demo printer and the delayed start."""

    def test_printer_counts(self) -> None:
        """Each non-empty connection is one job; bytes are added up."""
        printer = DemoPrinter(0, MemoryReactorClock())
        printer.received(0)
        printer.received(100)
        printer.received(20)
        self.assertEqual((printer.jobs, printer.bytes), (2, 120))

    def test_start_when(self) -> None:
        """Children start once the condition holds, and stop only if started."""
        clock = MemoryReactorClock()
        ready = [False]
        gate = StartWhen(lambda: Deferred.fromCoroutine(_value(ready[0])), clock, "child")
        child = DemoPrinter(0, clock)
        child.setServiceParent(gate)
        gate.startService()
        self.assertFalse(child.running)
        ready[0] = True
        clock.advance(1)
        self.assertTrue(child.running)
        self.successResultOf(gate.stopService())
        self.assertFalse(child.running)

    def test_start_when_never_ready(self) -> None:
        """Stopping before the condition held stops nothing that never started."""
        clock = MemoryReactorClock()
        gate = StartWhen(lambda: Deferred.fromCoroutine(_value(False)), clock, "child")
        child = DemoPrinter(0, clock)
        child.setServiceParent(gate)
        gate.startService()
        clock.advance(5)
        self.successResultOf(gate.stopService())
        self.assertFalse(child.running)
        self.assertEqual(clock.getDelayedCalls(), [])


async def _value(value: bool) -> bool:
    return value


_pool = HTTPConnectionPool(reactor, persistent=False)
_agent = Agent(reactor, pool=_pool, connectTimeout=2)


async def _api(method: str, path: str, key: str, body: Any = None) -> tuple[int, Any]:
    """One request to the site's device API: (status, JSON)."""
    headers = Headers({b"authorization": [f"Bearer {key}".encode()]})
    producer = None
    if body is not None:
        headers.addRawHeader(b"content-type", b"application/json")
        producer = FileBodyProducer(io.BytesIO(json.dumps(body).encode()))
    d = _agent.request(
        method.encode(), f"http://127.0.0.1:9293/api/v1/{path}".encode(), headers, producer
    )
    d.addTimeout(5, reactor)
    response = await d
    data = await readBody(response)
    return response.code, json.loads(data) if data else None


class DemoRunTests(TestCase, _InTempDirectory):
    """The outage a newcomer tries, in this process on the demo's own ports.

    The site gets online, the provider connects and the sample job is held for alice;
    "Simulate outage" takes the site offline, where alice releases the job at the MFD
    and the demo printer receives it; "Restore link" brings the site back online with
    the charge handed to the primary.
    """

    timeout = 60

    def setUp(self) -> None:
        port = _taken_port()
        if port is not None:
            self.skipTest(f"port {port} is in use; the demo needs its fixed ports")
        self.enterTempDirectory(self)
        with redirect_stdout(io.StringIO()):
            self.demo = demo.make_demo(reactor)
        self.demo.startService()
        self.addCleanup(self.demo.stopService)
        with open(os.path.join("var", "demo", "branch", "mfd.key")) as f:
            self.key = f.read().strip()

    async def site(self, check: Any, what: str) -> dict[str, Any]:
        """Poll the site's /health until ``check(body)``; return the body."""

        async def poll() -> dict[str, Any] | None:
            health = await get_health(9293)
            return health.body if health.code is not None and check(health.body) else None

        result: dict[str, Any] = await wait_for(lambda: ensureDeferred(poll()), what, 15)
        return result

    async def _outage(self) -> None:
        controls = self.demo.controls
        await self.site(lambda h: h["mode"] == "online", "site online")
        await self.site(lambda h: demo.PROVIDER_NAME in h["providers"], "provider connected")
        marker = os.path.join("var", "demo", demo.PROVIDER_NAME, "sample-printed")
        await wait_for(lambda: os.path.exists(marker), "sample job held", 15)
        status, session = await _api("POST", "sessions", self.key, {"card": "1001", "pin": "1234"})
        self.assertEqual(status, 201, session)
        sid = session["session"]
        status, jobs = await _api("GET", f"sessions/{sid}/jobs", self.key)
        self.assertEqual(status, 200, jobs)
        self.assertEqual([j["document"] for j in jobs["jobs"]], ["Demo page"])

        await controls.cutLink()
        self.assertTrue(controls.linkCut())
        await self.site(lambda h: h["mode"] == "offline", "site offline after the cut")
        status, released = await _api("POST", f"sessions/{sid}/release", self.key, {})
        self.assertEqual((status, released["released"]), (200, 1), released)
        self.assertTrue(released["offline"])
        await wait_for(lambda: self.demo.printer.jobs == 1, "demo printer received the job")
        offline = await self.site(
            lambda h: h["outbox_pending"] >= 1, "the charge waits in the site's outbox"
        )
        self.assertEqual(offline["mode"], "offline")

        await controls.restoreLink()
        self.assertFalse(controls.linkCut())
        await self.site(
            lambda h: h["mode"] == "online" and h["outbox_pending"] == 0,
            "site online with its outbox drained",
        )
        logged = await self.demo.primary.store.runRead(thdListJobs, "alice")
        self.assertEqual([j.document for j in logged], ["Demo page"])

    def test_outage(self) -> None:
        """Cut the link, release offline, restore: reconciled at the primary."""
        return ensureDeferred(self._outage())


class DemoCommandTests(TestCase):
    """The README's demo command starts a primary and a site that replicate."""

    timeout = 60

    def setUp(self) -> None:
        reason = twistd_unavailable()
        if reason:
            self.skipTest(reason)
        port = _taken_port()
        if port is not None:
            self.skipTest(f"port {port} is in use; the demo needs its fixed ports")

    async def _demo(self) -> None:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        log = open(os.path.join(directory, "demo.log"), "wb")  # noqa: SIM115
        self.addCleanup(log.close)
        process = subprocess.Popen(
            [*TWISTD, "-n", "--pidfile=", "sitesrv", "--demo"],
            cwd=directory,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )

        def stop() -> None:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()

        self.addCleanup(stop)

        async def provider_connected() -> bool:
            health = await get_health(9293)
            return health.mode == "online" and demo.PROVIDER_NAME in health.body["providers"]

        try:
            await wait_for(
                lambda: ensureDeferred(provider_connected()), "demo site online, provider in", 30
            )
            marker = os.path.join(directory, "var", "demo", demo.PROVIDER_NAME, "sample-printed")
            await wait_for(lambda: os.path.exists(marker), "sample job held", 15)
        except AssertionError:
            with open(os.path.join(directory, "demo.log"), errors="replace") as f:
                sys.stderr.write(f.read()[-4000:])
            raise
        primary = await get_health(9193)
        self.assertEqual((primary.code, primary.body["role"]), (200, "primary"))
        stop()
        # twistd shuts down cleanly on SIGTERM, then exits by that same signal.
        self.assertIn(process.returncode, (0, -signal.SIGTERM))
        with open(os.path.join(directory, "demo.log"), errors="replace") as f:
            text = f.read()
        self.assertIn("sitesrv demo", text)
        self.assertIn("demo: alice's 'Demo page' (1 page) sent to branch-colour: held", text)
        self.assertIn("Server Shut Down", text)
        self.assertNotIn("Traceback", text)

    def test_demo(self) -> None:
        """``twistd -n sitesrv --demo``: online, provider connected, sample held, clean stop."""
        return ensureDeferred(self._demo())
