"""The server side of the print-provider protocol (port 9191, ``config.listen.providers``).

One ``ProviderSession`` per connected provider: it authenticates the provider
(``ProviderHello``), answers its questions and reports through the Find-Me queue
(``sitesrv.core.findme``), and carries the server's pushes (``Release``, ``DeleteJobs``).
``ProviderService`` keeps the sessions by provider name, implements the Find-Me queue's
``ProviderLinks``, and closes the link of a provider whose key was rotated or which was
removed. Every input is checked against the limits in ``commands.py``.
"""

from __future__ import annotations

import math
import time
import uuid as uuidlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from sqlalchemy import Connection
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Factory, connectionDone
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

import sitesrv
from sitesrv.core.findme import (
    NO_SUCH_JOB,
    NOT_SENT,
    PUSHED,
    AnnouncedJob,
    CannotRecord,
    FindMe,
    JobDetails,
    PrintedReport,
)
from sitesrv.core.gate import Gate, Refused
from sitesrv.errors import NotFound, SitesrvError
from sitesrv.providers.commands import (
    HELD_ACTIONS,
    MAX_ANNOUNCE,
    MAX_COPIES,
    MAX_DOCUMENT,
    MAX_KEY,
    MAX_NAME,
    MAX_PAGES,
    MAX_QUEUES,
    MAX_REASON,
    PROVIDER_PROTOCOL_VERSION,
    AnnounceHeld,
    AnnounceQueues,
    BadKey,
    DeleteJobs,
    InvalidRequest,
    JobCancelled,
    JobFailed,
    JobPrinted,
    NotAuthenticated,
    NotServing,
    ProviderHello,
    Release,
    SubmitJob,
    UnknownJob,
    UnknownProvider,
    VersionRefused,
)
from sitesrv.replication.liveness import LivenessAMP
from sitesrv.secrets import token_matches
from sitesrv.store.devices import Provider, thdListProviders, thdProvider
from sitesrv.store.policies import thdDecimals, thdSetting
from sitesrv.store.printers import thdPrinter

log = Logger()

T = TypeVar("T")

#: How often the service checks that connected providers still exist with the same key.
KEY_CHECK_INTERVAL = 5.0
#: Largest spool size a provider may report (1 TiB): a bigger number is a bug.
MAX_SIZE = 2**40
#: A connection that has not said hello within this many seconds is closed.
HELLO_TIMEOUT = 30.0
#: Most bytes received without a complete AMP box (AMP limits each value to 64 KiB but
#: not how many keys a box has); beyond it the link is dropped.
MAX_BOX_BYTES = 1024 * 1024


# -- input checks ----------------------------------------------------------------------


def _text(value: str, field: str, limit: int = MAX_NAME, empty: bool = False) -> str:
    if not value and not empty:
        raise InvalidRequest(f"{field} is empty")
    if len(value) > limit:
        raise InvalidRequest(f"{field} is longer than {limit} characters")
    if any(ord(c) < 32 for c in value):
        raise InvalidRequest(f"{field} contains control characters")
    return value


def _cut(value: str, limit: int) -> str:
    """Free text (document names, reasons): control characters become spaces, then cut."""
    return "".join(" " if ord(c) < 32 else c for c in value[: limit * 4])[:limit]


def _uuid(value: str, field: str = "job") -> str:
    try:
        parsed = uuidlib.UUID(value)
    except (ValueError, TypeError):
        raise InvalidRequest(f"{field} is not a UUID: {value[:40]!r}") from None
    if str(parsed) != value:
        raise InvalidRequest(f"{field} must be a UUID in lower-case 8-4-4-4-12 form")
    return value


def _release_id(value: str) -> str:
    return "" if value == "" else _uuid(value, "release_id")


def _int(value: int, field: str, low: int, high: int) -> int:
    if not low <= value <= high:
        raise InvalidRequest(f"{field} must be from {low} to {high}, not {value}")
    return value


def _time(value: float, field: str) -> float:
    if not math.isfinite(value) or value < 0:
        raise InvalidRequest(f"{field} must be a time in seconds since the epoch")
    return value


