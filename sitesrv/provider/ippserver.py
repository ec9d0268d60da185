"""The provider's IPP printer: virtual queues at ``/ipp/print/QUEUE`` (and ``/printers/QUEUE``).

A ``twisted.web`` resource taking ``POST`` requests of type ``application/ipp``. It
answers Print-Job (the document follows the attributes in the body), Validate-Job,
Get-Printer-Attributes, Get-Jobs, Get-Job-Attributes and Cancel-Job; any other operation
gets ``server-error-operation-not-supported``. The job's owner is its
``requesting-user-name``.

Bodies are bounded (`IPPSite`): at most ``max_attributes`` bytes before the document
and ``max_document`` bytes of document; a larger body is read and thrown away (only its
first bytes are kept, to answer with the right request id) and answered with
``client-error-request-entity-too-large``. Malformed requests get
``client-error-bad-request`` naming the problem; an unexpected error is logged and
answered with ``server-error-internal-error``. Never a dropped connection or a traceback.
"""

from __future__ import annotations

import datetime
import io
import uuid as uuidlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, BinaryIO, Protocol

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

import sitesrv
from sitesrv.provider import ipp
from sitesrv.provider.config import Queue
from sitesrv.provider.ipp import Attribute, Collection, Group, Message, Value, attribute
from sitesrv.provider.pages import OCTET_STREAM, PDF, POSTSCRIPT, TEXT
from sitesrv.provider.spool import (
    CANCELLED,
    DENIED,
    EXPIRED,
    FAILED,
    HELD,
    PENDING,
    PRINTED,
    RELEASING,
    SpooledJob,
    SpoolFull,
)

log = Logger()

#: Document formats the queues accept (the document is passed to the printer as is).
DOCUMENT_FORMATS = (PDF, POSTSCRIPT, TEXT, OCTET_STREAM)
#: Operations this printer supports.
OPERATIONS = (
    ipp.OP_PRINT_JOB,
    ipp.OP_VALIDATE_JOB,
    ipp.OP_CANCEL_JOB,
    ipp.OP_GET_JOB_ATTRIBUTES,
    ipp.OP_GET_JOBS,
    ipp.OP_GET_PRINTER_ATTRIBUTES,
)
#: The IPP versions answered.
VERSIONS = ("1.0", "1.1", "2.0")
#: Highest number of copies accepted.
MAX_COPIES = 999

# job-state values (RFC 8011 section 5.3.7).
JOB_PENDING = 3
JOB_PENDING_HELD = 4
JOB_PROCESSING = 5
JOB_CANCELED = 7
JOB_ABORTED = 8
JOB_COMPLETED = 9

# printer-state values (RFC 8011 section 5.4.11).
PRINTER_IDLE = 3
PRINTER_PROCESSING = 4
PRINTER_STOPPED = 5

#: A spool state → (job-state, job-state-reasons keyword, default job-state-message).
JOB_STATES: dict[str, tuple[int, str, str]] = {
    PENDING: (JOB_PENDING_HELD, "job-hold-until-specified", "waiting for the print server"),
    HELD: (JOB_PENDING_HELD, "job-hold-until-specified", "held for release"),
    RELEASING: (JOB_PROCESSING, "job-printing", "printing"),
    PRINTED: (JOB_COMPLETED, "job-completed-successfully", "printed"),
    FAILED: (JOB_ABORTED, "aborted-by-system", "could not be printed"),
    DENIED: (JOB_CANCELED, "job-canceled-by-operator", "denied"),
    CANCELLED: (JOB_CANCELED, "job-canceled-by-user", "cancelled"),
    EXPIRED: (JOB_CANCELED, "job-canceled-by-operator", "expired"),
}

_PREFIXES = ("/ipp/print/", "/printers/")
# A queue's printer-uuid is derived from its name, so it stays the same across restarts.
_UUID_PREFIX = "sitesrv-provider:"


class IPPRequestError(Exception):
    """A request this printer refuses: the IPP status and a message for the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@attrs.frozen
class QueueState:
    """What Get-Printer-Attributes says about a queue's state."""

    accepting: bool
    reasons: tuple[str, ...] = ("none",)
    message: str = ""
    queued: int = 0


