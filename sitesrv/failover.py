"""The failover machine: what a site may do now, decided from facts about its link.

An Automat ``TypeMachineBuilder`` machine. Its modes (DESIGN.md "Failover machine"):

``unsynced``     no complete replica stored: requests refused
``syncing``      connected, complete replica, catching up or re-snapshotting: normal
``online``       connected, caught up, outbox drained: normal
``offline``      complete replica, not connected: offline policies
``reconciling``  reconnected, outbox still draining: offline policies for credit
``revoked``      the primary revoked this site: requests refused

The whole input-by-mode table is ``TRANSITIONS`` below; ``docs/failover.rst`` shows it
and ``tests/test_failover.py`` checks every cell. Inputs come from the replication client
(through ``FailoverObserver``) and from start-up (``replicaFound``). Every transition is
logged with its reason and kept in a short history for ``/health`` and the status page.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

import attrs
from automat import TypeMachineBuilder
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from sitesrv.interfaces import IReplicationObserver

log = Logger()

MODES = ("unsynced", "syncing", "online", "offline", "reconciling", "revoked")
#: Modes in which requests are answered at all.
SERVING = frozenset({"syncing", "online", "offline", "reconciling"})
#: Modes in which offline policies apply to credit (charging and release).
OFFLINE_CREDIT = frozenset({"offline", "reconciling"})

REFUSALS = {
    "unsynced": "site not yet synchronised with the primary",
    "revoked": "site revoked by the primary",
}


class FailoverInputs(Protocol):
    """What can happen to a site's link; each input carries a human-readable reason."""

    def replicaFound(self, reason: str) -> None:
        """At start-up: a complete replica is stored."""

    def connected(self, reason: str) -> None:
        """The primary accepted the site's hello."""

    def snapshotLoaded(self, reason: str) -> None:
        """A complete snapshot was swapped in."""

    def outboxDrained(self, reason: str) -> None:
        """Everything the site recorded has been acknowledged by the primary."""

    def caughtUp(self, reason: str) -> None:
        """The replica reached the primary's head."""

    def heartbeatMissed(self, reason: str) -> None:
        """The primary was silent for three heartbeat intervals."""

    def lost(self, reason: str) -> None:
        """The connection closed (or was refused)."""

    def revoked(self, reason: str) -> None:
        """The primary revoked this site."""


INPUTS = (
    "replicaFound",
    "connected",
    "snapshotLoaded",
    "outboxDrained",
    "caughtUp",
    "heartbeatMissed",
    "lost",
    "revoked",
)

#: (mode, input) -> next mode. Every cell is defined: an input that changes nothing
#: leaves the mode as it is.
TRANSITIONS: dict[tuple[str, str], str] = {
    # unsynced: nothing to serve from until a snapshot is loaded.
    ("unsynced", "replicaFound"): "offline",
    ("unsynced", "connected"): "unsynced",
    ("unsynced", "snapshotLoaded"): "syncing",
    ("unsynced", "outboxDrained"): "unsynced",
    ("unsynced", "caughtUp"): "unsynced",
    ("unsynced", "heartbeatMissed"): "unsynced",
    ("unsynced", "lost"): "unsynced",
    ("unsynced", "revoked"): "revoked",
    # syncing: connected, replica complete, catching up.
    ("syncing", "replicaFound"): "syncing",
    ("syncing", "connected"): "syncing",
    ("syncing", "snapshotLoaded"): "syncing",
    ("syncing", "outboxDrained"): "syncing",
    ("syncing", "caughtUp"): "online",
    ("syncing", "heartbeatMissed"): "offline",
    ("syncing", "lost"): "offline",
    ("syncing", "revoked"): "revoked",
    # online: the normal state.
    ("online", "replicaFound"): "online",
    ("online", "connected"): "online",
    ("online", "snapshotLoaded"): "syncing",
    ("online", "outboxDrained"): "online",
    ("online", "caughtUp"): "online",
    ("online", "heartbeatMissed"): "offline",
    ("online", "lost"): "offline",
    ("online", "revoked"): "revoked",
    # offline: serve from the replica under the offline policies.
    ("offline", "replicaFound"): "offline",
    ("offline", "connected"): "reconciling",
    ("offline", "snapshotLoaded"): "offline",
    ("offline", "outboxDrained"): "offline",
    ("offline", "caughtUp"): "offline",
    ("offline", "heartbeatMissed"): "offline",
    ("offline", "lost"): "offline",
    ("offline", "revoked"): "revoked",
    # reconciling: reconnected; the outbox drains first, then the stream catches up.
    ("reconciling", "replicaFound"): "reconciling",
    ("reconciling", "connected"): "reconciling",
    ("reconciling", "snapshotLoaded"): "reconciling",
    ("reconciling", "outboxDrained"): "syncing",
    ("reconciling", "caughtUp"): "reconciling",
    ("reconciling", "heartbeatMissed"): "offline",
    ("reconciling", "lost"): "offline",
    ("reconciling", "revoked"): "revoked",
    # revoked: only a successful hello (after `site rotate-token`) lifts it. Revocation
    # marks the stored replica incomplete, so a re-admitted site serves again only once
    # a fresh snapshot is in (and a revoked site that restarts starts unsynced).
    ("revoked", "replicaFound"): "revoked",
    ("revoked", "connected"): "unsynced",
    ("revoked", "snapshotLoaded"): "syncing",
    ("revoked", "outboxDrained"): "revoked",
    ("revoked", "caughtUp"): "revoked",
    ("revoked", "heartbeatMissed"): "revoked",
    ("revoked", "lost"): "revoked",
    ("revoked", "revoked"): "revoked",
}


