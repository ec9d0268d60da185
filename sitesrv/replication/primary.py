"""The primary's side of replication: one ``SiteSession`` per connected site.

A session authenticates the site (``Hello``), tells it whether it must re-snapshot,
serves change batches (``GetChanges``) and snapshots (``BeginSnapshot`` then pushed
``SnapshotPage``s, a few in flight). ``PrimaryReplication`` polls the change-log head
(catching writes by ``sitesrv-admin`` in other processes), pokes sessions when it moves,
closes revoked sites' links, and trims the change log.
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredSemaphore, gatherResults
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Factory, connectionDone
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

import sitesrv
from sitesrv.replication import codec
from sitesrv.replication.commands import (
    BadToken,
    BeginSnapshot,
    CheckPassword,
    GetChanges,
    Hello,
    NotAuthenticated,
    Poke,
    ProtocolViolation,
    Revoke,
    SiteRevoked,
    SnapshotPage,
    SubmitOutbox,
    UnknownSite,
    VersionRefused,
)
from sitesrv.replication.liveness import LivenessAMP
from sitesrv.secrets import hash_token, token_matches
from sitesrv.store import Store
from sitesrv.store.changelog import (
    Change,
    thdChangeBatch,
    thdOldestPosition,
    thdState,
    thdTrimOld,
)
from sitesrv.store.outbox import thdApplyOutbox
from sitesrv.store.policies import thdEffectivePolicies
from sitesrv.store.sites import (
    thdLink,
    thdLinkDown,
    thdLinkPasswords,
    thdLinks,
    thdLinkSeen,
    thdLinkUp,
    thdRevokedSites,
    thdSiteAuth,
    thdSiteOfTokenHash,
)
from sitesrv.store.snapshot import Snapshot

log = Logger()

#: Protocol versions the primary accepts: its own and the previous one.
ACCEPTED_PROTOCOLS = (sitesrv.PROTOCOL_VERSION, sitesrv.PROTOCOL_VERSION - 1)
#: Uncompressed bytes of changes per batch (compressed batches are split to fit AMP).
BATCH_BYTES = {1: 50_000, 2: 400_000}
#: Change-log rows read per GetChanges.
BATCH_ROWS = 5_000
#: Snapshot pages in flight per site.
SNAPSHOT_WINDOW = 4
#: Snapshots served at once (each holds a database connection open).
MAX_SNAPSHOTS = 2
#: Seconds a connection may take to say hello (TLS handshake included).
HELLO_TIMEOUT = 30.0
#: How often the change-log head is polled, seconds.
POLL_INTERVAL = 0.05
#: How often a session writes the site's position to ``site_links``, seconds.
LINK_WRITE_INTERVAL = 1.0
#: Most outbox records applied in one transaction (batches that queue up while the
#: previous ones are applied go together).
OUTBOX_GROUP_RECORDS = 20_000


@attrs.define
class _Submission:
    """A site's outbox batch waiting to be applied, and who waits for the answer."""

    session: SiteSession
    records: list[Any]
    done: Deferred[int]


def thdPasswordsAllowed(conn: Any, site: str) -> bool:
    """Whether a site's replica may hold password verifiers (its password-login policy)."""
    return thdEffectivePolicies(conn, site)["offline.password_login"][0] == "allow"


def encode_change(change: Change) -> list[Any]:
    """The wire form of a change."""
    return [change.position, change.table, change.row_id, change.op, change.image, change.format]


def decode_change(item: Any) -> Change:
    """A change from its wire form; ProtocolViolation when malformed."""
    try:
        position, table, row_id, op, image, fmt = item
        if not (isinstance(position, int) and isinstance(row_id, int) and isinstance(fmt, int)):
            raise TypeError
        if not (isinstance(table, str) and isinstance(op, str)):
            raise TypeError
        if image is not None and not isinstance(image, dict):
            raise TypeError
    except (TypeError, ValueError):
        raise ProtocolViolation("malformed change in batch") from None
    return Change(position, table, row_id, op, image, None, fmt)


