"""Tests for sitesrv.failover: every cell of the failover machine, and what it records.

The expected input-by-mode table below is written out by hand from DESIGN.md's
"Failover machine" facts, independently of ``sitesrv.failover.TRANSITIONS``; one test
checks the two agree, another that ``docs/failover.rst`` shows the same table.
"""

from __future__ import annotations

import inspect
import itertools
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from sitesrv.failover import (
    INPUTS,
    MODES,
    TRANSITIONS,
    Failover,
    FailoverInputs,
    FailoverObserver,
    Transition,
)
from sitesrv.interfaces import IReplicationObserver

DAY = 86_400.0
START = 1_800_000_000.0
DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")

ALL_MODES = ("unsynced", "syncing", "online", "offline", "reconciling", "revoked")
ALL_INPUTS = (
    "replicaFound",
    "connected",
    "snapshotLoaded",
    "outboxDrained",
    "caughtUp",
    "heartbeatMissed",
    "lost",
    "revoked",
)

#: mode -> input -> next mode, from the facts that define each mode:
#: unsynced = no complete replica; syncing = connected, replica complete, catching up;
#: online = connected, caught up, outbox drained; offline = replica, not connected;
#: reconciling = reconnected, outbox still draining; revoked = revoked by the primary.
EXPECTED: dict[str, dict[str, str]] = {
    "unsynced": {
        "replicaFound": "offline",  # a complete replica at start-up: serve at once
        "connected": "unsynced",  # still nothing to serve from
        "snapshotLoaded": "syncing",  # now a replica; the stream replays from P
        "outboxDrained": "unsynced",
        "caughtUp": "unsynced",  # no replica yet, whatever the stream says
        "heartbeatMissed": "unsynced",
        "lost": "unsynced",
        "revoked": "revoked",
    },
    "syncing": {
        "replicaFound": "syncing",
        "connected": "syncing",
        "snapshotLoaded": "syncing",  # a re-snapshot went in; still catching up
        "outboxDrained": "syncing",
        "caughtUp": "online",
        "heartbeatMissed": "offline",  # replica complete, link gone
        "lost": "offline",
        "revoked": "revoked",
    },
    "online": {
        "replicaFound": "online",
        "connected": "online",
        "snapshotLoaded": "syncing",  # re-snapshotted: replay from its position
        "outboxDrained": "online",
        "caughtUp": "online",
        "heartbeatMissed": "offline",
        "lost": "offline",
        "revoked": "revoked",
    },
    "offline": {
        "replicaFound": "offline",
        "connected": "reconciling",  # reconnected: the outbox drains first
        "snapshotLoaded": "offline",  # stale events of a dead link change nothing
        "outboxDrained": "offline",
        "caughtUp": "offline",
        "heartbeatMissed": "offline",
        "lost": "offline",
        "revoked": "revoked",
    },
    "reconciling": {
        "replicaFound": "reconciling",
        "connected": "reconciling",
        "snapshotLoaded": "reconciling",  # the outbox is still not drained
        "outboxDrained": "syncing",
        "caughtUp": "reconciling",  # the outbox is still not drained
        "heartbeatMissed": "offline",
        "lost": "offline",
        "revoked": "revoked",
    },
    "revoked": {
        "replicaFound": "revoked",
        # Re-admitted (rotate-token). Revocation discarded the replica, so nothing is
        # served until a fresh snapshot is in.
        "connected": "unsynced",
        "snapshotLoaded": "syncing",
        "outboxDrained": "revoked",
        "caughtUp": "revoked",
        "heartbeatMissed": "revoked",
        "lost": "revoked",  # the primary closes a revoked site's link
        "revoked": "revoked",
    },
}

#: How a site really gets into each mode, from a fresh (unsynced) machine: the order of
#: events the replication client sends (connected, outboxDrained, [snapshotLoaded],
#: caughtUp), plus replicaFound at start-up.
PATHS: dict[str, tuple[str, ...]] = {
    "unsynced": (),
    # a new site's first connection: nothing stored, the primary sends a snapshot
    "syncing": ("connected", "outboxDrained", "snapshotLoaded"),
    "online": ("replicaFound", "connected", "outboxDrained", "caughtUp"),
    "offline": ("replicaFound",),
    "reconciling": ("replicaFound", "connected"),
    "revoked": ("replicaFound", "revoked"),
}