def job_details(
    job: str,
    queue: str,
    user: str,
    document: str,
    pages: int,
    copies: int,
    colour: bool,
    duplex: bool,
    size: int,
    submitted_at: float,
    **_rest: Any,
) -> JobDetails:
    """Check the job fields of a command and return them as ``JobDetails``."""
    return JobDetails(
        uuid=_uuid(job),
        queue=_text(queue, "queue"),
        user=_text(user, "user"),
        document=_cut(document, MAX_DOCUMENT),
        pages=_int(pages, "pages", 0, MAX_PAGES),
        copies=_int(copies, "copies", 1, MAX_COPIES),
        colour=bool(colour),
        duplex=bool(duplex),
        size=_int(size, "size", 0, MAX_SIZE),
        submitted_at=_time(submitted_at, "submitted_at"),
    )


# -- one provider's link -----------------------------------------------------------------


class ProviderSession(LivenessAMP):
    """One print provider's connection, at the server."""

    provider: str | None = None
    key_hash: str | None = None

    def __init__(self, service: ProviderService) -> None:
        super().__init__(clock=service.clock, monotonic=service.monotonic)
        self.service = service
        self.findme = service.findme
        self._boxes = 0
        self._sinceBox = 0
        self._helloTimer: IDelayedCall | None = None

    def connectionMade(self) -> None:
        """Give the provider ``HELLO_TIMEOUT`` seconds to say hello."""
        super().connectionMade()
        self._helloTimer = self.clock.callLater(HELLO_TIMEOUT, self._noHello)

    def _noHello(self) -> None:
        self._helloTimer = None
        if self.provider is None:
            log.warn("closing provider link from {peer}: no hello", peer=self._peer())
            self.drop(f"no hello within {HELLO_TIMEOUT:g} s")

    def dataReceived(self, data: bytes) -> None:
        """Parse as usual, but drop a peer that sends a box without end."""
        boxes = self._boxes
        super().dataReceived(data)
        self._sinceBox = self._sinceBox + len(data) if self._boxes == boxes else 0
        if self._sinceBox > MAX_BOX_BYTES and self.transport is not None:
            log.warn(
                "dropping provider link from {peer}: more than {limit} bytes without a "
                "complete message",
                peer=self._peer(),
                limit=MAX_BOX_BYTES,
            )
            self.dropReason = "message too large"
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def ampBoxReceived(self, box: Any) -> None:
        """Count complete boxes (for the size guard)."""
        self._boxes += 1
        super().ampBoxReceived(box)

    def _peer(self) -> str:
        peer = getattr(self.transport, "getPeer", lambda: None)()
        host = getattr(peer, "host", None)
        return f"{host}:{getattr(peer, 'port', '')}" if host else "unknown"

    def _require(self) -> str:
        if self.provider is None:
            raise NotAuthenticated("say ProviderHello first")
        return self.provider

    # -- hello ----------------------------------------------------------------------

    @ProviderHello.responder
    def hello(self, **kw: Any) -> Deferred[dict[str, Any]]:
        """Authenticate the provider by name and key."""
        return Deferred.fromCoroutine(self._hello(**kw))

    async def _hello(
        self,
        provider: str,
        key: str,
        software_version: str,
        protocol_version: int,
        provider_time: float,
    ) -> dict[str, Any]:
        peer = self._peer()
        if self.provider is not None:
            raise InvalidRequest("ProviderHello sent twice")
        _text(provider, "provider")
        _text(software_version, "software_version", empty=True)
        if protocol_version != PROVIDER_PROTOCOL_VERSION:
            message = (
                f"provider {provider!r} speaks provider protocol {protocol_version} "
                f"({software_version[:50]}); this server (sitesrv {sitesrv.__version__}) "
                f"speaks protocol {PROVIDER_PROTOCOL_VERSION}"
            )
            log.error("refused provider from {peer}: {message}", peer=peer, message=message)
            raise VersionRefused(message)
        try:
            self.service.gate.check()
        except Refused as e:
            log.warn(
                "provider {provider!r} from {peer} turned away: {why}",
                provider=provider,
                peer=peer,
                why=str(e),
            )
            raise NotServing(str(e)) from None
        site = self.service.gate.site
        record = await self.service.read(_thdProviderOrNone, provider)
        if record is None:
            log.error(
                "refused unknown provider {provider!r} from {peer}", provider=provider, peer=peer
            )
            raise UnknownProvider(
                f"no print provider named {provider!r} at this server (site {site!r}); "
                "add it with `sitesrv-admin provider add` at the primary"
            )
        if record.site != site:
            log.error(
                "refused provider {provider!r} of site {other!r} from {peer}",
                provider=provider,
                other=record.site,
                peer=peer,
            )
            raise UnknownProvider(
                f"print provider {provider!r} belongs to site {record.site!r}, not to "
                f"this server's site {site!r}"
            )
        # Compared even when too long (as a mismatch), so timing says nothing of the key.
        if len(key) > MAX_KEY or not token_matches(key, record.key_hash):
            log.error(
                "refused provider {provider!r} from {peer}: wrong key",
                provider=provider,
                peer=peer,
            )
            raise BadKey(
                f"wrong key for print provider {provider!r} (mistyped, or replaced with "
                "`sitesrv-admin provider rotate-key`)"
            )
        self.provider = provider
        self.key_hash = record.key_hash
        self.service.attach(self)
        self.startHeartbeat(self.service.heartbeat)
        currency = await self.service.read(thdSetting, "currency")
        decimals = await self.service.read(thdDecimals)
        log.info(
            "print provider {provider!r} connected from {peer} ({sv}, skew {skew:.1f} s)",
            provider=provider,
            peer=peer,
            sv=software_version,
            skew=provider_time - time.time(),
        )
        # After the answer is on its way: expired and cancelled jobs to delete.
        self.clock.callLater(0, self._tellDeletes)
        return {
            "server": self.service.server_name,
            "site": site,
            "software_version": sitesrv.__version__,
            "protocol_version": PROVIDER_PROTOCOL_VERSION,
            "heartbeat": self.service.heartbeat,
            "server_time": time.time(),
            "currency": currency,
            "decimals": decimals,
        }

    def _tellDeletes(self) -> None:
        if self.provider is None or self.service.sessions.get(self.provider) is not self:
            return
        d = Deferred.fromCoroutine(self.findme.tellProvider(self.provider))
        d.addErrback(lambda f: log.failure("telling {p!r} what to delete", f, p=self.provider))

    # -- queues -----------------------------------------------------------------------

    @AnnounceQueues.responder
    def announceQueues(self, queues: list[str]) -> Deferred[dict[str, Any]]:
        """Say which of the provider's queues are printers at this site."""
        return Deferred.fromCoroutine(self._announceQueues(queues))

    async def _announceQueues(self, queues: list[str]) -> dict[str, Any]:
        provider = self._require()
        if len(queues) > MAX_QUEUES:
            raise InvalidRequest(f"more than {MAX_QUEUES} queues")
        names = [_text(q, "queue") for q in dict.fromkeys(queues)]
        known, unknown = await self.service.read(thdQueues, self.service.gate.site, names)
        for name, reason in unknown:
            log.warn(
                "provider {provider!r}: queue {queue!r} unknown: {reason}",
                provider=provider,
                queue=name,
                reason=reason,
            )
        return {
            "known": known,
            "unknown": [{"name": n, "reason": r} for n, r in unknown],
        }

    # -- jobs -------------------------------------------------------------------------

    @SubmitJob.responder
    def submitJob(self, **kw: Any) -> Deferred[dict[str, Any]]:
        """Decide print / hold / deny for a job."""
        return Deferred.fromCoroutine(self._submitJob(**kw))

    async def _submitJob(self, **kw: Any) -> dict[str, Any]:
        provider = self._require()
        details = job_details(**kw)
        decision = await _mapped(self.findme.decide(provider, details))
        return {
            "decision": decision.decision,
            "reason": decision.reason,
            "cost": decision.cost,
            "release_id": decision.release_id,
            "printer": decision.printer,
            "uri": decision.uri,
            "expires_at": decision.expires_at,
        }

    @AnnounceHeld.responder
    def announceHeld(self, jobs: list[dict[str, Any]]) -> Deferred[dict[str, Any]]:
        """Reconcile the jobs a provider still holds."""
        return Deferred.fromCoroutine(self._announceHeld(jobs))

    async def _announceHeld(self, jobs: list[dict[str, Any]]) -> dict[str, Any]:
        provider = self._require()
        if len(jobs) > MAX_ANNOUNCE:
            raise InvalidRequest(f"more than {MAX_ANNOUNCE} jobs in one AnnounceHeld")
        items: dict[str, AnnouncedJob] = {}
        for item in jobs:
            details = job_details(**item)
            items[details.uuid] = AnnouncedJob(
                details,
                expires_at=_time(item["expires_at"], "expires_at"),
                release_id=_release_id(item["release_id"]),
            )
        answers = await _mapped(self.findme.announceHeld(provider, list(items.values())))
        assert all(a.action in HELD_ACTIONS for a in answers)
        log.info(
            "provider {provider!r} re-announced {count} held job(s): {summary}",
            provider=provider,
            count=len(answers),
            summary=", ".join(f"{a.job[:8]} {a.action}" for a in answers),
        )
        return {
            "jobs": [
                {
                    "job": a.job,
                    "action": a.action,
                    "reason": a.reason,
                    "release_id": a.release_id,
                    "printer": a.printer,
                    "uri": a.uri,
                    "expires_at": a.expires_at,
                }
                for a in answers
            ]
        }

    # -- reports ----------------------------------------------------------------------

    @JobPrinted.responder
    def jobPrinted(self, **kw: Any) -> Deferred[dict[str, Any]]:
        """Log and charge a printed job (once)."""
        return Deferred.fromCoroutine(self._jobPrinted(**kw))

    async def _jobPrinted(
        self, release_id: str, printer: str, printed_at: float, **kw: Any
    ) -> dict[str, Any]:
        provider = self._require()
        report = PrintedReport(
            details=job_details(**kw),
            release_id=_release_id(release_id),
            printer=_text(printer, "printer"),
            printed_at=_time(printed_at, "printed_at"),
        )
        result = await _mapped(self.findme.printed(provider, report))
        return {"charged": result.charged, "recorded": result.recorded}

    @JobFailed.responder
    def jobFailed(self, job: str, release_id: str, reason: str) -> Deferred[dict[str, Any]]:
        """Record that a job could not be delivered."""
        return Deferred.fromCoroutine(self._ended(job, release_id, reason, failed=True))

    @JobCancelled.responder
    def jobCancelled(self, job: str, release_id: str, reason: str) -> Deferred[dict[str, Any]]:
        """Record that a job was cancelled at the provider."""
        return Deferred.fromCoroutine(self._ended(job, release_id, reason, failed=False))

    async def _ended(self, job: str, release_id: str, reason: str, failed: bool) -> dict[str, Any]:
        provider = self._require()
        job = _uuid(job)
        release_id = _release_id(release_id)
        reason = _cut(reason, MAX_REASON)
        if failed:
            await _mapped(self.findme.failed(provider, job, release_id, reason))
        else:
            await _mapped(self.findme.cancelledAtProvider(provider, job, release_id, reason))
        return {}

    # -- pushes -----------------------------------------------------------------------

    def pushRelease(self, job: str, release_id: str, printer: str, uri: str) -> Deferred[str]:
        """Send a Release; fires PUSHED, NO_SUCH_JOB, or NOT_SENT when the link failed."""
        try:
            d = self.callRemote(Release, job=job, release_id=release_id, printer=printer, uri=uri)
        except Exception:
            return Deferred.fromCoroutine(_value(NOT_SENT))

        def failed(failure: Failure) -> str:
            if failure.check(UnknownJob):
                log.warn(
                    "provider {provider!r} no longer has job {job}: {why}",
                    provider=self.provider,
                    job=job,
                    why=failure.getErrorMessage(),
                )
                return NO_SUCH_JOB
            return NOT_SENT

        d.addCallbacks(lambda _: PUSHED, failed)
        return d

    def pushDelete(self, jobs: Sequence[str], reason: str) -> Deferred[bool]:
        """Send DeleteJobs; fires True once the provider answered."""
        try:
            d = self.callRemote(DeleteJobs, jobs=list(jobs), reason=reason)
        except Exception:
            return Deferred.fromCoroutine(_value(False))
        d.addCallbacks(lambda _: True, lambda _f: False)
        return d

    # -- ending -----------------------------------------------------------------------

    def drop(self, reason: str) -> None:
        """Close this provider's link."""
        self.dropReason = reason
        if self.transport is not None:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """Forget the session."""
        if self._helloTimer is not None and self._helloTimer.active():
            self._helloTimer.cancel()
        self._helloTimer = None
        super().connectionLost(reason)
        if self.provider is not None and self.service.detach(self):
            log.info(
                "print provider {provider!r} disconnected: {why}",
                provider=self.provider,
                why=self.dropReason or reason.getErrorMessage(),
            )


