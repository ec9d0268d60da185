"""End to end: a PDF printed with ``ipptool`` is held, released at a card reader and
arrives at a real IPP printer, charged once.

Real processes on loopback: a private ``dbus-daemon`` (``ippeveprinter`` needs a system
bus for DNS-SD), ``ippeveprinter`` as the physical printer (``-k`` keeps what it
receives), a sitesrv primary (``twistd``) set up with ``sitesrv-admin`` as an
administrator would, and ``sitesrv-provider``. Jobs are submitted with ``ipptool`` as
alice; releases happen as in real life, by swiping alice's card at a network card reader
(the ``card-reader`` connector), which releases through the server's Find-Me queue.

Skipped (with the reason) only when ``ippeveprinter``, ``ipptool`` or ``dbus-daemon``
are not installed; CI installs them (Debian ``cups-ipp-utils`` and ``dbus``).
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from typing import Any

from pypdf import PdfWriter
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SkipTest, TestCase

from tests.processes import (
    DEADLINE,
    Node,
    ServerProcess,
    admin,
    admin_sync,
    free_port,
    reactor,
    scalar,
    tls_init,
    twistd_unavailable,
    wait_for,
    wait_for_health,
    write_primary_config,
)

#: alice's card, as the card reader sends it.
CARD = "12345678"
#: Lines of a child's log shown when a test fails.
TAIL = 40
#: ``sitesrv-provider`` run by this interpreter (works in a virtualenv and under tox).
PROVIDER = (sys.executable, "-c", "from sitesrv.provider.main import main; main()")

_DBUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
  </policy>
</busconfig>
"""


#: ipptool's print-job.test with the owner as a variable: ``-d user=`` does not override
#: the built-in ``$user`` (the login name), so the stock file always prints as root.
_PRINT_JOB_TEST = """{
    NAME "Print a file with Print-Job as $owner"
    OPERATION Print-Job
    GROUP operation-attributes-tag
    ATTR charset attributes-charset utf-8
    ATTR language attributes-natural-language en
    ATTR uri printer-uri $uri
    ATTR name requesting-user-name $owner
    ATTR name job-name $jobname
    ATTR mimeMediaType document-format $filetype
    GROUP job-attributes-tag
    ATTR integer copies 1
    FILE $filename
    STATUS successful-ok
    EXPECT job-id
    EXPECT job-uri
    EXPECT job-state
}
"""


def missing_tools() -> str | None:
    """Why this test cannot run here, or None."""
    for tool in ("ippeveprinter", "ipptool", "dbus-daemon"):
        if shutil.which(tool) is None and not os.path.exists(f"/usr/sbin/{tool}"):
            return (
                f"{tool} is not installed (Debian packages cups-ipp-utils and dbus; "
                "CI installs them)"
            )
    return twistd_unavailable()


def tool(name: str) -> str:
    """The path of a tool (ippeveprinter lives in /usr/sbin, often not on PATH)."""
    return shutil.which(name) or f"/usr/sbin/{name}"


def pdf(path: str, pages: int) -> bytes:
    """Write a PDF of ``pages`` blank pages; return its bytes."""
    writer = PdfWriter()
    for _ in range(pages):
        writer.add_blank_page(595, 842)
    with open(path, "wb") as f:
        writer.write(f)
    with open(path, "rb") as f:
        return f.read()