#: A second, longer way into each mode: the next mode depends on the mode only, not on
#: how the site got there.
OTHER_PATHS: dict[str, tuple[str, ...]] = {
    "unsynced": ("connected", "outboxDrained", "lost"),
    "syncing": ("replicaFound", "connected", "outboxDrained"),
    "online": ("connected", "outboxDrained", "snapshotLoaded", "caughtUp"),
    "offline": ("replicaFound", "connected", "outboxDrained", "caughtUp", "heartbeatMissed"),
    "reconciling": (
        "replicaFound",
        "connected",
        "outboxDrained",
        "caughtUp",
        "lost",
        "connected",
    ),
    "revoked": ("connected", "outboxDrained", "snapshotLoaded", "caughtUp", "revoked", "lost"),
}


def feed(failover: Failover, inputs: Sequence[str]) -> None:
    """Feed ``inputs`` to ``failover``, each with a reason naming it."""
    for name in inputs:
        getattr(failover.inputs, name)(f"test: {name}")


def machine_in(
    testcase: SynchronousTestCase, mode: str, paths: dict[str, tuple[str, ...]] = PATHS
) -> tuple[Failover, Clock]:
    """A fresh machine driven into ``mode`` along its path in ``paths``."""
    clock = Clock()
    clock.advance(START)
    failover = Failover(clock)
    feed(failover, paths[mode])
    testcase.assertEqual(failover.mode, mode, f"path {list(paths[mode])} should lead to {mode!r}")
    return failover, clock


class TableTests(SynchronousTestCase):
    """The hand-written table, the machine's table and the documented table agree."""

    def test_modes_and_inputs(self) -> None:
        """The machine has the six modes of DESIGN.md, unsynced first, and eight inputs."""
        self.assertEqual(MODES, ALL_MODES)
        self.assertEqual(INPUTS, ALL_INPUTS)
        declared = {
            name
            for name, _ in inspect.getmembers(FailoverInputs, inspect.isfunction)
            if not name.startswith("_")
        }
        self.assertEqual(declared, set(ALL_INPUTS))

    def test_fresh_machine_is_unsynced(self) -> None:
        """A site with nothing stored starts unsynced and refuses requests."""
        failover = Failover(Clock())
        self.assertEqual(failover.mode, "unsynced")
        self.assertFalse(failover.serving())

    def test_table_complete(self) -> None:
        """Every (mode, input) cell is defined, and nothing else is."""
        cells = set(itertools.product(ALL_MODES, ALL_INPUTS))
        self.assertEqual(set(TRANSITIONS), cells)
        self.assertEqual(len(TRANSITIONS), len(ALL_MODES) * len(ALL_INPUTS))
        self.assertEqual(set(TRANSITIONS.values()) - set(ALL_MODES), set())

    def test_expected_table_matches_machine(self) -> None:
        """The table written out here is the machine's table, cell for cell."""
        expected = {
            (mode, name): EXPECTED[mode][name] for mode in ALL_MODES for name in ALL_INPUTS
        }
        differ = {
            cell: (expected[cell], TRANSITIONS.get(cell))
            for cell in expected
            if expected[cell] != TRANSITIONS.get(cell)
        }
        self.assertEqual(differ, {}, "cells as (expected here, TRANSITIONS)")
        self.assertEqual(expected, TRANSITIONS)

    def test_paths(self) -> None:
        """Each path to a mode only uses real inputs and really ends in that mode."""
        for paths in (PATHS, OTHER_PATHS):
            self.assertEqual(set(paths), set(ALL_MODES))
            for mode in ALL_MODES:
                self.assertEqual(set(paths[mode]) - set(ALL_INPUTS), set())
                machine_in(self, mode, paths)

    def test_documented_table(self) -> None:
        """docs/failover.rst shows exactly the machine's table: rows modes, columns inputs."""
        with open(os.path.join(DOC, "failover.rst"), encoding="utf-8") as f:
            header, rows = parse_grid_table(f.read(), "replicaFound")
        self.assertEqual(header[1:], list(ALL_INPUTS))
        self.assertEqual([row[0] for row in rows], list(ALL_MODES))
        documented = {
            (row[0], name): cell
            for row in rows
            for name, cell in zip(header[1:], row[1:], strict=True)
        }
        self.assertEqual(documented, TRANSITIONS)


