"""Delivering a spooled document to a physical printer, with retries.

Delivery URIs:

* ``ipp://host[:port]/path`` (port 631): an IPP Print-Job request over HTTP, encoded
  with `sitesrv.provider.ipp`; ``ipps://`` is the same over HTTPS, trusting the
  system's certificate authorities.
* ``socket://host[:port]`` (port 9100): "raw" printing: connect, send the bytes, close.

A failed attempt is retried after ``backoff`` seconds, doubling each time (at most
`MAX_BACKOFF`), ``retries`` times; then the delivery has failed for good and the caller
reports it. Timers use the injected clock.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, BinaryIO
from urllib.parse import urlsplit

import attrs
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IConsumer, IReactorTime
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.protocols.basic import FileSender
from twisted.python.failure import Failure
from twisted.web.client import Agent, FileBodyProducer, ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer, IResponse
from zope.interface import implementer

from sitesrv.provider import ipp
from sitesrv.provider.ipp import attribute

log = Logger()

#: The longest wait between two attempts.
MAX_BACKOFF = 300.0
#: The most of a printer's IPP answer that is read.
MAX_RESPONSE = 1 << 20
#: Schemes a delivery URI may have, and their default ports.
DEFAULT_PORTS = {"ipp": 631, "ipps": 631, "socket": 9100}


class DeliveryError(Exception):
    """One delivery attempt failed; ``str()`` says why, for logs and the failed report."""


@attrs.frozen
class Target:
    """Where a delivery goes, parsed from its URI."""

    uri: str
    scheme: str
    host: str
    port: int
    path: str

    @property
    def http_url(self) -> bytes:
        """The HTTP(S) URL an IPP request is posted to."""
        scheme = "https" if self.scheme == "ipps" else "http"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}{self.path}".encode()


def parse_target(uri: str) -> Target:
    """Parse a delivery URI; raise ValueError saying what is wrong with it."""
    try:
        parts = urlsplit(uri.strip())
        port = parts.port
    except ValueError as e:
        raise ValueError(f"bad delivery URI {uri!r}: {e}") from None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise ValueError(f"delivery URI {uri!r} must start with ipp://, ipps:// or socket://")
    if not parts.hostname:
        raise ValueError(f"delivery URI {uri!r} has no host")
    if scheme == "socket" and parts.path not in ("", "/"):
        raise ValueError(f"delivery URI {uri!r}: socket:// takes no path")
    path = parts.path or "/"
    if parts.query:
        path += f"?{parts.query}"
    return Target(
        uri=uri.strip(),
        scheme=scheme,
        host=parts.hostname,
        port=port or DEFAULT_PORTS[scheme],
        path=path if scheme != "socket" else "",
    )


@attrs.frozen
class Document:
    """What is delivered: the spooled file and the job's details."""

    path: str
    owner: str
    title: str
    document_format: str
    copies: int = 1
    duplex: bool = False
    colour: bool = False


@attrs.frozen
class Outcome:
    """How a delivery ended: delivered or not, after how many attempts, and why not."""

    delivered: bool
    attempts: int
    reason: str = ""


# -- one attempt ------------------------------------------------------------------------


@implementer(IBodyProducer)
class _HeaderThenFile:
    """A request body: the IPP request's attributes, then the document file."""

    def __init__(self, header: bytes, document: BinaryIO) -> None:
        self._header = header
        self._file = FileBodyProducer(document)
        self.length = len(header) + self._file.length
        self._started = False

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        self._started = True
        consumer.write(self._header)
        return self._file.startProducing(consumer)

    def pauseProducing(self) -> None:
        self._file.pauseProducing()

    def resumeProducing(self) -> None:
        self._file.resumeProducing()

    def stopProducing(self) -> None:
        if self._started:
            self._file.stopProducing()


