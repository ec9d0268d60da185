"""The reference print provider's core: jobs from the IPP printer, decisions from the server.

`Provider` is the root service of ``sitesrv-provider``. It keeps one connection to its
server (`ProviderLink`, AMP over TCP or TLS, with ``ClientService``'s capped backoff);
after the hello it announces its queues, resends the reports the server has not
acknowledged, re-announces the jobs it holds and asks about the jobs it spooled while it
could not reach the server (the order ``docs/protocols/providers.rst`` gives).

Each job the IPP printer receives is spooled, its pages counted (off the reactor
thread), and the server asked: print now, hold for release, or deny. Without an answer
(no link, ``NOT_SERVING``, or no answer within ``decision_timeout``) the configured
offline policy applies: ``hold`` (keep the job until the server answers), ``print-later``
(print now, report when connected) or ``print-untracked`` (print, never report).

Releases pushed by the server are stored before they are answered, then delivered
(`sitesrv.provider.deliver`, with retries) and reported ``printed`` (with the pages
counted) or ``failed``. Reports wait on disk until acknowledged.
"""

from __future__ import annotations

import json
import os
import time
import uuid as uuidlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import attrs
from twisted.application import strports
from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import clientFromString
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory, connectionDone
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

import sitesrv
from sitesrv.provider.config import ProviderConfig, Queue, read_key
from sitesrv.provider.deliver import Deliverer, Document, network_attempt
from sitesrv.provider.ippserver import QueueState, Submission, make_site
from sitesrv.provider.pages import PageCount, count_pages_off_thread
from sitesrv.provider.spool import (
    CANCELLED,
    DENIED,
    EXPIRED,
    FAILED,
    HELD,
    PENDING,
    PRINTED,
    RELEASING,
    Report,
    Spool,
    SpooledJob,
    write_json_atomically,
)
from sitesrv.providers.commands import (
    MAX_ANNOUNCE,
    MAX_DOCUMENT,
    MAX_NAME,
    MAX_PAGES,
    MAX_QUEUES,
    MAX_REASON,
    PROVIDER_PROTOCOL_VERSION,
    AnnounceHeld,
    AnnounceQueues,
    DeleteJobs,
    InvalidRequest,
    JobCancelled,
    JobFailed,
    JobPrinted,
    ProviderHello,
    Release,
    SubmitJob,
    UnknownJob,
)
from sitesrv.replication.liveness import LivenessAMP
from sitesrv.tls import client_context_factory, wrap_client_endpoint

log = Logger()

T = TypeVar("T")

#: How often spooled jobs are checked for expiry and undecided jobs are asked about.
HOUSEKEEPING_INTERVAL = 60.0

#: Where the server's last answer about the queues is kept (for printing while offline).
QUEUES_FILE = "queues.json"


@attrs.frozen
class ServerQueue:
    """What the server said about one of our queues' printers."""

    name: str
    hold: bool
    uri: str
    price_mono: int
    price_colour: int
    duplex_discount: int


def _clean(text: str, limit: int) -> str:
    """Text for the wire: no control characters, at most ``limit`` characters."""
    return "".join(" " if ord(c) < 32 or ord(c) == 127 else c for c in text)[:limit].strip()


def job_fields(job: SpooledJob) -> dict[str, Any]:
    """The protocol's ``JOB_FIELDS`` for a spooled job."""
    return {
        "job": job.uuid,
        "queue": job.printer,
        "user": _clean(job.owner, MAX_NAME) or "anonymous",
        "document": _clean(job.title, MAX_DOCUMENT),
        "pages": min(max(job.pages, 0), MAX_PAGES),
        "copies": max(job.copies, 1),
        "colour": job.colour,
        "duplex": job.duplex,
        "size": job.size,
        "submitted_at": job.submitted_at,
    }