def parse_grid_table(text: str, marker: str) -> tuple[list[str], list[list[str]]]:
    """The header and body cells of the first reST grid table whose header has ``marker``.

    Cells are stripped of surrounding space, ``**`` and backquotes.
    """
    lines = text.splitlines()
    blocks: list[list[str]] = []
    current: list[str] = []
    for line in [*lines, ""]:
        stripped = line.strip()
        if stripped.startswith(("+", "|")):
            current.append(stripped)
        elif current:
            blocks.append(current)
            current = []
    for block in blocks:
        if not block[0].startswith("+") or marker not in "\n".join(block):
            continue
        edges = [i for i, char in enumerate(block[0]) if char == "+"]
        header: list[str] = []
        rows: list[list[str]] = []
        cells: list[list[str]] = [[] for _ in edges[1:]]
        for line in block[1:]:
            if line.startswith("+"):
                row = [clean(" ".join(parts)) for parts in cells]
                if line.startswith("+="):
                    header = row
                else:
                    rows.append(row)
                cells = [[] for _ in edges[1:]]
                continue
            for i, (left, right) in enumerate(itertools.pairwise(edges)):
                if line[left] != "|" or line[right] != "|":
                    raise ValueError(f"spanning or misaligned cell in {line!r}")
                cells[i].append(line[left + 1 : right])
        return header, rows
    raise ValueError(f"no grid table with {marker!r}")


def clean(cell: str) -> str:
    """A cell's text without markup."""
    return re.sub(r"\*\*|`", "", " ".join(cell.split()))


class CellTests(SynchronousTestCase):
    """Every input in every mode, reached along two different realistic paths.

    The methods are generated below: ``test_<mode>_<input>`` (along ``PATHS``) and
    ``test_<mode>_<input>_other_path`` (along ``OTHER_PATHS``).
    """

    def check_cell(self, mode: str, name: str, paths: dict[str, tuple[str, ...]]) -> None:
        failover, clock = machine_in(self, mode, paths)
        expected = EXPECTED[mode][name]
        before = list(failover.core.history)
        clock.advance(5)
        getattr(failover.inputs, name)(f"test: {name} in {mode}")
        self.assertEqual(
            failover.mode,
            expected,
            f"cell ({mode}, {name}) after path {list(paths[mode])}: "
            f"expected {expected!r}, got {failover.mode!r}",
        )
        history = list(failover.core.history)
        if expected == mode:
            self.assertEqual(history, before, f"cell ({mode}, {name}) is a loop: no record")
        else:
            self.assertEqual(
                history[0],
                Transition(START + 5, mode, expected, name, f"test: {name} in {mode}"),
                f"cell ({mode}, {name}) should be recorded",
            )
            self.assertEqual(history[1:], before)


def _cell_test(
    mode: str, name: str, paths: dict[str, tuple[str, ...]], label: str
) -> Callable[[CellTests], None]:
    def test(self: CellTests) -> None:
        self.check_cell(mode, name, paths)

    test.__doc__ = f"({mode}, {name}) -> {EXPECTED[mode][name]}{label}."
    return test


for _mode, _name in itertools.product(ALL_MODES, ALL_INPUTS):
    setattr(CellTests, f"test_{_mode}_{_name}", _cell_test(_mode, _name, PATHS, ""))
    setattr(
        CellTests,
        f"test_{_mode}_{_name}_other_path",
        _cell_test(_mode, _name, OTHER_PATHS, ", reached another way"),
    )


class ReadmissionTests(SynchronousTestCase):
    """A revoked site re-admitted by the primary serves again only from a fresh snapshot."""

    def test_readmitted_before_first_sync_does_not_serve(self) -> None:
        """A site revoked before it ever had a replica serves nothing when re-admitted."""
        failover = Failover(Clock())
        feed(failover, ["revoked", "connected"])
        self.assertFalse(failover.serving(), f"serving in {failover.mode} with no replica")
        feed(failover, ["snapshotLoaded", "outboxDrained", "caughtUp"])
        self.assertEqual(failover.mode, "online")


