"""The site's side of replication: keep the replica in step with the primary.

``SiteReplication`` keeps one connection to the primary with ``ClientService`` (capped
backoff, injected clock). On each connection ``PrimaryLink`` says hello, loads a
snapshot when the primary asks for one (into shadow tables, swapped in whole, while the
old replica keeps serving), then pulls change batches whenever the primary pokes it.
Every event is reported to an ``IReplicationObserver`` (the failover machine).
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from OpenSSL import SSL
from service_identity import VerificationError
from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, FirstError, gatherResults, succeed
from twisted.internet.endpoints import clientFromString
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import (
    IDelayedCall,
    IHandshakeListener,
    IReactorTime,
    ISSLTransport,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, connectionDone
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure
from zope.interface import implementer

import sitesrv
from sitesrv.config import PrimaryLink
from sitesrv.interfaces import IReplicationObserver
from sitesrv.replication import codec
from sitesrv.replication.commands import (
    BadToken,
    BeginSnapshot,
    CheckPassword,
    GetChanges,
    Hello,
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
from sitesrv.replication.primary import decode_change
from sitesrv.store import Store
from sitesrv.store.changelog import Change
from sitesrv.store.outbox import thdOwnAppliedSeq, thdPendingCount, thdPendingText
from sitesrv.store.replica import (
    ReplicaError,
    thdApplyChanges,
    thdClearShadow,
    thdLoadShadow,
    thdMarkIncomplete,
    thdReplicaState,
    thdSwapShadow,
)
from sitesrv.tls import TLSError, client_context_factory, wrap_client_endpoint

log = Logger()

#: Most changes held while waiting for the rest of one primary transaction.
MAX_HELD = 200_000
#: Outbox records read per submission round.
DRAIN_RECORDS = 5_000
#: Submission rounds sent and not yet answered, at most: the next round is read and
#: packed while the primary applies the previous one (which it then applies together).
DRAIN_WINDOW = 2
#: Seconds a new connection may take to complete its TLS handshake and hello.
HELLO_TIMEOUT = 10.0
#: Largest token file accepted.
MAX_TOKEN = 1024


def link_endpoint(link: PrimaryLink, reactor: Any) -> IStreamClientEndpoint:
    """The client endpoint for the primary: TLS layered over ``link.endpoint``."""
    if link.insecure:
        return clientFromString(reactor, link.endpoint)
    assert link.hostname is not None
    context = client_context_factory(link.hostname, ca_path=link.ca, fingerprint=link.fingerprint)
    return wrap_client_endpoint(link.endpoint, reactor, context)


def read_token(path: str) -> str:
    """The enrolment token from ``token_file``; OSError/ValueError with a clear message."""
    with open(path, encoding="utf-8") as f:
        token = f.read(MAX_TOKEN + 1).strip()
    if not token or len(token) > MAX_TOKEN:
        raise ValueError(f"token file {path} is empty or too long")
    return token


@implementer(IHandshakeListener)
class PrimaryLinkProtocol(LivenessAMP):
    """One connection from a site to its primary."""

    def __init__(self, replication: SiteReplication) -> None:
        super().__init__(clock=replication.clock, monotonic=replication.monotonic)
        self.replication = replication
        self.store = replication.store
        self.observer = replication.observer
        self.position = 0
        self.primaryHead = 0
        self.hello: dict[str, Any] | None = None
        self._pulling = False
        self._pullAgain = False
        self._snapshot: dict[str, Any] | None = None
        self._snapshotDone: Deferred[None] | None = None
        self._closedReason: str | None = None
        self._helloTimer: IDelayedCall | None = None
        self._draining = False
        self._drainAgain = False
        # The highest sequence number the primary acknowledged on this connection.
        self._acked = 0
        # Whether the outbox may be submitted: only once the replica (and so the
        # applied_seq the submission starts after) is this primary's. Before a snapshot
        # after a restore, the old replica's applied_seq is ahead of the primary's, and
        # a record submitted above it would make the primary skip the ones it lost.
        self._mayDrain = False
        # The outbox's unapplied records when last counted (sent with heartbeats).
        self._outboxPending: int | None = None
        self._countingOutbox = False

    # -- connecting -----------------------------------------------------------------

    def connectionMade(self) -> None:
        """Say hello once the link is ready (after the TLS handshake), then sync."""
        super().connectionMade()
        # A black-holed network can stall the handshake or the hello for ever: give up
        # and let ClientService try a new connection.
        self._helloTimer = self.clock.callLater(HELLO_TIMEOUT, self._helloTimedOut)
        if not ISSLTransport.providedBy(self.transport):
            self._start()

    def handshakeCompleted(self) -> None:
        """TLS is up: only now say hello, so its clock reading is not stale by the
        handshake's duration (the primary measures clock skew from it)."""
        self._start()

    def _start(self) -> None:
        d = Deferred.fromCoroutine(self._run())
        d.addErrback(self._runFailed)

    def _helloTimedOut(self) -> None:
        self._helloTimer = None
        if self.hello is None:
            reason = f"no answer to hello within {HELLO_TIMEOUT:g} s"
            log.warn("{reason}; trying a new connection", reason=reason)
            self._closedReason = reason
            if self.transport is not None:
                self.transport.abortConnection()  # type: ignore[attr-defined]

    def _runFailed(self, failure: Failure) -> None:
        if self._closedReason is not None:
            return
        reason = failure.getErrorMessage()
        if failure.check(SSL.Error, VerificationError, TLSError):
            # The handshake failed: the primary is not who it should be (or we are not
            # trusted). Say so in one line; the link retries with backoff.
            reason = f"TLS handshake with the primary failed: {reason}"
            log.error("{reason}; retrying", reason=reason)
            self.observer.refused(reason)
        elif failure.check(ConnectionDone, ConnectionLost):
            reason = f"connection closed: {reason}"
        elif failure.check(ProtocolViolation, ReplicaError, amp.RemoteAmpError):
            log.error("replication with the primary failed: {reason}", reason=reason)
        else:
            log.failure("replication with the primary failed", failure)
        self._close(reason)

    def _close(self, reason: str) -> None:
        self._closedReason = reason
        if self.transport is not None:
            self.transport.loseConnection()

    async def _run(self) -> None:
        link = self.replication.link
        try:
            token = read_token(link.token_file)
        except (OSError, ValueError) as e:
            message = f"cannot read the enrolment token: {e}"
            log.error(
                "{message}; will retry (put the token from `sitesrv-admin site add "
                "{site}` in {path})",
                message=message,
                site=self.replication.name,
                path=link.token_file,
            )
            self.observer.refused(message)
            self._close(message)
            return
        state = await self.store.runRead(thdReplicaState)
        self.position = state.position
        try:
            hello = await self.callRemote(
                Hello,
                site=self.replication.name,
                token=token,
                software_version=sitesrv.__version__,
                protocol_version=self.replication.protocol_version,
                site_time=time.time(),
                epoch=state.epoch,
                position=state.position,
                complete=state.complete,
            )
        except SiteRevoked as e:
            self._refused(str(e), revoked=True)
            return
        except (VersionRefused, UnknownSite, BadToken) as e:
            self._refused(str(e), revoked=False)
            return
        self.hello = hello
        if self._helloTimer is not None and self._helloTimer.active():
            self._helloTimer.cancel()
        self.primaryHead = hello["head"]
        skew = time.time() - hello["primary_time"]
        self.replication.skew = skew
        self.startHeartbeat(hello["heartbeat"])
        log.info(
            "connected to primary {primary!r} (sitesrv {sv}, protocol {pv}); "
            "replica at {pos}, primary head {head}, clock skew {skew:.1f} s",
            primary=hello["primary"],
            sv=hello["software_version"],
            pv=hello["protocol_version"],
            pos=state.position,
            head=hello["head"],
            skew=skew,
        )
        self.observer.connected(skew=skew)
        self.replication.current = self.replication.last = self
        if hello["resnapshot"]:
            log.info("loading a snapshot from the primary: {reason}", reason=hello["resnapshot"])
            self.observer.syncing(hello["resnapshot"])
            await self._loadSnapshot()
        # Reconcile first: what was recorded while offline goes to the primary, then the
        # stream brings back its effect (balances and applied_seq together).
        self._mayDrain = True
        await self.drain()
        await self._pull()

    def _refused(self, reason: str, revoked: bool) -> None:
        log.error("the primary refused this site: {reason}; retrying with backoff", reason=reason)
        self._closedReason = reason
        if revoked:
            # Persisted, so a revoked site that restarts does not serve from its replica.
            self.store.runWrite(thdMarkIncomplete).addErrback(
                lambda f: log.failure("marking the replica incomplete", f)
            )
            self.observer.revoked(reason)
        else:
            self.observer.refused(reason)

    # -- outbox ---------------------------------------------------------------------

    async def drain(self) -> None:
        """Submit the outbox in sequence order until nothing is pending.

        Records go as they are stored (JSON text, packed without decoding); up to
        ``DRAIN_WINDOW`` rounds are in flight. The primary applies a site's batches in
        the order they arrive and none after one that failed, so a failure anywhere
        closes the link and the next connection resumes after ``applied_seq``.
        """
        if not self._mayDrain:
            return  # the connection drains everything once its snapshot is in
        if self._draining:
            self._drainAgain = True
            return
        self._draining = True
        inflight: deque[tuple[Deferred[int], int]] = deque()
        sent = 0
        try:
            while True:
                self._drainAgain = False
                applied = await self.store.runRead(thdOwnAppliedSeq)
                after = max(self._acked, applied, sent)
                pending = await self.store.runRead(thdPendingText, after, DRAIN_RECORDS)
                if pending:
                    inflight.append((self._submitRound([p for _, p in pending]), len(pending)))
                    sent = pending[-1][0]
                    if len(inflight) < DRAIN_WINDOW:
                        continue
                elif not inflight:
                    if not self._drainAgain:
                        self.observer.outboxDrained()
                        return
                    continue
                answered, count = inflight.popleft()
                self._acked = max(self._acked, await answered)
                self.observer.outboxSubmitted(count, self._acked)
        finally:
            self._draining = False
            for answered, _ in inflight:
                answered.addErrback(lambda _: None)  # the link is closing: said once

    def _submitRound(self, texts: list[str]) -> Deferred[int]:
        """Send one round's records, in as many values as they take (all at once);
        the highest ``applied_seq`` answered."""
        d = gatherResults(
            [
                self.callRemote(SubmitOutbox, records=value)
                for value in codec.pack_json(texts, self.replication.protocol_version)
            ],
            consumeErrors=True,
        )

        def highest(answers: list[dict[str, Any]]) -> int:
            return max(a["applied_seq"] for a in answers)

        def first(failure: Failure) -> Failure:
            failure.trap(FirstError)
            error = failure.value
            assert isinstance(error, FirstError)
            return error.subFailure

        return d.addCallbacks(highest, first)

    # -- snapshot -------------------------------------------------------------------

    async def _loadSnapshot(self) -> None:
        await self.store.runWrite(thdClearShadow)
        self._snapshotDone = Deferred()
        begun = await self.callRemote(BeginSnapshot)
        self._snapshot = {**begun, "rows": 0, "seq": 0}
        await self._snapshotDone

    @SnapshotPage.responder
    def snapshotPage(
        self, snapshot: str, seq: int, table: str, columns: list[str], page: bytes, last: bool
    ) -> Deferred[dict[str, Any]]:
        """Load one page into the shadow tables; on the last, swap the snapshot in."""
        return Deferred.fromCoroutine(self._snapshotPage(snapshot, table, columns, page, last))

    async def _snapshotPage(
        self, snapshot: str, table: str, columns: list[str], page: bytes, last: bool
    ) -> dict[str, Any]:
        current = self._snapshot
        if current is None or current["snapshot"] != snapshot:
            raise ProtocolViolation("page of an unknown snapshot")
        rows = codec.unpack(page, self.replication.protocol_version)
        if rows:
            loaded = await self.store.runWrite(thdLoadShadow, table, columns, rows)
            current["rows"] += loaded
        if last:
            now = self.clock.seconds()
            await self.store.runWrite(thdSwapShadow, current["epoch"], current["position"], now)
            self.position = current["position"]
            log.info(
                "snapshot at position {position} loaded ({rows} rows)",
                position=self.position,
                rows=current["rows"],
            )
            self._snapshot = None
            done, self._snapshotDone = self._snapshotDone, None
            self.observer.snapshotLoaded()
            if done is not None:
                self.clock.callLater(0, done.callback, None)
        return {}

    # -- stream ---------------------------------------------------------------------

    @Poke.responder
    def poke(self, head: int) -> dict[str, Any]:
        """The primary's head moved: pull unless already pulling."""
        self.primaryHead = max(self.primaryHead, head)
        if self.hello is not None and self._snapshot is None and head > self.position:
            d = Deferred.fromCoroutine(self._pull())
            d.addErrback(self._runFailed)
        return {}

    async def _pull(self) -> None:
        if self._pulling:
            self._pullAgain = True
            return
        self._pulling = True
        # Changes of a transaction that continues in the next batch wait here, so that
        # the site applies each of the primary's transactions whole.
        held: list[Change] = []
        seen = self.position
        try:
            while True:
                self._pullAgain = False
                answer = await self.callRemote(GetChanges, after=seen)
                items = codec.unpack(answer["batch"], self.replication.protocol_version)
                held.extend(decode_change(item) for item in items)
                seen = answer["upto"]
                if answer.get("partial"):
                    if len(held) > MAX_HELD:
                        raise ProtocolViolation("a transaction too large to hold")
                    continue
                changes, held = held, []
                caught_up = not answer["limited"] and answer["upto"] >= answer["head"]
                self.position = await self.store.runWrite(
                    thdApplyChanges,
                    changes,
                    answer["upto"],
                    self.clock.seconds() if caught_up else None,
                )
                self.primaryHead = max(self.primaryHead, answer["head"])
                if changes:
                    self.observer.changesApplied(len(changes), self.position)
                if answer["limited"]:
                    continue
                if caught_up:
                    self.observer.caughtUp(self.position)
                if not self._pullAgain and self.position >= self.primaryHead:
                    return
        finally:
            self._pulling = False

    def heartbeatArguments(self) -> dict[str, Any]:
        """Tell the primary how far the replica has got (for ``site list`` and trimming)
        and the outbox's size at the last count (for its status page); count again for
        the next heartbeat, off the reactor thread."""
        self._countOutbox()
        arguments: dict[str, Any] = {"position": self.position}
        if self._outboxPending is not None:
            arguments["outbox_pending"] = self._outboxPending
        return arguments

    def _countOutbox(self) -> None:
        if self._countingOutbox:
            return
        self._countingOutbox = True

        def counted(pending: int) -> None:
            self._outboxPending = pending

        def done(_: object) -> None:
            self._countingOutbox = False

        d = self.store.runRead(thdPendingCount)
        d.addCallback(counted)
        d.addErrback(lambda f: log.failure("counting the outbox", f))
        d.addBoth(done)

    def peerSilent(self, reason: str) -> None:
        """The primary missed three heartbeats: go offline now, before the close."""
        self.observer.heartbeatMissed(reason)

    @Revoke.responder
    def revoke(self, reason: str) -> dict[str, Any]:
        """The primary revoked this site."""
        self._refused(reason, revoked=True)
        return {}

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """Tell the observer the link is gone and why."""
        if self._helloTimer is not None and self._helloTimer.active():
            self._helloTimer.cancel()
        if self.hello is None and self._closedReason is None:
            # Closed before the hello was answered: a TLS handshake failure arrives only
            # here (the hello waits for the handshake). Say why, as for any failure.
            self._runFailed(reason)
        super().connectionLost(reason)
        if self.replication.current is self:
            self.replication.current = None
        why = self.dropReason or self._closedReason or reason.getErrorMessage()
        if self.hello is not None:
            log.warn("link to the primary lost: {why}", why=why)
            self.observer.lost(why)