def _chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class ProviderLink(LivenessAMP):
    """One connection from the provider to its server."""

    def __init__(self, provider: Provider) -> None:
        super().__init__(clock=provider.clock, monotonic=provider.monotonic)
        self.provider = provider
        #: The server's hello answer, once it accepted us.
        self.hello: dict[str, Any] | None = None
        #: Whether the queues are announced: decisions may be asked for.
        self.is_ready = False
        self.closed = False
        self._waiting: list[Deferred[None]] = []

    def connectionMade(self) -> None:
        """Say hello."""
        super().connectionMade()
        d = Deferred.fromCoroutine(self._hello())
        d.addErrback(lambda f: log.failure("provider hello", f))

    async def _hello(self) -> None:
        config = self.provider.config
        try:
            key = read_key(config.server.key_file)
        except (OSError, ValueError) as e:
            log.error("cannot read the provider key: {error}", error=e)
            self.transport.loseConnection()  # type: ignore[union-attr]
            return
        try:
            answer = await self.callRemote(
                ProviderHello,
                provider=config.name,
                key=key,
                software_version=f"sitesrv-provider {sitesrv.__version__}",
                protocol_version=PROVIDER_PROTOCOL_VERSION,
                provider_time=self.provider.clock.seconds(),
            )
        except (ConnectionDone, ConnectionLost) as e:
            log.warn("the link to the server closed during the hello: {why}", why=_reason(e))
            return
        except Exception as e:
            # UNKNOWN_PROVIDER, BAD_KEY, VERSION_REFUSED, NOT_SERVING, INVALID_REQUEST:
            # the server closes the link; ClientService tries again after its backoff.
            log.error(
                "the server refused provider {name!r}: {why}", name=config.name, why=_reason(e)
            )
            if self.transport is not None:
                self.transport.loseConnection()
            return
        self.hello = answer
        self.startHeartbeat(float(answer["heartbeat"]))
        log.info(
            "connected to server {server!r} (site {site!r}, {version})",
            server=answer["server"],
            site=answer["site"],
            version=answer["software_version"],
        )
        self.provider.link_up(self)

    def when_ready(self) -> Deferred[None]:
        """Fires once the queues are announced; fails if the link closes first."""
        if self.is_ready:
            return succeed(None)
        if self.closed:
            return fail(ConnectionError("the link to the server closed"))
        d: Deferred[None] = Deferred()
        self._waiting.append(d)
        return d

    def mark_ready(self) -> None:
        """The queues are announced."""
        self.is_ready = True
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(None)

    @Release.responder
    def release(self, job: str, release_id: str, printer: str, uri: str) -> Deferred[Any]:
        """The server releases a held job: store it, answer, then deliver."""
        return Deferred.fromCoroutine(self.provider.released(job, release_id, printer, uri))

    @DeleteJobs.responder
    def delete_jobs(self, jobs: list[str], reason: str) -> Deferred[Any]:
        """The server says these held jobs expired or were cancelled."""
        return Deferred.fromCoroutine(self.provider.delete_jobs(jobs, reason))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """Tell the provider."""
        super().connectionLost(reason)
        self.closed = True
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.errback(Failure(ConnectionError("the link to the server closed")))
        self.provider.link_down(self, self.dropReason or reason.getErrorMessage())


def _reason(error: BaseException) -> str:
    return str(error) or type(error).__name__