class HistoryTests(SynchronousTestCase):
    """Each change of mode is recorded once, newest first, with its input and reason."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.failover = Failover(self.clock)
        self.core = self.failover.core

    def step(self, name: str, reason: str, after: float = 1.0) -> None:
        self.clock.advance(after)
        getattr(self.failover.inputs, name)(reason)

    def test_start(self) -> None:
        """A fresh machine has no history, no last sync, and is unsynced since now."""
        self.assertEqual(list(self.core.history), [])
        self.assertIsNone(self.core.last_sync)
        self.assertEqual(self.core.since, START)

    def test_records_changes_newest_first(self) -> None:
        """The path to online is four transitions, newest first, each with its reason."""
        self.step("replicaFound", "complete replica at position 9 stored")
        self.step("connected", "the primary accepted our hello")
        self.step("outboxDrained", "outbox drained")
        self.step("caughtUp", "caught up at position 12")
        self.assertEqual(
            list(self.core.history),
            [
                Transition(START + 4, "syncing", "online", "caughtUp", "caught up at position 12"),
                Transition(START + 3, "reconciling", "syncing", "outboxDrained", "outbox drained"),
                Transition(
                    START + 2,
                    "offline",
                    "reconciling",
                    "connected",
                    "the primary accepted our hello",
                ),
                Transition(
                    START + 1,
                    "unsynced",
                    "offline",
                    "replicaFound",
                    "complete replica at position 9 stored",
                ),
            ],
        )

    def test_loops_not_recorded(self) -> None:
        """Inputs that leave the mode as it is add nothing and keep ``since``."""
        feed(self.failover, PATHS["online"])
        recorded = list(self.core.history)
        since = self.core.since
        for name in ("replicaFound", "connected", "outboxDrained", "caughtUp"):
            self.step(name, f"again: {name}")
        self.assertEqual(self.failover.mode, "online")
        self.assertEqual(list(self.core.history), recorded)
        self.assertEqual(self.core.since, since)

    def test_each_change_once(self) -> None:
        """A lost link that also missed heartbeats is one transition, not two."""
        feed(self.failover, PATHS["online"])
        self.step("heartbeatMissed", "no message for 3 s")
        self.step("lost", "connection closed")
        self.assertEqual(
            [(t.old, t.new, t.input, t.reason) for t in list(self.core.history)[:2]],
            [
                ("online", "offline", "heartbeatMissed", "no message for 3 s"),
                ("syncing", "online", "caughtUp", "test: caughtUp"),
            ],
        )

    def test_bounded(self) -> None:
        """Only the newest 20 transitions are kept."""
        feed(self.failover, ["replicaFound"])
        for i in range(30):
            self.step("connected", f"hello {i}")
            self.step("lost", f"cut {i}")
        history = list(self.core.history)
        self.assertEqual(len(history), 20)
        self.assertEqual(history[0].reason, "cut 29")
        self.assertEqual(history[1].reason, "hello 29")
        self.assertEqual(history[-1].reason, "hello 20")
        self.assertEqual([t.at for t in history], sorted((t.at for t in history), reverse=True))

    def test_since_follows_clock(self) -> None:
        """``since`` is the clock's time of the latest change of mode."""
        self.step("replicaFound", "stored", after=10)
        self.assertEqual(self.core.since, START + 10)
        self.step("connected", "hello", after=25)
        self.assertEqual(self.core.since, START + 35)
        self.step("connected", "hello again", after=7)
        self.assertEqual(self.core.since, START + 35)

    def test_last_sync_on_caught_up(self) -> None:
        """``last_sync`` is the clock's time of the latest caughtUp, loop or not."""
        feed(self.failover, ["replicaFound", "connected", "outboxDrained"])
        self.assertIsNone(self.core.last_sync)
        self.step("caughtUp", "caught up at position 1", after=3)
        self.assertEqual(self.core.last_sync, START + 3)
        self.step("caughtUp", "caught up at position 2", after=60)
        self.assertEqual(self.failover.mode, "online")
        self.assertEqual(self.core.last_sync, START + 63)
        self.step("lost", "connection closed", after=100)
        self.assertEqual(self.core.last_sync, START + 63)

    def test_listener_once_per_transition(self) -> None:
        """A listener in ``core.listeners`` hears every change of mode, once, and no loop."""
        heard: list[Transition] = []
        self.core.listeners.append(heard.append)
        feed(self.failover, PATHS["online"])
        feed(self.failover, ["caughtUp", "outboxDrained", "connected", "heartbeatMissed"])
        feed(self.failover, ["lost", "heartbeatMissed", "connected", "revoked", "lost"])
        self.assertEqual(
            [(t.old, t.new, t.input) for t in heard],
            [
                ("unsynced", "offline", "replicaFound"),
                ("offline", "reconciling", "connected"),
                ("reconciling", "syncing", "outboxDrained"),
                ("syncing", "online", "caughtUp"),
                ("online", "offline", "heartbeatMissed"),
                ("offline", "reconciling", "connected"),
                ("reconciling", "revoked", "revoked"),
            ],
        )
        self.assertEqual(heard, list(reversed(self.core.history)))


