"""The example vendor connector in ``examples/vendor-connector``, installed as a vendor's is.

The distribution is installed with pip (``--target`` a temporary directory, from a copy
of the example so the build leaves nothing in the source tree), then found without any
change to sitesrv: by a fresh interpreter with the directory on ``PYTHONPATH``, and in
this process once the directory is on ``sys.path`` (the ``connectors`` package extends
its ``__path__`` as it does at import). The installed module is then driven over a
``StringTransport`` against the real device core, gate and Find-Me queue
(``tests/test_devicecore``'s fixture) and started by the connector manager from a
device record.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import tempfile
from types import ModuleType
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.plugin import IPlugin, pluginPackagePaths
from twisted.trial.unittest import SkipTest
from zope.interface.verify import verifyObject

import connectors
from sitesrv.connectormanager import ConnectorManager
from sitesrv.interfaces import IConnectorFactory
from sitesrv.plugins import find_connectors
from sitesrv.store.devices import thdAddDevice
from tests.support import NOW
from tests.test_devicecore import ALICE_CARD, PIN, DeviceFixture, device
from tests.test_findme import sync

EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "examples", "vendor-connector")
LOCAL = IPv4Address("TCP", "127.0.0.1", 50000)

_installed: list[str] = []
_failed: list[str] = []


def installed() -> str:
    """The directory the example is installed into (once per test run)."""
    if _installed:
        return _installed[0]
    if _failed:
        raise SkipTest(_failed[0])
    work = tempfile.mkdtemp(prefix="sitesrv-vendor-")
    source, target = os.path.join(work, "src"), os.path.join(work, "target")
    shutil.copytree(EXAMPLE, source)
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", target]
    attempts = [
        [*pip, source],
        # Offline, without build isolation (needs setuptools and wheel installed here).
        [*pip, "--no-index", "--no-build-isolation", source],
    ]
    outputs = []
    for argv in attempts:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
        if done.returncode == 0:
            _installed.append(target)
            return target
        outputs.append(f"{' '.join(argv[3:])}: {(done.stderr or done.stdout).strip()[-800:]}")
    _failed.append("cannot pip install the example connector:\n" + "\n".join(outputs))
    raise SkipTest(_failed[0])


class InstalledMixin:
    """Puts the installed example on ``sys.path`` and in ``connectors.__path__``."""

    def install(self) -> ModuleType:
        """The installed ``connectors.acme_terminal`` module, importable for this test."""
        target = installed()
        saved_path, saved_package = list(sys.path), list(connectors.__path__)

        def restore() -> None:
            sys.path[:] = saved_path
            connectors.__path__[:] = saved_package
            sys.modules.pop("connectors.acme_terminal", None)

        self.addCleanup(restore)  # type: ignore[attr-defined]
        sys.path.insert(0, target)
        # What connectors/__init__.py does at import, for the entry added since.
        for path in pluginPackagePaths("connectors"):
            if path not in connectors.__path__:
                connectors.__path__.append(path)
        module = importlib.import_module("connectors.acme_terminal")
        assert module.__file__ is not None and module.__file__.startswith(target), module.__file__
        return module


class InstallTests(InstalledMixin, DeviceFixture):
    """Installed with pip, the plugin is found with no change to sitesrv."""

    def test_not_found_before_installing(self) -> None:
        self.assertNotIn("acme-terminal", find_connectors())

    def test_discovered_and_complete(self) -> None:
        """getPlugins finds it; it provides IPlugin and IConnectorFactory completely."""
        module = self.install()
        factory = find_connectors()["acme-terminal"]
        self.assertIs(factory, module.acmeTerminal)
        self.assertTrue(IPlugin.providedBy(factory))
        self.assertTrue(verifyObject(IConnectorFactory, factory))
        self.assertEqual(sorted(factory.options), ["allow", "idle", "listen"])

    def test_fresh_interpreter_finds_it(self) -> None:
        """A new process with the install directory on PYTHONPATH lists it."""
        target = installed()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([target, *sys.path]))
        done = subprocess.run(
            [
                sys.executable,
                "-c",
                "from sitesrv.plugins import find_connectors; print(sorted(find_connectors()))",
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(done.stdout.strip(), "['acme-terminal', 'card-reader', 'http']")

    def test_started_by_the_manager(self) -> None:
        """A device record naming acme-terminal gets a listening service."""
        self.install()
        self.primary.write(
            thdAddDevice,
            "copier-1",
            "north",
            "acme-terminal",
            NOW,
            printer="north-hold",
            options={"listen": "tcp:7000"},
        )
        self.sync()
        reactor = MemoryReactorClock()
        manager = ConnectorManager(
            "north",
            self.store.runRead,
            lambda record, changed: self.make_core_on(record, reactor, changed),
            reactor,
        )
        manager.startService()
        self.addCleanup(manager.stopService)
        self.assertEqual((list(manager.devices), manager.problems()), (["copier-1"], []))
        self.assertEqual(reactor.tcpServers[0][0], 7000)

    def sync(self) -> None:
        sync(self.primary, self.store)

    def make_core_on(self, record: Any, reactor: Any, changed: Any) -> Any:
        core = self.make_core(record)
        core.reactor = reactor
        core.changed = changed
        return core


class TerminalTests(InstalledMixin, DeviceFixture):
    """The ACME protocol against the real core: card + PIN, copies, held jobs."""

    def setUp(self) -> None:
        super().setUp()
        module = self.install()
        self.reactor = MemoryReactorClock()
        self.reactor.advance(NOW)
        self.core = self.make_core(device(name="copier-1", connector="acme-terminal"))
        self.core.reactor = self.reactor
        record = device(name="copier-1", connector="acme-terminal", listen="tcp:7000")
        self.service = module.acmeTerminal.makeService(record, self.core)
        self.service.startService()
        self.addCleanup(self.service.stopService)
        self.transport = StringTransport(peerAddress=LOCAL)
        self.protocol = self.reactor.tcpServers[-1][1].buildProtocol(LOCAL)
        self.protocol.makeConnection(self.transport)
        self.assertEqual(self.read(), ["READY copier-1"])

    def read(self) -> list[str]:
        lines = self.transport.value().decode("ascii").split("\r\n")
        self.transport.clear()
        return lines[:-1]

    def send(self, *lines: str) -> list[str]:
        self.protocol.dataReceived("".join(f"{line}\r\n" for line in lines).encode())
        return self.read()

    def test_login_copy_logout(self) -> None:
        """Card + PIN, copies priced at north-hold (0.10 mono, 0.50 colour), one resent
        with its id (charged once), one beyond the balance, then logout."""
        self.assertEqual(self.send(f"LOGIN {ALICE_CARD} {PIN}"), ["OK alice 1.00"])
        self.assertEqual(self.send("COPY 3"), ["OK 0.30 0.70"])
        copy = "COPY 1 COLOUR ID=6f1c1e4e-0000-4000-8000-000000000001"
        self.assertEqual(self.send(copy, copy), ["OK 0.50 0.20", "OK 0.50 0.20"])
        self.assertEqual(
            self.send("COPY 1 COLOUR"),
            ["ERR insufficient balance: 0.20 available, copy costs 0.50"],
        )
        self.assertEqual(len(self.charges()), 2)
        self.assertEqual(self.send("LOGOUT", "COPY 1"), ["BYE", "ERR log in first"])

    def test_refusals(self) -> None:
        """Wrong PIN, a card without PIN, unknown commands and bad arguments."""
        self.assertEqual(
            self.send(f"LOGIN {ALICE_CARD} 0000", f"LOGIN {ALICE_CARD}", "FROB", "JOBS"),
            [
                "ERR wrong PIN",
                "ERR usage: LOGIN <card> <pin>",
                "ERR unknown command FROB",
                "ERR log in first",
            ],
        )
        self.assertEqual(
            self.send(f"LOGIN {ALICE_CARD} {PIN}", "COPY x"),
            [
                "OK alice 1.00",
                "ERR usage: COPY <pages> [COLOUR] [DUPLEX] [COPIES=<n>] [ID=<uuid>]",
            ],
        )

    def test_held_jobs(self) -> None:
        """JOBS lists held jobs; RELEASE sends them to the device's printer."""
        self.hold(1, 2, pages=2)
        self.send(f"LOGIN {ALICE_CARD} {PIN}")
        listed = self.send("JOBS")
        self.assertEqual(
            listed,
            [
                "JOB 00000000-0000-4000-8000-000000000001 2 20 doc1.pdf",
                "JOB 00000000-0000-4000-8000-000000000002 2 20 doc2.pdf",
                "END 2",
            ],
        )
        self.assertEqual(self.send("RELEASE 00000000-0000-4000-8000-000000000002"), ["OK 1 0"])
        self.assertEqual(self.send("RELEASE"), ["OK 1 0"])
        self.assertEqual([r[3] for r in self.links.releases], ["north-hold", "north-hold"])

    def test_idle_session_ends(self) -> None:
        """After idle seconds without a command the session ends and the terminal is told."""
        self.send(f"LOGIN {ALICE_CARD} {PIN}")
        self.reactor.advance(59)
        self.assertEqual(self.send("JOBS"), ["END 0"])
        self.reactor.advance(60)
        self.assertEqual(self.read(), ["BYE idle"])
        self.assertEqual(self.send("JOBS"), ["ERR log in first"])

    def test_refuses_other_peers(self) -> None:
        """Only allowed addresses (default 127.0.0.1) may connect."""
        factory = self.reactor.tcpServers[-1][1]
        self.assertIsNone(factory.buildProtocol(IPv4Address("TCP", "192.0.2.1", 1)))
        self.assertEqual(self.core.connections, 1)