class Provider(MultiService):
    """The print provider: IPP queues, spool, deliveries and the link to its server."""

    def __init__(
        self,
        config: ProviderConfig,
        clock: IReactorTime,
        spool: Spool,
        deliverer: Deliverer,
        endpoint: IStreamClientEndpoint,
        *,
        count: Callable[[str, str], Deferred[PageCount]] | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.config = config
        self.clock = clock
        self.monotonic = monotonic
        self.spool = spool
        self.deliverer = deliverer
        self.count = count or (lambda path, fmt: count_pages_off_thread(path, fmt))
        self.queues: Mapping[str, Queue] = config.queues
        self.started_at = clock.seconds()
        self.link: ProviderLink | None = None
        self.server_queues: dict[str, ServerQueue] = {}
        self.unknown_queues: dict[str, str] = {}
        self._deliveries: dict[str, Deferred[None]] = {}
        self._deciding: set[str] = set()
        self._flushing = False
        self._flush_again = False
        self._syncing = False
        self._housekeeping = LoopingCall(self.housekeep)
        self._housekeeping.clock = clock
        self._pools: list[ThreadPool] = []
        self._load_queues()
        self.client = ClientService(
            endpoint,
            Factory.forProtocol(lambda: ProviderLink(self)),
            retryPolicy=backoffPolicy(initialDelay=0.5, maxDelay=config.server.max_backoff),
            clock=clock,
        )
        self.client.setServiceParent(self)

    # -- start and stop -----------------------------------------------------------------

    def add_pool(self, pool: ThreadPool) -> None:
        """A thread pool to start and stop with the service."""
        self._pools.append(pool)

    def startService(self) -> None:
        """Start thread pools, resume interrupted deliveries, connect and listen."""
        for pool in self._pools:
            pool.start()
        for job in self.spool.active_jobs():
            if job.state == RELEASING:
                log.info(
                    "resuming delivery of job {job} to {printer}", job=job.uuid, printer=job.target
                )
                self._start_delivery(job)
        super().startService()
        self._housekeeping.start(HOUSEKEEPING_INTERVAL, now=False)
        log.info(
            "sitesrv-provider {name!r} started: queues {queues}, IPP on {listen}, "
            "server {server}, offline policy {policy}",
            name=self.config.name,
            queues=", ".join(sorted(self.queues)),
            listen=self.config.ipp.listen,
            server=self.config.server.endpoint,
            policy=self.config.offline_policy,
        )

    async def _stop(self) -> None:
        if self._housekeeping.running:
            self._housekeeping.stop()
        await super().stopService()
        for pool in self._pools:
            pool.stop()

    def stopService(self) -> Deferred[None]:
        """Close the link and the listener, then stop the thread pools."""
        return Deferred.fromCoroutine(self._stop())

    # -- the link -----------------------------------------------------------------------

    def link_up(self, link: ProviderLink) -> None:
        """The server accepted our hello: synchronise."""
        self.link = link
        d = Deferred.fromCoroutine(self._sync(link))
        d.addErrback(lambda f: log.failure("synchronising with the server", f))

    def link_down(self, link: ProviderLink, why: str) -> None:
        """The link closed."""
        if self.link is link:
            self.link = None
            log.warn("lost the link to the server: {why}", why=why)

    def _usable(self, link: ProviderLink) -> bool:
        return self.link is link and link.transport is not None

    async def _sync(self, link: ProviderLink) -> None:
        """After a hello: queues, reports, held jobs, undecided jobs, in that order."""
        self._syncing = True
        try:
            await self._announce_queues(link)
            link.mark_ready()
            await self._flush()
            await self._announce_held(link)
            await self._submit_pending()
        except Exception as e:
            if self._usable(link):
                log.warn("synchronising with the server failed: {why}", why=_reason(e))
        finally:
            self._syncing = False

    async def _announce_queues(self, link: ProviderLink) -> None:
        printers = sorted({q.printer for q in self.queues.values()})
        known: dict[str, ServerQueue] = {}
        unknown: dict[str, str] = {}
        for batch in _chunks(printers, MAX_QUEUES):
            answer = await link.callRemote(AnnounceQueues, queues=list(batch))
            for item in answer["known"]:
                known[item["name"]] = ServerQueue(**item)
            for item in answer["unknown"]:
                unknown[item["name"]] = item["reason"]
        for name, reason in unknown.items():
            log.error(
                "queue printer {printer!r} is unknown to the server: {reason}",
                printer=name,
                reason=reason,
            )
        self.server_queues, self.unknown_queues = known, unknown
        await self.spool.run(
            write_json_atomically,
            os.path.join(self.spool.directory, QUEUES_FILE),
            {"known": [attrs.asdict(q) for q in known.values()], "unknown": unknown},
        )

    def _load_queues(self) -> None:
        path = os.path.join(self.spool.directory, QUEUES_FILE)
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            self.server_queues = {q["name"]: ServerQueue(**q) for q in data["known"]}
            self.unknown_queues = dict(data["unknown"])
        except FileNotFoundError:
            pass
        except (OSError, ValueError, TypeError, KeyError) as e:
            log.warn("ignoring {path}: {error}", path=path, error=e)

    async def _announce_held(self, link: ProviderLink) -> None:
        held = [
            j
            for j in self.spool.active_jobs()
            if j.state == HELD or (j.state == RELEASING and j.release_id and j.tracked)
        ]
        for batch in _chunks(held, MAX_ANNOUNCE):
            items = [
                {
                    **job_fields(j),
                    "expires_at": j.expires_at,
                    "release_id": j.release_id if j.state == RELEASING else "",
                }
                for j in batch
            ]
            answer = await link.callRemote(AnnounceHeld, jobs=items)
            for item in answer["jobs"]:
                await self._reconcile(item)
        if held:
            log.info("re-announced {count} held job(s) to the server", count=len(held))

    async def _reconcile(self, item: dict[str, Any]) -> None:
        job = self.spool.jobs.get(item["job"])
        if job is None or not job.active:
            return
        action = item["action"]
        if action == "hold":
            if job.state == RELEASING and job.uuid not in self._deliveries:
                # The server has no record of our release (restored from a backup):
                # drop it; the user releases the job again.
                log.warn(
                    "job {job}: release {release} unknown to the server; held again",
                    job=job.uuid,
                    release=job.release_id,
                )
                job = attrs.evolve(job, state=HELD, release_id="", target="", target_uri="")
            if job.state == HELD:
                await self.spool.update(attrs.evolve(job, expires_at=item["expires_at"]))
        elif action == "print":
            await self.released(job.uuid, item["release_id"], item["printer"], item["uri"])
        elif action == "delete":
            if job.state != RELEASING:
                await self._end(job, EXPIRED, item["reason"] or "deleted by the server")
        else:
            log.warn(
                "server answered unknown action {action!r} for job {job}",
                action=action,
                job=job.uuid,
            )

    # -- IPPBackend -----------------------------------------------------------------------

    def queue_state(self, queue: Queue) -> QueueState:
        """Whether ``queue`` accepts jobs (spool not full, printer known to the server)."""
        queued = sum(1 for j in self.spool.active_jobs() if j.queue == queue.name)
        if self.spool.full:
            return QueueState(False, ("spool-area-full",), "the print spool is full", queued)
        if queue.printer in self.unknown_queues:
            reason = self.unknown_queues[queue.printer]
            return QueueState(
                False, ("other-error",), f"not set up at the server: {reason}", queued
            )
        if self.link is None:
            return QueueState(
                True, ("other-warning",), "the print server cannot be reached", queued
            )
        return QueueState(True, ("none",), "", queued)

    def jobs(self, queue: Queue) -> list[SpooledJob]:
        """Jobs of ``queue`` still known, in IPP job id order."""
        return sorted(
            (j for j in self.spool.jobs.values() if j.queue == queue.name),
            key=lambda j: j.ipp_id,
        )

    def submit(self, submission: Submission) -> Deferred[SpooledJob]:
        """Spool a job from the IPP printer, count its pages and decide about it."""
        return Deferred.fromCoroutine(self._submit(submission))

    async def _submit(self, s: Submission) -> SpooledJob:
        now = self.clock.seconds()
        job = SpooledJob(
            uuid=str(uuidlib.uuid4()),
            ipp_id=self.spool.allocate_ipp_id(),
            queue=s.queue.name,
            printer=s.queue.printer,
            owner=s.owner,
            title=s.title,
            document_format=s.document_format,
            size=s.size,
            pages=-1,
            copies=s.copies,
            colour=s.colour,
            duplex=s.duplex,
            submitted_at=now,
            state=PENDING,
            updated_at=now,
        )
        job = await self.spool.add(job, s.content, s.offset, s.size)
        job = await self._counted(job)
        log.info(
            "job {job} (IPP {ipp_id}) from {owner!r} on {queue}: {pages} page(s) x {copies}, "
            "{size} bytes",
            job=job.uuid,
            ipp_id=job.ipp_id,
            owner=job.owner,
            queue=job.queue,
            pages=job.pages,
            copies=job.copies,
            size=job.size,
        )
        return await self._decide(job)

    async def _counted(self, job: SpooledJob) -> SpooledJob:
        """The job with its pages counted (a job spooled before a crash may not be)."""
        if job.pages >= 0:
            return job
        counted = await self.count(self.spool.document_path(job.uuid), job.document_format)
        return await self.spool.update(
            attrs.evolve(self.spool.jobs[job.uuid], pages=counted.pages)
        )

    def cancel(self, job: SpooledJob, by: str) -> Deferred[SpooledJob]:
        """Cancel a job at its owner's request (IPP Cancel-Job)."""
        return Deferred.fromCoroutine(self._cancel(job, by))

    async def _cancel(self, job: SpooledJob, by: str) -> SpooledJob:
        reason = f"cancelled by {by} at the provider"
        known_to_server = job.state == HELD
        ended = await self._end(job, CANCELLED, reason, report=known_to_server)
        return ended

    # -- decisions ------------------------------------------------------------------------

    async def _decide(self, job: SpooledJob) -> SpooledJob:
        """Ask the server about ``job``; apply its answer, or the offline policy."""
        if job.uuid in self._deciding:
            return job
        self._deciding.add(job.uuid)
        try:
            job = await self._counted(job)
            link = self.link
            if link is None:
                return await self._offline(job, "the server cannot be reached")
            timeout = self.config.server.decision_timeout
            try:
                if not link.is_ready:
                    await _with_timeout(link.when_ready(), timeout, self.clock)
                answer = await _with_timeout(
                    link.callRemote(SubmitJob, **job_fields(job)), timeout, self.clock
                )
            except InvalidRequest as e:
                log.error("the server refused job {job}: {why}", job=job.uuid, why=_reason(e))
                return await self._end(job, DENIED, f"refused by the server: {_reason(e)}")
            except Exception as e:
                return await self._offline(job, _reason(e))
            return await self._apply(job, answer)
        finally:
            self._deciding.discard(job.uuid)

    async def _apply(self, job: SpooledJob, answer: dict[str, Any]) -> SpooledJob:
        current = self.spool.jobs.get(job.uuid)
        if current is None or current.state != PENDING:
            # Decided meanwhile (a Release, a cancel): that stands.
            return current or job
        decision = answer["decision"]
        log.info(
            "job {job}: server decided {decision} ({reason}); cost {cost}",
            job=job.uuid,
            decision=decision,
            reason=answer["reason"],
            cost=answer["cost"],
        )
        if decision == "print":
            return await self._release(
                current, answer["release_id"], answer["printer"] or job.printer, answer["uri"]
            )
        if decision == "hold":
            return await self.spool.update(
                attrs.evolve(
                    current,
                    state=HELD,
                    reason=answer["reason"] or "held for release",
                    expires_at=answer["expires_at"],
                    updated_at=self.clock.seconds(),
                )
            )
        if decision == "deny":
            return await self._end(current, DENIED, answer["reason"] or "denied by the server")
        log.error("unknown decision {decision!r} for job {job}", decision=decision, job=job.uuid)
        return await self._offline(current, f"unknown decision {decision!r}")

    async def _offline(self, job: SpooledJob, why: str) -> SpooledJob:
        """No decision from the server: apply the configured offline policy."""
        policy = self.config.offline_policy
        log.warn(
            "no decision for job {job} ({why}): offline policy {policy}",
            job=job.uuid,
            why=why,
            policy=policy,
        )
        if policy == "hold":
            if job.state == PENDING and job.reason != "waiting for the print server":
                job = await self.spool.update(
                    attrs.evolve(job, reason="waiting for the print server")
                )
            return job
        uri = self.delivery_uri(job.printer)
        return await self._release(job, "", job.printer, uri, tracked=policy == "print-later")

    def delivery_uri(self, printer: str, offered: str = "") -> str:
        """Where to deliver to ``printer``: this provider's config, else the server's URI."""
        if printer in self.config.printers:
            return self.config.printers[printer]
        if offered:
            return offered
        known = self.server_queues.get(printer)
        return known.uri if known is not None else ""

    async def _submit_pending(self) -> None:
        for job in self.spool.active_jobs():
            if self.link is None:
                return
            if job.state == PENDING and job.uuid not in self._deciding:
                await self._decide(job)

    # -- releases and delivery ----------------------------------------------------------

    async def released(self, uuid: str, release_id: str, printer: str, uri: str) -> dict[str, Any]:
        """A Release from the server (or a ``print`` reconcile answer)."""
        job = self.spool.jobs.get(uuid)
        if job is None:
            raise UnknownJob(f"this provider has no job {uuid}")
        if job.release_id == release_id and (job.state == RELEASING or not job.active):
            return {}  # already acted on: the server pushed it again
        if not job.active:
            raise UnknownJob(f"job {uuid} is {job.state} here")
        if job.state == RELEASING:
            log.warn(
                "job {job} is already being printed for release {current}; release {new} ignored",
                job=uuid,
                current=job.release_id,
                new=release_id,
            )
            return {}
        await self._release(job, release_id, printer, uri)
        return {}

    async def _release(
        self, job: SpooledJob, release_id: str, printer: str, uri: str, tracked: bool = True
    ) -> SpooledJob:
        """Store that ``job`` is to be printed on ``printer``, then start delivering it."""
        job = await self.spool.update(
            attrs.evolve(
                job,
                state=RELEASING,
                release_id=release_id,
                target=printer,
                target_uri=self.delivery_uri(printer, uri),
                tracked=tracked,
                reason=f"printing on {printer}",
                updated_at=self.clock.seconds(),
            )
        )
        self._start_delivery(job)
        return job

    def _start_delivery(self, job: SpooledJob) -> None:
        if job.uuid in self._deliveries:
            return
        d = Deferred.fromCoroutine(self._deliver(job))
        self._deliveries[job.uuid] = d

        def done(result: object) -> None:
            self._deliveries.pop(job.uuid, None)

        d.addErrback(lambda f: log.failure("delivering job {job}", f, job=job.uuid))
        d.addBoth(done)

    async def _deliver(self, job: SpooledJob) -> None:
        job = await self._counted(job)
        if job.target_uri:
            outcome = await self.deliverer.deliver(
                job.target_uri,
                Document(
                    path=self.spool.document_path(job.uuid),
                    owner=job.owner,
                    title=job.title,
                    document_format=job.document_format,
                    copies=job.copies,
                    duplex=job.duplex,
                    colour=job.colour,
                ),
                job=job.uuid,
            )
            delivered, reason = outcome.delivered, outcome.reason
        else:
            delivered, reason = False, f"no delivery URI for printer {job.target!r}"
            log.error("job {job}: {reason}", job=job.uuid, reason=reason)
        current = self.spool.jobs.get(job.uuid, job)
        if delivered:
            await self._end(current, PRINTED, f"printed on {job.target}", report=job.tracked)
        else:
            # A job printed under "print-later" is unknown to the server: nothing to report.
            await self._end(
                current,
                FAILED,
                reason,
                report=job.tracked and bool(job.release_id),
            )

    async def _end(
        self, job: SpooledJob, state: str, reason: str, *, report: bool = False
    ) -> SpooledJob:
        """Finish ``job`` in ``state``: report it first if asked (so a crash between the
        two never loses the report), then delete its document."""
        now = self.clock.seconds()
        ended = attrs.evolve(job, state=state, reason=reason[:MAX_REASON], updated_at=now)
        if report:
            kind = {PRINTED: "printed", FAILED: "failed", CANCELLED: "cancelled"}[state]
            await self.spool.add_report(
                kind, ended, printer=job.target or job.printer, reason=reason, at=now
            )
        await self.spool.finish(ended)
        log.info("job {job} {state}: {reason}", job=job.uuid, state=state, reason=reason)
        if report:
            self.flush()
        return ended

    async def delete_jobs(self, uuids: list[str], reason: str) -> dict[str, Any]:
        """DeleteJobs from the server: held jobs that expired or were cancelled there."""
        for uuid in uuids:
            job = self.spool.jobs.get(uuid)
            if job is None or not job.active:
                continue
            if job.state == RELEASING:
                log.warn("job {job} is being printed; not deleting it", job=uuid)
                continue
            await self._end(job, EXPIRED, reason or "deleted by the server")
        return {}

    # -- reports ------------------------------------------------------------------------

    def flush(self) -> None:
        """Send the reports the server has not acknowledged (in the background)."""
        d = Deferred.fromCoroutine(self._flush())
        d.addErrback(lambda f: log.failure("sending reports", f))

    async def _flush(self) -> None:
        if self._flushing:
            self._flush_again = True
            return
        self._flushing = True
        try:
            while True:
                self._flush_again = False
                await self._send_reports()
                if not self._flush_again:
                    break
        finally:
            self._flushing = False

    async def _send_reports(self) -> None:
        for report in self.spool.pending_reports():
            link = self.link
            if link is None or not link.is_ready:
                return
            try:
                await self._send(link, report)
            except InvalidRequest as e:
                log.error(
                    "the server refused the {kind} report for job {job} for good: {why}",
                    kind=report.kind,
                    job=report.job.uuid,
                    why=_reason(e),
                )
            except Exception as e:
                log.warn(
                    "{kind} report for job {job} not acknowledged ({why}); will resend",
                    kind=report.kind,
                    job=report.job.uuid,
                    why=_reason(e),
                )
                return
            await self.spool.remove_report(report)

    async def _send(self, link: ProviderLink, report: Report) -> None:
        reason = _clean(report.reason, MAX_REASON)
        if report.kind == "printed":
            answer = await link.callRemote(
                JobPrinted,
                **job_fields(report.job),
                release_id=report.release_id,
                printer=report.printer or report.job.printer,
                printed_at=report.at,
            )
            log.info(
                "server recorded job {job} as printed: charged {charged}{again}",
                job=report.job.uuid,
                charged=answer["charged"],
                again="" if answer["recorded"] else " (already recorded)",
            )
        elif report.kind == "failed":
            await link.callRemote(
                JobFailed, job=report.job.uuid, release_id=report.release_id, reason=reason
            )
        else:
            await link.callRemote(
                JobCancelled, job=report.job.uuid, release_id=report.release_id, reason=reason
            )

    # -- housekeeping -------------------------------------------------------------------

    def housekeep(self) -> Deferred[None]:
        """Expire old jobs, forget old records, ask again about undecided jobs."""
        d = Deferred.fromCoroutine(self._housekeep())
        d.addErrback(lambda f: log.failure("spool housekeeping", f))
        return d

    async def _housekeep(self) -> None:
        stale, done = self.spool.expired(self.clock.seconds(), self.config.spool.max_age)
        for job in stale:
            if job.state == RELEASING:
                continue
            hours = self.config.spool.max_age / 3600
            reason = f"not printed within {hours:g} hours"
            if job.state == HELD:
                # The server holds it too: tell it the job is gone (stored first).
                await self.spool.add_report(
                    "cancelled", job, reason=reason, at=self.clock.seconds()
                )
            await self._end(job, EXPIRED, reason)
        for job in done:
            await self.spool.remove(job.uuid)
        if stale:
            self.flush()
        if self.link is not None and self.link.is_ready and not self._syncing:
            await self._submit_pending()
            await self._flush()


async def _with_timeout(d: Deferred[T], seconds: float, clock: IReactorTime) -> T:
    """``await d``, but at most ``seconds``; defer.TimeoutError after that."""
    return await d.addTimeout(seconds, clock)


# -- assembly ---------------------------------------------------------------------------


def server_endpoint(config: ProviderConfig, reactor: Any) -> IStreamClientEndpoint:
    """The client endpoint for the server: TLS layered over ``server.endpoint``."""
    link = config.server
    if link.insecure:
        log.warn(
            "link to the server {endpoint} is plain TCP (insecure = true): the provider key "
            "and jobs cross the network unencrypted",
            endpoint=link.endpoint,
        )
        return clientFromString(reactor, link.endpoint)
    assert link.hostname is not None
    context = client_context_factory(link.hostname, ca_path=link.ca, fingerprint=link.fingerprint)
    return wrap_client_endpoint(link.endpoint, reactor, context)


def make_provider(config: ProviderConfig, reactor: Any) -> Provider:
    """Load the spool and build the provider's service tree (TLSError, OSError on failure)."""
    io_pool = ThreadPool(1, 1, "sitesrv-provider-io")
    cpu_pool = ThreadPool(1, 2, "sitesrv-provider-cpu")

    def on_io(fn: Callable[..., T], *args: Any) -> Deferred[T]:
        return deferToThreadPool(reactor, io_pool, fn, *args)

    def on_cpu(fn: Callable[..., T], *args: Any) -> Deferred[T]:
        return deferToThreadPool(reactor, cpu_pool, fn, *args)

    spool = Spool(
        config.spool.directory,
        config.spool.quota,
        on_io,
        keep_finished=config.spool.keep_finished,
    )
    spool.load()
    deliverer = Deliverer(
        clock=reactor,
        attempt=network_attempt(reactor, timeout=config.delivery.timeout),
        retries=config.delivery.retries,
        backoff=config.delivery.backoff,
    )
    provider = Provider(
        config,
        reactor,
        spool,
        deliverer,
        server_endpoint(config, reactor),
        count=lambda path, fmt: count_pages_off_thread(path, fmt, on_cpu),
    )
    provider.add_pool(io_pool)
    provider.add_pool(cpu_pool)
    site = make_site(provider, config.ipp.max_document, config.ipp.max_attributes)
    strports.service(config.ipp.listen, site, reactor=reactor).setServiceParent(provider)
    return provider


__all__ = ["Provider", "ProviderLink", "ServerQueue", "job_fields", "make_provider"]