class ClockJumpTests(SynchronousTestCase):
    """The machine has no timers: a step of the clock alone changes no mode."""

    def check_jump(self, jump: Callable[[Clock], Any]) -> None:
        for mode in ALL_MODES:
            failover, clock = machine_in(self, mode)
            history = list(failover.core.history)
            since = failover.core.since
            self.assertEqual(clock.getDelayedCalls(), [], f"timers in {mode}")
            jump(clock)
            self.assertEqual(failover.mode, mode, f"{mode} after a clock jump")
            self.assertEqual(list(failover.core.history), history)
            self.assertEqual(failover.core.since, since)

    def test_forward_a_day(self) -> None:
        """A day's jump forward leaves every mode as it is."""
        self.check_jump(lambda clock: clock.advance(DAY))

    def test_back_a_day(self) -> None:
        """Setting the clock back a day leaves every mode as it is."""
        self.check_jump(lambda clock: clock.advance(-DAY))

    def test_transition_after_clock_set_back(self) -> None:
        """A change after the clock was set back is recorded at the (earlier) clock time."""
        failover, clock = machine_in(self, "online")
        clock.advance(-DAY)
        failover.inputs.lost("connection closed")
        self.assertEqual(failover.mode, "offline")
        self.assertEqual(failover.core.since, START - DAY)
        self.assertEqual(failover.core.history[0].at, START - DAY)


class ServingTests(SynchronousTestCase):
    """What requests get in each mode."""

    SERVING = {
        "unsynced": (False, "site not yet synchronised with the primary", False),
        "syncing": (True, None, False),
        "online": (True, None, False),
        "offline": (True, None, True),
        "reconciling": (True, None, True),
        "revoked": (False, "site revoked by the primary", False),
    }

    def test_every_mode(self) -> None:
        """serving(), refusal() and offline_credit() in each mode, reached by its path."""
        self.assertEqual(set(self.SERVING), set(ALL_MODES))
        for mode, expected in self.SERVING.items():
            failover, _ = machine_in(self, mode)
            self.assertEqual(
                (failover.serving(), failover.refusal(), failover.offline_credit()),
                expected,
                f"(serving, refusal, offline_credit) in {mode}",
            )

    def test_refusal_iff_not_serving(self) -> None:
        """A refusal message exists exactly when requests are not served."""
        for mode in ALL_MODES:
            failover, _ = machine_in(self, mode)
            self.assertEqual(failover.refusal() is None, failover.serving(), mode)


