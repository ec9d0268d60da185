"""The demo's moving parts: a cuttable link, a printer, a delayed start and its controls.

``twistd -n sitesrv --demo`` (`sitesrv.demo`) puts these around a primary and a site so
that a newcomer can watch failover and reconciliation from the status page:

`LinkProxy`
    the site's link to the primary goes through a `FaultProxy` in the same process, so
    "Simulate outage" can cut it and "Restore link" heal it;
`DemoPrinter`
    a raw-socket (JetDirect) printer that counts the jobs it receives, so a released job
    really travels provider → printer;
`StartWhen`
    starts its children (the demo print provider) once a condition holds, so the provider
    does not knock on the site before the site serves and knows it;
`Controls`
    what the status page's demo buttons call (``linkCut``, ``cutLink``, ``restoreLink``,
    ``printSample``);
`FirstSample`
    at the first start, prints one sample job for alice once the provider is connected,
    so the release station has a job to release.

Everything listens on loopback only.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from typing import Any

from twisted.application import strports
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers

from sitesrv.provider import ipp
from sitesrv.provider.ipp import attribute
from sitesrv.provider.service import Provider
from sitesrv.testing.faultproxy import FaultProxy

log = Logger()

#: How often `StartWhen` and `FirstSample` look again.
POLL_INTERVAL = 0.5
#: The longest the sample print may take (the provider waits up to 10 s for a decision).
SAMPLE_TIMEOUT = 20.0

#: The sample document: plain text, one page.
SAMPLE_TITLE = "Demo page"
SAMPLE_OWNER = "alice"
SAMPLE_DOCUMENT = (
    b"sitesrv demo page\n\n"
    b"Printed by alice to the hold queue branch-colour, held at site 'branch' until\n"
    b"she releases it at the release station, an MFD or the card reader.\n"
)
SAMPLE_PAGES = 1

# job-state values (RFC 8011 5.3.7) → a word for the status page.
_JOB_STATE_WORDS = {
    3: "pending",
    4: "held",
    5: "printing",
    6: "stopped",
    7: "cancelled",
    8: "aborted",
    9: "printed",
}


class LinkProxy(Service):
    """A `FaultProxy` on ``127.0.0.1:port`` to ``target``, listening while running."""

    def __init__(self, port: int, target_port: int, reactor: IReactorTime) -> None:
        super().__init__()
        self.listen_port = port
        self.proxy = FaultProxy("127.0.0.1", target_port, reactor=reactor)

    def startService(self) -> None:
        """Listen (an occupied port fails the start, as any listener's does)."""
        self.proxy.listen(self.listen_port)
        super().startService()

    def stopService(self) -> Deferred[None]:
        """Stop listening and drop every proxied connection."""
        super().stopService()
        return self.proxy.stop()


class _PrinterJob(Protocol):
    """One job: every byte until the sender closes."""

    def __init__(self, printer: DemoPrinter) -> None:
        self.printer = printer
        self.size = 0

    def dataReceived(self, data: bytes) -> None:
        self.size += len(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.printer.received(self.size)


class DemoPrinter(MultiService):
    """A raw-socket (port 9100 style) printer that counts jobs and bytes, and prints nothing."""

    def __init__(self, port: int, reactor: Any) -> None:
        super().__init__()
        self.port = port
        self.uri = f"socket://127.0.0.1:{port}"
        #: Jobs received, and their bytes.
        self.jobs = 0
        self.bytes = 0
        factory = Factory.forProtocol(lambda: _PrinterJob(self))
        strports.service(
            f"tcp:{port}:interface=127.0.0.1", factory, reactor=reactor
        ).setServiceParent(self)

    def received(self, size: int) -> None:
        """A connection closed after ``size`` bytes: one job (an empty one is no job)."""
        if not size:
            return
        self.jobs += 1
        self.bytes += size
        log.info("demo printer received job of {size} bytes", size=size)


class StartWhen(MultiService):
    """Starts its children once ``ready()`` fires True (polled); stops them if started."""

    def __init__(
        self, ready: Callable[[], Deferred[bool]], clock: IReactorTime, what: str
    ) -> None:
        super().__init__()
        self.ready = ready
        self.what = what
        self.started = False
        self._poll = LoopingCall(self._check)
        self._poll.clock = clock

    def startService(self) -> None:
        """Wait for the condition (the children are not started yet)."""
        Service.startService(self)
        self._poll.start(POLL_INTERVAL, now=True)

    def _check(self) -> Deferred[None]:
        d = self.ready()

        def result(ready: bool) -> None:
            if ready and self.running and not self.started:
                self._poll.stop()
                self.started = True
                log.info("demo: starting {what}", what=self.what)
                for child in self:
                    child.startService()

        def failed(f: Failure) -> None:
            # Keep polling: a database read may fail while the site is starting.
            log.debug("demo: not starting {what} yet: {why}", what=self.what, why=f.value)

        return d.addCallbacks(result, failed)

    def stopService(self) -> Deferred[None]:
        """Stop waiting, and stop the children if they were started."""
        if self._poll.running:
            self._poll.stop()
        if not self.started:
            Service.stopService(self)
            return succeed(None)
        self.started = False
        d = super().stopService()
        assert d is not None
        return d


class Controls:
    """The demo's buttons, as the status page calls them (``DemoControls``)."""

    def __init__(self, proxy: FaultProxy, ipp_url: str, queue: str, reactor: IReactorTime) -> None:
        self.proxy = proxy
        self.ipp_url = ipp_url
        self.queue = queue
        self.reactor = reactor
        self._agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))

    def linkCut(self) -> bool:
        """True while the demo's replication link is cut."""
        return self.proxy.isCut

    def cutLink(self) -> Deferred[None]:
        """Cut the site's link to the primary: the site goes offline."""
        if not self.proxy.isCut:
            log.info("demo: cutting the link between site and primary (simulated outage)")
        return self.proxy.cut()

    def restoreLink(self) -> Deferred[None]:
        """Restore the link: the site reconnects and hands back what it recorded."""
        if self.proxy.isCut:
            log.info("demo: restoring the link between site and primary")
        return self.proxy.heal()

    def printSample(self) -> Deferred[str]:
        """Print the sample page as alice to the hold queue, over IPP; one line for the page.

        Never fails: a failure is described in the line.
        """
        return Deferred.fromCoroutine(self._printSampleLine())

    async def _printSampleLine(self) -> str:
        _, line = await self.printSampleResult()
        return line

    async def printSampleResult(self) -> tuple[int | None, str]:
        """Print the sample page: (the IPP job-state or None, the line for the page)."""
        what = f"{SAMPLE_OWNER}'s {SAMPLE_TITLE!r} ({SAMPLE_PAGES} page) sent to {self.queue}"
        try:
            state, message = await self._printJob()
        except Exception as e:
            reason = str(e) or type(e).__name__
            log.warn("demo: the sample print failed: {why}", why=reason)
            return None, f"{what}: failed ({reason})"
        word = _JOB_STATE_WORDS.get(state, f"job state {state}")
        if state == 4 and message.startswith("held"):
            return state, f"{what}: held"
        return state, f"{what}: {word}" + (f" ({message})" if message else "")

    async def _printJob(self) -> tuple[int, str]:
        request = ipp.Message(
            (2, 0),
            ipp.OP_PRINT_JOB,
            1,
            (
                ipp.operation_attributes(
                    attribute("printer-uri", ipp.TAG_URI, self.ipp_url.replace("http", "ipp", 1)),
                    attribute("requesting-user-name", ipp.TAG_NAME, SAMPLE_OWNER),
                    attribute("job-name", ipp.TAG_NAME, SAMPLE_TITLE),
                    attribute("document-format", ipp.TAG_MIME_TYPE, "text/plain"),
                ),
            ),
            SAMPLE_DOCUMENT,
        )
        d = self._agent.request(
            b"POST",
            self.ipp_url.encode("ascii"),
            Headers({b"Content-Type": [b"application/ipp"]}),
            FileBodyProducer(io.BytesIO(ipp.encode(request))),
        )
        d.addTimeout(SAMPLE_TIMEOUT, self.reactor)
        response = await d
        body = await readBody(response)
        if response.code != 200:
            raise RuntimeError(f"the provider answered HTTP {response.code}")
        answer = ipp.decode(body)
        if answer.code >= 0x0100:
            status = answer.operation("status-message")
            detail = f": {status.value!s}" if status is not None else ""
            raise RuntimeError(f"{ipp.status_name(answer.code)}{detail}")
        state = answer.get(ipp.TAG_JOB, "job-state")
        message = answer.get(ipp.TAG_JOB, "job-state-message")
        return (
            state.value if state is not None and isinstance(state.value, int) else 0,
            str(message.value) if message is not None else "",
        )


