"""The Find-Me queue: decisions on provider jobs, hold, release, charging when printed.

Print providers ask (through ``sitesrv.providers.server``) what to do with each job;
device connectors, the device API and the web release station list, release and cancel
held jobs through ``IFindMe``. Everything goes through the gate, so offline policies
apply at a site. Jobs are stored (``sitesrv.store.jobqueue``) with their state.

Money rules:

* A decision or release needs the job's cost at the printer's prices to fit in what the
  user may spend: the balance as this server sees it, less the estimated cost of the
  user's jobs already on their way to a printer (state ``releasing``), down to the credit
  limit (offline: the offline allowance). So a user with 1.00 cannot hold ten 1.00 jobs
  and release them all.
* A job is charged once, when a provider reports it printed, at the prices of the
  printer it printed on, through ``Gate.charge`` with a transaction UUID derived from the
  job UUID and the release id (``charge_uuid``): a report sent twice charges once.

Held jobs expire at a stored absolute time; a timer on the injected clock re-checks the
stored times, so a clock step neither stalls expiry nor fires it early.
"""

from __future__ import annotations

import math
import uuid as uuidlib
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import attrs
from sqlalchemy import Connection, bindparam, select
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from zope.interface import implementer

from sitesrv.core.auth import Identity
from sitesrv.core.gate import Gate, JobInfo, Refused, account_user
from sitesrv.costing import job_cost
from sitesrv.errors import InsufficientFunds, Invalid, NotFound, SitesrvError
from sitesrv.interfaces import IFindMe
from sitesrv.money import format_amount
from sitesrv.store import jobqueue, ledger, outbox
from sitesrv.store.jobqueue import (
    CANCELLED,
    DENIED,
    EXPIRED,
    FAILED,
    HELD,
    OPEN,
    PRINTED,
    RELEASING,
    ProviderJob,
)
from sitesrv.store.policies import thdDecimals, thdEffectivePolicies
from sitesrv.store.printers import Printer, thdPrinter, thdPrinterById
from sitesrv.store.schema import accounts
from sitesrv.store.users import User, thdUser, thdUserById

log = Logger()

#: Default time a held job waits for release.
HOLD_SECONDS = 8 * 3600.0
#: A released job stays open at least this long for its provider's report, even when
#: it was released just before it would have expired.
RELEASE_GRACE = 3600.0
#: The expiry timer re-checks at least this often (a clock step is noticed within it).
CHECK_INTERVAL = 60.0
#: Finished jobs are deleted from the queue table after this long (the job log and the
#: ledger keep what was printed and charged).
PURGE_AFTER = 7 * 86400.0
#: How often finished jobs are purged.
PURGE_INTERVAL = 3600.0
#: Most jobs named in one DeleteJobs push.
DELETE_BATCH = 500
#: Namespace of the charge transaction UUIDs (``charge_uuid``); never change it, or
#: a report resent across an upgrade would be charged again.
CHARGE_NAMESPACE = uuidlib.UUID("0b0f7c56-3c1e-5d4c-9a59-6b1f5b7c2d10")
#: Why expired jobs are deleted at their provider.
EXPIRED_REASON = "not released before it expired"
CANCELLED_REASON = "cancelled by its owner"


def charge_uuid(job_uuid: str, release_id: str) -> str:
    """The ledger transaction UUID of a job printed under ``release_id``: always the same."""
    return str(uuidlib.uuid5(CHARGE_NAMESPACE, f"{job_uuid}/{release_id}"))


class JobConflict(SitesrvError):
    """A job UUID the server already knows from another print provider."""


class CannotRecord(SitesrvError):
    """The server cannot decide or record this now (not serving, or charging refused
    offline); the provider keeps it and tries again later."""


# -- values ----------------------------------------------------------------------------


@attrs.frozen
class JobDetails:
    """What a provider says about a job when it asks about it."""

    uuid: str
    queue: str
    user: str
    document: str
    pages: int
    copies: int = 1
    colour: bool = False
    duplex: bool = False
    size: int = 0
    submitted_at: float = 0.0


@attrs.frozen
class Decision:
    """The answer to a provider's question about a job."""

    decision: str  # "print" | "hold" | "deny"
    reason: str
    cost: int
    release_id: str = ""
    printer: str = ""
    uri: str = ""
    expires_at: float = 0.0


@attrs.frozen
class AnnouncedJob:
    """A job a reconnecting provider still holds, with what it was last told."""

    details: JobDetails
    expires_at: float = 0.0
    release_id: str = ""


@attrs.frozen
class HeldAnswer:
    """What a provider is to do with a job it re-announced."""

    job: str
    action: str  # "hold" | "print" | "delete"
    reason: str
    release_id: str = ""
    printer: str = ""
    uri: str = ""
    expires_at: float = 0.0


