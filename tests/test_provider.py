"""Tests of the reference print provider (``sitesrv.provider``), socket-free where possible.

Page counting with generated documents; the spool's persistence, quota and crash
recovery; delivery retries on a ``Clock`` (and one real loopback delivery each for
``ipp://`` and ``socket://``); the config; the IPP printer through the whole
``twisted.web`` HTTP stack over a ``StringTransport``; and the provider core talking to
a real server side (``ProviderService`` with the Find-Me queue, from
``tests/test_providers.py``) over ``iosim``.
"""

from __future__ import annotations

import io
import json
import os
from typing import Any

import attrs
from pypdf import PdfWriter
from twisted.internet import reactor as _reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from sitesrv.config import ConfigError
from sitesrv.provider import ipp
from sitesrv.provider.config import ProviderConfig, from_dict
from sitesrv.provider.deliver import (
    Deliverer,
    DeliveryError,
    Document,
    Target,
    network_attempt,
    parse_target,
)
from sitesrv.provider.ipp import Message, attribute
from sitesrv.provider.ippserver import Submission, make_site
from sitesrv.provider.pages import (
    count_pages,
    count_pages_off_thread,
    count_postscript,
    count_text,
)
from sitesrv.provider.service import Provider, ProviderLink, server_endpoint
from sitesrv.provider.spool import (
    DENIED,
    EXPIRED,
    FAILED,
    HELD,
    PENDING,
    PRINTED,
    RELEASING,
    Spool,
    SpooledJob,
    SpoolFull,
)
from sitesrv.store import jobqueue
from tests.support import NOW, Wire, run_inline
from tests.test_findme import HOUR
from tests.test_providers import ProtocolFixture

reactor: Any = _reactor