class Child:
    """A child process with its output in a log file; killed at the test's end, and its
    log's tail shown if the test failed."""

    def __init__(self, testcase: TestCase, name: str, argv: list[str], log: str, **env: str):
        self.name = name
        self.log = log
        with open(log, "ab") as f:
            self.process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=f,
                stderr=subprocess.STDOUT,
                env={**os.environ, **env},
            )
        testcase.addCleanup(self.cleanup, testcase)

    def text(self) -> str:
        """Everything it wrote."""
        with open(self.log, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it does not end."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(DEADLINE)

    def cleanup(self, testcase: TestCase) -> None:
        """Stop it; show its log's tail when the test failed."""
        self.stop()
        if not getattr(testcase, "_passed", False):
            tail = "\n".join(self.text().splitlines()[-TAIL:])
            print(f"\n---- {self.name}: last lines of {self.log}\n{tail}", file=sys.stderr)


def listening(port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:port."""
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def swipe(port: int, card: str) -> str:
    """Swipe a card at a network card reader's port; the feedback line (blocking)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(card.encode() + b"\r\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(1000)
            if not chunk:
                break
            data += chunk
    return data.decode("utf-8", "replace").strip()


class PrintingEndToEndTests(TestCase):
    """ipptool → sitesrv-provider → sitesrv (Find-Me) → ippeveprinter."""

    timeout = 120

    def setUp(self) -> None:
        why = missing_tools()
        if why is not None:
            raise SkipTest(why)
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        # ippeveprinter's spool and a private system bus.
        self.printed_dir = os.path.join(self.directory, "ippeveprinter")
        os.makedirs(self.printed_dir)
        # A unix socket path has at most 107 bytes: trial's temp directory is too deep.
        bus_dir = tempfile.mkdtemp(prefix="sitesrv-bus-")
        self.addCleanup(shutil.rmtree, bus_dir, True)
        self.bus = os.path.join(bus_dir, "system_bus_socket")
        self.printer_port = free_port()
        self.ipp_port = free_port()
        self.reader_port = free_port()
        self.broken_reader_port = free_port()
        # Nothing listens here: the printer that is down.
        self.down_port = free_port()

        self.primary: Node = write_primary_config(self.directory, "hq")
        tls_init(self.primary)

        def admin_(*args: str) -> Any:
            return admin_sync(self.primary, *args)

        admin_("user", "add", "alice", "--balance", "1.00")
        admin_("card", "add", "alice", CARD)
        printer_uri = f"ipp://127.0.0.1:{self.printer_port}/ipp/print"
        prices = ("--price-mono", "0.10", "--price-colour", "0.50")
        admin_(
            "printer", "add", "lib-hold", "--site", "hq", *prices, "--hold", "--uri", printer_uri
        )
        admin_("printer", "add", "lib-direct", "--site", "hq", *prices, "--uri", printer_uri)
        admin_(
            *("printer", "add", "lib-broken", "--site", "hq", *prices),
            *("--uri", f"ipp://127.0.0.1:{self.down_port}/ipp/print"),
        )
        for device, printer, port in (
            ("desk", "lib-hold", self.reader_port),
            ("desk-broken", "lib-broken", self.broken_reader_port),
        ):
            admin_(
                *("device", "add", device, "--site", "hq", "--connector", "card-reader"),
                *("--printer", printer),
                *("--option", f"listen=tcp:{port}:interface=127.0.0.1"),
                *("--option", "feedback=line"),
            )
        key = admin_("provider", "add", "spool", "--site", "hq").out.strip().splitlines()[-1]
        self.provider_dir = os.path.join(self.directory, "provider")
        os.makedirs(self.provider_dir)
        with open(os.path.join(self.provider_dir, "key"), "w") as f:
            f.write(key.strip() + "\n")
        self.provider_config = os.path.join(self.provider_dir, "provider.toml")
        with open(self.provider_config, "w") as f:
            f.write(
                f"""name = "spool"
data_dir = "{self.provider_dir}"

[server]
endpoint = "tcp:127.0.0.1:{self.primary.providers_port}"
key_file = "key"
insecure = true

[ipp]
listen = "tcp:{self.ipp_port}:interface=127.0.0.1"

[delivery]
retries = 2
backoff = 0.2
timeout = 10.0

[queues.lib-hold]
[queues.lib-direct]
"""
            )

    def child(self, name: str, argv: list[str], **env: str) -> Child:
        return Child(self, name, argv, os.path.join(self.directory, f"{name}.log"), **env)

    async def start(self) -> None:
        """The bus, the physical printer, the server and the provider, each ready."""
        with open(os.path.join(self.directory, "bus.conf"), "w") as f:
            f.write(_DBUS_CONFIG.format(socket=self.bus))
        bus = self.child(
            "dbus-daemon",
            [
                tool("dbus-daemon"),
                f"--config-file={os.path.join(self.directory, 'bus.conf')}",
                "--nofork",
                "--nopidfile",
            ],
        )
        await wait_for(
            lambda: os.path.exists(self.bus) or bus.process.poll() is not None,
            "the private system bus",
        )
        self.assertIsNone(bus.process.poll(), bus.text())
        self.printer = self.child(
            "ippeveprinter",
            [
                tool("ippeveprinter"),
                *("-r", "off", "-p", str(self.printer_port), "-n", "localhost"),
                *("-d", self.printed_dir, "-k", "-f", "application/pdf,text/plain"),
                "Physical Printer",
            ],
            DBUS_SYSTEM_BUS_ADDRESS=f"unix:path={self.bus}",
        )
        await wait_for(
            lambda: listening(self.printer_port) or self.printer.process.poll() is not None,
            "ippeveprinter listening",
        )
        self.assertIsNone(self.printer.process.poll(), self.printer.text())
        self.server = ServerProcess(self.primary).start(self)
        await wait_for_health(self.server, lambda h: h.code == 200, "the server answers /health")
        await wait_for(lambda: listening(self.reader_port), "the card reader port")
        self.provider = self.child(
            "sitesrv-provider", [*PROVIDER, "--config", self.provider_config]
        )
        await wait_for(
            lambda: (
                "connected to server" in self.provider.text()
                or self.provider.process.poll() is not None
            ),
            "sitesrv-provider connected",
        )
        self.assertIsNone(self.provider.process.poll(), self.provider.text())
        await wait_for(lambda: listening(self.ipp_port), "the provider's IPP port")

    async def ipptool(self, queue: str, document: str) -> str:
        """Print ``document`` to ``queue`` as alice with ipptool (a Print-Job test)."""
        test_file = os.path.join(self.directory, "print-job-as.test")
        with open(test_file, "w") as f:
            f.write(_PRINT_JOB_TEST)
        out, err, code = await getProcessOutputAndValue(
            tool("ipptool"),
            [
                "-tv",
                *("-f", document),
                *("-d", "owner=alice"),
                *("-d", f"jobname={os.path.basename(document)}"),
                f"ipp://127.0.0.1:{self.ipp_port}/ipp/print/{queue}",
                test_file,
            ],
            env=dict(os.environ),
            reactor=reactor,
        )
        text = (out + err).decode("utf-8", "replace")
        self.assertEqual(code, 0, text)
        return text

    def server_job(self, what: str = "state") -> Any:
        """A column of alice's latest job at the server's Find-Me queue."""
        return scalar(
            self.primary.database,
            f"SELECT {what} FROM provider_jobs WHERE username = 'alice' ORDER BY id DESC LIMIT 1",
        )

    async def balance(self) -> int:
        """alice's balance in minor units, as ``sitesrv-admin user show`` reports it."""
        shown = await admin(self.primary, "--json", "user", "show", "alice")
        return int(shown.json()["balance_minor"])

    def received(self) -> list[str]:
        """Documents ippeveprinter has kept."""
        return sorted(
            p for p in glob.glob(os.path.join(self.printed_dir, "*")) if os.path.isfile(p)
        )

    async def test_held_released_printed_and_charged(self) -> None:
        """A 3-page PDF is held, released by a card swipe, printed, and costs 0.30."""
        await self.start()
        document = os.path.join(self.directory, "thesis.pdf")
        data = pdf(document, 3)
        output = await self.ipptool("lib-hold", document)
        self.assertIn("job-state (enum) = pending-held", output)
        await wait_for(lambda: self.server_job() == "held", "the job held at the server")
        self.assertEqual(self.server_job("pages"), 3)
        self.assertEqual(self.received(), [])
        self.assertEqual(await self.balance(), 100)

        feedback = await deferToThread(swipe, self.reader_port, CARD)
        self.assertEqual(feedback, "OK 1 job")

        def arrived() -> bool:
            for path in self.received():
                with open(path, "rb") as f:
                    if f.read() == data:
                        return True
            return False

        await wait_for(arrived, "the PDF at ippeveprinter", deadline=30)
        await wait_for(lambda: self.server_job() == "printed", "the job printed at the server")
        self.assertEqual(self.server_job("charged"), 30)
        self.assertEqual(await self.balance(), 70)
        self.assertEqual(len(self.received()), 1)

    async def test_over_balance_denied_with_the_reason(self) -> None:
        """An 11-page job at 0.10 a page is over alice's 1.00: denied, saying why."""
        await self.start()
        document = os.path.join(self.directory, "big.pdf")
        pdf(document, 11)
        output = await self.ipptool("lib-direct", document)
        self.assertIn("job-state (enum) = canceled", output)
        self.assertIn("insufficient balance: 1.00 available, job costs 1.10", output)
        await wait_for(lambda: self.server_job() == "denied", "the job denied at the server")
        self.assertEqual(self.received(), [])
        self.assertEqual(await self.balance(), 100)

    async def test_printer_down_retried_then_failed_not_charged(self) -> None:
        """Released to a printer that is down: retried, reported failed, not charged."""
        await self.start()
        document = os.path.join(self.directory, "notes.pdf")
        pdf(document, 2)
        await self.ipptool("lib-hold", document)
        await wait_for(lambda: self.server_job() == "held", "the job held at the server")
        await wait_for(lambda: listening(self.broken_reader_port), "the second card reader")
        feedback = await deferToThread(swipe, self.broken_reader_port, CARD)
        self.assertEqual(feedback, "OK 1 job")
        await wait_for(lambda: self.server_job() == "failed", "the job failed at the server")
        log = self.provider.text()
        self.assertEqual(log.count(f"127.0.0.1:{self.down_port}/ipp/print failed (attempt"), 2)
        self.assertIn("failed for good after 3 attempt(s)", log)
        self.assertIsNone(self.server_job("charged"))
        self.assertEqual(await self.balance(), 100)
        self.assertEqual(self.received(), [])