@attrs.frozen
class Submission:
    """A job received with Print-Job: its attributes and where its document is."""

    queue: Queue
    owner: str
    title: str
    document_format: str
    copies: int
    colour: bool
    duplex: bool
    content: BinaryIO
    offset: int
    size: int


class IPPBackend(Protocol):
    """What the IPP printer needs from the provider (`sitesrv.provider.service.Provider`)."""

    clock: IReactorTime
    started_at: float
    queues: Mapping[str, Queue]

    def queue_state(self, queue: Queue) -> QueueState:
        """Whether ``queue`` accepts jobs now, and why not."""

    def submit(self, submission: Submission) -> Deferred[SpooledJob]:
        """Spool a job and decide about it; `SpoolFull` if it does not fit."""

    def jobs(self, queue: Queue) -> list[SpooledJob]:
        """The jobs of ``queue`` still known (active and recently finished)."""

    def cancel(self, job: SpooledJob, by: str) -> Deferred[SpooledJob]:
        """Cancel an active job (not one being printed) at its owner's request."""


# -- bounded request bodies -------------------------------------------------------------


class IPPRequest(Request):
    """An HTTP request whose body is bounded by its `IPPSite`'s limits.

    Past the limit the rest of the body is discarded as it arrives (nothing more is
    stored), keeping only the first ``max_attributes`` bytes to answer from.
    """

    too_large = False
    received = 0

    def _limits(self) -> tuple[int, int]:
        site = self.channel.site  # type: ignore[attr-defined]
        return site.max_attributes, site.max_attributes + site.max_document

    def gotLength(self, length: int | None) -> None:
        """Refuse at once (by discarding) a body announced as too large."""
        _, limit = self._limits()
        if length is not None and length > limit:
            self.too_large = True
            self.content = io.BytesIO()
        else:
            super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        """Store the chunk, unless the body has grown past the limit."""
        head, limit = self._limits()
        self.received += len(data)
        content = self.content
        assert content is not None
        if not self.too_large and self.received > limit:
            self.too_large = True
            content.seek(0)
            kept = content.read(head)
            content.close()
            self.content = io.BytesIO(kept)
            self.content.seek(0, io.SEEK_END)
            return
        if self.too_large:
            room = head - content.tell()
            if room > 0:
                content.write(data[:room])
            return
        super().handleContentChunk(data)


class IPPSite(Site):
    """A web site for the IPP printer, with the body limits `IPPRequest` applies."""

    requestFactory = IPPRequest

    def __init__(
        self, resource: Resource, max_document: int, max_attributes: int, reactor: Any = None
    ) -> None:
        super().__init__(resource, reactor=reactor)
        self.max_document = max_document
        self.max_attributes = max_attributes
        self.displayTracebacks = False


# -- the resource -----------------------------------------------------------------------


def queue_name(path: str) -> str | None:
    """The queue named by a request path, or None if the path names no queue."""
    for prefix in _PREFIXES:
        if path.startswith(prefix):
            rest = path[len(prefix) :].strip("/")
            return rest or None
    return None