@attrs.frozen
class PrintedReport:
    """A provider's report that a job was delivered to a printer."""

    details: JobDetails
    release_id: str
    printer: str
    printed_at: float


@attrs.frozen
class PrintedResult:
    """The answer to a printed report: the amount charged; False when a resend."""

    charged: int
    recorded: bool


@attrs.frozen
class HeldJob:
    """A held job as connectors, the device API and the web show it."""

    uuid: str
    document: str
    queue: str
    provider: str
    pages: int
    copies: int
    colour: bool
    duplex: bool
    cost: int
    created_at: float
    expires_at: float


@attrs.frozen
class ReleaseOutcome:
    """What happened to one job asked to be released."""

    job: str
    released: bool
    reason: str
    printer: str = ""
    cost: int = 0


@attrs.frozen
class _Push:
    """A Release to send to a provider once the transaction that decided it committed."""

    provider: str
    job: str
    release_id: str
    printer: str
    uri: str


# -- what the Find-Me queue needs from the provider front-end ---------------------------

#: ``ProviderLinks.pushRelease`` results.
PUSHED = "pushed"
NOT_SENT = "not-sent"
NO_SUCH_JOB = "no-such-job"


class ProviderLinks(Protocol):
    """The connected print providers, as the Find-Me queue sees them.

    Implemented by ``sitesrv.providers.server.ProviderService``.
    """

    def connected(self) -> frozenset[str]:
        """Names of the providers connected now."""

    def pushRelease(
        self, provider: str, job: str, release_id: str, printer: str, uri: str
    ) -> Deferred[str]:
        """Push a Release; fires with PUSHED, NOT_SENT (link down) or NO_SUCH_JOB."""

    def pushDelete(self, provider: str, jobs: Sequence[str], reason: str) -> Deferred[bool]:
        """Push DeleteJobs; fires True once the provider answered."""


class NoProviders:
    """``ProviderLinks`` with nobody connected (until the provider listener is wired)."""

    def connected(self) -> frozenset[str]:
        """Nobody."""
        return frozenset()

    def pushRelease(
        self, provider: str, job: str, release_id: str, printer: str, uri: str
    ) -> Deferred[str]:
        """Nothing to push to."""
        return Deferred.fromCoroutine(_constant(NOT_SENT))

    def pushDelete(self, provider: str, jobs: Sequence[str], reason: str) -> Deferred[bool]:
        """Nothing to push to."""
        return Deferred.fromCoroutine(_constant(False))


async def _constant(value: Any) -> Any:
    return value


def _logFailure(failure: Any, message: str, **fields: Any) -> None:
    log.failure(message, failure, **fields)


# -- credit: what a user may still spend ------------------------------------------------


@attrs.frozen
class Credit:
    """What a user may spend on print jobs now, by the rules ``Gate.charge`` applies."""

    account_id: int
    #: The account's balance as this server sees it (net of unapplied site charges).
    view: int
    #: The lowest the balance may go; None for an unrestricted account.
    floor: int | None
    #: "balance", or "offline allowance" while offline.
    what: str
    #: Estimated cost of the user's jobs on their way to a printer.
    releasing: int
    decimals: int
    #: Set when charging is refused altogether (offline policy).
    refused: str | None = None

    def shortfall(self, cost: int) -> str | None:
        """Why ``cost`` cannot be spent now, in words; None when it can."""
        if self.refused is not None:
            return self.refused
        if self.floor is None:
            return None
        left = self.view - self.releasing - self.floor
        if cost <= left:
            return None
        return (
            f"insufficient {self.what}: {format_amount(max(left, 0), self.decimals)} "
            f"available, job costs {format_amount(cost, self.decimals)}"
        )


#: Built once: every decision runs it (building a statement costs more than running it).
_LOCK_ACCOUNT = (
    select(accounts.c.id).where(accounts.c.id == bindparam("account_id")).with_for_update()
)