class FirstSample(Service):
    """Prints the sample job once, after the provider announced its queues.

    ``marker`` is written when it was held, so later starts print nothing.
    """

    def __init__(
        self, controls: Controls, provider: Provider, marker: str, clock: IReactorTime
    ) -> None:
        super().__init__()
        self.controls = controls
        self.provider = provider
        self.marker = marker
        self.tries = 3
        self._busy = False
        self._poll = LoopingCall(self._check)
        self._poll.clock = clock

    def startService(self) -> None:
        """Wait for the provider, unless the sample was printed at an earlier start."""
        super().startService()
        if not os.path.exists(self.marker):
            self._poll.start(POLL_INTERVAL, now=False)

    def stopService(self) -> None:
        """Stop waiting."""
        if self._poll.running:
            self._poll.stop()
        super().stopService()

    def _ready(self) -> bool:
        link = self.provider.link
        return (
            link is not None
            and link.is_ready
            and self.controls.queue in self.provider.server_queues
        )

    def _check(self) -> Deferred[None] | None:
        if self._busy or not self._ready():
            return None
        self._busy = True
        d = Deferred.fromCoroutine(self._print())
        d.addErrback(lambda f: log.failure("demo: printing the sample job", f))
        return d

    async def _print(self) -> None:
        try:
            state, line = await self.controls.printSampleResult()
        finally:
            self._busy = False
        self.tries -= 1
        if state == 4:
            with open(self.marker, "w", encoding="utf-8") as f:
                f.write(line + "\n")
            log.info("demo: {line}", line=line)
        elif self.tries > 0:
            return
        else:
            log.warn("demo: gave up printing the sample job: {line}", line=line)
        if self._poll.running:
            self._poll.stop()