class SiteSession(LivenessAMP):
    """One site's replication connection, at the primary."""

    site: str | None = None
    protocol_version = sitesrv.PROTOCOL_VERSION
    passwords_included = False
    #: Outbox records the site holds that are not applied here, from its last heartbeat.
    outbox_pending: int | None = None

    def __init__(self, service: PrimaryReplication) -> None:
        super().__init__(clock=service.clock, monotonic=service.monotonic)
        self.service = service
        self.store = service.store
        self._last_link_write = 0.0
        self._snapshot: Snapshot | None = None
        self._helloTimer: IDelayedCall | None = None
        #: Why a batch of this session's failed to apply: its later batches are refused.
        self.outboxFailure: Failure | None = None

    # -- hello ----------------------------------------------------------------------

    @Hello.responder
    def hello(self, **kw: Any) -> Deferred[dict[str, Any]]:
        """Authenticate the site and tell it where to start."""
        return Deferred.fromCoroutine(self._hello(**kw))

    async def _hello(
        self,
        site: str,
        token: str,
        software_version: str,
        protocol_version: int,
        site_time: float,
        epoch: str,
        position: int,
        complete: bool,
    ) -> dict[str, Any]:
        peer = self._peer()
        if self.site is not None:
            raise ProtocolViolation("hello sent twice")
        if protocol_version not in ACCEPTED_PROTOCOLS:
            message = (
                f"site {site!r} speaks replication protocol {protocol_version} "
                f"(sitesrv {software_version}); this primary (sitesrv {sitesrv.__version__}) "
                f"accepts protocol {' and '.join(map(str, ACCEPTED_PROTOCOLS))}"
            )
            log.error("refused site from {peer}: {message}", peer=peer, message=message)
            raise VersionRefused(message)
        auth = await self.store.runRead(thdSiteAuth, site)
        if auth is None or auth.is_primary:
            log.error("refused unknown site {site!r} from {peer}", site=site, peer=peer)
            raise UnknownSite(f"no site named {site!r} is enrolled at this primary")
        if auth.revoked:
            log.error("refused revoked site {site!r} from {peer}", site=site, peer=peer)
            raise SiteRevoked(f"site {site!r} has been revoked by the primary")
        if not token_matches(token, auth.token_hash):
            owner = await self.store.runRead(thdSiteOfTokenHash, hash_token(token))
            detail = (
                f"the token belongs to site {owner!r}, not {site!r}"
                if owner
                else f"wrong enrolment token for site {site!r}"
            )
            log.error("refused site from {peer}: {detail}", peer=peer, detail=detail)
            raise BadToken(detail)

        now = self.clock.seconds()
        head_epoch, head = await self.store.runRead(thdState)
        oldest = await self.store.runRead(thdOldestPosition)
        passwords = await self.store.runRead(thdPasswordsAllowed, site)
        link = await self.store.runRead(thdLink, site)
        reason = ""
        if not complete:
            reason = "the site has no complete replica"
        elif epoch != head_epoch:
            reason = "the primary's change log has a new epoch (restored from a backup?)"
        elif position > head:
            reason = f"the site is at position {position}, ahead of the primary's head {head}"
        elif position < head and (oldest is None or oldest > position + 1):
            reason = f"the change log was trimmed past the site's position {position}"
        elif link is not None and link.passwords_included != passwords:
            reason = "the site's password-login policy changed"
        self.site = site
        self.protocol_version = protocol_version
        self.passwords_included = passwords
        skew = site_time - time.time()
        # What the site's replica holds changes only once a snapshot is in: until then
        # keep the old fact, so a re-snapshot that fails half-way is asked for again.
        holds = {} if reason else {"passwords_included": passwords}
        await self.store.runWrite(
            thdLinkUp,
            site,
            now,
            position=position,
            skew=skew,
            software_version=software_version,
            protocol_version=protocol_version,
            address=peer,
            **holds,
        )
        self.service.attach(self)
        self.startHeartbeat(self.service.heartbeat)
        log.info(
            "site {site!r} connected from {peer} (sitesrv {sv}, protocol {pv}, position {pos}, "
            "skew {skew:.1f} s){resnap}",
            site=site,
            peer=peer,
            sv=software_version,
            pv=protocol_version,
            pos=position,
            skew=skew,
            resnap=f"; re-snapshot: {reason}" if reason else "",
        )
        return {
            "primary": self.service.name,
            "software_version": sitesrv.__version__,
            "protocol_version": protocol_version,
            "primary_time": time.time(),
            "epoch": head_epoch,
            "head": head,
            "heartbeat": self.service.heartbeat,
            "resnapshot": reason,
        }

    def _peer(self) -> str:
        peer = getattr(self.transport, "getPeer", lambda: None)()
        host = getattr(peer, "host", None)
        return f"{host}:{getattr(peer, 'port', '')}" if host else "unknown"

    def _require_site(self) -> str:
        if self.site is None:
            raise NotAuthenticated("say hello first")
        return self.site

    # -- stream ---------------------------------------------------------------------

    @GetChanges.responder
    def getChanges(self, after: int) -> Deferred[dict[str, Any]]:
        """Serve the changes after ``after`` for this site, one batch."""
        return Deferred.fromCoroutine(self._getChanges(after))

    async def _getChanges(self, after: int) -> dict[str, Any]:
        site = self._require_site()
        if after < 0:
            raise ProtocolViolation("negative position")
        # Bookkeeping, not the data path: never make the stream wait for the write lock
        # (a busy writer held it for seconds and froze the site's stream).
        self.peerPosition(after)
        found = await self.store.runRead(thdChangeBatch, after, BATCH_ROWS, (None, site))
        changes, upto, limited, partial = found.changes, found.upto, found.limited, found.partial
        if not self.passwords_included:
            changes = [c for c in changes if c.table != "passwords"]
        if any(c.table == "policies" for c in changes):
            allowed = await self.store.runRead(thdPasswordsAllowed, site)
            if allowed != self.passwords_included:
                # The replica must gain or lose password verifiers: make it re-snapshot.
                log.info("site {site!r}: password-login policy changed; resyncing", site=site)
                self.clock.callLater(0, self._drop, "password-login policy changed")
        batch, upto, limited, partial = self._fit(changes, upto, limited, partial)
        head = self.service.head
        return {
            "batch": batch,
            "upto": upto,
            "limited": limited,
            "partial": partial,
            "head": max(head, upto),
        }

    async def _recordPosition(self, site: str, position: int) -> None:
        # At most once a second per site: this is bookkeeping, not the data path.
        now = self.clock.seconds()
        if now - self._last_link_write >= LINK_WRITE_INTERVAL:
            self._last_link_write = now
            await self.store.runWrite(thdLinkSeen, site, now, position)

    def peerOutbox(self, pending: int) -> None:
        """The site's outbox size, for the status page's table of sites."""
        self.outbox_pending = max(0, pending)

    def peerPosition(self, position: int) -> None:
        """The site has applied the change log up to ``position`` (from a heartbeat or a
        GetChanges): recorded in site_links at most once a second, in the background."""
        if self.site is not None and position >= 0:
            d = Deferred.fromCoroutine(self._recordPosition(self.site, position))
            d.addErrback(lambda f: log.failure("recording a site's position", f))

    def _fit(
        self, changes: list[Change], upto: int, limited: bool, partial: bool
    ) -> tuple[bytes, int, bool, bool]:
        """Encode as many changes as fit one AMP value; say where the batch stops."""
        budget = BATCH_BYTES.get(self.protocol_version, BATCH_BYTES[1])
        count = 0
        size = 0
        for change in changes:
            size += codec.estimate(encode_change(change))
            if count and size > budget:
                break
            count += 1
        while True:
            if count < len(changes):
                # Cut here: the rest follows in the next batch.
                upto, limited = changes[count - 1].position, True
                partial = changes[count].txn == changes[count - 1].txn
            values = codec.pack([encode_change(c) for c in changes[:count]], self.protocol_version)
            if len(values) == 1:
                return values[0], upto, limited, partial
            # Compressed worse than expected: send the first half now.
            count = max(1, count // 2)

    # -- passwords ------------------------------------------------------------------

    @CheckPassword.responder
    def checkPassword(self, username: str, password: str) -> Deferred[dict[str, Any]]:
        """Check a password for a site whose replica holds no verifiers."""
        return Deferred.fromCoroutine(self._checkPassword(username, password))

    async def _checkPassword(self, username: str, password: str) -> dict[str, Any]:
        site = self._require_site()
        check = self.service.check_password
        if check is None:
            return {"ok": False}
        return {"ok": bool(await check(username, password, f"site:{site}"))}

    # -- outbox ---------------------------------------------------------------------

    @SubmitOutbox.responder
    def submitOutbox(self, records: bytes) -> Deferred[dict[str, Any]]:
        """Apply a batch of the site's outbox records; answer with its applied_seq."""
        return Deferred.fromCoroutine(self._submitOutbox(records))

    async def _submitOutbox(self, records: bytes) -> dict[str, Any]:
        site = self._require_site()
        batch = codec.unpack(records, self.protocol_version)
        applied = await self.service.applyOutbox(self, site, batch)
        return {"applied_seq": applied}

    # -- snapshot -------------------------------------------------------------------

    @BeginSnapshot.responder
    def beginSnapshot(self) -> Deferred[dict[str, Any]]:
        """Open a consistent snapshot and start pushing its pages."""
        return Deferred.fromCoroutine(self._beginSnapshot())

    async def _beginSnapshot(self) -> dict[str, Any]:
        site = self._require_site()
        if self._snapshot is not None:
            raise ProtocolViolation("a snapshot is already in progress")
        await self.service.snapshots.acquire()
        exclude = frozenset() if self.passwords_included else frozenset({"passwords"})
        snapshot = Snapshot(self.store.reader, site, exclude_tables=exclude)
        self._snapshot = snapshot
        try:
            await self.service.inThread(snapshot.open)
        except BaseException:
            self._snapshot = None
            self.service.snapshots.release()
            raise
        snapshot_id = str(uuid.uuid4())
        log.info(
            "site {site!r}: snapshot at position {position} starting",
            site=site,
            position=snapshot.position,
        )
        self.clock.callLater(0, self._pushSnapshot, snapshot_id, snapshot)
        return {"snapshot": snapshot_id, "epoch": snapshot.epoch, "position": snapshot.position}

    def _pushSnapshot(self, snapshot_id: str, snapshot: Snapshot) -> None:
        d = Deferred.fromCoroutine(self._push(snapshot_id, snapshot))

        def done(result: Any) -> None:
            self._snapshot = None
            self.service.snapshots.release()
            self.service.inThread(snapshot.close).addErrback(lambda f: None)
            if isinstance(result, Failure):
                if result.check(ConnectionDone, ConnectionLost):
                    log.info("site {site!r}: link closed during its snapshot", site=self.site)
                    return
                log.failure("snapshot for {site!r} failed", result, site=self.site)
                self._drop("snapshot failed")

        d.addBoth(done)

    async def _push(self, snapshot_id: str, snapshot: Snapshot) -> None:
        window = DeferredSemaphore(SNAPSHOT_WINDOW)
        outstanding: list[Deferred[Any]] = []
        # The first page that failed (the link closed, or the site refused it): once a
        # page fails, reading and sending the rest of the snapshot is wasted work.
        failed: list[Failure] = []

        def settled(result: Any) -> None:
            window.release()
            if isinstance(result, Failure) and not failed:
                failed.append(result)

        seq = itertools.count()
        rows_sent = 0
        while not failed:
            chunk = await self.service.inThread(snapshot.next_rows)
            if chunk is None:
                break
            table, columns, rows = chunk
            rows_sent += len(rows)
            for value in codec.pack(rows, self.protocol_version):
                await window.acquire()
                if failed:
                    break
                d = self.callRemote(
                    SnapshotPage,
                    snapshot=snapshot_id,
                    seq=next(seq),
                    table=table,
                    columns=columns,
                    page=value,
                    last=False,
                )
                d.addBoth(settled)
                outstanding.append(d)
                outstanding = [o for o in outstanding if not o.called]
        await gatherResults(outstanding)
        if failed:
            failed[0].raiseException()
        await self.callRemote(
            SnapshotPage,
            snapshot=snapshot_id,
            seq=next(seq),
            table="",
            columns=[],
            page=codec.pack([], self.protocol_version)[0],
            last=True,
        )
        # The site answers the last page once the snapshot is swapped in.
        assert self.site is not None
        await self.store.runWrite(thdLinkPasswords, self.site, self.passwords_included)
        log.info(
            "site {site!r}: snapshot at position {position} sent ({rows} rows)",
            site=self.site,
            position=snapshot.position,
            rows=rows_sent,
        )

    # -- ending ---------------------------------------------------------------------

    def _drop(self, reason: str) -> None:
        self.dropReason = reason
        if self.transport is not None:
            self.transport.loseConnection()

    def revoke(self) -> None:
        """Tell the site it is revoked and close the link."""
        self.notify(Revoke, reason="site revoked by the primary")
        log.warn("site {site!r} revoked: closing its link", site=self.site)
        self._drop("revoked")

    def connectionMade(self) -> None:
        """Give the site a while to say hello (a stalled client must not hold a socket)."""
        super().connectionMade()
        self._helloTimer = self.clock.callLater(HELLO_TIMEOUT, self._helloTimedOut)

    def _helloTimedOut(self) -> None:
        self._helloTimer = None
        if self.site is None:
            log.warn("closing a replication connection from {peer}: no hello", peer=self._peer())
            self.dropReason = "no hello"
            if self.transport is not None:
                self.transport.abortConnection()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """Forget the session and record the link as down."""
        if self._helloTimer is not None and self._helloTimer.active():
            self._helloTimer.cancel()
        super().connectionLost(reason)
        if self.site is not None and self.service.detach(self):
            log.info(
                "site {site!r} disconnected: {why}",
                site=self.site,
                why=self.dropReason or reason.getErrorMessage(),
            )
            self.store.runWrite(thdLinkDown, self.site, self.clock.seconds()).addErrback(
                lambda f: log.failure("recording link down", f)
            )


class PrimaryReplication(Service):
    """Serves replication to sites: sessions, head polling, revocation, trimming."""

    def __init__(
        self,
        store: Store,
        name: str,
        clock: IReactorTime,
        heartbeat: float = 1.0,
        changelog_max_age: float = 30 * 86400,
        monotonic: Callable[[], float] = time.monotonic,
        reactor: Any = None,
    ) -> None:
        self.store = store
        self.name = name
        self.clock = clock
        self.heartbeat = heartbeat
        self.changelog_max_age = changelog_max_age
        self.monotonic = monotonic
        self.reactor: Any = reactor if reactor is not None else clock
        self.sessions: dict[str, SiteSession] = {}
        #: Checks a password for a site (set by the server: its authenticator).
        self.check_password: Callable[[str, str, str], Deferred[bool]] | None = None
        self.head = 0
        self.snapshots = DeferredSemaphore(MAX_SNAPSHOTS)
        self._threads = ThreadPool(1, MAX_SNAPSHOTS, "sitesrv-snapshot")
        self._poll = LoopingCall(self.poll)
        self._poll.clock = clock
        self._trim = LoopingCall(self.trim)
        self._trim.clock = clock
        self._polling = False
        #: Each site's outbox batches waiting to be applied, in arrival order.
        self._outbox: dict[str, deque[_Submission]] = {}

    def factory(self) -> Factory:
        """The protocol factory for the replication port."""
        return Factory.forProtocol(lambda: SiteSession(self))

    def inThread(self, fn: Callable[..., Any], *args: Any) -> Deferred[Any]:
        """Run blocking snapshot work on the snapshot threads."""
        return deferToThreadPool(self.reactor, self._threads, fn, *args)

    def startService(self) -> None:
        """Start polling the head and trimming the change log."""
        super().startService()
        self._threads.start()
        self._poll.start(POLL_INTERVAL, now=True)
        self._trim.start(60.0, now=False)

    def stopService(self) -> None:
        """Stop timers and close every site link."""
        super().stopService()
        for loop in (self._poll, self._trim):
            if loop.running:
                loop.stop()
        for session in list(self.sessions.values()):
            session._drop("primary shutting down")
        self._threads.stop()

    def attach(self, session: SiteSession) -> None:
        """A site said hello: it replaces any older session of the same site."""
        assert session.site is not None
        old = self.sessions.get(session.site)
        self.sessions[session.site] = session
        if old is not None and old is not session:
            old._drop("replaced by a new connection from the same site")

    def detach(self, session: SiteSession) -> bool:
        """Forget a closed session; False if a newer one already replaced it."""
        if session.site is not None and self.sessions.get(session.site) is session:
            del self.sessions[session.site]
            return True
        return False

    def applyOutbox(self, session: SiteSession, site: str, records: list[Any]) -> Deferred[int]:
        """Apply a batch of ``site``'s outbox after every batch that came before it (from
        any of its sessions); the site's ``applied_seq`` once committed.

        Batches that arrive while the site's previous ones are being applied are then
        applied together, in order, in one transaction (one commit, and one change of
        each balance for the stream). A batch that came after one of its session's that
        failed is refused with that failure: applying it would move ``applied_seq`` past
        the records that failed, and the site would never resend them.
        """
        done: Deferred[int] = Deferred()
        queue = self._outbox.get(site)
        if queue is None:
            queue = self._outbox[site] = deque()
            queue.append(_Submission(session, records, done))
            self._applyQueued(site, queue)
        else:
            queue.append(_Submission(session, records, done))
        return done

    def _applyQueued(self, site: str, queue: deque[_Submission]) -> None:
        group: list[_Submission] = []
        count = 0
        while queue and (not group or count + len(queue[0].records) <= OUTBOX_GROUP_RECORDS):
            submission = queue.popleft()
            if submission.session.outboxFailure is not None:
                submission.done.errback(submission.session.outboxFailure)
                continue
            group.append(submission)
            count += len(submission.records)
        if not group:
            del self._outbox[site]
            return
        records = [r for s in group for r in s.records] if len(group) > 1 else group[0].records
        d = self.store.runWrite(thdApplyOutbox, site, records, self.clock.seconds())

        def applied(seq: int) -> None:
            for s in group:
                s.done.callback(seq)
            # The batch changed the change log: tell every site now, not at the next poll.
            self.poll()

        def failed(failure: Failure) -> None:
            for s in group:
                s.session.outboxFailure = failure
            for s in group:
                s.done.errback(failure)

        d.addCallbacks(applied, failed)
        d.addErrback(lambda f: log.failure("answering outbox batches", f))
        d.addCallback(lambda _: self._applyQueued(site, queue))

    def poll(self) -> Deferred[None] | None:
        """Check the change-log head; poke sites and close revoked links when it moved."""
        if self._polling:
            return None
        self._polling = True
        d = Deferred.fromCoroutine(self._pollOnce())
        d.addErrback(lambda f: log.failure("polling the change log", f))

        def done(_: Any) -> None:
            self._polling = False

        d.addBoth(done)
        return d

    async def _pollOnce(self) -> None:
        _epoch, head = await self.store.runRead(thdState)
        if head == self.head:
            return
        self.head = head
        if self.sessions:
            revoked = await self.store.runRead(thdRevokedSites)
            for site in revoked & set(self.sessions):
                self.sessions[site].revoke()
        for session in list(self.sessions.values()):
            session.notify(Poke, head=head)

    def trim(self) -> Deferred[int]:
        """Trim the change log up to the slowest site, and anything past the maximum age."""
        return self.store.runWrite(thdTrimOld, self.clock.seconds() - self.changelog_max_age)

    def links(self) -> Deferred[dict[str, Any]]:
        """The recorded link state of every site (for /health and ``site list``)."""
        return self.store.runRead(thdLinks)