async def _value(value: Any) -> Any:
    return value


async def _mapped(work: Awaitable[T]) -> T:
    """Await ``work``, turning the Find-Me queue's errors into the protocol's."""
    try:
        return await work
    except (CannotRecord, Refused) as e:
        raise NotServing(str(e)) from None
    except SitesrvError as e:
        # JobConflict, NotFound (a printer that cannot be priced), Invalid.
        raise InvalidRequest(str(e)) from None


def _thdProviderOrNone(conn: Connection, name: str) -> Provider | None:
    try:
        return thdProvider(conn, name)
    except NotFound:
        return None


def thdQueues(
    conn: Connection, site: str, names: Sequence[str]
) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """Which queue names are printers at ``site`` (with their details), and why not."""
    known: list[dict[str, Any]] = []
    unknown: list[tuple[str, str]] = []
    for name in names:
        try:
            printer = thdPrinter(conn, name)
        except NotFound:
            unknown.append((name, f"no printer named {name!r} (add it at the primary)"))
            continue
        if printer.site != site:
            unknown.append(
                (name, f"printer {name!r} is at site {printer.site!r}, not at {site!r}")
            )
            continue
        known.append(
            {
                "name": printer.name,
                "hold": printer.hold,
                "uri": printer.uri,
                "price_mono": printer.price_mono,
                "price_colour": printer.price_colour,
                "duplex_discount": printer.duplex_discount,
            }
        )
    return known, unknown