class IPPResource(Resource):
    """Every IPP request to the provider, whatever its path."""

    isLeaf = True

    def __init__(self, backend: IPPBackend, max_attributes: int) -> None:
        super().__init__()
        self.backend = backend
        self.max_attributes = max_attributes
        self._handlers: dict[int, Callable[[Request, Message, Queue, int], Any]] = {
            ipp.OP_PRINT_JOB: self._print_job,
            ipp.OP_VALIDATE_JOB: self._validate_job,
            ipp.OP_GET_PRINTER_ATTRIBUTES: self._get_printer_attributes,
            ipp.OP_GET_JOBS: self._get_jobs,
            ipp.OP_GET_JOB_ATTRIBUTES: self._get_job_attributes,
            ipp.OP_CANCEL_JOB: self._cancel_job,
        }

    def render_GET(self, request: Request) -> bytes:
        """A one-line page: this is an IPP printer, not a web page."""
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        name = queue_name(request.path.decode("utf-8", "replace"))
        queue = self.backend.queues.get(name or "")
        if queue is None:
            request.setResponseCode(404)
            return b"no such print queue\n"
        return f"sitesrv-provider IPP print queue {queue.name}\n".encode()

    def render_POST(self, request: Request) -> int:
        """Answer an IPP request (asynchronously)."""
        d = Deferred.fromCoroutine(self._answer(request))
        d.addErrback(lambda f: log.failure("answering an IPP request", f))
        return NOT_DONE_YET

    async def _answer(self, request: Request) -> None:
        content = request.content
        assert content is not None
        head = content.read(self.max_attributes + 1)
        try:
            message, offset = ipp.parse(head)
        except ipp.IPPParseError as e:
            if getattr(request, "too_large", False):
                request_id = _request_id(head)
                self._reply_raw(
                    request,
                    request_id,
                    ipp.STATUS_REQUEST_ENTITY_TOO_LARGE,
                    "the request is larger than this printer accepts",
                )
                return
            if len(head) > self.max_attributes and "truncated" in str(e):
                problem = f"the attributes are longer than {self.max_attributes} bytes"
            else:
                problem = f"malformed IPP request: {e}"
            log.info(
                "bad IPP request from {peer}: {problem}", peer=_peer(request), problem=problem
            )
            self._reply_raw(request, _request_id(head), ipp.STATUS_BAD_REQUEST, problem)
            return
        try:
            answer = await self._dispatch(request, message, offset)
        except IPPRequestError as e:
            answer = ipp.response(message, e.status, e.message)
        except Exception:
            log.failure("IPP {operation} failed", operation=ipp.OPERATION_NAMES.get(message.code))
            answer = ipp.response(message, ipp.STATUS_INTERNAL_ERROR, "internal error")
        self._reply(request, answer)

    def _reply_raw(self, request: Request, request_id: int, status: int, text: str) -> None:
        self._reply(request, ipp.response(Message((2, 0), 0, request_id), status, text))

    def _reply(self, request: Request, answer: Message) -> None:
        if request.finished or getattr(request, "_disconnected", False):
            return
        try:
            body = ipp.encode(answer)
        except ipp.IPPEncodeError:
            log.failure("cannot encode an IPP answer")
            body = ipp.encode(ipp.response(answer, ipp.STATUS_INTERNAL_ERROR, "internal error"))
        request.setHeader(b"content-type", b"application/ipp")
        request.setHeader(b"content-length", b"%d" % len(body))
        request.write(body)
        request.finish()

    async def _dispatch(self, request: Request, message: Message, offset: int) -> Message:
        if message.version[0] not in (1, 2):
            raise IPPRequestError(
                ipp.STATUS_VERSION_NOT_SUPPORTED,
                f"IPP version {message.version[0]}.{message.version[1]} is not supported",
            )
        if getattr(request, "too_large", False):
            raise IPPRequestError(
                ipp.STATUS_REQUEST_ENTITY_TOO_LARGE,
                "the document is larger than this printer accepts",
            )
        if message.request_id <= 0:
            raise IPPRequestError(ipp.STATUS_BAD_REQUEST, "request-id must be positive")
        _check_operation_group(message)
        if message.operation("printer-uri") is None and message.operation("job-uri") is None:
            # RFC 8011 section 4.1.5: every request names its target.
            raise IPPRequestError(ipp.STATUS_BAD_REQUEST, "printer-uri is required")
        handler = self._handlers.get(message.code)
        if handler is None:
            operation = ipp.OPERATION_NAMES.get(message.code, f"0x{message.code:04x}")
            raise IPPRequestError(
                ipp.STATUS_OPERATION_NOT_SUPPORTED, f"operation {operation} is not supported"
            )
        path = request.path.decode("utf-8", "replace")
        name = queue_name(path)
        queue = self.backend.queues.get(name) if name else None
        if queue is None and name is None and len(self.backend.queues) == 1:
            # /ipp/print alone names the only queue, as on a printer with one.
            queue = next(iter(self.backend.queues.values()))
        if queue is None:
            raise IPPRequestError(ipp.STATUS_NOT_FOUND, f"no print queue at {path}")
        result: Message = await handler(request, message, queue, offset)
        return result

    # -- operations ---------------------------------------------------------------------

    async def _print_job(
        self, request: Request, message: Message, queue: Queue, offset: int
    ) -> Message:
        details = self._job_details(message, queue)
        content = request.content
        assert content is not None
        content.seek(0, io.SEEK_END)
        size = content.tell() - offset
        try:
            job = await self.backend.submit(
                Submission(queue=queue, content=content, offset=offset, size=size, **details)
            )
        except SpoolFull as e:
            log.warn("job refused for queue {queue}: {why}", queue=queue.name, why=e)
            raise IPPRequestError(
                ipp.STATUS_NOT_ACCEPTING_JOBS, "the print spool is full; try again later"
            ) from None
        return ipp.response(
            message,
            ipp.STATUS_OK,
            groups=[Group(ipp.TAG_JOB, self._job_attributes(request, queue, job, _SUMMARY))],
        )

    async def _validate_job(
        self, request: Request, message: Message, queue: Queue, offset: int
    ) -> Message:
        self._job_details(message, queue)
        return ipp.response(message, ipp.STATUS_OK)

    def _job_details(self, message: Message, queue: Queue) -> dict[str, Any]:
        """Check a Print-Job or Validate-Job request; the job's details for `Submission`."""
        state = self.backend.queue_state(queue)
        if not state.accepting:
            raise IPPRequestError(ipp.STATUS_NOT_ACCEPTING_JOBS, state.message or "not accepting")
        owner = _string(message.operation("requesting-user-name")) or "anonymous"
        title = _string(message.operation("job-name")) or _string(
            message.operation("document-name")
        )
        document_format = (_string(message.operation("document-format")) or OCTET_STREAM).lower()
        if document_format.split(";")[0].strip() not in DOCUMENT_FORMATS:
            raise IPPRequestError(
                ipp.STATUS_DOCUMENT_FORMAT_NOT_SUPPORTED,
                f"document format {document_format} is not supported",
            )
        compression = _string(message.operation("compression"))
        if compression not in (None, "none"):
            raise IPPRequestError(
                ipp.STATUS_COMPRESSION_NOT_SUPPORTED, f"compression {compression} is not supported"
            )
        copies_attr = message.get(ipp.TAG_JOB, "copies")
        copies = 1
        if copies_attr is not None:
            if (
                not isinstance(copies_attr.value, int)
                or isinstance(copies_attr.value, bool)
                or not 1 <= copies_attr.value <= MAX_COPIES
            ):
                raise IPPRequestError(
                    ipp.STATUS_ATTRIBUTES_OR_VALUES_NOT_SUPPORTED,
                    f"copies must be an integer from 1 to {MAX_COPIES}",
                )
            copies = copies_attr.value
        sides = _string(message.get(ipp.TAG_JOB, "sides")) or "one-sided"
        colour_mode = _string(message.get(ipp.TAG_JOB, "print-color-mode")) or "monochrome"
        return {
            "owner": owner[:200],
            "title": (title or "untitled")[:500],
            "document_format": document_format,
            "copies": copies,
            "duplex": sides != "one-sided",
            "colour": colour_mode in ("color", "auto"),
        }

    async def _get_printer_attributes(
        self, request: Request, message: Message, queue: Queue, offset: int
    ) -> Message:
        requested = _requested(message)
        attributes = [
            a
            for a in self._printer_attributes(request, queue)
            if requested is None or a.name in requested
        ]
        return ipp.response(
            message, ipp.STATUS_OK, groups=[Group(ipp.TAG_PRINTER, tuple(attributes))]
        )

    async def _get_jobs(
        self, request: Request, message: Message, queue: Queue, offset: int
    ) -> Message:
        which = _string(message.operation("which-jobs")) or "not-completed"
        if which not in ("not-completed", "completed", "all"):
            raise IPPRequestError(
                ipp.STATUS_ATTRIBUTES_OR_VALUES_NOT_SUPPORTED, f"which-jobs {which} not supported"
            )
        jobs = self.backend.jobs(queue)
        if which == "not-completed":
            jobs = [j for j in jobs if j.active]
        elif which == "completed":
            jobs = [j for j in jobs if not j.active]
        my_jobs = message.operation("my-jobs")
        if my_jobs is not None and my_jobs.value is True:
            owner = _string(message.operation("requesting-user-name")) or ""
            jobs = [j for j in jobs if j.owner == owner]
        limit = message.operation("limit")
        if limit is not None and isinstance(limit.value, int) and limit.value > 0:
            jobs = jobs[: limit.value]
        requested = _requested(message) or frozenset({"job-id", "job-uri"})
        groups = [
            Group(ipp.TAG_JOB, self._job_attributes(request, queue, job, requested))
            for job in jobs
        ]
        return ipp.response(message, ipp.STATUS_OK, groups=groups)

    async def _get_job_attributes(
        self, request: Request, message: Message, queue: Queue, offset: int
    ) -> Message:
        job = self._target_job(message, queue)
        requested = _requested(message)
        return ipp.response(
            message,
            ipp.STATUS_OK,
            groups=[Group(ipp.TAG_JOB, self._job_attributes(request, queue, job, requested))],
        )

    async def _cancel_job(
        self, request: Request, message: Message, queue: Queue, offset: int
    ) -> Message:
        job = self._target_job(message, queue)
        user = _string(message.operation("requesting-user-name")) or ""
        if user != job.owner:
            raise IPPRequestError(ipp.STATUS_NOT_AUTHORIZED, "only the job's owner may cancel it")
        if not job.active:
            raise IPPRequestError(ipp.STATUS_NOT_POSSIBLE, f"the job is already {job.state}")
        if job.state == RELEASING:
            raise IPPRequestError(ipp.STATUS_NOT_POSSIBLE, "the job is being printed")
        await self.backend.cancel(job, user)
        return ipp.response(message, ipp.STATUS_OK)

    def _target_job(self, message: Message, queue: Queue) -> SpooledJob:
        job_id = message.operation("job-id")
        job_uri = message.operation("job-uri")
        ipp_id: int | None = None
        if job_id is not None and isinstance(job_id.value, int):
            ipp_id = job_id.value
        elif job_uri is not None and isinstance(job_uri.value, str):
            tail = job_uri.value.rstrip("/").rsplit("/", 1)[-1]
            ipp_id = int(tail) if tail.isdigit() else None
        if ipp_id is None:
            raise IPPRequestError(ipp.STATUS_BAD_REQUEST, "job-id or job-uri is required")
        for job in self.backend.jobs(queue):
            if job.ipp_id == ipp_id:
                return job
        raise IPPRequestError(ipp.STATUS_NOT_FOUND, f"no job {ipp_id} on {queue.name}")

    # -- attributes ---------------------------------------------------------------------

    def _printer_uris(self, request: Request, queue: Queue) -> tuple[str, str]:
        host = (request.getHeader(b"host") or b"localhost").decode("ascii", "replace")
        scheme = "ipps" if request.isSecure() else "ipp"
        return f"{scheme}://{host}/ipp/print/{queue.name}", scheme

    def _printer_attributes(self, request: Request, queue: Queue) -> list[Attribute]:
        uri, scheme = self._printer_uris(request, queue)
        state = self.backend.queue_state(queue)
        now = self.backend.clock.seconds()
        up = max(1, int(now - self.backend.started_at))
        a4 = Collection(
            (
                Attribute(
                    "media-size",
                    (
                        Value(
                            ipp.TAG_BEGIN_COLLECTION,
                            Collection(
                                (
                                    attribute("x-dimension", ipp.TAG_INTEGER, 21000),
                                    attribute("y-dimension", ipp.TAG_INTEGER, 29700),
                                )
                            ),
                        ),
                    ),
                ),
            )
        )
        return [
            attribute("printer-uri-supported", ipp.TAG_URI, uri),
            attribute(
                "uri-security-supported", ipp.TAG_KEYWORD, "tls" if scheme == "ipps" else "none"
            ),
            attribute("uri-authentication-supported", ipp.TAG_KEYWORD, "requesting-user-name"),
            attribute("printer-name", ipp.TAG_NAME, queue.name),
            attribute("printer-info", ipp.TAG_TEXT, queue.info or f"{queue.printer} (sitesrv)"),
            attribute("printer-location", ipp.TAG_TEXT, queue.location),
            attribute("printer-make-and-model", ipp.TAG_TEXT, "sitesrv-provider"),
            attribute("printer-more-info", ipp.TAG_URI, uri.replace(scheme + "://", "http://", 1)),
            attribute(
                "printer-uuid",
                ipp.TAG_URI,
                f"urn:uuid:{uuidlib.uuid5(uuidlib.NAMESPACE_URL, _UUID_PREFIX + queue.name)}",
            ),
            attribute(
                "printer-state",
                ipp.TAG_ENUM,
                PRINTER_PROCESSING
                if state.queued and state.accepting
                else (PRINTER_IDLE if state.accepting else PRINTER_STOPPED),
            ),
            attribute("printer-state-reasons", ipp.TAG_KEYWORD, *state.reasons),
            attribute("printer-state-message", ipp.TAG_TEXT, state.message),
            attribute("printer-is-accepting-jobs", ipp.TAG_BOOLEAN, state.accepting),
            attribute("queued-job-count", ipp.TAG_INTEGER, state.queued),
            attribute("printer-up-time", ipp.TAG_INTEGER, up),
            attribute("printer-current-time", ipp.TAG_DATETIME, _datetime(now)),
            attribute("ipp-versions-supported", ipp.TAG_KEYWORD, *VERSIONS),
            attribute("operations-supported", ipp.TAG_ENUM, *OPERATIONS),
            attribute("charset-configured", ipp.TAG_CHARSET, "utf-8"),
            attribute("charset-supported", ipp.TAG_CHARSET, "utf-8", "us-ascii"),
            attribute("natural-language-configured", ipp.TAG_LANGUAGE, "en"),
            attribute("generated-natural-language-supported", ipp.TAG_LANGUAGE, "en"),
            attribute("document-format-default", ipp.TAG_MIME_TYPE, OCTET_STREAM),
            attribute("document-format-supported", ipp.TAG_MIME_TYPE, *DOCUMENT_FORMATS),
            attribute("pdl-override-supported", ipp.TAG_KEYWORD, "not-attempted"),
            attribute("compression-supported", ipp.TAG_KEYWORD, "none"),
            attribute("multiple-document-jobs-supported", ipp.TAG_BOOLEAN, False),
            attribute(
                "job-creation-attributes-supported",
                ipp.TAG_KEYWORD,
                "copies",
                "sides",
                "print-color-mode",
            ),
            attribute("copies-default", ipp.TAG_INTEGER, 1),
            attribute("copies-supported", ipp.TAG_RANGE, ipp.Range(1, MAX_COPIES)),
            attribute("sides-default", ipp.TAG_KEYWORD, "one-sided"),
            attribute(
                "sides-supported",
                ipp.TAG_KEYWORD,
                "one-sided",
                "two-sided-long-edge",
                "two-sided-short-edge",
            ),
            attribute("print-color-mode-default", ipp.TAG_KEYWORD, "monochrome"),
            attribute(
                "print-color-mode-supported", ipp.TAG_KEYWORD, "monochrome", "color", "auto"
            ),
            attribute("color-supported", ipp.TAG_BOOLEAN, True),
            attribute("media-default", ipp.TAG_KEYWORD, "iso_a4_210x297mm"),
            attribute(
                "media-supported", ipp.TAG_KEYWORD, "iso_a4_210x297mm", "na_letter_8.5x11in"
            ),
            attribute("media-col-default", ipp.TAG_BEGIN_COLLECTION, a4),
            attribute("printer-firmware-string-version", ipp.TAG_TEXT, sitesrv.__version__),
        ]

    def _job_attributes(
        self,
        request: Request,
        queue: Queue,
        job: SpooledJob,
        requested: frozenset[str] | None,
    ) -> tuple[Attribute, ...]:
        printer_uri, _ = self._printer_uris(request, queue)
        state, reason, default_message = JOB_STATES.get(
            job.state, (JOB_PENDING, "none", job.state)
        )
        attributes = [
            attribute("job-id", ipp.TAG_INTEGER, job.ipp_id),
            attribute("job-uri", ipp.TAG_URI, f"{printer_uri}/{job.ipp_id}"),
            attribute("job-printer-uri", ipp.TAG_URI, printer_uri),
            attribute("job-uuid", ipp.TAG_URI, f"urn:uuid:{job.uuid}"),
            attribute("job-name", ipp.TAG_NAME, job.title),
            attribute("job-originating-user-name", ipp.TAG_NAME, job.owner),
            attribute("job-state", ipp.TAG_ENUM, state),
            attribute("job-state-reasons", ipp.TAG_KEYWORD, reason),
            attribute("job-state-message", ipp.TAG_TEXT, (job.reason or default_message)[:255]),
            attribute("job-k-octets", ipp.TAG_INTEGER, min((job.size + 1023) // 1024, 2**31 - 1)),
            attribute("job-impressions", ipp.TAG_INTEGER, job.pages * job.copies),
            attribute("copies", ipp.TAG_INTEGER, job.copies),
            attribute("document-format", ipp.TAG_MIME_TYPE, job.document_format),
            attribute(
                "time-at-creation",
                ipp.TAG_INTEGER,
                max(0, int(job.submitted_at - self.backend.started_at)),
            ),
            attribute("date-time-at-creation", ipp.TAG_DATETIME, _datetime(job.submitted_at)),
        ]
        if requested is not None:
            attributes = [a for a in attributes if a.name in requested]
        return tuple(attributes)


#: What Print-Job answers about the new job.
_SUMMARY = frozenset(
    {"job-id", "job-uri", "job-uuid", "job-state", "job-state-reasons", "job-state-message"}
)


def _check_operation_group(message: Message) -> None:
    """RFC 8011 section 4.1.4: the operation group starts with charset and language."""
    if not message.groups or message.groups[0].tag != ipp.TAG_OPERATION:
        raise IPPRequestError(ipp.STATUS_BAD_REQUEST, "the operation attributes must come first")
    attributes = message.groups[0].attributes
    if len(attributes) < 2 or (attributes[0].name, attributes[1].name) != (
        "attributes-charset",
        "attributes-natural-language",
    ):
        raise IPPRequestError(
            ipp.STATUS_BAD_REQUEST,
            "attributes-charset and attributes-natural-language must be the first attributes",
        )
    charset = _string(attributes[0])
    if charset is None or charset.lower() not in ("utf-8", "us-ascii"):
        raise IPPRequestError(
            ipp.STATUS_CHARSET_NOT_SUPPORTED, f"charset {charset} is not supported"
        )


def _string(attr: Attribute | None) -> str | None:
    """An attribute's first value as a string (text and name, with or without language)."""
    if attr is None:
        return None
    value = attr.value
    if isinstance(value, ipp.LangString):
        return value.text
    return value if isinstance(value, str) else None


def _requested(message: Message) -> frozenset[str] | None:
    """``requested-attributes`` (None for all: absent, "all" or a group name)."""
    attr = message.operation("requested-attributes")
    if attr is None:
        return None
    names = frozenset(v for v in attr.python if isinstance(v, str))
    if names & {"all", "printer-description", "job-template", "job-description"}:
        return None
    return names


def _request_id(data: bytes) -> int:
    """The request id of a request too broken to parse (0 if not even that is there)."""
    return int.from_bytes(data[4:8], "big", signed=True) if len(data) >= 8 else 0


def _datetime(seconds: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(int(seconds), datetime.UTC)


def _peer(request: Request) -> str:
    peer = request.getClientAddress()
    return str(getattr(peer, "host", peer))


def make_site(
    backend: IPPBackend, max_document: int, max_attributes: int, reactor: Any = None
) -> IPPSite:
    """The web site serving the IPP queues of ``backend`` (idle timeouts on ``reactor``)."""
    return IPPSite(IPPResource(backend, max_attributes), max_document, max_attributes, reactor)


__all__: Sequence[str] = (
    "IPPBackend",
    "IPPRequest",
    "IPPResource",
    "IPPSite",
    "QueueState",
    "Submission",
    "make_site",
)
