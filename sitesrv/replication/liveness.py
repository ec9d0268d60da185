"""Heartbeats for AMP links: proof of life both ways, and dropping a silent peer.

Any bytes received count as proof of life, so a bulk transfer on a slow link never trips
the timeout; under TLS that means the encrypted bytes as they arrive, not only whole
records (see `LivenessAMP.makeConnection`). Timers run on the injected reactor clock;
elapsed silence is measured with a monotonic clock (also injected), so a wall-clock step
neither stalls nor fires it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure

from sitesrv.replication.commands import Heartbeat

log = Logger()

#: A peer silent for this many heartbeat intervals is dropped.
MISSED_BEATS = 3
#: How often per heartbeat interval silence is checked.
CHECKS_PER_BEAT = 4


class LivenessAMP(amp.AMP):
    """AMP with heartbeats. Subclasses call ``startHeartbeat`` once the peer is known."""

    #: Why the link was dropped by this side (for logs and the failover machine).
    dropReason: str | None = None

    def __init__(
        self,
        clock: IReactorTime,
        monotonic: Callable[[], float] = time.monotonic,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.clock = clock
        self.monotonic = monotonic
        self.lastReceived = monotonic()
        self.heartbeatInterval = 0.0
        self._beat: LoopingCall | None = None
        self._deadline: IDelayedCall | None = None

    def makeConnection(self, transport: Any) -> None:
        """Over TLS, also note proof of life as soon as encrypted bytes arrive.

        TLS hands the protocol above it whole records only (up to 16 KiB): on a slow
        link one record can take longer than the timeout to arrive, though bytes arrive
        all along, and a peer sending a large batch would be dropped again and again.
        """
        if isinstance(transport, TLSMemoryBIOProtocol):
            decrypt = transport.dataReceived

            def dataReceived(data: bytes) -> None:
                self.lastReceived = self.monotonic()
                decrypt(data)

            transport.dataReceived = dataReceived  # type: ignore[method-assign]
        super().makeConnection(transport)

    def dataReceived(self, data: bytes) -> None:
        """Note proof of life, then parse as usual."""
        self.lastReceived = self.monotonic()
        super().dataReceived(data)

    def startHeartbeat(self, interval: float) -> None:
        """Send a heartbeat every ``interval`` s; drop the peer after 3 silent ones."""
        self.heartbeatInterval = interval
        self.lastReceived = self.monotonic()
        self._ticks = 0
        # Silence is checked CHECKS_PER_BEAT times per interval, so a black-holed peer is
        # dropped within a fraction of an interval after three silent ones, not up to a
        # whole interval later.
        self._beat = LoopingCall.withCount(self._tick)
        self._beat.clock = self.clock
        self._beat.start(interval / CHECKS_PER_BEAT, now=False)

    def _tick(self, count: int) -> None:
        if self._dropIfSilent():
            return
        # ``count`` > 1 when the reactor was late (or a test's clock jumped): a heartbeat
        # is due whenever the ticks pass a whole interval.
        before, self._ticks = self._ticks, self._ticks + count
        if self._ticks // CHECKS_PER_BEAT > before // CHECKS_PER_BEAT:
            self.notify(Heartbeat, **self.heartbeatArguments())

    def _dropIfSilent(self) -> bool:
        """Drop the peer if it has been silent for ``MISSED_BEATS`` intervals.

        When the limit falls before the next check, a one-off check is set for the
        moment it is reached: a black-holed peer is dropped after three intervals of
        silence, not up to a quarter interval later.
        """
        limit = MISSED_BEATS * self.heartbeatInterval
        silent = self.monotonic() - self.lastReceived
        if silent < limit:
            if silent + self.heartbeatInterval / CHECKS_PER_BEAT > limit and (
                self._deadline is None or not self._deadline.active()
            ):
                self._deadline = self.clock.callLater(limit - silent, self._dropIfSilent)
            return False
        self.dropReason = f"peer silent for {silent:.1f} s (heartbeat {self.heartbeatInterval} s)"
        log.warn("dropping link: {reason}", reason=self.dropReason)
        self.stopHeartbeat()
        self.peerSilent(self.dropReason)
        if self.transport is not None:
            # abort, not close: a black-holed peer would never finish a clean close.
            self.transport.abortConnection()  # type: ignore[attr-defined]
        return True

    def heartbeatArguments(self) -> dict[str, Any]:
        """What this side's heartbeats carry (nothing by default)."""
        return {}

    def notify(self, command: type[amp.Command], **arguments: Any) -> None:
        """Send a command that needs no answer; on a closing link it is simply dropped."""
        with contextlib.suppress(Exception):
            self.callRemote(command, **arguments)

    def peerSilent(self, reason: str) -> None:
        """Called when the peer is dropped for silence, before the connection closes."""

    @Heartbeat.responder
    def heartbeat(
        self, position: int | None = None, outbox_pending: int | None = None
    ) -> dict[str, Any]:
        """Receiving it was the point; a position, if any, goes to ``peerPosition``, an
        outbox count to ``peerOutbox``."""
        if position is not None:
            self.peerPosition(position)
        if outbox_pending is not None:
            self.peerOutbox(outbox_pending)
        return {}

    def peerPosition(self, position: int) -> None:
        """The peer reported the change-log position it has applied."""

    def peerOutbox(self, pending: int) -> None:
        """The peer reported how many outbox records it holds unapplied."""

    def stopHeartbeat(self) -> None:
        """Stop sending heartbeats."""
        if self._beat is not None and self._beat.running:
            self._beat.stop()
        self._beat = None
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """Stop the heartbeat with the link."""
        self.stopHeartbeat()
        super().connectionLost(reason)