# -- the service ---------------------------------------------------------------------------


class ProviderService(Service):
    """The connected print providers of one server; the Find-Me queue's ``ProviderLinks``."""

    def __init__(
        self,
        findme: FindMe,
        gate: Gate,
        read: Callable[..., Deferred[Any]],
        name: str,
        clock: Any,
        heartbeat: float = 5.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.findme = findme
        self.gate = gate
        self.read = read
        self.server_name = name
        self.clock = clock
        self.heartbeat = heartbeat
        self.monotonic = monotonic
        self.sessions: dict[str, ProviderSession] = {}
        self._keys = LoopingCall(self.checkKeys)
        self._keys.clock = clock

    def factory(self) -> Factory:
        """The protocol factory for the provider port."""
        return Factory.forProtocol(lambda: ProviderSession(self))

    def startService(self) -> None:
        """Start checking connected providers' keys."""
        super().startService()
        self._keys.start(KEY_CHECK_INTERVAL, now=False)

    def stopService(self) -> None:
        """Stop the key checks and close every provider link."""
        super().stopService()
        if self._keys.running:
            self._keys.stop()
        for session in list(self.sessions.values()):
            session.drop("server shutting down")

    def attach(self, session: ProviderSession) -> None:
        """A provider said hello: it replaces an older link of the same provider."""
        assert session.provider is not None
        old = self.sessions.get(session.provider)
        self.sessions[session.provider] = session
        if old is not None and old is not session:
            old.drop("replaced by a new connection from the same provider")

    def detach(self, session: ProviderSession) -> bool:
        """Forget a closed session; False if a newer one already replaced it."""
        if session.provider is not None and self.sessions.get(session.provider) is session:
            del self.sessions[session.provider]
            return True
        return False

    def checkKeys(self) -> Deferred[None] | None:
        """Close the links of providers removed, moved or given a new key since hello."""
        if not self.sessions:
            return None
        return Deferred.fromCoroutine(self._checkKeys())

    async def _checkKeys(self) -> None:
        records = {p.name: p for p in await self.read(thdListProviders, self.gate.site)}
        for name, session in list(self.sessions.items()):
            record = records.get(name)
            if record is None or record.key_hash != session.key_hash:
                why = "provider removed" if record is None else "provider key replaced"
                log.warn(
                    "closing print provider {provider!r}'s link: {why}", provider=name, why=why
                )
                session.drop(why)

    # -- ProviderLinks -----------------------------------------------------------------

    def connected(self) -> frozenset[str]:
        """Names of the providers connected now."""
        return frozenset(self.sessions)

    def pushRelease(
        self, provider: str, job: str, release_id: str, printer: str, uri: str
    ) -> Deferred[str]:
        """Push a Release to ``provider`` if it is connected."""
        session = self.sessions.get(provider)
        if session is None:
            return Deferred.fromCoroutine(_value(NOT_SENT))
        return session.pushRelease(job, release_id, printer, uri)

    def pushDelete(self, provider: str, jobs: Sequence[str], reason: str) -> Deferred[bool]:
        """Push DeleteJobs to ``provider`` if it is connected."""
        session = self.sessions.get(provider)
        if session is None:
            return Deferred.fromCoroutine(_value(False))
        return session.pushDelete(jobs, reason)