def thdCredit(conn: Connection, role: str, site: str, user: User, offline: bool) -> Credit:
    """What ``user`` may spend, locking their account row until the transaction ends.

    Mirrors the rules of ``gate.thdCharge`` (account choice and floor) without charging.
    """
    decimals = thdDecimals(conn)
    account = ledger.thdAccountById(conn, user.account_id)
    if account is None:
        return Credit(0, 0, 0, "balance", 0, decimals, f"no account for {user.username!r}")
    refused = None
    policies: dict[str, str] = {}
    if offline:
        # Only the offline rules depend on policies.
        policies = {k: v for k, (v, _src) in thdEffectivePolicies(conn, site).items()}
        choice = policies["offline.account"]
        if choice == "refuse":
            refused = "printing is not charged while the site is offline (policy: refuse)"
        elif choice == "offline-account":
            account = ledger.thdAccount(conn, ledger.OFFLINE_ACCOUNT)
    # Serialise decisions and releases for one account (PostgreSQL runs several
    # writers; SQLite's single writer already does, and ignores FOR UPDATE).
    conn.execute(_LOCK_ACCOUNT, {"account_id": account.id})
    pending = outbox.thdPendingAmount(conn, account.id) if role == "site" else 0
    floor: int | None = None
    what = "balance"
    if account.restricted:
        if offline:
            allowance = policies["offline.allowance"]
            floor = None if allowance == "unlimited" else -int(allowance)
            what = "offline allowance"
        else:
            floor = -account.credit_limit
    return Credit(
        account_id=account.id,
        view=account.balance + pending,
        floor=floor,
        what=what,
        releasing=jobqueue.thdReleasingTotal(conn, user.id),
        decimals=decimals,
        refused=refused,
    )


# -- decisions ---------------------------------------------------------------------------