class RecordingInputs:
    """Stands in for the machine's inputs: records (input, reason)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def __getattr__(self, name: str) -> Callable[[str], None]:
        if name not in ALL_INPUTS:
            raise AttributeError(name)
        return lambda reason: self.calls.append((name, reason))


class ObserverTests(SynchronousTestCase):
    """FailoverObserver turns replication events into the right inputs."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.failover = Failover(self.clock)
        self.observer = FailoverObserver(self.failover)

    def test_provides_interface(self) -> None:
        """It is a complete IReplicationObserver."""
        self.assertTrue(verifyObject(IReplicationObserver, self.observer))

    def test_event_to_input(self) -> None:
        """Each event feeds one input with its reason; the progress events feed none."""
        events: list[tuple[Callable[[FailoverObserver], Any], list[tuple[str, str]]]] = [
            (
                lambda o: o.connected(skew=0.5),
                [("connected", "the primary accepted our hello")],
            ),
            (lambda o: o.syncing("epoch changed"), []),
            (lambda o: o.snapshotLoaded(), [("snapshotLoaded", "snapshot loaded")]),
            (lambda o: o.outboxDrained(), [("outboxDrained", "outbox drained")]),
            (lambda o: o.changesApplied(3, 17), []),
            (lambda o: o.caughtUp(17), [("caughtUp", "caught up at position 17")]),
            (
                lambda o: o.heartbeatMissed("no message for 3 s"),
                [("heartbeatMissed", "no message for 3 s")],
            ),
            (lambda o: o.lost("connection reset"), [("lost", "connection reset")]),
            (
                lambda o: o.refused("protocol version 9 refused"),
                [("lost", "refused: protocol version 9 refused")],
            ),
            (lambda o: o.revoked("site revoked"), [("revoked", "site revoked")]),
        ]
        if hasattr(FailoverObserver, "outboxSubmitted"):  # arrives with the outbox
            events.append((lambda o: o.outboxSubmitted(5, 42), []))
        for event, expected in events:
            recording = RecordingInputs()
            self.failover.inputs = recording
            event(self.observer)
            self.assertEqual(recording.calls, expected)

    def test_replication_order_reaches_online(self) -> None:
        """The client's order of events takes a new site, and a returning one, online."""
        self.observer.connected(skew=0.0)
        self.observer.outboxDrained()
        self.observer.syncing("no complete replica")
        self.assertEqual(self.failover.mode, "unsynced")
        self.observer.snapshotLoaded()
        self.assertEqual(self.failover.mode, "syncing")
        self.observer.changesApplied(2, 5)
        self.observer.caughtUp(5)
        self.assertEqual(self.failover.mode, "online")
        self.observer.heartbeatMissed("no message for 3 s")
        self.observer.lost("no message for 3 s")
        self.assertEqual(self.failover.mode, "offline")
        self.observer.connected(skew=0.0)
        self.assertEqual(self.failover.mode, "reconciling")
        self.observer.outboxDrained()
        self.observer.caughtUp(9)
        self.assertEqual(self.failover.mode, "online")

    def test_drain_after_snapshot_reaches_online(self) -> None:
        """Draining the outbox after a snapshot (then pulling) reaches online too."""
        self.observer.connected(skew=0.0)
        self.observer.syncing("no complete replica")
        self.observer.snapshotLoaded()
        self.observer.outboxDrained()
        self.observer.caughtUp(5)
        self.assertEqual(self.failover.mode, "online")
        feed(self.failover, ["lost", "connected"])
        self.observer.syncing("the primary was restored from a backup")
        self.observer.snapshotLoaded()
        self.assertEqual(self.failover.mode, "reconciling")
        self.observer.outboxDrained()
        self.observer.caughtUp(3)
        self.assertEqual(self.failover.mode, "online")

    def test_caught_up_during_drain_then_pull(self) -> None:
        """A caughtUp while reconciling is not lost: the pull after the drain repeats it."""
        feed(self.failover, ["replicaFound", "connected"])
        self.observer.caughtUp(7)  # a poke's pull finished while the outbox drained
        self.assertEqual(self.failover.mode, "reconciling")
        self.observer.outboxDrained()
        self.assertEqual(self.failover.mode, "syncing")
        self.observer.caughtUp(7)  # the client always pulls after draining
        self.assertEqual(self.failover.mode, "online")

    def test_refused_keeps_offline_site_offline(self) -> None:
        """A refused hello is a problem to show; an offline site stays offline and serves."""
        feed(self.failover, ["replicaFound"])
        self.observer.refused("sitesrv 1.0 speaks protocol 4; this primary accepts 2 and 3")
        self.assertEqual(self.failover.mode, "offline")
        self.assertTrue(self.failover.serving())
        self.assertEqual(
            self.observer.problems,
            ["sitesrv 1.0 speaks protocol 4; this primary accepts 2 and 3"],
        )
        self.assertEqual(len(self.failover.core.history), 1)

    def test_refused_takes_online_site_offline(self) -> None:
        """Refused on a reconnect after a drop (say, a new token not yet installed)."""
        feed(self.failover, PATHS["online"])
        self.observer.refused("bad token")
        self.assertEqual(self.failover.mode, "offline")
        self.assertEqual(self.failover.core.history[0].reason, "refused: bad token")

    def test_refused_replaces_problem(self) -> None:
        """Repeated refusals show the latest reason only."""
        self.observer.refused("unknown site")
        self.observer.refused("bad token")
        self.assertEqual(self.observer.problems, ["bad token"])
        self.assertEqual(self.failover.mode, "unsynced")

    def test_connected_clears_problems_records_skew(self) -> None:
        """A successful hello clears the problems and records the clock skew."""
        feed(self.failover, ["replicaFound"])
        self.assertIsNone(self.observer.skew)
        self.observer.refused("bad token")
        self.observer.connected(skew=-72.5)
        self.assertEqual(self.observer.problems, [])
        self.assertEqual(self.observer.skew, -72.5)
        self.assertEqual(self.failover.mode, "reconciling")

    def test_revoked(self) -> None:
        """Revocation is shown as a problem, and the site stops serving."""
        feed(self.failover, PATHS["online"])
        self.observer.revoked("site hq-annex revoked by the primary")
        self.assertEqual(self.failover.mode, "revoked")
        self.assertFalse(self.failover.serving())
        self.assertEqual(self.observer.problems, ["site hq-annex revoked by the primary"])
        self.observer.lost("connection closed")
        self.assertEqual(self.failover.mode, "revoked")
