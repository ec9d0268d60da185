"""The demo, as a newcomer runs it: ``twistd -n sitesrv --demo``."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
from contextlib import redirect_stdout

from twisted.internet.defer import ensureDeferred
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from sitesrv import demo
from sitesrv.store import Store
from sitesrv.store.users import thdListUsers
from tests.processes import TWISTD, get_health, twistd_unavailable, wait_for


class DemoSetUpTests(SynchronousTestCase):
    """make_demo prepares ./var/demo once, and is idempotent."""

    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        cwd = os.getcwd()
        os.chdir(self.directory)
        self.addCleanup(os.chdir, cwd)

    def make(self) -> tuple[object, str]:
        out = io.StringIO()
        with redirect_stdout(out):
            service = demo.make_demo(MemoryReactorClock())
        for server in service:  # type: ignore[attr-defined]
            self.addCleanup(server.store.stop)
        return service, out.getvalue()

    def test_first_start(self) -> None:
        """Configs, certificates, token, device key and demo users are made."""
        service, sheet = self.make()
        for path in (
            "primary.toml",
            "branch.toml",
            "tls/ca.crt",
            "tls/server.key",
            "branch/token",
            "branch/mfd.key",
        ):
            self.assertTrue(os.path.exists(os.path.join("var", "demo", path)), path)
        primary = next(iter(service))  # type: ignore[call-overload]
        store: Store = primary.store
        names = [u.username for u in store.read(thdListUsers)]
        self.assertEqual(names, ["alice", "bob", "carol"])
        with open(os.path.join("var", "demo", "branch", "mfd.key")) as f:
            key = f.read().strip()
        # The sheet's commands use the real key and the real config paths.
        self.assertIn(f"Bearer {key}", sheet)
        self.assertIn("sitesrv-admin --config var/demo/primary.toml user list", sheet)
        self.assertEqual(
            os.stat(os.path.join("var", "demo", "branch", "token")).st_mode & 0o077, 0
        )

    def test_second_start_keeps_data(self) -> None:
        """Starting again reuses what is there: no second seeding, same key."""
        self.make()
        with open(os.path.join("var", "demo", "branch", "mfd.key")) as f:
            key = f.read()
        service, sheet = self.make()
        with open(os.path.join("var", "demo", "branch", "mfd.key")) as f:
            self.assertEqual(f.read(), key)
        primary = next(iter(service))  # type: ignore[call-overload]
        self.assertEqual(len(primary.store.read(thdListUsers)), 3)
        self.assertIn(key.strip(), sheet)


class DemoCommandTests(TestCase):
    """The README's demo command starts a primary and a site that replicate."""

    timeout = 60

    def setUp(self) -> None:
        reason = twistd_unavailable()
        if reason:
            self.skipTest(reason)

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

        async def site_online() -> bool:
            health = await get_health(9293)
            return health.mode == "online"

        try:
            await wait_for(lambda: ensureDeferred(site_online()), "demo site online", 30)
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
        self.assertIn("Server Shut Down", text)
        self.assertNotIn("Traceback", text)

    def test_demo(self) -> None:
        """``twistd -n sitesrv --demo``: both /health answer, the site gets online."""
        return ensureDeferred(self._demo())