def print_job_request(target: Target, document: Document, request_id: int = 1) -> ipp.Message:
    """The IPP Print-Job request (without the document) delivering ``document``."""
    operation = [
        attribute("printer-uri", ipp.TAG_URI, f"{target.scheme}://{_netloc(target)}{target.path}"),
        attribute("requesting-user-name", ipp.TAG_NAME, document.owner or "anonymous"),
        attribute("job-name", ipp.TAG_NAME, document.title or "untitled"),
        attribute("document-format", ipp.TAG_MIME_TYPE, document.document_format),
    ]
    job: list[ipp.Attribute] = []
    if document.copies > 1:
        job.append(attribute("copies", ipp.TAG_INTEGER, document.copies))
    if document.duplex:
        job.append(attribute("sides", ipp.TAG_KEYWORD, "two-sided-long-edge"))
    groups = [ipp.operation_attributes(*operation)]
    if job:
        groups.append(ipp.Group(ipp.TAG_JOB, tuple(job)))
    return ipp.Message((2, 0), ipp.OP_PRINT_JOB, request_id, tuple(groups))


def _netloc(target: Target) -> str:
    host = f"[{target.host}]" if ":" in target.host else target.host
    return f"{host}:{target.port}"


class _LimitedBody(Protocol):
    """Collects a response body, up to a limit."""

    def __init__(self, done: Deferred[bytes], limit: int) -> None:
        self.done = done
        self.limit = limit
        self.parts: list[bytes] = []
        self.size = 0

    def dataReceived(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.limit:
            if not self.done.called:
                self.done.errback(DeliveryError("the printer's answer is too long"))
            if self.transport is not None:
                self.transport.stopProducing()  # type: ignore[attr-defined]
            return
        self.parts.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.done.called:
            return
        if reason.check(ResponseDone):
            self.done.callback(b"".join(self.parts))
        else:
            self.done.errback(DeliveryError(f"the printer's answer broke off: {reason.value}"))


async def deliver_ipp(agent: Any, target: Target, document: Document) -> None:
    """Send ``document`` with an IPP Print-Job; raise DeliveryError unless it succeeds."""
    header = ipp.encode(print_job_request(target, document))
    f = open(document.path, "rb")  # noqa: SIM115 (closed below, or by the producer)
    body = _HeaderThenFile(header, f)
    try:
        response: IResponse = await agent.request(
            b"POST",
            target.http_url,
            Headers({b"Content-Type": [b"application/ipp"]}),
            body,
        )
    except Exception as e:
        raise DeliveryError(f"cannot send to {target.uri}: {_why(e)}") from None
    finally:
        f.close()
    done: Deferred[bytes] = Deferred()
    response.deliverBody(_LimitedBody(done, MAX_RESPONSE))
    data = await done
    if response.code != 200:
        raise DeliveryError(f"{target.uri} answered HTTP {response.code}")
    try:
        answer = ipp.decode(data)
    except ipp.IPPParseError as e:
        raise DeliveryError(f"{target.uri} sent a malformed IPP answer: {e}") from None
    if answer.code >= 0x0100:
        message = answer.operation("status-message")
        detail = f": {message.value!s}" if message is not None else ""
        raise DeliveryError(
            f"{target.uri} refused the job with {ipp.status_name(answer.code)}{detail}"
        )


class _RawSender(Protocol):
    """Sends a file, then closes the connection; ``done`` fires when it is closed."""

    def __init__(self, path: str, done: Deferred[None]) -> None:
        self.path = path
        self.done = done
        self.sent = False

    def connectionMade(self) -> None:
        f = open(self.path, "rb")  # noqa: SIM115 (closed when the sender finishes)
        d = FileSender().beginFileTransfer(f, self.transport)

        def finished(result: object) -> None:
            f.close()
            self.sent = True
            assert self.transport is not None
            self.transport.loseConnection()

        def failed(reason: Failure) -> None:
            f.close()
            if not self.done.called:
                self.done.errback(DeliveryError(f"sending failed: {reason.value}"))
            assert self.transport is not None
            self.transport.abortConnection()  # type: ignore[attr-defined]

        d.addCallbacks(finished, failed)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.done.called:
            return
        if self.sent and reason.check(ConnectionDone):
            self.done.callback(None)
        else:
            self.done.errback(DeliveryError(f"the printer closed the connection: {reason.value}"))


async def deliver_socket(reactor: Any, target: Target, document: Document) -> None:
    """Send the document's bytes to a raw (port 9100) printer; raise DeliveryError."""
    done: Deferred[None] = Deferred()
    endpoint = HostnameEndpoint(reactor, target.host, target.port, timeout=30)
    try:
        await endpoint.connect(Factory.forProtocol(lambda: _RawSender(document.path, done)))
    except Exception as e:
        raise DeliveryError(f"cannot connect to {target.uri}: {_why(e)}") from None
    await done


def _why(error: BaseException) -> str:
    reasons = getattr(error, "reasons", None)  # twisted.web's ResponseNeverReceived etc.
    if reasons:
        return "; ".join(str(r.value) for r in reasons)
    return str(error) or type(error).__name__


# -- retries ----------------------------------------------------------------------------

#: One delivery attempt: fires None when delivered, fails (DeliveryError) otherwise.
Attempt = Callable[[Target, Document], Deferred[None]]


def network_attempt(reactor: Any, timeout: float = 120.0) -> Attempt:
    """An `Attempt` over the network with ``reactor`` (an Agent for ipp, TCP for raw)."""
    agent = Agent(reactor, connectTimeout=30)

    def attempt(target: Target, document: Document) -> Deferred[None]:
        if target.scheme == "socket":
            d = Deferred.fromCoroutine(deliver_socket(reactor, target, document))
        else:
            d = Deferred.fromCoroutine(deliver_ipp(agent, target, document))

        def timed_out(reason: Failure) -> Failure:
            if reason.check(defer.TimeoutError):
                return Failure(DeliveryError(f"{target.uri}: no answer within {timeout:g} s"))
            return reason

        return d.addTimeout(timeout, reactor).addErrback(timed_out)

    return attempt


@attrs.define
class Deliverer:
    """Delivers documents with ``attempt``, retrying ``retries`` times with backoff."""

    clock: IReactorTime
    attempt: Attempt
    retries: int = 3
    backoff: float = 5.0

    async def deliver(self, uri: str, document: Document, job: str = "") -> Outcome:
        """Deliver ``document`` to ``uri``; the outcome after the last attempt."""
        try:
            target = parse_target(uri)
        except ValueError as e:
            return Outcome(False, 0, str(e))
        reason = ""
        for attempt in range(1, self.retries + 2):
            try:
                await self.attempt(target, document)
            except DeliveryError as e:
                reason = str(e)
            except Exception as e:  # a bug or an unexpected network error: still a failure
                log.failure("delivery attempt for {job} crashed", job=job)
                reason = f"{type(e).__name__}: {e}"
            else:
                log.info(
                    "job {job} delivered to {uri} (attempt {attempt})",
                    job=job,
                    uri=uri,
                    attempt=attempt,
                )
                return Outcome(True, attempt)
            if attempt > self.retries:
                break
            delay = min(self.backoff * 2 ** (attempt - 1), MAX_BACKOFF)
            log.warn(
                "job {job}: delivery to {uri} failed (attempt {attempt} of {total}): "
                "{reason}; retrying in {delay:g} s",
                job=job,
                uri=uri,
                attempt=attempt,
                total=self.retries + 1,
                reason=reason,
                delay=delay,
            )
            await deferLater(self.clock, delay, lambda: None)
        log.error(
            "job {job}: delivery to {uri} failed for good after {attempts} attempt(s): {reason}",
            job=job,
            uri=uri,
            attempts=self.retries + 1,
            reason=reason,
        )
        return Outcome(False, self.retries + 1, reason)