def _duration(seconds: float) -> str:
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{int(seconds // 3600)} h"
    if seconds >= 60:
        return f"{math.ceil(seconds / 60)} min"
    return f"{math.ceil(seconds)} s"


def _thdQueue(conn: Connection, site: str, name: str) -> tuple[Printer | None, str]:
    """The printer a queue name refers to at ``site``, or None and why not."""
    try:
        printer = thdPrinter(conn, name)
    except NotFound:
        return None, f"unknown queue {name!r}: no printer of that name at site {site!r}"
    if printer.site != site:
        return None, f"queue {name!r} is a printer at site {printer.site!r}, not at {site!r}"
    return printer, ""


def _thdUser(conn: Connection, username: str) -> tuple[User | None, str]:
    try:
        user = thdUser(conn, username)
    except NotFound:
        return None, f"unknown user {username!r}"
    if user.disabled:
        return None, f"user {username!r} is disabled"
    return user, ""


def _thdTargetUri(conn: Connection, job: ProviderJob) -> str:
    printer = None if job.target_id is None else thdPrinterById(conn, job.target_id)
    return "" if printer is None else printer.uri


def _thdAnswer(conn: Connection, job: ProviderJob) -> Decision:
    """The decision for a job already recorded: the same as the first time."""
    if job.state == HELD:
        return Decision("hold", job.reason, job.cost, expires_at=job.expires_at)
    if job.state == RELEASING:
        return Decision(
            "print",
            job.reason,
            job.cost,
            release_id=job.release_id or "",
            printer=job.target or job.queue,
            uri=_thdTargetUri(conn, job),
        )
    if job.state == DENIED:
        return Decision("deny", job.reason, job.cost)
    return Decision("deny", f"job {job.uuid} was already {job.state}", job.cost)


def _job_values(provider: str, details: JobDetails) -> dict[str, Any]:
    return {
        "uuid": details.uuid,
        "provider": provider,
        "queue": details.queue,
        "username": details.user,
        "document": details.document[:500],
        "pages": details.pages,
        "copies": details.copies,
        "colour": details.colour,
        "duplex": details.duplex,
        "size": details.size,
    }


def thdDecide(
    conn: Connection,
    *,
    role: str,
    site: str,
    provider: str,
    details: JobDetails,
    offline: bool,
    now: float,
    hold_seconds: float,
) -> Decision:
    """Decide print / hold / deny for a job and record it; the same answer when asked again."""
    existing = jobqueue.thdJob(conn, details.uuid)
    if existing is not None:
        if existing.provider != provider:
            raise JobConflict(
                f"job {details.uuid} was submitted by provider {existing.provider!r}"
            )
        return _thdAnswer(conn, existing)
    values = _job_values(provider, details)

    def deny(reason: str, cost: int = 0, **more: Any) -> Decision:
        jobqueue.thdAddJob(
            conn, now, state=DENIED, reason=reason, cost=cost, expires_at=now, **values, **more
        )
        return Decision("deny", reason, cost)

    printer, why = _thdQueue(conn, site, details.queue)
    if printer is None:
        return deny(why)
    user, why = _thdUser(conn, details.user)
    if user is None:
        return deny(why, queue_id=printer.id)
    values.update(queue_id=printer.id, user_id=user.id)
    cost = job_cost(printer.prices, details.pages, details.copies, details.colour, details.duplex)
    credit = thdCredit(conn, role, site, user, offline)
    short = credit.shortfall(cost)
    if printer.hold:
        if short is not None and credit.refused is None:
            return deny(short, cost)
        # Offline with charging refused, a held job can still be released once online.
        reason = f"held for release at a printer of site {site!r} (expires in " + (
            f"{_duration(hold_seconds)})"
        )
        expires_at = now + hold_seconds
        jobqueue.thdAddJob(
            conn, now, state=HELD, reason=reason, cost=cost, expires_at=expires_at, **values
        )
        return Decision("hold", reason, cost, expires_at=expires_at)
    if short is not None:
        return deny(short, cost)
    release_id = str(uuidlib.uuid4())
    reason = f"printing on {printer.name}"
    jobqueue.thdAddJob(
        conn,
        now,
        state=RELEASING,
        reason=reason,
        cost=cost,
        release_id=release_id,
        target=printer.name,
        target_id=printer.id,
        expires_at=now + max(hold_seconds, RELEASE_GRACE),
        **values,
    )
    return Decision("print", reason, cost, release_id, printer.name, printer.uri)


def thdReconcile(
    conn: Connection,
    *,
    site: str,
    provider: str,
    jobs: Sequence[AnnouncedJob],
    now: float,
    hold_seconds: float,
) -> list[HeldAnswer]:
    """Reconcile the held jobs a reconnecting provider announces with the stored ones.

    A job the server knows keeps its state (a release that may not have arrived is
    answered ``print`` with its release id again); a job it has no record of is
    recorded as held again (none lost); a job announced twice is recorded once.
    """
    answers: list[HeldAnswer] = []
    for item in jobs:
        details = item.details
        job = jobqueue.thdJob(conn, details.uuid)
        if job is None:
            answers.append(_thdRecordAnnounced(conn, site, provider, item, now, hold_seconds))
            continue
        if job.provider != provider:
            answers.append(
                HeldAnswer(
                    job.uuid,
                    "delete",
                    f"this job UUID is recorded for provider {job.provider!r}",
                )
            )
            continue
        if job.state == HELD:
            answers.append(HeldAnswer(job.uuid, "hold", job.reason, expires_at=job.expires_at))
        elif job.state == RELEASING:
            answers.append(
                HeldAnswer(
                    job.uuid,
                    "print",
                    job.reason,
                    release_id=job.release_id or "",
                    printer=job.target or job.queue,
                    uri=_thdTargetUri(conn, job),
                    expires_at=job.expires_at,
                )
            )
        else:
            reason = job.reason if job.state in (EXPIRED, CANCELLED) else f"job {job.state}"
            answers.append(HeldAnswer(job.uuid, "delete", reason))
            if not job.provider_told:
                jobqueue.thdUpdateJob(conn, job.uuid, now, provider_told=True)
    return answers


def _thdRecordAnnounced(
    conn: Connection,
    site: str,
    provider: str,
    item: AnnouncedJob,
    now: float,
    hold_seconds: float,
) -> HeldAnswer:
    """Record again a held job the server has no record of (its database was replaced)."""
    details = item.details
    values = _job_values(provider, details)
    printer, why = _thdQueue(conn, site, details.queue)
    user, why_user = _thdUser(conn, details.user)
    expires_at = item.expires_at if item.expires_at > 0 else now + hold_seconds
    if printer is None or user is None:
        reason = why or why_user
        jobqueue.thdAddJob(
            conn,
            now,
            state=DENIED,
            reason=reason,
            cost=0,
            expires_at=now,
            queue_id=None if printer is None else printer.id,
            user_id=None if user is None else user.id,
            **values,
        )
        return HeldAnswer(details.uuid, "delete", reason)
    cost = job_cost(printer.prices, details.pages, details.copies, details.colour, details.duplex)
    values.update(queue_id=printer.id, user_id=user.id, cost=cost)
    if expires_at <= now:
        jobqueue.thdAddJob(
            conn, now, state=EXPIRED, reason=EXPIRED_REASON, expires_at=expires_at, **values
        )
        return HeldAnswer(details.uuid, "delete", EXPIRED_REASON)
    # A release the provider holds but the server has no record of cannot be trusted to
    # name a printer here: the job is held again and the user releases it again.
    reason = f"held for release at a printer of site {site!r} (recorded again on reconnect)"
    jobqueue.thdAddJob(conn, now, state=HELD, reason=reason, expires_at=expires_at, **values)
    log.info(
        "provider {provider!r} re-announced job {job} the server had no record of: held again",
        provider=provider,
        job=details.uuid,
    )
    return HeldAnswer(details.uuid, "hold", reason, expires_at=expires_at)


def thdRelease(
    conn: Connection,
    *,
    role: str,
    site: str,
    user: User,
    printer: str,
    uuids: Sequence[str] | None,
    offline: bool,
    connected: frozenset[str],
    now: float,
) -> tuple[list[ReleaseOutcome], list[_Push]]:
    """Mark the user's held jobs (all, or those named) as releasing to ``printer``.

    Each job's cost at ``printer``'s prices is checked against what the user may spend,
    counting the jobs already released and not yet printed; a job that does not fit,
    or whose provider is not connected, stays held.
    """
    target = thdPrinter(conn, printer)
    if target.site != site:
        raise Invalid(
            f"printer {target.name!r} is at site {target.site!r}; jobs held here print "
            f"only at site {site!r}"
        )
    outcomes: list[ReleaseOutcome] = []
    pushes: list[_Push] = []
    if uuids is not None:
        mine = {j.uuid: j for j in jobqueue.thdJobsOfUser(conn, user.id, jobqueue.STATES, uuids)}
        for name in dict.fromkeys(uuids):
            job = mine.get(name)
            if job is None:
                outcomes.append(ReleaseOutcome(name, False, "no such held job"))
            elif job.state != HELD:
                outcomes.append(ReleaseOutcome(name, False, f"job is {job.state}, not held"))
    held = jobqueue.thdJobsOfUser(conn, user.id, (HELD,), uuids)
    if not held:
        return outcomes, pushes
    credit = thdCredit(conn, role, site, user, offline)
    for job in held:
        cost = job_cost(target.prices, job.pages, job.copies, job.colour, job.duplex)
        if job.provider not in connected:
            why = f"print provider {job.provider!r} is not connected; the job stays held"
            outcomes.append(ReleaseOutcome(job.uuid, False, why, target.name, cost))
            continue
        short = credit.shortfall(cost)
        if short is not None:
            why = f"{short}; the job stays held"
            outcomes.append(ReleaseOutcome(job.uuid, False, why, target.name, cost))
            continue
        release_id = str(uuidlib.uuid4())
        reason = f"released to {target.name}"
        jobqueue.thdUpdateJob(
            conn,
            job.uuid,
            now,
            state=RELEASING,
            reason=reason,
            release_id=release_id,
            target=target.name,
            target_id=target.id,
            cost=cost,
            expires_at=max(job.expires_at, now + RELEASE_GRACE),
        )
        credit = attrs.evolve(credit, releasing=credit.releasing + cost)
        outcomes.append(ReleaseOutcome(job.uuid, True, reason, target.name, cost))
        pushes.append(_Push(job.provider, job.uuid, release_id, target.name, target.uri))
    return outcomes, pushes


def thdCancelHeld(
    conn: Connection, user_id: int, uuids: Sequence[str] | None, now: float
) -> list[ProviderJob]:
    """Cancel the user's held jobs (all, or those named); return them."""
    jobs = jobqueue.thdJobsOfUser(conn, user_id, (HELD,), uuids)
    return [
        jobqueue.thdUpdateJob(
            conn, job.uuid, now, state=CANCELLED, reason=CANCELLED_REASON, provider_told=False
        )
        for job in jobs
    ]


def thdExpire(conn: Connection, now: float) -> list[ProviderJob]:
    """Expire the open jobs whose stored expiry time has passed; return them."""
    return [
        jobqueue.thdUpdateJob(
            conn, job.uuid, now, state=EXPIRED, reason=EXPIRED_REASON, provider_told=False
        )
        for job in jobqueue.thdDueToExpire(conn, now)
    ]


def thdPrintedContext(
    conn: Connection, provider: str, report: PrintedReport
) -> tuple[ProviderJob | None, Printer | None, User | None]:
    """The job, the printer it printed on and its owner, for charging a printed report."""
    details = report.details
    job = jobqueue.thdJob(conn, details.uuid)
    if job is not None and job.provider != provider:
        raise JobConflict(f"job {details.uuid} was submitted by provider {job.provider!r}")
    printer: Printer | None
    try:
        printer = thdPrinter(conn, report.printer)
    except NotFound:
        printer = None
    if printer is None and job is not None:
        # Renamed or removed since: the printer the job was released to, or its queue.
        for printer_id in (job.target_id, job.queue_id):
            if printer_id is not None and printer is None:
                printer = thdPrinterById(conn, printer_id)
    user = None
    if job is not None and job.user_id is not None:
        user = thdUserById(conn, job.user_id)
    elif job is None:
        try:
            user = thdUser(conn, details.user)
        except NotFound:
            user = None
    return job, printer, user


def thdMarkPrinted(
    conn: Connection,
    *,
    provider: str,
    report: PrintedReport,
    printer: Printer,
    user: User | None,
    charged: int,
    now: float,
) -> ProviderJob:
    """Record a job as printed (recording it first if it was printed unasked)."""
    details = report.details
    values: dict[str, Any] = {
        "state": PRINTED,
        "reason": f"printed on {printer.name}",
        "release_id": report.release_id or None,
        "target": printer.name,
        "target_id": printer.id,
        "charged": charged,
        "provider_told": True,
    }
    existing = jobqueue.thdJob(conn, details.uuid)
    if existing is None:
        queue, _why = _thdQueue(conn, printer.site, details.queue)
        return jobqueue.thdAddJob(
            conn,
            now,
            **_job_values(provider, details),
            queue_id=None if queue is None else queue.id,
            user_id=None if user is None else user.id,
            cost=charged,
            expires_at=now,
            **values,
        )
    if existing.release_id:
        # The release the server issued stays on record, whatever the report said.
        del values["release_id"]
    return jobqueue.thdUpdateJob(conn, details.uuid, now, **values)


def thdEndJob(
    conn: Connection, provider: str, job_uuid: str, state: str, reason: str, now: float
) -> ProviderJob | None:
    """Record a provider's failed or cancelled report; a finished job stays as it is."""
    job = jobqueue.thdJob(conn, job_uuid)
    if job is None:
        return None
    if job.provider != provider:
        raise JobConflict(f"job {job_uuid} was submitted by provider {job.provider!r}")
    if job.state not in OPEN:
        return job
    return jobqueue.thdUpdateJob(
        conn, job_uuid, now, state=state, reason=reason[:500], provider_told=True
    )


def _suspense_identity(account: ledger.Account, username: str) -> Identity:
    """Who pays for a printed job whose owner cannot: the Suspense account."""
    return Identity(account_user(account, username), "provider")


def _held(job: ProviderJob) -> HeldJob:
    return HeldJob(
        uuid=job.uuid,
        document=job.document,
        queue=job.queue,
        provider=job.provider,
        pages=job.pages,
        copies=job.copies,
        colour=job.colour,
        duplex=job.duplex,
        cost=job.cost,
        created_at=job.created_at,
        expires_at=job.expires_at,
    )


# -- the queue -----------------------------------------------------------------------


@implementer(IFindMe)
class FindMe(Service):
    """The Find-Me queue of one server, and the decisions on its providers' jobs.

    ``read``/``write`` run ``thd`` functions (``Store.runRead``/``runWrite``); ``links``
    is the provider front-end, set when the provider listener is wired in.
    """

    def __init__(
        self,
        gate: Gate,
        read: Callable[..., Deferred[Any]],
        write: Callable[..., Deferred[Any]],
        clock: Any,
        hold_seconds: float = HOLD_SECONDS,
        purge_after: float = PURGE_AFTER,
    ) -> None:
        self.gate = gate
        self.read = read
        self.write = write
        self.clock = clock
        self.hold_seconds = hold_seconds
        self.purge_after = purge_after
        self.links: ProviderLinks = NoProviders()
        #: Told of each job event (held, denied, released, printed, failed, cancelled,
        #: expired): the server counts them in its metrics.
        self.on_event: Callable[[str], None] = lambda event: None
        self._timer: IDelayedCall | None = None
        self._checking = False
        self._last_purge = -math.inf

    # -- provider questions and reports ---------------------------------------------------

    def _serving(self) -> None:
        try:
            self.gate.check()
        except Refused as e:
            raise CannotRecord(str(e)) from None

    async def decide(self, provider: str, details: JobDetails) -> Decision:
        """Decide print / hold / deny for a job a provider asks about, and record it."""
        self._serving()
        decision: Decision = await self.write(
            thdDecide,
            role=self.gate.role,
            site=self.gate.site,
            provider=provider,
            details=details,
            offline=self.gate.offline(),
            now=self.clock.seconds(),
            hold_seconds=self.hold_seconds,
        )
        log.info(
            "job {job} from provider {provider!r} for {user!r} on {queue!r}: {decision} "
            "({reason})",
            job=details.uuid,
            provider=provider,
            user=details.user,
            queue=details.queue,
            decision=decision.decision,
            reason=decision.reason,
        )
        if decision.decision == "hold":
            self._schedule(decision.expires_at)
        self.on_event({"hold": "held", "deny": "denied"}.get(decision.decision, "direct"))
        return decision

    async def announceHeld(self, provider: str, jobs: Sequence[AnnouncedJob]) -> list[HeldAnswer]:
        """Reconcile the held jobs a reconnecting provider announces."""
        self._serving()
        answers: list[HeldAnswer] = await self.write(
            thdReconcile,
            site=self.gate.site,
            provider=provider,
            jobs=jobs,
            now=self.clock.seconds(),
            hold_seconds=self.hold_seconds,
        )
        for answer in answers:
            if answer.action == "hold":
                self._schedule(answer.expires_at)
        return answers

    async def printed(self, provider: str, report: PrintedReport) -> PrintedResult:
        """Log and charge a printed job once, at the prices of the printer it printed on."""
        self._serving()
        details = report.details
        job, printer, user = await self.read(thdPrintedContext, provider, report)
        if job is not None and job.state == PRINTED:
            return PrintedResult(job.charged or 0, False)
        if printer is None:
            raise NotFound(f"no printer named {report.printer!r}; the job cannot be priced")
        if job is not None:
            # What the server recorded wins over what a provider resends about it.
            details = attrs.evolve(details, user=job.username, document=job.document)
        cost = job_cost(
            printer.prices, details.pages, details.copies, details.colour, details.duplex
        )
        info = JobInfo(
            kind="print",
            printer_id=printer.id,
            printer_name=printer.name,
            pages=details.pages,
            copies=details.copies,
            colour=details.colour,
            duplex=details.duplex,
            document=details.document,
            status="printed",
            uuid=details.uuid,
        )
        # The stored release id when there is one: whatever a provider reports, one job
        # gives one transaction UUID, even for two reports racing each other.
        release_id = job.release_id if job is not None and job.release_id else report.release_id
        txn = charge_uuid(details.uuid, release_id)
        try:
            if user is None:
                raise InsufficientFunds(f"user {details.user!r} no longer exists")
            result = await self.gate.charge(Identity(user, "provider"), cost, "print", info, txn)
        except InsufficientFunds as e:
            # It printed: the charge must land somewhere. The Suspense account pays, and
            # the suspense report shows it.
            log.warn(
                "job {job} printed for {user!r} on {printer!r} but not payable ({why}): "
                "charged to the Suspense account",
                job=details.uuid,
                user=details.user,
                printer=printer.name,
                why=str(e),
            )
            suspense = await self.read(ledger.thdAccount, ledger.SUSPENSE_ACCOUNT)
            try:
                result = await self.gate.charge(
                    _suspense_identity(suspense, details.user), cost, "print", info, txn
                )
            except Refused as refused:
                raise CannotRecord(str(refused)) from None
        except Refused as e:
            raise CannotRecord(str(e)) from None
        await self.write(
            thdMarkPrinted,
            provider=provider,
            report=report,
            printer=printer,
            user=user,
            charged=cost,
            now=self.clock.seconds(),
        )
        log.info(
            "job {job} printed for {user!r} on {printer!r}: {pages} page(s) x {copies}, "
            "charged {cost}{again}",
            job=details.uuid,
            user=details.user,
            printer=printer.name,
            pages=details.pages,
            copies=details.copies,
            cost=cost,
            again="" if result.recorded else " (already recorded)",
        )
        if result.recorded:
            self.on_event("printed")
        return PrintedResult(cost, result.recorded)

    async def failed(self, provider: str, job: str, release_id: str, reason: str) -> None:
        """A provider could not deliver the job: it is not charged."""
        ended = await self.write(
            thdEndJob, provider, job, FAILED, reason or "delivery failed", self.clock.seconds()
        )
        self.on_event("failed")
        log.info(
            "job {job} failed at provider {provider!r} (release {release}): {reason}",
            job=job,
            provider=provider,
            release=release_id,
            reason=reason,
            known=ended is not None,
        )

    async def cancelledAtProvider(
        self, provider: str, job: str, release_id: str, reason: str
    ) -> None:
        """A provider cancelled the job: it is not charged."""
        await self.write(
            thdEndJob,
            provider,
            job,
            CANCELLED,
            reason or "cancelled at the print provider",
            self.clock.seconds(),
        )
        self.on_event("cancelled")
        log.info(
            "job {job} cancelled at provider {provider!r}: {reason}",
            job=job,
            provider=provider,
            reason=reason,
        )

    async def tellProvider(self, provider: str) -> int:
        """Tell a connected provider to delete its expired and cancelled jobs; how many."""
        told = 0
        while provider in self.links.connected():
            jobs = await self.read(jobqueue.thdUntold, provider, DELETE_BATCH)
            if not jobs:
                break
            by_reason: dict[str, list[str]] = defaultdict(list)
            for job in jobs:
                by_reason[EXPIRED_REASON if job.state == EXPIRED else job.reason].append(job.uuid)
            for reason, uuids in by_reason.items():
                if not await self.links.pushDelete(provider, uuids, reason):
                    return told
                await self.write(jobqueue.thdMarkTold, uuids, self.clock.seconds())
                told += len(uuids)
        return told

    def _tell(self, providers: set[str]) -> None:
        for provider in providers & self.links.connected():
            d = Deferred.fromCoroutine(self.tellProvider(provider))
            d.addErrback(_logFailure, "telling {provider!r} what to delete", provider=provider)

    # -- IFindMe ---------------------------------------------------------------------

    def held(self, identity: Identity) -> Deferred[list[HeldJob]]:
        """The user's held jobs at this server, oldest first."""
        return Deferred.fromCoroutine(self._heldJobs(identity))

    async def _heldJobs(self, identity: Identity) -> list[HeldJob]:
        self.gate.check()
        jobs = await self.read(jobqueue.thdJobsOfUser, identity.user.id, (HELD,))
        return [_held(j) for j in jobs]

    def release(
        self, identity: Identity, printer: str, job_uuids: Sequence[str] | None = None
    ) -> Deferred[list[ReleaseOutcome]]:
        """Release the user's held jobs (all, or those named) to ``printer``."""
        return Deferred.fromCoroutine(self._release(identity, printer, job_uuids))

    async def _release(
        self, identity: Identity, printer: str, job_uuids: Sequence[str] | None
    ) -> list[ReleaseOutcome]:
        await self.gate.may_release()
        outcomes, pushes = await self.write(
            thdRelease,
            role=self.gate.role,
            site=self.gate.site,
            user=identity.user,
            printer=printer,
            uuids=None if job_uuids is None else list(job_uuids),
            offline=self.gate.offline(),
            connected=self.links.connected(),
            now=self.clock.seconds(),
        )
        for push in pushes:
            self._push(push)
        for outcome in outcomes:
            if outcome.released:
                self.on_event("released")
            log.info(
                "release of job {job} by {user!r} to {printer!r}: {what} ({reason})",
                job=outcome.job,
                user=identity.user.username,
                printer=printer,
                what="released" if outcome.released else "not released",
                reason=outcome.reason,
            )
        return list(outcomes)

    def _push(self, push: _Push) -> None:
        """Send a Release; a lost one is sent again when the provider re-announces."""
        d = self.links.pushRelease(
            push.provider, push.job, push.release_id, push.printer, push.uri
        )

        def pushed(result: str) -> Deferred[Any] | None:
            if result == NO_SUCH_JOB:
                return Deferred.fromCoroutine(
                    self.failed(push.provider, push.job, push.release_id, "not in the spool")
                )
            if result == NOT_SENT:
                log.info(
                    "release of job {job} not delivered to provider {provider!r} (link "
                    "down): it is sent again when the provider reconnects",
                    job=push.job,
                    provider=push.provider,
                )
            return None

        d.addCallback(pushed)
        d.addErrback(lambda f: log.failure("pushing release of {job}", f, job=push.job))

    def cancel(self, identity: Identity, job_uuids: Sequence[str] | None = None) -> Deferred[int]:
        """Cancel the user's held jobs (all, or those named); fires with how many."""
        return Deferred.fromCoroutine(self._cancel(identity, job_uuids))

    async def _cancel(self, identity: Identity, job_uuids: Sequence[str] | None) -> int:
        self.gate.check()
        jobs = await self.write(
            thdCancelHeld,
            identity.user.id,
            None if job_uuids is None else list(job_uuids),
            self.clock.seconds(),
        )
        for job in jobs:
            self.on_event("cancelled")
            log.info("job {job} cancelled by {user!r}", job=job.uuid, user=job.username)
        self._tell({j.provider for j in jobs})
        return len(jobs)

    # -- expiry ------------------------------------------------------------------------

    def startService(self) -> None:
        """Check for expired jobs now, and from then on when each is due."""
        super().startService()
        self._fire()

    def stopService(self) -> None:
        """Stop the expiry timer."""
        super().stopService()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _schedule(self, at: float | None) -> None:
        """Check expiry at ``at`` (absolute), or sooner if a check is already due."""
        if not self.running:
            return
        now = self.clock.seconds()
        when = now + CHECK_INTERVAL if at is None else min(at, now + CHECK_INTERVAL)
        if self._timer is not None and self._timer.active():
            if self._timer.getTime() <= when:
                return
            self._timer.cancel()
        self._timer = self.clock.callLater(max(0.0, when - now), self._fire)

    def _fire(self) -> None:
        self._timer = None
        d = self.expire()
        d.addErrback(lambda f: log.failure("expiring held jobs", f))

        def again(next_at: Any) -> None:
            self._schedule(next_at if isinstance(next_at, float) else None)

        d.addBoth(again)

    def expire(self) -> Deferred[float | None]:
        """Expire the jobs whose stored expiry time has passed; fires with the next one."""
        return Deferred.fromCoroutine(self._expire())

    async def _expire(self) -> float | None:
        if self._checking:
            return None
        self._checking = True
        try:
            now = self.clock.seconds()
            expired: list[ProviderJob] = await self.write(thdExpire, now)
            for job in expired:
                self.on_event("expired")
                log.info(
                    "job {job} of {user!r} expired (due at {due}, was {state})",
                    job=job.uuid,
                    user=job.username,
                    due=job.expires_at,
                    state="held" if job.release_id is None else "releasing",
                )
            if expired:
                self._tell({j.provider for j in expired})
            if now - self._last_purge >= PURGE_INTERVAL:
                self._last_purge = now
                await self.write(jobqueue.thdPurgeFinished, now - self.purge_after)
            next_at: float | None = await self.read(jobqueue.thdNextExpiry)
            return next_at
        finally:
            self._checking = False