@attrs.frozen
class Transition:
    """One recorded change of mode."""

    at: float
    old: str
    new: str
    input: str
    reason: str


@attrs.define
class FailoverCore:
    """The machine's facts and collaborators: the clock, the history, listeners."""

    clock: IReactorTime
    history_size: int = 20
    mode: str = "unsynced"
    since: float = 0.0
    last_sync: float | None = None
    history: deque[Transition] = attrs.field(init=False)
    listeners: list[Callable[[Transition], Any]] = attrs.field(factory=list)

    def __attrs_post_init__(self) -> None:
        self.history = deque(maxlen=self.history_size)
        self.since = self.clock.seconds()

    def enter(self, new: str, input: str, reason: str) -> None:
        """Record the result of an input (a transition when the mode changes)."""
        now = self.clock.seconds()
        if input == "caughtUp":
            self.last_sync = now
        if new == self.mode:
            return
        transition = Transition(now, self.mode, new, input, reason)
        log.info(
            "site mode {old} -> {new} ({input}: {reason})",
            old=self.mode,
            new=new,
            input=input,
            reason=reason,
        )
        self.mode, self.since = new, now
        self.history.appendleft(transition)
        for listener in self.listeners:
            listener(transition)


def _build() -> Callable[[FailoverCore], FailoverInputs]:
    builder = TypeMachineBuilder(FailoverInputs, FailoverCore)
    states = {mode: builder.state(mode) for mode in MODES}  # "unsynced" first: initial
    for (mode, input_name), target in TRANSITIONS.items():
        method = getattr(FailoverInputs, input_name)
        upon = states[mode].upon(method)
        registrar = upon.loop() if target == mode else upon.to(states[target])

        def transition(
            inputs: FailoverInputs,
            core: FailoverCore,
            reason: str,
            _target: str = target,
            _input: str = input_name,
        ) -> None:
            core.enter(_target, _input, reason)

        registrar(transition)
    return builder.build()


_Machine = _build()


class Failover:
    """A site's failover machine with its core: feed inputs, read ``mode``."""

    def __init__(self, clock: IReactorTime) -> None:
        self.core = FailoverCore(clock)
        self.inputs: FailoverInputs = _Machine(self.core)

    @property
    def mode(self) -> str:
        """The current mode."""
        return self.core.mode

    def serving(self) -> bool:
        """Whether requests are answered in the current mode."""
        return self.core.mode in SERVING

    def refusal(self) -> str | None:
        """Why requests are refused now, or None when they are served."""
        return REFUSALS.get(self.core.mode)

    def offline_credit(self) -> bool:
        """Whether offline policies govern credit now."""
        return self.core.mode in OFFLINE_CREDIT


@implementer(IReplicationObserver)
@attrs.define
class FailoverObserver:
    """Turns the replication client's events into machine inputs."""

    failover: Failover
    skew: float | None = None
    problems: list[str] = attrs.field(factory=list)

    def connected(self, skew: float) -> None:
        """Hello accepted."""
        self.skew = skew
        self.problems.clear()
        self.failover.inputs.connected("the primary accepted our hello")

    def syncing(self, reason: str) -> None:
        """A snapshot is being loaded; the mode does not change until it is in."""
        log.info("re-synchronising: {reason}", reason=reason)

    def snapshotLoaded(self) -> None:
        """A snapshot is in."""
        self.failover.inputs.snapshotLoaded("snapshot loaded")

    def outboxSubmitted(self, count: int, applied_seq: int) -> None:
        """Records went to the primary (no mode change)."""

    def outboxDrained(self) -> None:
        """The outbox is empty up to what the primary has applied."""
        self.failover.inputs.outboxDrained("outbox drained")

    def changesApplied(self, count: int, position: int) -> None:
        """A batch was applied (no mode change)."""

    def caughtUp(self, position: int) -> None:
        """At the primary's head."""
        self.failover.inputs.caughtUp(f"caught up at position {position}")

    def heartbeatMissed(self, reason: str) -> None:
        """The primary went silent."""
        self.failover.inputs.heartbeatMissed(reason)

    def lost(self, reason: str) -> None:
        """The link is gone."""
        self.failover.inputs.lost(reason)

    def refused(self, reason: str) -> None:
        """The primary refused us; we are as good as disconnected."""
        self.problems[:] = [reason]
        self.failover.inputs.lost(f"refused: {reason}")

    def revoked(self, reason: str) -> None:
        """The primary revoked us."""
        self.problems[:] = [reason]
        self.failover.inputs.revoked(reason)