class SiteReplication(MultiService):
    """Keeps a site's replica in step with its primary over one reconnecting link."""

    protocol_version = sitesrv.PROTOCOL_VERSION

    def __init__(
        self,
        store: Store,
        name: str,
        link: PrimaryLink,
        observer: IReplicationObserver,
        clock: IReactorTime,
        endpoint: IStreamClientEndpoint,
        max_backoff: float = 2.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.store = store
        self.name = name
        self.link = link
        self.observer = observer
        self.clock = clock
        self.monotonic = monotonic
        self.skew: float | None = None
        #: The connection that has said hello, while there is one.
        self.current: PrimaryLinkProtocol | None = None
        #: The latest connection that said hello, kept after it closes (for the lag).
        self.last: PrimaryLinkProtocol | None = None
        self.client = ClientService(
            endpoint,
            Factory.forProtocol(lambda: PrimaryLinkProtocol(self)),
            retryPolicy=backoffPolicy(initialDelay=0.25, maxDelay=max_backoff),
            clock=clock,
        )
        self.client.setServiceParent(self)
        if link.insecure:
            log.warn(
                "replication link to {endpoint} is plain TCP (insecure = true): "
                "tokens and data cross the network unencrypted",
                endpoint=link.endpoint,
            )

    def checkPassword(self, username: str, password: str) -> Deferred[bool]:
        """Ask the primary whether this is the user's password (False when unreachable)."""
        link = self.current
        if link is None:
            return succeed(False)
        d = link.callRemote(CheckPassword, username=username, password=password)
        d.addCallbacks(lambda answer: bool(answer["ok"]), lambda failure: False)
        return d

    def outboxChanged(self) -> None:
        """A record was added to the outbox: submit it now if the primary is reachable."""
        link = self.current
        if link is not None:
            d = Deferred.fromCoroutine(link.drain())
            d.addErrback(link._runFailed)

    def lag(self) -> int | None:
        """Changes the replica is behind the primary's head, as last heard; None before any
        hello (while offline, the head may have moved on since)."""
        link = self.last
        return None if link is None else max(0, link.primaryHead - link.position)

    def position(self) -> int | None:
        """The replica's position as the link last saw it; None before any hello."""
        return None if self.last is None else self.last.position

    def whenConnected(self) -> Deferred[Any]:
        """The current connection, once there is one."""
        return self.client.whenConnected()

    def tokenFileExists(self) -> bool:
        """Whether the token file is in place (for /health problems)."""
        return os.path.exists(self.link.token_file)