def pdf_bytes(pages: int) -> bytes:
    """A PDF of ``pages`` blank pages."""
    writer = PdfWriter()
    for _ in range(pages):
        writer.add_blank_page(595, 842)
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def write(directory: str, name: str, data: bytes) -> str:
    """Write a file; return its path."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, name)
    with open(path, "wb") as f:
        f.write(data)
    return path


# -- page counting ----------------------------------------------------------------------


class PageCountTests(SynchronousTestCase):
    """Pages of one copy, by document format."""

    def count(self, data: bytes, document_format: str) -> Any:
        return count_pages(write(self.mktemp(), "doc", data), document_format)

    def test_pdf(self) -> None:
        """A PDF's pages come from its page tree."""
        for pages in (1, 3, 12):
            result = self.count(pdf_bytes(pages), "application/pdf")
            self.assertEqual((result.pages, result.method, result.warning), (pages, "pdf", ""))

    def test_pdfSentAsOctetStream(self) -> None:
        """application/octet-stream that is a PDF is counted as one."""
        self.assertEqual(self.count(pdf_bytes(4), "application/octet-stream").pages, 4)

    def test_brokenPDF(self) -> None:
        """A PDF that cannot be read counts as 1 page, with a warning."""
        result = self.count(b"%PDF-1.4\nnot really a pdf", "application/pdf")
        self.assertEqual(result.pages, 1)
        self.assertIn("cannot read the PDF", result.warning)

    def test_postscriptHeader(self) -> None:
        """%%Pages: N in the header."""
        ps = b"%!PS-Adobe-3.0\n%%Pages: 7\n%%EndComments\nshowpage\n%%EOF\n"
        self.assertEqual(count_postscript(io.BytesIO(ps)).pages, 7)

    def test_postscriptAtend(self) -> None:
        """%%Pages: (atend) defers to the trailer."""
        ps = (
            b"%!PS-Adobe-3.0\n%%Pages: (atend)\n%%EndComments\n"
            b"%%Page: 1 1\nshowpage\n%%Page: 2 2\nshowpage\n"
            b"%%Trailer\n%%Pages: 5\n%%EOF\n"
        )
        self.assertEqual(count_postscript(io.BytesIO(ps)).pages, 5)

    def test_postscriptEmbeddedDocumentIgnored(self) -> None:
        """An embedded EPS's own %%Pages does not count."""
        ps = (
            b"%!PS-Adobe-3.0\n%%Pages: (atend)\n%%EndComments\n"
            b"%%BeginDocument: logo.eps\n%!PS-Adobe-3.0 EPSF-3.0\n%%Pages: 9\n"
            b"%%EndDocument\n%%Trailer\n%%Pages: 2\n%%EOF\n"
        )
        self.assertEqual(count_postscript(io.BytesIO(ps)).pages, 2)

    def test_postscriptPageComments(self) -> None:
        """Without %%Pages, the %%Page comments are counted."""
        ps = b"%!PS\n%%Page: 1 1\nshowpage\n%%Page: 2 2\nshowpage\n%%Page: 3 3\n"
        result = count_postscript(io.BytesIO(ps))
        self.assertEqual((result.pages, result.method), (3, "dsc-page-comments"))

    def test_postscriptWithoutComments(self) -> None:
        """No DSC comments at all: 1 page and a warning."""
        result = self.count(b"%!\nshowpage\n", "application/postscript")
        self.assertEqual(result.pages, 1)
        self.assertTrue(result.warning)

    def test_text(self) -> None:
        """66 lines a page; a form feed starts a new page."""
        cases = {
            b"": 0,
            b"hello": 1,
            b"line\n" * 66: 1,
            b"line\n" * 67: 2,
            b"line\n" * 66 + b"x": 2,
            b"a\fb": 2,
            b"a\fb\f": 2,
            b"a\f\fb": 3,
            b"a\n" * 100 + b"\f" + b"b\n" * 10: 3,
        }
        for text, pages in cases.items():
            self.assertEqual(count_text(io.BytesIO(text)).pages, pages, text[:20])

    def test_textInChunks(self) -> None:
        """Counting is the same when the text is read in many chunks."""
        text = (b"x" * 100 + b"\n") * 20_000 + b"\f" + b"tail"
        self.assertEqual(self.count(text, "text/plain").pages, 20_000 // 66 + 1 + 1)

    def test_unknownFormat(self) -> None:
        """Anything else counts as 1 page, with a warning naming the format."""
        result = self.count(b"\x1b%-12345X@PJL", "application/vnd.hp-pcl")
        self.assertEqual(result.pages, 1)
        self.assertIn("application/vnd.hp-pcl", result.warning)

    def test_offThread(self) -> None:
        """count_pages_off_thread runs the count with the given runner."""
        path = write(self.mktemp(), "doc.pdf", pdf_bytes(2))
        result = self.successResultOf(count_pages_off_thread(path, "application/pdf", run_inline))
        self.assertEqual(result.pages, 2)


# -- the spool --------------------------------------------------------------------------


def spooled(n: int = 1, **kw: Any) -> SpooledJob:
    """A job record for tests."""
    values: dict[str, Any] = {
        "uuid": f"00000000-0000-4000-8000-{n:012d}",
        "ipp_id": n,
        "queue": "q",
        "printer": "p",
        "owner": "alice",
        "title": f"doc{n}",
        "document_format": "application/pdf",
        "size": 0,
        "pages": 1,
        "copies": 1,
        "colour": False,
        "duplex": False,
        "submitted_at": 1000.0,
    }
    values.update(kw)
    return SpooledJob(**values)


class SpoolTests(SynchronousTestCase):
    """Documents and records on disk, surviving restarts, under a quota."""

    def setUp(self) -> None:
        self.directory = self.mktemp()
        self.spool = self.open()

    def open(self, quota: int = 1000) -> Spool:
        spool = Spool(self.directory, quota, run_inline)
        spool.load()
        return spool

    def add(self, spool: Spool, n: int, data: bytes, **kw: Any) -> SpooledJob:
        d = Deferred.fromCoroutine(spool.add(spooled(n, **kw), io.BytesIO(data), 0, len(data)))
        job: SpooledJob = self.successResultOf(d)
        return job

    def test_addAndReload(self) -> None:
        """A spooled job and its document are there after a restart."""
        job = self.add(self.spool, 1, b"hello")
        self.assertEqual(job.size, 5)
        with open(self.spool.document_path(job.uuid), "rb") as f:
            self.assertEqual(f.read(), b"hello")
        again = self.open()
        self.assertEqual(again.jobs, {job.uuid: job})
        self.assertEqual(again.allocate_ipp_id(), 2)

    def test_documentFromOffset(self) -> None:
        """Only the bytes after the IPP attributes are the document."""
        d = Deferred.fromCoroutine(self.spool.add(spooled(1), io.BytesIO(b"HEADERdocument"), 6, 8))
        job = self.successResultOf(d)
        with open(self.spool.document_path(job.uuid), "rb") as f:
            self.assertEqual(f.read(), b"document")

    def test_quota(self) -> None:
        """A document that would take the spool over its quota is refused."""
        self.add(self.spool, 1, b"x" * 600)
        self.assertFalse(self.spool.has_room(500))
        d = Deferred.fromCoroutine(self.spool.add(spooled(2), io.BytesIO(b"y" * 500), 0, 500))
        self.failureResultOf(d, SpoolFull)
        self.assertNotIn(spooled(2).uuid, self.spool.jobs)
        self.assertEqual(os.listdir(self.spool.incoming_dir), [])

    def test_finishFreesTheQuota(self) -> None:
        """A finished job's document is deleted; its record stays for a while."""
        job = self.add(self.spool, 1, b"x" * 600)
        self.successResultOf(
            Deferred.fromCoroutine(self.spool.finish(attrs.evolve(job, state=PRINTED)))
        )
        self.assertFalse(os.path.exists(self.spool.document_path(job.uuid)))
        self.assertTrue(self.spool.has_room(1000))
        self.assertEqual(self.open().jobs[job.uuid].state, PRINTED)

    def test_expiry(self) -> None:
        """Old active jobs and old finished records are listed for removal."""
        old = self.add(self.spool, 1, b"a", submitted_at=0.0)
        self.add(self.spool, 2, b"b", submitted_at=5000.0)
        done = attrs.evolve(self.add(self.spool, 3, b"c"), state=PRINTED, updated_at=0.0)
        self.successResultOf(Deferred.fromCoroutine(self.spool.finish(done)))
        stale, finished = self.spool.expired(now=100_000.0, max_age=96_000.0)
        self.assertEqual([j.uuid for j in stale], [old.uuid])
        self.assertEqual([j.uuid for j in finished], [done.uuid])
        self.successResultOf(Deferred.fromCoroutine(self.spool.remove(done.uuid)))
        self.assertNotIn(done.uuid, self.open().jobs)

    def test_reportsSurviveRestarts(self) -> None:
        """Reports stay on disk, in order, until removed."""
        job = self.add(self.spool, 1, b"a", release_id="r1")
        first = self.successResultOf(
            Deferred.fromCoroutine(self.spool.add_report("printed", job, printer="p", at=5.0))
        )
        self.successResultOf(
            Deferred.fromCoroutine(self.spool.add_report("failed", job, reason="jam"))
        )
        again = self.open()
        self.assertEqual([r.kind for r in again.pending_reports()], ["printed", "failed"])
        self.assertEqual(again.pending_reports()[0], first)
        self.successResultOf(Deferred.fromCoroutine(again.remove_report(first)))
        self.assertEqual([r.kind for r in self.open().pending_reports()], ["failed"])

    def test_reportedReleaseIsNotDeliveredAgain(self) -> None:
        """A job being released whose printed report is stored finished before a crash."""
        job = self.add(self.spool, 1, b"a", state=RELEASING, release_id="r1")
        self.successResultOf(Deferred.fromCoroutine(self.spool.add_report("printed", job)))
        again = self.open()
        self.assertEqual(again.jobs[job.uuid].state, PRINTED)
        self.assertFalse(os.path.exists(again.document_path(job.uuid)))

    def test_damagedEntriesRemoved(self) -> None:
        """A job directory without a record, or without its document, is removed."""
        job = self.add(self.spool, 1, b"a")
        os.unlink(self.spool.document_path(job.uuid))
        os.makedirs(os.path.join(self.spool.jobs_dir, "junk"))
        write(self.spool.incoming_dir, "partial", b"half a document")
        again = self.open()
        self.assertEqual(again.jobs, {})
        self.assertEqual(os.listdir(again.jobs_dir), [])
        self.assertEqual(os.listdir(again.incoming_dir), [])

    def test_recordsAreJSON(self) -> None:
        """job.json is plain JSON with a format version (readable by an administrator)."""
        job = self.add(self.spool, 1, b"a")
        with open(os.path.join(self.spool.job_dir(job.uuid), "job.json")) as f:
            data = json.load(f)
        self.assertEqual((data["format"], data["owner"]), (1, "alice"))


# -- delivery ---------------------------------------------------------------------------


class FakePrinter:
    """A delivery attempt that fails while ``down`` and records what it printed."""

    def __init__(self) -> None:
        self.down = False
        #: Called as a document is printed (a test's hook).
        self.printing: Any = lambda: None
        self.attempts: list[str] = []
        self.printed: list[tuple[str, bytes]] = []

    def __call__(self, target: Target, document: Document) -> Deferred[None]:
        self.attempts.append(target.uri)
        if self.down:
            return fail(DeliveryError(f"cannot connect to {target.uri}: connection refused"))
        with open(document.path, "rb") as f:
            self.printed.append((target.uri, f.read()))
        self.printing()
        return succeed(None)


class DeliveryRetryTests(SynchronousTestCase):
    """Retries with backoff on a Clock, then a failure."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.printer = FakePrinter()
        self.deliverer = Deliverer(self.clock, self.printer, retries=3, backoff=2.0)
        self.document = Document(write(self.mktemp(), "d", b"data"), "alice", "t", "text/plain")

    def deliver(self, uri: str = "ipp://printer/ipp/print") -> Deferred[Any]:
        return Deferred.fromCoroutine(self.deliverer.deliver(uri, self.document, "job"))

    def test_firstAttempt(self) -> None:
        """A working printer gets the document at once."""
        outcome = self.successResultOf(self.deliver())
        self.assertEqual((outcome.delivered, outcome.attempts), (True, 1))
        self.assertEqual(self.printer.printed, [("ipp://printer/ipp/print", b"data")])

    def test_retriesWithBackoff(self) -> None:
        """Failed attempts are retried after 2, 4, 8 s; success on the way stops it."""
        self.printer.down = True
        d = self.deliver()
        self.assertEqual(len(self.printer.attempts), 1)
        self.clock.advance(1.9)
        self.assertEqual(len(self.printer.attempts), 1)
        self.clock.advance(0.1)
        self.assertEqual(len(self.printer.attempts), 2)
        self.clock.advance(4)
        self.assertEqual(len(self.printer.attempts), 3)
        self.printer.down = False
        self.assertNoResult(d)
        self.clock.advance(8)
        outcome = self.successResultOf(d)
        self.assertEqual((outcome.delivered, outcome.attempts), (True, 4))

    def test_givesUp(self) -> None:
        """After the retries, the outcome is a failure with the last reason."""
        self.printer.down = True
        d = self.deliver()
        for delay in (2, 4, 8):
            self.clock.advance(delay)
        outcome = self.successResultOf(d)
        self.assertEqual((outcome.delivered, outcome.attempts), (False, 4))
        self.assertIn("connection refused", outcome.reason)
        self.assertEqual(len(self.printer.attempts), 4)

    def test_badURI(self) -> None:
        """A URI that is not ipp/ipps/socket fails at once, without attempts."""
        outcome = self.successResultOf(self.deliver("lpd://printer/queue"))
        self.assertFalse(outcome.delivered)
        self.assertIn("ipp://", outcome.reason)
        self.assertEqual(self.printer.attempts, [])

    def test_parseTarget(self) -> None:
        """Default ports and paths."""
        self.assertEqual(parse_target("ipp://h/ipp/print").port, 631)
        self.assertEqual(parse_target("socket://h").port, 9100)
        self.assertEqual(parse_target("socket://h:9101").port, 9101)
        self.assertEqual(parse_target("ipp://h:8631/x").http_url, b"http://h:8631/x")
        self.assertEqual(parse_target("ipps://h/x").http_url, b"https://h:631/x")
        for bad in ("ipp://", "socket://h/path", "http://h/", "ipp://h:99999/"):
            self.assertRaises(ValueError, parse_target, bad)


class _RawPrinter(Protocol):
    """A port-9100 printer: collects bytes until the sender closes."""

    def __init__(self, received: list[bytes], done: Deferred[bytes]) -> None:
        self.received = received
        self.done = done

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self.done.callback(b"".join(self.received))


class _IPPPrinter(Resource):
    """A minimal IPP printer answering Print-Job with successful-ok (or an error)."""

    isLeaf = True

    def __init__(self, status: int = ipp.STATUS_OK) -> None:
        super().__init__()
        self.status = status
        self.requests: list[Message] = []

    def render_POST(self, request: Any) -> bytes:
        message = ipp.decode(request.content.read())
        self.requests.append(message)
        request.setHeader(b"content-type", b"application/ipp")
        return ipp.encode(ipp.response(message, self.status, "busy" if self.status else None))


class NetworkDeliveryTests(TestCase):
    """One real delivery each over loopback TCP."""

    def setUp(self) -> None:
        self.document = Document(
            write(self.mktemp(), "d.pdf", b"%PDF-1.4 " + b"x" * 200_000),
            "alice",
            "report.pdf",
            "application/pdf",
            copies=2,
            duplex=True,
        )

    async def test_socket(self) -> None:
        """socket://: connect, send every byte, close."""
        received: list[bytes] = []
        done: Deferred[bytes] = Deferred()
        port = reactor.listenTCP(
            0, Factory.forProtocol(lambda: _RawPrinter(received, done)), interface="127.0.0.1"
        )
        self.addCleanup(port.stopListening)
        attempt = network_attempt(reactor, timeout=10)
        target = parse_target(f"socket://127.0.0.1:{port.getHost().port}")
        await attempt(target, self.document)
        data = await done
        with open(self.document.path, "rb") as f:
            self.assertEqual(data, f.read())

    async def test_ipp(self) -> None:
        """ipp://: a Print-Job with the owner, title, copies and sides, then the document."""
        printer = _IPPPrinter()
        port = reactor.listenTCP(0, Site(printer), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        attempt = network_attempt(reactor, timeout=10)
        await attempt(
            parse_target(f"ipp://127.0.0.1:{port.getHost().port}/ipp/print"), self.document
        )
        [request] = printer.requests
        self.assertEqual(request.code, ipp.OP_PRINT_JOB)
        user = request.operation("requesting-user-name")
        name = request.operation("job-name")
        assert user is not None and name is not None
        self.assertEqual((user.value, name.value), ("alice", "report.pdf"))
        copies = request.get(ipp.TAG_JOB, "copies")
        sides = request.get(ipp.TAG_JOB, "sides")
        assert copies is not None and sides is not None
        self.assertEqual((copies.value, sides.value), (2, "two-sided-long-edge"))
        with open(self.document.path, "rb") as f:
            self.assertEqual(request.data, f.read())

    async def test_ippRefused(self) -> None:
        """An IPP error status is a failed attempt naming the status."""
        printer = _IPPPrinter(ipp.STATUS_BUSY)
        port = reactor.listenTCP(0, Site(printer), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        attempt = network_attempt(reactor, timeout=10)
        target = parse_target(f"ipp://127.0.0.1:{port.getHost().port}/ipp/print")
        with self.assertRaises(DeliveryError) as caught:
            await attempt(target, self.document)
        self.assertIn("server-error-busy", str(caught.exception))

    async def test_connectionRefused(self) -> None:
        """Nothing listening: a failed attempt saying so."""
        port = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
        number = port.getHost().port
        await port.stopListening()
        attempt = network_attempt(reactor, timeout=10)
        for uri in (f"socket://127.0.0.1:{number}", f"ipp://127.0.0.1:{number}/ipp/print"):
            with self.assertRaises(DeliveryError):
                await attempt(parse_target(uri), self.document)


# -- config -----------------------------------------------------------------------------


def config_dict(directory: str, **top: Any) -> dict[str, Any]:
    """A minimal valid provider config."""
    data: dict[str, Any] = {
        "name": "north-spool",
        "data_dir": directory,
        "server": {"endpoint": "tcp:127.0.0.1:9191", "key_file": "key", "insecure": True},
        "ipp": {"listen": "tcp:0:interface=127.0.0.1"},
        "queues": {
            "north-hold": {},
            "direct": {"printer": "north-direct"},
        },
        "printers": {"north-direct": {"uri": "socket://192.0.2.9"}},
    }
    data.update(top)
    return data


class ConfigTests(SynchronousTestCase):
    """Validation with one-line errors naming the key, like the server's config."""

    def problem(self, data: dict[str, Any]) -> str:
        with self.assertRaises(ConfigError) as caught:
            from_dict(data, "/etc/p.toml")
        return str(caught.exception)

    def test_valid(self) -> None:
        """Defaults are filled in and paths are made absolute."""
        config = from_dict(config_dict("data"), "/etc/sitesrv/provider.toml")
        self.assertEqual(config.data_dir, "/etc/sitesrv/data")
        self.assertEqual(config.spool.directory, "/etc/sitesrv/data/spool")
        self.assertEqual(config.server.key_file, "/etc/sitesrv/key")
        self.assertEqual(config.offline_policy, "hold")
        self.assertEqual(config.ipp.max_document, 100 << 20)
        self.assertEqual(config.queues["north-hold"].printer, "north-hold")
        self.assertEqual(config.queues["direct"].printer, "north-direct")
        self.assertEqual(config.printers, {"north-direct": "socket://192.0.2.9"})
        self.assertEqual(config.delivery.retries, 3)

    def test_problems(self) -> None:
        """Each problem names the file and the key."""
        d = config_dict("data")
        cases: list[tuple[dict[str, Any], str]] = [
            ({**d, "queues": {}}, "queues: no queues"),
            ({**d, "offline_policy": "yolo"}, "offline_policy: must be"),
            ({**d, "printers": {"x": {"uri": "lpd://h/q"}}}, "printers.x.uri:"),
            ({**d, "queues": {"bad name": {}}}, 'queues."bad name": a queue name'),
            ({**d, "colour": True}, "colour: unknown key"),
            (
                {**d, "server": {"endpoint": "tcp:h:9191", "key_file": "k"}},
                "server.ca: give ca",
            ),
            (
                {**d, "server": {"endpoint": "ssl:h:9191", "key_file": "k", "insecure": True}},
                "server.endpoint:",
            ),
            ({**d, "spool": {"quota_mib": 10}}, "spool.quota_mib: must be at least"),
            ({**d, "delivery": {"retries": -1}}, "delivery.retries:"),
        ]
        for data, expected in cases:
            problem = self.problem(data)
            self.assertTrue(problem.startswith("/etc/p.toml: "), problem)
            self.assertIn(expected, problem)


class ServerEndpointTests(SynchronousTestCase):
    """The link to the server: TLS trusting a CA or a pinned fingerprint, or plain TCP."""

    def test_trust(self) -> None:
        """Each trust setting gives an endpoint; a missing CA file is a clear TLSError."""
        from sitesrv.tls import TLSError, init_tls

        directory = os.path.abspath(self.mktemp())
        files = init_tls(directory, ["localhost"], ["127.0.0.1"])
        server = {"endpoint": "tcp:127.0.0.1:9191", "key_file": "key"}
        for trust in (
            {"ca": files.ca_cert},
            {"fingerprint": files.fingerprint},
            {"insecure": True},
        ):
            config = from_dict(config_dict(directory, server={**server, **trust}), "/p.toml")
            self.assertIsNotNone(server_endpoint(config, Clock()))
        config = from_dict(
            config_dict(directory, server={**server, "ca": "/nonexistent/ca.crt"}), "/p.toml"
        )
        with self.assertRaises(TLSError) as caught:
            server_endpoint(config, Clock())
        self.assertIn("/nonexistent/ca.crt", str(caught.exception))
        self.flushLoggedErrors()


# -- the provider core, offline ----------------------------------------------------------


class NeverConnects:
    """A client endpoint whose connection attempts never finish (a server far away)."""

    def connect(self, factory: Any) -> Deferred[Any]:
        return Deferred()


def make_test_provider(
    testcase: SynchronousTestCase,
    clock: Clock,
    printer: FakePrinter,
    *,
    directory: str | None = None,
    config: ProviderConfig | None = None,
    key: str = "k" * 43,
    monotonic: Any = None,
    **top: Any,
) -> Provider:
    """A provider with an inline spool, inline page counting and a fake printer."""
    directory = directory or testcase.mktemp()
    os.makedirs(directory, exist_ok=True)
    write(directory, "key", key.encode() + b"\n")
    if config is None:
        config = from_dict(config_dict(directory, **top), os.path.join(directory, "p.toml"))
    spool = Spool(config.spool.directory, config.spool.quota, run_inline)
    spool.load()
    return Provider(
        config,
        clock,
        spool,
        Deliverer(
            clock, printer, retries=config.delivery.retries, backoff=config.delivery.backoff
        ),
        NeverConnects(),  # type: ignore[arg-type]
        count=lambda path, fmt: succeed(count_pages(path, fmt)),
        monotonic=monotonic or (lambda: 0.0),
    )


def submission(
    provider: Provider, queue: str, data: bytes, owner: str = "alice", **kw: Any
) -> Submission:
    """A Print-Job's submission with the document in memory."""
    values: dict[str, Any] = {
        "queue": provider.queues[queue],
        "owner": owner,
        "title": "doc.pdf",
        "document_format": "application/pdf",
        "copies": 1,
        "colour": False,
        "duplex": False,
        "content": io.BytesIO(data),
        "offset": 0,
        "size": len(data),
    }
    values.update(kw)
    return Submission(**values)


class OfflineProviderTests(SynchronousTestCase):
    """Without a server, each offline policy does what it says."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.printer = FakePrinter()

    def provider(self, policy: str) -> Provider:
        return make_test_provider(self, self.clock, self.printer, offline_policy=policy)

    def test_hold(self) -> None:
        """hold: the job waits, spooled, and nothing is printed."""
        provider = self.provider("hold")
        job = self.successResultOf(
            provider.submit(submission(provider, "north-hold", pdf_bytes(3)))
        )
        self.assertEqual((job.state, job.pages), (PENDING, 3))
        self.assertEqual(self.printer.printed, [])
        self.assertTrue(os.path.exists(provider.spool.document_path(job.uuid)))

    def test_printLater(self) -> None:
        """print-later: printed at once, with a report kept for the server."""
        provider = self.provider("print-later")
        job = self.successResultOf(provider.submit(submission(provider, "direct", pdf_bytes(2))))
        self.assertEqual(self.printer.printed[0][0], "socket://192.0.2.9")
        ended = provider.spool.jobs[job.uuid]
        self.assertEqual(ended.state, PRINTED)
        [report] = provider.spool.pending_reports()
        self.assertEqual((report.kind, report.release_id, report.job.pages), ("printed", "", 2))

    def test_printUntracked(self) -> None:
        """print-untracked: printed at once, nothing reported."""
        provider = self.provider("print-untracked")
        self.successResultOf(provider.submit(submission(provider, "direct", pdf_bytes(2))))
        self.assertEqual(len(self.printer.printed), 1)
        self.assertEqual(provider.spool.pending_reports(), [])

    def test_printLaterWithoutURI(self) -> None:
        """print-later for a printer with no known URI: failed, not printed, not reported."""
        provider = self.provider("print-later")
        job = self.successResultOf(provider.submit(submission(provider, "north-hold", b"x")))
        ended = provider.spool.jobs[job.uuid]
        self.assertEqual(ended.state, FAILED)
        self.assertIn("no delivery URI", ended.reason)
        self.assertEqual(provider.spool.pending_reports(), [])

    def test_expiry(self) -> None:
        """Jobs never decided are deleted after max_age; their records later."""
        provider = self.provider("hold")
        provider.startService()
        self.addCleanup(provider.stopService)
        job = self.successResultOf(provider.submit(submission(provider, "north-hold", b"x")))
        self.clock.advance(72 * HOUR)
        self.assertEqual(provider.spool.jobs[job.uuid].state, PENDING)
        self.clock.advance(HOUR)
        self.assertEqual(provider.spool.jobs[job.uuid].state, EXPIRED)
        self.assertFalse(os.path.exists(provider.spool.document_path(job.uuid)))
        self.clock.advance(25 * HOUR)
        self.assertNotIn(job.uuid, provider.spool.jobs)


# -- the IPP printer ------------------------------------------------------------------


class IPPClient:
    """Sends raw HTTP requests to an IPPSite over a StringTransport; parses answers."""

    def __init__(self, site: Site) -> None:
        self.site = site

    def post(
        self, body: bytes, path: str = "/ipp/print/north-hold", headers: bytes = b""
    ) -> tuple[int, bytes]:
        """POST a body; return (HTTP status, response body)."""
        return self.raw(
            f"POST {path} HTTP/1.1\r\nHost: printhost:631\r\nContent-Type: application/ipp\r\n"
            f"Content-Length: {len(body)}\r\n".encode()
            + headers
            + b"\r\n"
            + body
        )

    def raw(self, data: bytes, chunks: int = 1) -> tuple[int, bytes]:
        """Send raw bytes (in ``chunks`` pieces); return (HTTP status, body)."""
        protocol = self.site.buildProtocol(IPv4Address("TCP", "192.0.2.50", 50000))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.50", 50000))
        protocol.makeConnection(transport)
        step = max(1, len(data) // chunks)
        for start in range(0, len(data), step):
            protocol.dataReceived(data[start : start + step])
        out = transport.value()
        head, _, body = out.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        if b"transfer-encoding: chunked" in head.lower():
            body = _dechunk(body)
        return status, body

    def ipp(self, message: Message, path: str = "/ipp/print/north-hold") -> Message:
        """Send an IPP request; return the decoded answer."""
        status, body = self.post(ipp.encode(message), path)
        assert status == 200, (status, body)
        return ipp.decode(body)


def _dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        out += data[:size]
        data = data[size + 2 :]
    return out


def request(
    operation: int,
    *more: ipp.Attribute,
    job: tuple[ipp.Attribute, ...] = (),
    data: bytes = b"",
    request_id: int = 7,
) -> Message:
    """An IPP request with the usual operation attributes."""
    groups = [
        ipp.operation_attributes(
            attribute("printer-uri", ipp.TAG_URI, "ipp://printhost:631/ipp/print/north-hold"),
            attribute("requesting-user-name", ipp.TAG_NAME, "alice"),
            *more,
        )
    ]
    if job:
        groups.append(ipp.Group(ipp.TAG_JOB, job))
    return Message((2, 0), operation, request_id, tuple(groups), data)


class IPPServerTests(SynchronousTestCase):
    """The IPP printer, through twisted.web's HTTP stack, with an offline provider."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.printer = FakePrinter()
        self.provider = make_test_provider(self, self.clock, self.printer)
        self.site = make_site(
            self.provider, max_document=50_000, max_attributes=4096, reactor=self.clock
        )
        self.client = IPPClient(self.site)

    def status(self, answer: Message) -> str:
        return ipp.status_name(answer.code)

    def message(self, answer: Message) -> str:
        attr = answer.operation("status-message")
        return attr.value if attr is not None and isinstance(attr.value, str) else ""

    def print_job(self, data: bytes, **kw: Any) -> Message:
        return self.client.ipp(
            request(
                ipp.OP_PRINT_JOB,
                attribute("job-name", ipp.TAG_NAME, "thesis.pdf"),
                attribute("document-format", ipp.TAG_MIME_TYPE, "application/pdf"),
                job=(attribute("copies", ipp.TAG_INTEGER, 2),),
                data=data,
                **kw,
            )
        )

    def test_printJob(self) -> None:
        """Print-Job spools the document for its owner and answers with the job."""
        answer = self.print_job(pdf_bytes(3))
        self.assertEqual(self.status(answer), "successful-ok")
        self.assertEqual(answer.request_id, 7)
        job_id = answer.get(ipp.TAG_JOB, "job-id")
        uri = answer.get(ipp.TAG_JOB, "job-uri")
        state = answer.get(ipp.TAG_JOB, "job-state")
        assert job_id is not None and uri is not None and state is not None
        self.assertEqual(uri.value, f"ipp://printhost:631/ipp/print/north-hold/{job_id.value!s}")
        self.assertEqual(state.value, 4)  # pending-held: waiting for the server
        [job] = self.provider.spool.jobs.values()
        self.assertEqual(
            (job.owner, job.title, job.pages, job.copies, job.queue),
            ("alice", "thesis.pdf", 3, 2, "north-hold"),
        )
        with open(self.provider.spool.document_path(job.uuid), "rb") as f:
            self.assertEqual(f.read(), pdf_bytes(3))

    def test_printJobInChunks(self) -> None:
        """A body arriving in many pieces (chunked or not) is the same job."""
        body = ipp.encode(request(ipp.OP_PRINT_JOB, data=pdf_bytes(2)))
        chunked = (
            b"".join(
                b"%x\r\n%s\r\n" % (len(body[i : i + 1000]), body[i : i + 1000])
                for i in range(0, len(body), 1000)
            )
            + b"0\r\n\r\n"
        )
        status, answer = self.client.raw(
            b"POST /printers/north-hold HTTP/1.1\r\nHost: h\r\nContent-Type: application/ipp\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" + chunked,
            chunks=37,
        )
        self.assertEqual((status, ipp.decode(answer).code), (200, ipp.STATUS_OK))
        [job] = self.provider.spool.jobs.values()
        self.assertEqual(job.pages, 2)

    def test_validateJob(self) -> None:
        """Validate-Job checks without spooling anything."""
        answer = self.client.ipp(request(ipp.OP_VALIDATE_JOB))
        self.assertEqual(self.status(answer), "successful-ok")
        self.assertEqual(self.provider.spool.jobs, {})

    def test_unsupportedFormat(self) -> None:
        """A document format the queues do not take."""
        answer = self.client.ipp(
            request(
                ipp.OP_PRINT_JOB,
                attribute("document-format", ipp.TAG_MIME_TYPE, "image/pwg-raster"),
            )
        )
        self.assertEqual(self.status(answer), "client-error-document-format-not-supported")

    def test_getPrinterAttributes(self) -> None:
        """What IPP Everywhere clients and ipptool's tests expect."""
        answer = self.client.ipp(request(ipp.OP_GET_PRINTER_ATTRIBUTES))
        printer = answer.group(ipp.TAG_PRINTER)
        assert printer is not None
        names = {a.name for a in printer.attributes}
        for expected in (
            "printer-uri-supported",
            "uri-security-supported",
            "uri-authentication-supported",
            "printer-name",
            "printer-state",
            "printer-state-reasons",
            "ipp-versions-supported",
            "operations-supported",
            "charset-configured",
            "charset-supported",
            "natural-language-configured",
            "generated-natural-language-supported",
            "document-format-default",
            "document-format-supported",
            "printer-is-accepting-jobs",
            "queued-job-count",
            "pdl-override-supported",
            "compression-supported",
            "printer-up-time",
            "media-col-default",
        ):
            self.assertIn(expected, names)
        uri = printer.get("printer-uri-supported")
        formats = printer.get("document-format-supported")
        assert uri is not None and formats is not None
        self.assertEqual(uri.value, "ipp://printhost:631/ipp/print/north-hold")
        self.assertEqual(
            formats.python,
            [
                "application/pdf",
                "application/postscript",
                "text/plain",
                "application/octet-stream",
            ],
        )

    def test_requestedAttributes(self) -> None:
        """requested-attributes limits the answer."""
        answer = self.client.ipp(
            request(
                ipp.OP_GET_PRINTER_ATTRIBUTES,
                attribute(
                    "requested-attributes", ipp.TAG_KEYWORD, "printer-state", "printer-name"
                ),
            )
        )
        printer = answer.group(ipp.TAG_PRINTER)
        assert printer is not None
        self.assertEqual({a.name for a in printer.attributes}, {"printer-state", "printer-name"})

    def test_getJobsAndJobAttributes(self) -> None:
        """Get-Jobs lists the queue's jobs; Get-Job-Attributes describes one."""
        first = self.print_job(pdf_bytes(1))
        self.print_job(pdf_bytes(2))
        answer = self.client.ipp(
            request(
                ipp.OP_GET_JOBS,
                attribute(
                    "requested-attributes", ipp.TAG_KEYWORD, "job-id", "job-originating-user-name"
                ),
            )
        )
        jobs = answer.groups_of(ipp.TAG_JOB)
        self.assertEqual(len(jobs), 2)
        owner = jobs[0].get("job-originating-user-name")
        assert owner is not None
        self.assertEqual(owner.value, "alice")
        job_id = first.get(ipp.TAG_JOB, "job-id")
        assert job_id is not None
        answer = self.client.ipp(
            request(ipp.OP_GET_JOB_ATTRIBUTES, attribute("job-id", ipp.TAG_INTEGER, job_id.value))
        )
        impressions = answer.get(ipp.TAG_JOB, "job-impressions")
        assert impressions is not None
        self.assertEqual(impressions.value, 2)  # 1 page x 2 copies
        missing = self.client.ipp(
            request(ipp.OP_GET_JOB_ATTRIBUTES, attribute("job-id", ipp.TAG_INTEGER, 999))
        )
        self.assertEqual(self.status(missing), "client-error-not-found")

    def test_cancelJob(self) -> None:
        """The owner can cancel a waiting job; others cannot."""
        answer = self.print_job(pdf_bytes(1))
        job_id = answer.get(ipp.TAG_JOB, "job-id")
        assert job_id is not None
        cancel = request(ipp.OP_CANCEL_JOB, attribute("job-id", ipp.TAG_INTEGER, job_id.value))
        mallory = attrs.evolve(
            cancel,
            groups=(
                ipp.operation_attributes(
                    attribute("printer-uri", ipp.TAG_URI, "ipp://h/ipp/print/north-hold"),
                    attribute("requesting-user-name", ipp.TAG_NAME, "mallory"),
                    attribute("job-id", ipp.TAG_INTEGER, job_id.value),
                ),
            ),
        )
        self.assertEqual(self.status(self.client.ipp(mallory)), "client-error-not-authorized")
        self.assertEqual(self.status(self.client.ipp(cancel)), "successful-ok")
        [job] = self.provider.spool.jobs.values()
        self.assertEqual(job.state, "cancelled")
        self.assertFalse(os.path.exists(self.provider.spool.document_path(job.uuid)))

    def test_unsupportedOperation(self) -> None:
        """Operations this printer does not do."""
        answer = self.client.ipp(request(ipp.OP_CREATE_JOB))
        self.assertEqual(self.status(answer), "server-error-operation-not-supported")
        self.assertIn("Create-Job", self.message(answer))

    def test_unknownQueue(self) -> None:
        """A path that names no queue."""
        answer = self.client.ipp(request(ipp.OP_GET_PRINTER_ATTRIBUTES), path="/ipp/print/nope")
        self.assertEqual(self.status(answer), "client-error-not-found")

    def test_malformed(self) -> None:
        """Malformed bodies get client-error-bad-request with the request id, not a drop."""
        good = ipp.encode(request(ipp.OP_GET_PRINTER_ATTRIBUTES, request_id=99))
        for body in (good[:20], good[:-1], b"\x02\x00\x00\x0b\x00\x00\x00\x63\x01\x21\xff\xff"):
            status, data = self.client.post(body)
            self.assertEqual(status, 200)
            answer = ipp.decode(data)
            self.assertEqual(self.status(answer), "client-error-bad-request", body)
            self.assertEqual(answer.request_id, 99)
            self.assertIn("malformed", self.message(answer))
        status, data = self.client.post(b"")
        self.assertEqual(ipp.decode(data).code, ipp.STATUS_BAD_REQUEST)

    def test_missingCharset(self) -> None:
        """The operation group must start with charset and language."""
        bad = Message(
            (2, 0),
            ipp.OP_GET_PRINTER_ATTRIBUTES,
            3,
            (ipp.Group(ipp.TAG_OPERATION, (attribute("printer-uri", ipp.TAG_URI, "ipp://h/"),)),),
        )
        self.assertEqual(self.status(self.client.ipp(bad)), "client-error-bad-request")

    def test_missingPrinterURI(self) -> None:
        """Every request names its target (RFC 8011 section 4.1.5)."""
        bare = Message((2, 0), ipp.OP_GET_PRINTER_ATTRIBUTES, 3, (ipp.operation_attributes(),))
        answer = self.client.ipp(bare)
        self.assertEqual(self.status(answer), "client-error-bad-request")
        self.assertIn("printer-uri", self.message(answer))

    def test_badVersion(self) -> None:
        """IPP 3.0 does not exist."""
        answer = self.client.ipp(
            attrs.evolve(request(ipp.OP_GET_PRINTER_ATTRIBUTES), version=(3, 0))
        )
        self.assertEqual(self.status(answer), "server-error-version-not-supported")

    def test_documentTooLarge(self) -> None:
        """A document over the limit is answered, not stored, whether announced or not."""
        body = ipp.encode(request(ipp.OP_PRINT_JOB, data=b"x" * 60_000, request_id=5))
        answer = ipp.decode(self.client.post(body)[1])
        self.assertEqual(self.status(answer), "client-error-request-entity-too-large")
        self.assertEqual(answer.request_id, 5)
        chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
        _status, data = self.client.raw(
            b"POST /ipp/print/north-hold HTTP/1.1\r\nHost: h\r\nContent-Type: application/ipp\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" + chunked,
            chunks=20,
        )
        self.assertEqual(ipp.decode(data).code, ipp.STATUS_REQUEST_ENTITY_TOO_LARGE)
        self.assertEqual(self.provider.spool.jobs, {})

    def test_attributesTooLong(self) -> None:
        """An attribute section over its limit is a bad request."""
        long_name = attribute("job-name", ipp.TAG_NAME, "n" * 3000)
        body = ipp.encode(request(ipp.OP_PRINT_JOB, long_name, long_name, data=b"x"))
        answer = ipp.decode(self.client.post(body)[1])
        self.assertEqual(self.status(answer), "client-error-bad-request")
        self.assertIn("longer than 4096 bytes", self.message(answer))

    def test_spoolFull(self) -> None:
        """Over the spool quota: server-error-not-accepting-jobs, printer not accepting."""
        self.provider.spool.quota = 5000
        answer = self.print_job(b"x" * 6000)
        self.assertEqual(self.status(answer), "server-error-not-accepting-jobs")
        self.print_job(b"x" * 4000)
        self.provider.spool.quota = 4000
        answer = self.client.ipp(request(ipp.OP_GET_PRINTER_ATTRIBUTES))
        accepting = answer.get(ipp.TAG_PRINTER, "printer-is-accepting-jobs")
        assert accepting is not None
        self.assertIs(accepting.value, False)
        self.assertEqual(self.status(self.print_job(b"x")), "server-error-not-accepting-jobs")

    def test_get(self) -> None:
        """A browser gets one line, not an error page."""
        status, body = self.client.raw(b"GET /ipp/print/north-hold HTTP/1.1\r\nHost: h\r\n\r\n")
        self.assertEqual(status, 200)
        self.assertIn(b"north-hold", body)


# -- the provider core against the real server side --------------------------------------


class ProviderProtocolTests(ProtocolFixture):
    """``Provider`` and north's ``ProviderService`` + Find-Me queue over ``iosim``."""

    def setUp(self) -> None:
        super().setUp()
        self.printer = FakePrinter()
        self.directory = self.mktemp()
        self.provider = self.new_provider()

    def new_provider(self, **top: Any) -> Provider:
        provider = make_test_provider(
            self,
            self.clock,
            self.printer,
            directory=self.directory,
            key=self.keys["north-spool"],
            monotonic=lambda: self.mono,
            **top,
        )
        provider.startService()
        self.addCleanup(provider.stopService)
        return provider

    def link(self, provider: Provider | None = None) -> tuple[ProviderLink, Wire]:
        """Connect the provider to the server and settle."""
        link = ProviderLink(provider or self.provider)
        server = self.service.factory().buildProtocol(IPv4Address("TCP", "192.0.2.7", 40000))
        wire = Wire(link, server, self.clock)
        self.wires.append(wire)
        self.settle()
        return link, wire

    def cut(self, wire: Wire) -> None:
        wire.clientIO.loseConnection()
        self.settle()

    def submit(self, queue: str, pages: int, owner: str = "alice", **kw: Any) -> Any:  # type: ignore[override]
        d = self.provider.submit(submission(self.provider, queue, pdf_bytes(pages), owner, **kw))
        self.settle()
        return self.successResultOf(d)

    def alice(self) -> Any:
        return self.identity("alice")

    def server_state(self, uuid: str) -> str:
        """The job's state at the server."""
        job = self.store.read(jobqueue.thdJob, uuid)
        assert job is not None
        return str(job.state)

    def test_helloAndQueues(self) -> None:
        """The provider says hello and learns its queues' printers."""
        link, _ = self.link()
        self.assertIs(self.provider.link, link)
        self.assertTrue(link.is_ready)
        self.assertEqual(set(self.provider.server_queues), {"north-hold", "north-direct"})
        self.assertTrue(self.provider.server_queues["north-hold"].hold)

    def test_heldThenReleased(self) -> None:
        """A job on a hold queue is held; released, it prints and alice pays its pages."""
        self.link()
        job = self.submit("north-hold", 3)
        self.assertEqual(job.state, HELD)
        self.assertEqual(self.printer.printed, [])
        outcomes = self.ok(self.findme.release(self.alice(), "north-hold"))
        self.settle()
        self.assertTrue(outcomes[0].released)
        self.assertEqual(len(self.printer.printed), 1)
        self.assertEqual(self.printer.printed[0][0], "ipp://nh/ipp/print")
        self.assertEqual(self.provider.spool.jobs[job.uuid].state, PRINTED)
        self.assertEqual(self.provider.spool.pending_reports(), [])
        self.assertEqual(self.server_state(job.uuid), "printed")
        self.assertEqual([amount for _, amount, _ in self.charges()], [-30])

    def test_printedNow(self) -> None:
        """A direct queue prints at once (to the provider's own URI) and is charged."""
        self.link()
        job = self.submit("direct", 2)
        self.assertEqual(self.printer.printed[0][0], "socket://192.0.2.9")
        self.assertEqual(self.provider.spool.jobs[job.uuid].state, PRINTED)
        self.assertEqual([amount for _, amount, _ in self.charges()], [-20])

    def test_denied(self) -> None:
        """Over alice's balance: denied with the reason, deleted, not printed."""
        self.link()
        job = self.submit("direct", 11)
        self.assertEqual(job.state, DENIED)
        self.assertEqual(job.reason, "insufficient balance: 1.00 available, job costs 1.10")
        self.assertFalse(os.path.exists(self.provider.spool.document_path(job.uuid)))
        self.assertEqual(self.printer.attempts, [])
        self.assertEqual(self.charges(), [])

    def test_deliveryFails(self) -> None:
        """A released job whose printer is down is retried, reported failed, not charged."""
        self.link()
        job = self.submit("north-hold", 1)
        self.printer.down = True
        self.ok(self.findme.release(self.alice(), "north-hold"))
        self.settle()
        for delay in (5, 10, 20):
            self.clock.advance(delay)
            self.settle()
        self.assertEqual(len(self.printer.attempts), 4)
        self.assertEqual(self.provider.spool.jobs[job.uuid].state, FAILED)
        self.assertEqual(self.server_state(job.uuid), "failed")
        self.assertEqual(self.charges(), [])

    def test_reportResentUntilAcknowledged(self) -> None:
        """A report whose answer is lost is resent after reconnecting; charged once."""
        _, wire = self.link()
        job = self.submit("north-hold", 2)
        # Once the job is on paper, the server's answers are lost.
        self.printer.printing = lambda: setattr(wire, "to_client", False)
        self.ok(self.findme.release(self.alice(), "north-hold"))
        self.settle()
        self.assertEqual(len(self.printer.printed), 1)
        self.cut(wire)
        self.assertEqual([r.kind for r in self.provider.spool.pending_reports()], ["printed"])
        # A restart on the same spool still has the report.
        self.provider.stopService()
        self.provider = self.new_provider()
        self.assertEqual([r.kind for r in self.provider.spool.pending_reports()], ["printed"])
        self.link()
        self.assertEqual(self.provider.spool.pending_reports(), [])
        self.assertEqual(self.server_state(job.uuid), "printed")
        self.assertEqual([amount for _, amount, _ in self.charges()], [-20])
        self.assertEqual(len(self.printer.printed), 1)

    def test_heldJobsReannounced(self) -> None:
        """After a reconnect the held jobs are re-announced: held once, still releasable."""
        _, wire = self.link()
        job = self.submit("north-hold", 1)
        self.cut(wire)
        self.link()
        self.assertEqual(self.rows(), 1)
        self.assertEqual(self.provider.spool.jobs[job.uuid].state, HELD)
        self.ok(self.findme.release(self.alice(), "north-hold"))
        self.settle()
        self.assertEqual(len(self.printer.printed), 1)

    def test_heldWhileOfflineAskedOnReconnect(self) -> None:
        """Under "hold", a job spooled offline is decided when the server is back."""
        job = self.submit("north-hold", 1)
        self.assertEqual(job.state, PENDING)
        self.link()
        self.assertEqual(self.provider.spool.jobs[job.uuid].state, HELD)
        self.assertEqual(self.rows(), 1)

    def test_printLaterReportedOnReconnect(self) -> None:
        """Under "print-later", a job printed offline is charged once the link is back."""
        self.provider.stopService()
        self.provider = self.new_provider(offline_policy="print-later")
        self.submit("direct", 2)
        self.assertEqual(len(self.printer.printed), 1)
        self.assertEqual(self.charges(), [])
        self.link()
        self.assertEqual(self.provider.spool.pending_reports(), [])
        self.assertEqual([amount for _, amount, _ in self.charges()], [-20])

    def test_releaseLostWhenTheLinkDrops(self) -> None:
        """A release pushed as the link drops prints once, after the reconnect."""
        _, wire = self.link()
        job = self.submit("north-hold", 1)
        wire.to_client = False
        self.ok(self.findme.release(self.alice(), "north-hold"))
        self.settle()
        self.cut(wire)
        self.assertEqual(self.printer.printed, [])
        self.link()
        self.assertEqual(len(self.printer.printed), 1)
        self.assertEqual(self.provider.spool.jobs[job.uuid].state, PRINTED)
        self.assertEqual([amount for _, amount, _ in self.charges()], [-10])

    def test_expiredAtTheServer(self) -> None:
        """A held job that expires at the server is deleted from the spool."""
        self.link()
        job = self.submit("north-hold", 1)
        self.clock.advance(8 * HOUR + 1)
        self.settle()
        self.assertEqual(self.provider.spool.jobs[job.uuid].state, EXPIRED)
        self.assertFalse(os.path.exists(self.provider.spool.document_path(job.uuid)))

    def test_wrongKey(self) -> None:
        """A refused hello leaves the provider offline (it keeps trying)."""
        self.provider.stopService()
        self.provider = self.new_provider()
        with open(os.path.join(self.directory, "key"), "w") as f:
            f.write("wrong-key\n")
        link, wire = self.link()
        self.assertIsNone(self.provider.link)
        self.assertTrue(wire.closed)
        self.flushLoggedErrors()
        del link

    def test_unknownQueue(self) -> None:
        """A queue whose printer the server does not know stops accepting jobs."""
        self.provider.stopService()
        directory = self.directory
        config = from_dict(
            config_dict(directory, queues={"elsewhere": {"printer": "south-hold"}}),
            os.path.join(directory, "p.toml"),
        )
        self.provider = make_test_provider(
            self,
            self.clock,
            self.printer,
            directory=directory,
            config=config,
            key=self.keys["north-spool"],
        )
        self.link()
        state = self.provider.queue_state(self.provider.queues["elsewhere"])
        self.assertFalse(state.accepting)
        self.assertIn("south", state.message)
