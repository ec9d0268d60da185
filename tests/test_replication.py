"""Socket- and thread-free tests of replication: a site's replica follows its primary.

A ``SiteSession`` (the primary's side, from ``PrimaryReplication.factory()``) and a
``PrimaryLinkProtocol`` (the site's side) talk AMP over ``iosim`` transports
(``tests.support.Wire``), each with a real SQLite database run inline (``InlineStore``),
on one ``task.Clock``. Each test checks what an administrator would notice: the site's
tables hold exactly what the primary has for that site, the failover machine's mode,
and which links are open.
"""

from __future__ import annotations

import gc
import json
import os
import random
import uuid as uuidlib
import zlib
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import Connection, select, update
from sqlalchemy.exc import OperationalError
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, execute
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.protocols import amp
from twisted.test.proto_helpers import MemoryReactor
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

import sitesrv
from sitesrv.config import PrimaryLink
from sitesrv.core.gate import thdCharge
from sitesrv.failover import Failover, FailoverObserver
from sitesrv.interfaces import IReplicationObserver
from sitesrv.replication import codec
from sitesrv.replication import site as site_module
from sitesrv.replication.commands import (
    BeginSnapshot,
    GetChanges,
    Hello,
    NotAuthenticated,
    Poke,
    ProtocolViolation,
    SnapshotPage,
    SubmitOutbox,
)
from sitesrv.replication.primary import MAX_SNAPSHOTS, PrimaryReplication
from sitesrv.replication.site import PrimaryLinkProtocol, SiteReplication
from sitesrv.store import Store, outbox
from sitesrv.store.bootstrap import thdInitPrimary
from sitesrv.store.changelog import (
    Change,
    thdChangesSince,
    thdNewEpoch,
    thdState,
    thdTrim,
    thdUpdate,
)
from sitesrv.store.devices import thdAddDevice, thdAddProvider, thdRemoveDevice
from sitesrv.store.ledger import thdAccount, thdAddAccount, thdPost
from sitesrv.store.policies import thdSetPolicy
from sitesrv.store.printers import thdAddPrinter, thdPrinter
from sitesrv.store.replica import thdApplyChanges, thdReplicaState
from sitesrv.store.schema import (
    REPLICATED,
    SHADOW,
    accounts,
    devices,
    printers,
    providers,
    replica_state,
    sites,
    transactions,
    users,
)
from sitesrv.store.schema import settings as settings_table
from sitesrv.store.sites import (
    thdAddSite,
    thdLink,
    thdRevokeSite,
    thdRotateToken,
    thdSite,
)
from sitesrv.store.snapshot import Snapshot
from sitesrv.store.users import (
    NewUser,
    thdAddCard,
    thdAddGroup,
    thdAddMember,
    thdAddUser,
    thdImportUsers,
    thdRemoveUser,
    thdSetPassword,
    thdSetPin,
    thdUser,
)
from tests.support import NOW, Wire, open_inline_store, settle, sqlite_url

#: Heartbeat interval the primary hands out in its hello answer (the default).
BEAT = 1.0
#: A password verifier as the store keeps it (tests never need a real scrypt one).
VERIFIER = "scrypt$16384$8$1$c2FsdA$aGFzaA"


# -- fixtures -------------------------------------------------------------------------


@implementer(IReplicationObserver)
class RecordingObserver:
    """The site's real observer (the failover machine), recording every event."""

    def __init__(self, failover: Failover) -> None:
        self.inner = FailoverObserver(failover)
        self.events: list[tuple[str, tuple[Any, ...]]] = []

    def _record(self, name: str, *args: Any) -> None:
        self.events.append((name, args))
        getattr(self.inner, name)(*args)

    def names(self) -> list[str]:
        """The events so far, by name."""
        return [name for name, _args in self.events]

    def connected(self, skew: float) -> None:
        self._record("connected", skew)

    def syncing(self, reason: str) -> None:
        self._record("syncing", reason)

    def snapshotLoaded(self) -> None:
        self._record("snapshotLoaded")

    def changesApplied(self, count: int, position: int) -> None:
        self._record("changesApplied", count, position)

    def caughtUp(self, position: int) -> None:
        self._record("caughtUp", position)

    def outboxSubmitted(self, count: int, applied_seq: int) -> None:
        self._record("outboxSubmitted", count, applied_seq)

    def outboxDrained(self) -> None:
        self._record("outboxDrained")

    def heartbeatMissed(self, reason: str) -> None:
        self._record("heartbeatMissed", reason)

    def lost(self, reason: str) -> None:
        self._record("lost", reason)

    def refused(self, reason: str) -> None:
        self._record("refused", reason)

    def revoked(self, reason: str) -> None:
        self._record("revoked", reason)


class SiteFixture:
    """A site server's replication half: its database, token file, failover machine."""

    def __init__(self, test: ReplicationTestCase, name: str, token: str) -> None:
        self.name = name
        self.store = open_inline_store(sqlite_url(test, f"{name}.db"))
        test.addCleanup(self.store.stop)
        directory = test.mktemp()
        os.makedirs(directory)
        self.token_file = os.path.join(directory, "token")
        self.set_token(token)
        self.failover = Failover(test.clock)
        self.observer = RecordingObserver(self.failover)
        link = PrimaryLink(endpoint="tcp:127.0.0.1:1", token_file=self.token_file, insecure=True)
        self.replication = SiteReplication(
            self.store,
            name,
            link,
            self.observer,
            test.clock,
            # Never started: the tests connect the protocol over iosim themselves.
            endpoint=TCP4ClientEndpoint(MemoryReactor(), "127.0.0.1", 1),
            monotonic=test.clock.seconds,
        )

    def set_token(self, token: str) -> None:
        """Put an enrolment token in the site's token file."""
        with open(self.token_file, "w", encoding="utf-8") as f:
            f.write(token + "\n")

    def token(self) -> str:
        """The token in the site's token file."""
        with open(self.token_file, encoding="utf-8") as f:
            return f.read().strip()

    @property
    def mode(self) -> str:
        """The failover machine's mode."""
        return self.failover.mode

    def modes(self) -> list[str]:
        """The modes the failover machine went through, oldest first."""
        history = list(reversed(self.failover.core.history))
        return [history[0].old, *(t.new for t in history)] if history else [self.mode]

    def state(self) -> Any:
        """The replica's state."""
        return self.store.read(thdReplicaState)


def table_rows(
    conn: Connection, name: str, scope_id: int | None = None, secrets: bool = True
) -> list[tuple[Any, ...]]:
    """A replicated table's rows in id order (for ``scope_id``'s site when scoped).

    ``secrets`` False leaves the never-replicated columns out.
    """
    replicated = next(r for r in REPLICATED if r.table.name == name)
    table = replicated.table
    columns = [c for c in table.columns if secrets or c.name not in replicated.secret_columns]
    query = select(*columns).order_by(table.c.id)
    if scope_id is not None and replicated.scope_column is not None:
        query = query.where(table.c[replicated.scope_column] == scope_id)
    return [tuple(r) for r in conn.execute(query)]


class ReplicationTestCase(SynchronousTestCase):
    """A primary "hq" with its replication service, and helpers to run sites against it."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.primary_url = sqlite_url(self, "primary.db")
        self.primary = open_inline_store(self.primary_url)
        self.addCleanup(self.primary.stop)
        self.primary.write(thdInitPrimary, "hq", "USD", 2, NOW)
        self.service = self.make_service(self.primary)
        self.wires: list[Wire] = []

    def make_service(self, store: Store) -> PrimaryReplication:
        """A primary replication service whose snapshot work runs inline."""
        service = PrimaryReplication(store, "hq", self.clock, monotonic=self.clock.seconds)
        service.inThread = lambda fn, *args: execute(fn, *args)  # type: ignore[method-assign]
        return service

    # -- the primary's data --

    def add_site(self, name: str) -> SiteFixture:
        """Enrol a site at the primary and set up its server, token file in place."""
        return SiteFixture(self, name, self.primary.write(thdAddSite, name, NOW))

    def populate(self) -> None:
        """Users, cards, accounts, printers, devices and policies for sites north and south."""
        w = self.primary.write
        w(thdAddUser, "alice", NOW, full_name="Alice A", email="a@example.org", balance=1000)
        w(thdAddUser, "bob", NOW, balance=250, restricted=False, password_verifier=VERIFIER)
        w(thdSetPassword, "alice", VERIFIER, NOW)
        w(thdSetPin, "alice", VERIFIER, NOW)
        w(thdAddCard, "alice", "1001", NOW)
        w(thdAddCard, "bob", "2002", NOW)
        w(thdAddAccount, "Library", NOW, restricted=True, credit_limit=500)
        w(thdAddGroup, "staff", NOW)
        w(thdAddMember, "staff", "alice", NOW)
        w(thdAddPrinter, "hq-laser", "hq", 10, 50, NOW)
        w(thdAddPrinter, "north-laser", "north", 8, 40, NOW, hold=True, duplex_discount=10)
        w(thdAddPrinter, "south-laser", "south", 12, 60, NOW, uri="ipp://south/laser")
        w(thdAddDevice, "north-mfd", "north", "http", NOW, printer="north-laser")
        w(thdAddDevice, "north-reader", "north", "card-reader", NOW, options={"port": "7000"})
        w(thdAddDevice, "south-mfd", "south", "http", NOW, printer="south-laser")
        w(thdAddDevice, "hq-reader", "hq", "card-reader", NOW)
        w(thdAddProvider, "north-provider", "north", NOW)
        w(thdAddProvider, "south-provider", "south", NOW)
        w(thdAddProvider, "hq-provider", "hq", NOW)
        w(thdSetPolicy, "offline.account", "offline-account", NOW)
        w(thdSetPolicy, "offline.release", "refuse", NOW, site="south")

    def head(self) -> int:
        """The primary's change-log head."""
        return self.primary.read(thdState)[1]

    # -- the network --

    def connect(self, site: SiteFixture, *, settled: bool = True) -> Wire:
        """Connect a new site-side protocol to a new session of the primary."""
        server = self.service.factory().buildProtocol(IPv4Address("TCP", "192.0.2.7", 40000))
        wire = Wire(PrimaryLinkProtocol(site.replication), server, self.clock)
        self.wires.append(wire)
        if settled:
            self.settle()
        return wire

    def connect_raw(self, client: Any) -> Wire:
        """Connect any client protocol (a misbehaving peer) to a new session."""
        server = self.service.factory().buildProtocol(IPv4Address("TCP", "192.0.2.9", 40001))
        wire = Wire(client, server, self.clock)
        self.wires.append(wire)
        return wire

    def settle(self) -> None:
        """Deliver everything and run what is due, until nothing moves."""
        settle(self.clock, self.wires)

    def poll(self) -> None:
        """Let the primary notice its head moved (as its 50 ms poll would), then settle."""
        self.service.poll()
        self.settle()

    def disconnect(self, wire: Wire) -> None:
        """Close a link from the site's end."""
        wire.clientIO.loseConnection()
        self.settle()

    def advance(self, seconds: float, step: float = 0.5) -> None:
        """Move the clock on in steps, delivering what each step sends."""
        target = self.clock.seconds() + seconds
        while self.clock.seconds() < target:
            self.clock.advance(min(step, target - self.clock.seconds()))
            self.settle()

    # -- assertions --

    def assertReplicaMatches(self, site: SiteFixture, passwords: bool = True) -> None:
        """The site's replica holds exactly what the primary has for it (and no secrets)."""
        site_id = self.primary.read(thdSite, site.name).id
        for replicated in REPLICATED:
            name = replicated.table.name
            expected = self.primary.read(table_rows, name, site_id, False)
            if name == "passwords" and not passwords:
                expected = []
            actual = site.store.read(table_rows, name, None, False)
            self.assertEqual(actual, expected, f"table {name} differs at site {site.name}")
        # A secret column exists at the site (same schema) but is never filled.
        self.assertEqual(
            site.store.read(lambda c: c.execute(select(sites.c.token_hash)).scalars().all()),
            [None],
        )
        state = site.state()
        epoch, head = self.primary.read(thdState)
        self.assertEqual((state.epoch, state.position, state.complete), (epoch, head, True))

    def names(self, site: SiteFixture, table: Any, column: str = "name") -> list[str]:
        """One column of a table at the site, sorted."""
        return sorted(
            site.store.read(lambda c: c.execute(select(table.c[column])).scalars().all())
        )

    def synced_north(self, protocol: int | None = None) -> tuple[SiteFixture, Wire]:
        """Sites north and south enrolled, data populated, north connected and online."""
        north = self.add_site("north")
        self.south = self.add_site("south")
        self.populate()
        if protocol is not None:
            north.replication.protocol_version = protocol
        wire = self.connect(north)
        self.assertEqual(north.mode, "online")
        return north, wire


def caught(d: Deferred[Any]) -> Deferred[Any]:
    """Keep an AMP answer's error for ``failureResultOf`` (AMP swallows unhandled ones)."""
    result: Deferred[Any] = Deferred()
    d.addBoth(result.callback)
    return result


def thdSetPrice(conn: Connection, printer: str, price_mono: int, now: float) -> None:
    """Change a printer's mono price (no store function does this yet)."""
    thdUpdate(conn, printers, thdPrinter(conn, printer).id, {"price_mono": price_mono}, now)


def thdRawDeleteUser(conn: Connection, username: str) -> None:
    """Delete a user behind the change log's back (as a restore from backup would)."""
    user = thdUser(conn, username)
    conn.exec_driver_sql("DELETE FROM cards WHERE user_id = ?", (user.id,))
    conn.exec_driver_sql("DELETE FROM passwords WHERE user_id = ?", (user.id,))
    conn.exec_driver_sql("DELETE FROM group_members WHERE user_id = ?", (user.id,))
    conn.exec_driver_sql("DELETE FROM accounts WHERE id = ?", (user.account_id,))
    conn.exec_driver_sql("DELETE FROM users WHERE id = ?", (user.id,))


# -- 1. snapshot ----------------------------------------------------------------------


class SnapshotTests(ReplicationTestCase):
    """A fresh site loads a snapshot of exactly what belongs to it."""

    def test_fresh_site_gets_its_data_and_nothing_else(self) -> None:
        north = self.add_site("north")
        self.add_site("south")
        self.populate()
        self.assertEqual(north.mode, "unsynced")
        wire = self.connect(north)
        self.assertFalse(wire.closed)
        self.assertReplicaMatches(north)
        self.assertEqual(self.names(north, sites), ["north"])
        self.assertEqual(self.names(north, devices), ["north-mfd", "north-reader"])
        self.assertEqual(self.names(north, providers), ["north-provider"])
        self.assertEqual(self.names(north, printers), ["hq-laser", "north-laser", "south-laser"])
        self.assertEqual(self.names(north, users, "username"), ["alice", "bob"])
        self.assertEqual(len(north.store.read(table_rows, "passwords")), 2)
        self.assertEqual(
            self.names(north, accounts), ["Library", "Offline Account", "Suspense", "alice", "bob"]
        )
        self.assertEqual(self.names(north, settings_table, "key"), ["currency", "decimals"])
        self.assertEqual(len(north.store.read(table_rows, "policies")), 2)
        # The shadow tables are emptied after the swap.
        for shadow in SHADOW.values():
            self.assertEqual(north.store.read(lambda c, t=shadow: c.execute(select(t)).all()), [])
        self.assertEqual(north.modes(), ["unsynced", "syncing", "online"])
        events = north.observer.names()
        self.assertEqual(events[:2], ["connected", "syncing"])
        self.assertLess(events.index("snapshotLoaded"), events.index("caughtUp"))
        self.assertEqual(wire.client.hello["resnapshot"], "the site has no complete replica")
        link = self.primary.read(thdLink, "north")
        self.assertTrue(link.connected)
        self.assertEqual(link.address, "192.0.2.7:40000")
        self.assertEqual(list(self.service.sessions), ["north"])

    def _big_snapshot(self, protocol: int) -> None:
        north = self.add_site("north")
        self.add_site("south")
        self.populate()
        self.primary.write(
            thdImportUsers,
            [
                NewUser(
                    f"user{i:05d}",
                    full_name=f"User Number {i}",
                    email=f"u{i}@example.org",
                    balance=i,
                    cards=(f"{900000 + i}",),
                )
                for i in range(3000)
            ],
            NOW,
        )
        north.replication.protocol_version = protocol
        pages: list[bytes] = []
        real_unpack = codec.unpack

        def unpack(value: bytes, version: int) -> list[Any]:
            self.assertEqual(version, protocol)
            pages.append(value)
            return real_unpack(value, version)

        self.patch(site_module.codec, "unpack", unpack)
        loads: list[tuple[str, int]] = []
        real_load = site_module.thdLoadShadow

        def load(conn: Connection, table: str, columns: Any, rows: Any) -> int:
            loads.append((table, len(rows)))
            return real_load(conn, table, columns, rows)

        self.patch(site_module, "thdLoadShadow", load)
        self.connect(north)
        self.assertReplicaMatches(north)
        self.assertEqual(len(self.names(north, users, "username")), 3002)
        self.assertEqual(north.mode, "online")
        user_pages = [n for table, n in loads if table == "users"]
        self.assertGreater(len(user_pages), 1)
        self.assertEqual(sum(user_pages), 3002)
        self.assertTrue(all(len(p) <= codec.MAX_VALUE for p in pages))
        compressed = [p[:1] != b"[" for p in pages]
        self.assertEqual(set(compressed), {protocol >= codec.COMPRESSED_FROM})

    def test_site_leaving_mid_snapshot_frees_the_primary(self) -> None:
        north = self.add_site("north")
        self.add_site("south")
        self.populate()
        self.primary.write(thdImportUsers, [NewUser(f"user{i:05d}") for i in range(3000)], NOW)
        reads: list[str] = []
        real_next_rows = Snapshot.next_rows

        def next_rows(snapshot: Snapshot) -> Any:
            chunk = real_next_rows(snapshot)
            reads.append("end" if chunk is None else chunk[0])
            return chunk

        self.patch(Snapshot, "next_rows", next_rows)
        wire = self.connect(north, settled=False)
        while not (wire.client._snapshot and wire.client._snapshot["rows"]):
            wire.pump()
        session = wire.server
        read_at_close: list[int] = []
        real_lost = session.connectionLost

        def connectionLost(reason: Any) -> None:
            read_at_close.append(len(reads))
            real_lost(reason)

        session.connectionLost = connectionLost
        self.disconnect(wire)
        gc.collect()  # a dropped Deferred holding an error would be logged now
        # Once it sees the close, the primary reads no more of the snapshot and frees
        # its slot for another site.
        self.assertLessEqual(len(reads) - read_at_close[0], 1)
        self.assertNotIn("end", reads)
        self.assertEqual(self.service.snapshots.tokens, MAX_SNAPSHOTS)
        self.assertEqual(self.service.sessions, {})
        wire = self.connect(north)
        self.assertReplicaMatches(north)

    def test_many_pages_protocol_1(self) -> None:
        self._big_snapshot(1)

    def test_many_pages_protocol_2(self) -> None:
        self._big_snapshot(2)


# -- 2. stream ------------------------------------------------------------------------


class StreamTests(ReplicationTestCase):
    """Once synced, changes at the primary reach the site after the next poll."""

    def test_changes_reach_the_site(self) -> None:
        north, wire = self.synced_north()
        w = self.primary.write
        w(thdAddUser, "carol", NOW, balance=75)
        w(thdAddCard, "carol", "3003", NOW)
        w(thdPost, w(thdAccount, "alice").id, -150, "print", NOW, site="north")
        w(thdSetPrice, "north-laser", 9, NOW)
        w(thdSetPolicy, "offline.allowance", "5.00", NOW)
        w(thdRemoveUser, "bob", NOW)
        w(thdRemoveDevice, "north-reader", NOW)
        w(thdAddDevice, "south-kiosk", "south", "http", NOW)  # not for north
        self.poll()
        self.assertFalse(wire.closed)
        self.assertReplicaMatches(north)
        self.assertEqual(self.names(north, users, "username"), ["alice", "carol"])
        self.assertEqual(
            north.store.read(
                lambda c: c.execute(
                    select(printers.c.price_mono).where(printers.c.name == "north-laser")
                ).scalar()
            ),
            9,
        )
        alice = north.store.read(thdUser, "alice")
        self.assertEqual(alice.balance, 850)
        self.assertEqual(north.mode, "online")
        self.assertEqual(north.observer.events[-1], ("caughtUp", (self.head(),)))

    def test_writes_from_another_process_arrive(self) -> None:
        north, _wire = self.synced_north()
        admin = Store(self.primary_url)  # what sitesrv-admin opens, in its own process
        self.addCleanup(admin.stop)
        admin.write(thdAddUser, "dave", NOW, balance=5)
        admin.write(thdAddCard, "dave", "4004", NOW)
        self.settle()
        self.assertNotIn("dave", self.names(north, users, "username"))
        self.poll()
        self.assertIn("dave", self.names(north, users, "username"))
        self.assertReplicaMatches(north)

    def test_polls_without_changes_cost_nothing(self) -> None:
        north, wire = self.synced_north()
        self.poll()  # the service's first look at the head
        batches: list[bytes] = []
        self.patch(site_module.codec, "unpack", lambda value, _v: batches.append(value) or [])
        events = len(north.observer.events)
        for _ in range(3):
            self.service.poll()
            self.assertIsNone(wire.serverIO.getOutBuffer())  # not even a Poke
            self.settle()
        self.assertEqual(batches, [])
        self.assertEqual(len(north.observer.events), events)

    def test_many_changes_arrive_in_several_batches(self) -> None:
        north, _wire = self.synced_north(protocol=1)
        self.primary.write(
            thdImportUsers, [NewUser(f"bulk{i:05d}", full_name="x" * 50) for i in range(1500)], NOW
        )
        batches: list[int] = []
        real_unpack = codec.unpack

        def unpack(value: bytes, version: int) -> list[Any]:
            items = real_unpack(value, version)
            batches.append(len(items))
            return items

        self.patch(site_module.codec, "unpack", unpack)
        self.poll()
        self.assertGreater(len(batches), 1)
        self.assertEqual(sum(batches), 3000)
        self.assertReplicaMatches(north)
        # The import wrote 500 users (and their accounts) per transaction; batches are
        # cut by size, but the site applies each transaction whole.
        applied = [args[0] for name, args in north.observer.events if name == "changesApplied"]
        self.assertEqual(sum(applied), 3000)
        self.assertTrue(all(count % 1000 == 0 for count in applied), applied)


# -- 3. resume ------------------------------------------------------------------------


class ResumeTests(ReplicationTestCase):
    """A site that reconnects resumes from its position without a snapshot."""

    def test_reconnect_resumes(self) -> None:
        north, wire = self.synced_north()
        self.disconnect(wire)
        self.assertTrue(wire.closed)
        self.assertEqual(north.mode, "offline")
        self.assertFalse(self.primary.read(thdLink, "north").connected)
        self.assertEqual(self.service.sessions, {})
        position = north.state().position
        self.primary.write(thdAddUser, "erin", NOW)
        self.primary.write(thdRemoveUser, "bob", NOW)
        cleared: list[object] = []
        self.patch(site_module, "thdClearShadow", lambda conn: cleared.append(conn))
        events = len(north.observer.events)
        wire = self.connect(north)
        self.assertEqual(wire.client.hello["resnapshot"], "")
        self.assertEqual(cleared, [])
        new_events = north.observer.names()[events:]
        self.assertNotIn("syncing", new_events)
        self.assertNotIn("snapshotLoaded", new_events)
        self.assertIn("changesApplied", new_events)
        self.assertGreater(north.state().position, position)
        self.assertReplicaMatches(north)
        self.assertEqual(north.modes()[-4:], ["offline", "reconciling", "syncing", "online"])
        self.assertTrue(self.primary.read(thdLink, "north").connected)

    def test_new_connection_replaces_the_old_session(self) -> None:
        north, old = self.synced_north()
        new = self.connect(north)
        self.assertTrue(old.closed)
        self.assertFalse(new.closed)
        self.assertIs(self.service.sessions["north"], new.server)
        # The old session's close did not mark the live link as down.
        self.assertTrue(self.primary.read(thdLink, "north").connected)


# -- 4. re-snapshot -------------------------------------------------------------------


class ResnapshotTests(ReplicationTestCase):
    """A site whose position cannot be resumed loads a new snapshot, serving meanwhile."""

    def _reconnect_resnapshots(self, north: SiteFixture, why: str) -> Wire:
        before = north.store.read(table_rows, "users")
        wire = self.connect(north, settled=False)
        # Step by step: until the swap, the old replica keeps serving unchanged.
        loaded_shadow = False
        for _ in range(10_000):
            if "snapshotLoaded" in north.observer.names()[-3:]:
                break
            self.assertEqual(north.store.read(table_rows, "users"), before)
            self.assertTrue(north.failover.serving(), north.mode)
            shadow_users = north.store.read(lambda c: c.execute(select(SHADOW["users"])).all())
            loaded_shadow = loaded_shadow or bool(shadow_users)
            wire.pump()
        self.assertTrue(loaded_shadow)
        self.settle()
        self.assertIn(why, wire.client.hello["resnapshot"])
        self.assertReplicaMatches(north)
        self.assertEqual(north.mode, "online")
        return wire

    def test_trimmed_past_the_site(self) -> None:
        north, wire = self.synced_north()
        self.disconnect(wire)
        self.primary.write(thdRemoveUser, "bob", NOW)
        self.primary.write(thdAddUser, "frank", NOW)
        self.primary.write(thdTrim, self.head())
        self._reconnect_resnapshots(north, "trimmed past the site's position")
        self.assertEqual(self.names(north, users, "username"), ["alice", "frank"])

    def test_trimmed_up_to_the_site_resumes(self) -> None:
        north, wire = self.synced_north()
        self.disconnect(wire)
        self.primary.write(thdTrim, north.state().position)
        self.primary.write(thdRemoveUser, "bob", NOW)
        wire = self.connect(north)
        self.assertEqual(wire.client.hello["resnapshot"], "")
        self.assertReplicaMatches(north)

    def test_new_epoch(self) -> None:
        north, wire = self.synced_north()
        self.disconnect(wire)
        # Restored from a backup that predates bob; `sitesrv-admin db restored`.
        self.primary.write(thdRawDeleteUser, "bob")
        self.primary.write(thdNewEpoch)
        self._reconnect_resnapshots(north, "new epoch")
        self.assertEqual(self.names(north, users, "username"), ["alice"])

    def test_site_ahead_of_the_head(self) -> None:
        north, wire = self.synced_north()
        self.disconnect(wire)
        head = self.head()
        north.store.write(lambda c: c.execute(update(replica_state).values(position=head + 5)))
        self._reconnect_resnapshots(north, f"ahead of the primary's head {head}")
        self.assertEqual(north.state().position, head)


# -- 5. duplicate and out-of-order rows -----------------------------------------------


class ApplyTests(ReplicationTestCase):
    """Applying changes is idempotent: rows at or below the position are ignored."""

    def test_old_and_repeated_changes_change_nothing(self) -> None:
        north, wire = self.synced_north()
        self.disconnect(wire)
        start = north.state().position
        self.primary.write(thdAddUser, "gina", NOW, balance=10)
        self.primary.write(thdRemoveUser, "bob", NOW)
        self.primary.write(thdAddCard, "gina", "5005", NOW)
        changes, upto, limited = self.primary.read(thdChangesSince, start, 1000, (None, "north"))
        self.assertFalse(limited)
        self.assertGreater(len(changes), 5)
        # The first half, then a batch overlapping it through to the end.
        half = len(changes) // 2
        first = north.store.write(thdApplyChanges, changes[:half], changes[half - 1].position)
        self.assertEqual(first, changes[half - 1].position)
        self.assertEqual(north.store.write(thdApplyChanges, changes[half - 2 :], upto), upto)
        self.assertReplicaMatches(north)
        before = {r.table.name: north.store.read(table_rows, r.table.name) for r in REPLICATED}
        # Everything again, and the overlapping batch again: nothing changes.
        self.assertEqual(north.store.write(thdApplyChanges, changes, upto), upto)
        self.assertEqual(north.store.write(thdApplyChanges, changes[half - 2 :], upto), upto)
        # An old image of alice, at a position already applied, does not win.
        alice = north.store.read(thdUser, "alice")
        image = dict(north.store.read(lambda c: c.execute(select(users)).mappings().first()))
        self.assertEqual(image["username"], "alice")
        stale = Change(start, "users", alice.id, "upsert", {**image, "disabled": True}, None, 1)
        gone = Change(start - 1, "users", alice.id, "delete", None, None, 1)
        self.assertEqual(north.store.write(thdApplyChanges, [stale, gone], upto), upto)
        # A lower "upto" never moves the position back.
        self.assertEqual(north.store.write(thdApplyChanges, [], start), upto)
        after = {r.table.name: north.store.read(table_rows, r.table.name) for r in REPLICATED}
        self.assertEqual(after, before)
        self.assertFalse(north.store.read(thdUser, "alice").disabled)
        self.assertEqual(north.state().position, upto)


# -- 6. heartbeats --------------------------------------------------------------------


class HeartbeatTests(ReplicationTestCase):
    """A silent peer is dropped after three intervals; any bytes are proof of life."""

    def test_heartbeats_keep_an_idle_link_up(self) -> None:
        north, wire = self.synced_north()
        self.advance(30 * BEAT)
        self.assertFalse(wire.closed)
        self.assertEqual(north.mode, "online")

    def test_heartbeats_carry_the_outbox_size(self) -> None:
        """The site's heartbeats tell the primary how many outbox records wait (counted
        off the reactor thread at each heartbeat, sent with the next one)."""
        north, wire = self.synced_north()
        self.advance(2 * BEAT)
        self.assertEqual(wire.server.outbox_pending, 0)
        # Recorded behind the link's back (no outboxChanged): it stays pending.
        record = {"uuid": str(uuidlib.uuid4()), "kind": "charge", "amount": -1}
        north.store.write(outbox.thdRecord, record, NOW)
        self.advance(2 * BEAT)
        self.assertEqual(wire.server.outbox_pending, 1)

    def test_site_drops_a_silent_primary(self) -> None:
        north, wire = self.synced_north()
        wire.to_client = False  # the primary's bytes stop arriving
        self.advance(2.5 * BEAT)
        self.assertFalse(wire.closed)
        self.assertEqual(north.mode, "online")
        # Dropped within a quarter interval of the third silent one.
        self.advance(0.75 * BEAT)
        self.assertTrue(wire.closed)
        self.assertEqual(north.mode, "offline")
        last = north.failover.core.history[0]
        self.assertEqual(last.input, "heartbeatMissed")
        self.assertIn("peer silent", last.reason)
        self.assertEqual(north.observer.names()[-2:], ["heartbeatMissed", "lost"])
        self.assertEqual(self.service.sessions, {})
        self.assertFalse(self.primary.read(thdLink, "north").connected)

    def test_dropped_at_three_intervals_not_at_the_next_check(self) -> None:
        """Silence is checked four times an interval, and once more exactly when three
        intervals of it are reached: the drop is not up to a quarter interval late."""
        north, wire = self.synced_north()
        self.advance(0.1 * BEAT, step=0.1 * BEAT)
        # The primary's last bytes arrive out of step with the site's periodic checks.
        wire.server.notify(Poke, head=north.state().position)
        self.settle()
        wire.to_client = False
        last = wire.client.lastReceived
        self.assertEqual(last, self.clock.seconds())
        while not wire.closed:
            self.advance(0.01 * BEAT, step=0.01 * BEAT)
        silence = self.clock.seconds() - last
        self.assertGreaterEqual(silence, 3 * BEAT)
        self.assertLessEqual(silence, 3 * BEAT + 0.011 * BEAT)
        self.assertEqual(north.mode, "offline")

    def test_primary_drops_a_silent_site(self) -> None:
        north, wire = self.synced_north()
        wire.to_server = False  # the site's bytes stop arriving
        self.advance(2.5 * BEAT)
        self.assertFalse(wire.closed)
        self.assertIn("north", self.service.sessions)
        self.advance(0.75 * BEAT)
        self.assertTrue(wire.closed)
        self.assertEqual(self.service.sessions, {})
        self.assertIn("peer silent", wire.server.dropReason)
        self.assertFalse(self.primary.read(thdLink, "north").connected)
        self.assertEqual(north.mode, "offline")
        self.assertEqual(north.observer.names()[-1], "lost")

    def test_any_bytes_are_proof_of_life(self) -> None:
        north, wire = self.synced_north()
        session = wire.server
        session.stopHeartbeat()  # the primary sends no heartbeats: only a slow message
        session.notify(Poke, head=north.state().position)
        message = wire.serverIO.getOutBuffer()
        wire.to_client = False
        # One byte every 2 s: the message takes far longer than 3 intervals to arrive.
        for i in range(len(message)):
            self.advance(2 * BEAT)
            wire.clientIO.bufferReceived(message[i : i + 1])
        self.assertGreater(len(message) * 2 * BEAT, 10 * 3 * BEAT)
        self.assertFalse(wire.closed)
        self.assertEqual(north.mode, "online")
        self.advance(4 * BEAT)
        self.assertTrue(wire.closed)
        self.assertEqual(north.mode, "offline")

    def test_a_wall_clock_step_does_not_drop_the_link(self) -> None:
        ticks = [0.0]
        north = self.add_site("north")
        self.add_site("south")
        self.populate()
        north.replication.monotonic = lambda: ticks[0]
        self.service.monotonic = lambda: ticks[0]
        wire = self.connect(north)
        # The wall clock jumps an hour while one second really passes.
        ticks[0] += 1.0
        self.clock.advance(3600)
        self.settle()
        self.assertFalse(wire.closed)
        self.assertEqual(north.mode, "online")


# -- 7. protocol versions -------------------------------------------------------------


class VersionTests(ReplicationTestCase):
    """The primary accepts its protocol and the previous one, and refuses others."""

    def test_previous_protocol_gets_uncompressed_batches(self) -> None:
        north, wire = self.synced_north(protocol=1)
        self.assertReplicaMatches(north)
        self.assertEqual(wire.server.protocol_version, 1)
        self.assertEqual(self.primary.read(thdLink, "north").protocol_version, 1)
        self.primary.write(thdAddUser, "hank", NOW)
        self.poll()
        self.assertReplicaMatches(north)
        # What the primary sends a version-1 site is plain JSON.
        answer = wire.client.callRemote(GetChanges, after=0)
        self.settle()
        batch = self.successResultOf(answer)["batch"]
        self.assertIsInstance(json.loads(batch), list)
        self.assertEqual(codec.unpack(batch, 1), json.loads(batch))

    def test_current_protocol_gets_compressed_batches(self) -> None:
        _north, wire = self.synced_north()
        answer = wire.client.callRemote(GetChanges, after=0)
        self.settle()
        batch = self.successResultOf(answer)["batch"]
        self.assertTrue(codec.unpack(batch, 2))
        self.assertEqual(json.loads(zlib.decompress(batch)), codec.unpack(batch, 2))

    def _refused_version(self, version: int) -> None:
        north = self.add_site("north")
        self.add_site("south")
        self.populate()
        north.replication.protocol_version = version
        wire = self.connect(north)
        self.assertTrue(wire.closed)
        self.assertEqual(north.observer.names(), ["refused"])
        reason = north.observer.events[0][1][0]
        self.assertIn(f"protocol {version}", reason)
        accepted = f"{sitesrv.PROTOCOL_VERSION} and {sitesrv.PROTOCOL_VERSION - 1}"
        self.assertIn(f"accepts protocol {accepted}", reason)
        self.assertEqual(north.mode, "unsynced")
        self.assertEqual(self.service.sessions, {})
        self.assertIsNone(self.primary.read(thdLink, "north"))
        self.assertFalse(north.state().complete)

    def test_protocol_0_refused(self) -> None:
        self._refused_version(0)

    def test_newer_protocol_refused(self) -> None:
        self._refused_version(sitesrv.PROTOCOL_VERSION + 1)

    def test_version_refused_with_a_replica_goes_offline(self) -> None:
        north, wire = self.synced_north()
        self.disconnect(wire)
        north.replication.protocol_version = sitesrv.PROTOCOL_VERSION + 1
        wire = self.connect(north)
        self.assertTrue(wire.closed)
        self.assertEqual(north.mode, "offline")
        self.assertIn("accepts protocol", north.observer.inner.problems[0])


# -- 8. enrolment ---------------------------------------------------------------------


class EnrolmentTests(ReplicationTestCase):
    """Unknown sites, wrong tokens and revoked sites are refused, with a clear reason."""

    def _refused(self, site: SiteFixture, message: str, mode: str = "offline") -> None:
        wire = self.connect(site)
        self.assertTrue(wire.closed)
        self.assertIsNone(wire.client.hello)
        self.assertIn(message, site.observer.inner.problems[0])
        self.assertEqual(site.mode, mode)
        self.assertNotIn(site.name, self.service.sessions)

    def test_bad_token(self) -> None:
        north, wire = self.synced_north()
        self.disconnect(wire)
        north.set_token("not-the-token")
        self._refused(north, "wrong enrolment token for site 'north'")
        self.assertEqual(north.observer.names()[-1], "refused")

    def test_token_of_another_site(self) -> None:
        north, wire = self.synced_north()
        self.disconnect(wire)
        south_token = self.south.token()
        north.set_token(south_token)
        self._refused(north, "the token belongs to site 'south', not 'north'")

    def test_unknown_site(self) -> None:
        west = SiteFixture(self, "west", "whatever")
        self._refused(west, "no site named 'west' is enrolled", mode="unsynced")

    def test_primary_name_is_not_a_site(self) -> None:
        hq = SiteFixture(self, "hq", "whatever")
        self._refused(hq, "no site named 'hq' is enrolled", mode="unsynced")

    def test_missing_token_file(self) -> None:
        north = self.add_site("north")
        os.remove(north.token_file)
        self._refused(north, "cannot read the enrolment token", mode="unsynced")

    def test_revoked_site_refused(self) -> None:
        north, wire = self.synced_north()
        self.disconnect(wire)
        self.primary.write(thdRevokeSite, "north", NOW)
        self._refused(north, "site 'north' has been revoked", mode="revoked")
        self.assertEqual(north.failover.refusal(), "site revoked by the primary")

    def test_revoked_while_connected_then_rotated(self) -> None:
        north, wire = self.synced_north()
        south_wire = self.connect(self.south)
        self.primary.write(thdRevokeSite, "north", NOW)
        self.poll()
        self.assertTrue(wire.closed)
        self.assertEqual(north.mode, "revoked")
        self.assertEqual(north.failover.refusal(), "site revoked by the primary")
        self.assertFalse(north.state().complete)  # a restart must not serve from it
        self.assertEqual(wire.server.dropReason, "revoked")
        self.assertFalse(south_wire.closed)
        self.assertEqual(list(self.service.sessions), ["south"])
        # Reconnecting with the old token is refused, and the site stays revoked.
        self._refused(north, "revoked", mode="revoked")
        token = self.primary.write(thdRotateToken, "north", NOW)
        self._refused(north, "wrong enrolment token", mode="revoked")
        north.set_token(token)
        wire = self.connect(north)
        self.assertFalse(wire.closed)
        self.assertEqual(north.mode, "online")
        # Revocation made the replica untrusted: it serves again once a new snapshot is in.
        self.assertEqual(north.modes()[-4:], ["revoked", "unsynced", "syncing", "online"])
        self.assertEqual(wire.client.hello["resnapshot"], "the site has no complete replica")
        self.assertReplicaMatches(north)


# -- 9. malformed and oversized input --------------------------------------------------


class FakePrimary(amp.AMP):
    """A primary that accepts any hello, then misbehaves as a test tells it to."""

    def __init__(self, batch: bytes = b"[]", resnapshot: str = "") -> None:
        super().__init__()
        self.batch = batch
        self.resnapshot = resnapshot

    @Hello.responder
    def hello(self, **kw: Any) -> dict[str, Any]:
        return {
            "primary": "fake",
            "software_version": "0",
            "protocol_version": kw["protocol_version"],
            "primary_time": 0.0,
            "epoch": "e",
            "head": 10,
            "heartbeat": BEAT,
            "resnapshot": self.resnapshot,
        }

    @GetChanges.responder
    def getChanges(self, after: int) -> dict[str, Any]:
        return {"batch": self.batch, "upto": 10, "limited": False, "head": 10}

    @BeginSnapshot.responder
    def beginSnapshot(self) -> dict[str, Any]:
        return {"snapshot": "s1", "epoch": "e", "position": 10}


class MalformedInputTests(ReplicationTestCase):
    """Bad input closes only the offending connection; the primary serves on."""

    def assertStillServes(self, north: SiteFixture, wire: Wire) -> None:
        self.primary.write(thdAddUser, f"u{len(self.wires)}", NOW)
        self.poll()
        self.assertFalse(wire.closed)
        self.assertReplicaMatches(north)

    def test_garbage_bytes(self) -> None:
        north, good = self.synced_north()
        bad = self.connect_raw(Protocol())
        bad.clientIO.write(bytes(random.Random(1).randbytes(4096)))
        bad.clientIO.write(b"\xff" * 10)
        self.settle()
        self.assertTrue(bad.closed)
        self.assertStillServes(north, good)

    def test_box_without_a_command(self) -> None:
        north, good = self.synced_north()
        bad = self.connect_raw(Protocol())
        bad.clientIO.write(amp.AmpBox({b"hello": b"world"}).serialize())
        self.settle()
        self.assertTrue(bad.closed)
        self.assertEqual(len(bad.errors), 1)
        self.assertTrue(bad.errors[0].check(amp.NoEmptyBoxes))
        self.assertStillServes(north, good)

    def test_value_over_64_kib(self) -> None:
        north, good = self.synced_north()
        bad = self.connect_raw(Protocol())
        # A Hello whose token is 70,000 bytes: AMP's 16-bit length cannot say so, and
        # the bytes past 65,535 are then read as an over-long key.
        token = b"t" * 70_000
        box = amp.AmpBox({b"_command": b"Hello", b"_ask": b"1", b"site": b"north"}).serialize()
        bad.clientIO.write(box[:-2] + b"\x00\x05token\xff\xff" + token + b"\x00\x00")
        self.settle()
        self.assertTrue(bad.closed)
        self.assertStillServes(north, good)
        self.assertEqual(list(self.service.sessions), ["north"])

    def test_get_changes_before_hello(self) -> None:
        north, good = self.synced_north()
        client = amp.AMP()
        bad = self.connect_raw(client)
        answer = caught(client.callRemote(GetChanges, after=0))
        self.settle()
        self.failureResultOf(answer, NotAuthenticated)
        self.assertTrue(bad.closed)
        client = amp.AMP()
        bad = self.connect_raw(client)
        answer = caught(client.callRemote(BeginSnapshot))
        self.settle()
        self.failureResultOf(answer, NotAuthenticated)
        self.assertTrue(bad.closed)
        self.assertStillServes(north, good)

    def test_hello_twice(self) -> None:
        north, wire = self.synced_north()
        answer = caught(
            wire.client.callRemote(
                Hello,
                site="north",
                token=north.token(),
                software_version="x",
                protocol_version=2,
                site_time=0.0,
                epoch="",
                position=0,
                complete=False,
            )
        )
        self.settle()
        self.failureResultOf(answer, ProtocolViolation)
        self.assertTrue(wire.closed)

    def test_malformed_batches_raise_protocol_violation(self) -> None:
        for protocol in (1, 2):
            for junk in (b"", b"junk", b'{"a": 1}', b"\x78\x9c garbage", b"\xff\xfe"):
                self.assertRaises(ProtocolViolation, codec.unpack, junk, protocol)
        self.assertRaises(ProtocolViolation, codec.unpack, zlib.compress(b"{}"), 2)
        bomb = zlib.compress(b"[" + b" " * (codec.MAX_DECODED + 10) + b"]", 9)
        self.assertLess(len(bomb), codec.MAX_VALUE)
        self.assertRaises(ProtocolViolation, codec.unpack, bomb, 2)
        # Just under the limit is fine.
        fine = zlib.compress(b"[" + b" " * (codec.MAX_DECODED - 2) + b"]", 9)
        self.assertEqual(codec.unpack(fine, 2), [])

    def _site_against(self, primary: FakePrimary) -> tuple[SiteFixture, Wire]:
        north = SiteFixture(self, "north", "token")
        wire = Wire(PrimaryLinkProtocol(north.replication), primary, self.clock)
        self.wires.append(wire)
        self.settle()
        return north, wire

    def test_site_closes_on_a_malformed_batch(self) -> None:
        for batch in (b"junk", zlib.compress(b"[[1,2]]"), zlib.compress(b"{}")):
            north, wire = self._site_against(FakePrimary(batch=batch))
            self.assertTrue(wire.closed)
            self.assertIn("malformed", wire.client._closedReason)
            self.assertEqual(north.observer.names()[-1], "lost")
            self.assertEqual(north.state().position, 0)

    def test_site_closes_on_a_zip_bomb(self) -> None:
        bomb = zlib.compress(b"[" + b"0," * (codec.MAX_DECODED // 2) + b"0]", 9)
        north, wire = self._site_against(FakePrimary(batch=bomb))
        self.assertTrue(wire.closed)
        self.assertIn("beyond the size limit", wire.client._closedReason)
        self.assertEqual(north.state().position, 0)

    def test_site_closes_on_a_malformed_snapshot_page(self) -> None:
        primary = FakePrimary(resnapshot="test")
        north, wire = self._site_against(primary)
        self.assertFalse(wire.closed)
        page = caught(
            primary.callRemote(
                SnapshotPage,
                snapshot="s1",
                seq=0,
                table="users",
                columns=["id"],
                page=b"junk",
                last=False,
            )
        )
        self.settle()
        self.failureResultOf(page, ProtocolViolation)
        self.assertTrue(wire.closed)
        self.assertFalse(north.state().complete)

    def test_site_refuses_a_page_of_an_unknown_snapshot(self) -> None:
        primary = FakePrimary(resnapshot="test")
        north, wire = self._site_against(primary)
        page = caught(
            primary.callRemote(
                SnapshotPage,
                snapshot="other",
                seq=0,
                table="",
                columns=[],
                page=b"[]",
                last=True,
            )
        )
        self.settle()
        self.failureResultOf(page, ProtocolViolation)
        self.assertTrue(wire.closed)
        self.assertFalse(north.state().complete)


# -- 10. codec property ---------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30)
)
#: Rows as replication sends them: lists of JSON values, some large (repeated or random
#: text, so that batches both compress well and do not, and need splitting).
rows = st.lists(
    st.one_of(
        st.lists(json_scalars, max_size=8),
        st.tuples(st.text(min_size=1, max_size=8), st.integers(1, 500)).map(
            lambda t: [t[0] * t[1]]
        ),
        st.integers(0, 2**32).map(lambda seed: [random.Random(seed).randbytes(9000).hex()]),
        st.dictionaries(st.text(max_size=10), json_scalars, max_size=5).map(lambda d: [d]),
    ),
    max_size=40,
)


class CodecTests(SynchronousTestCase):
    """``pack`` splits batches to fit AMP; ``unpack`` gives back exactly what was packed."""

    @settings(max_examples=150, deadline=None)
    @given(rows, st.sampled_from([1, 2]))
    def test_round_trip(self, items: list[Any], protocol: int) -> None:
        values = codec.pack(items, protocol)
        self.assertTrue(values)
        self.assertTrue(all(len(v) <= codec.MAX_VALUE for v in values))
        decoded = [item for v in values for item in codec.unpack(v, protocol)]
        self.assertEqual(decoded, items)
        if items:
            self.assertTrue(all(codec.unpack(v, protocol) for v in values))

    def test_large_batches_split(self) -> None:
        rnd = random.Random(7)
        items = [[i, rnd.randbytes(2000).hex()] for i in range(200)]
        for protocol in (1, 2):
            values = codec.pack(items, protocol)
            self.assertGreater(len(values), 5)
            self.assertTrue(all(len(v) <= codec.MAX_VALUE for v in values))
            self.assertEqual([i for v in values for i in codec.unpack(v, protocol)], items)

    def test_one_item_too_large(self) -> None:
        # Random hex compresses to about half: 160,000 characters stay over 60,000 bytes.
        item = [random.Random(3).randbytes(80_000).hex()]
        for protocol in (1, 2):
            self.assertRaises(ValueError, codec.pack, [item], protocol)
            self.assertRaises(ValueError, codec.pack_json, [json.dumps(item)], protocol)

    @settings(max_examples=150, deadline=None)
    @given(rows, st.sampled_from([1, 2]), st.booleans())
    def test_json_texts_arrive_as_their_items(
        self, items: list[Any], protocol: int, ascii: bool
    ) -> None:
        """Items stored as JSON text (the outbox's records) are sent without decoding;
        the receiver's ``unpack`` gives back exactly the items, in order."""
        texts = [json.dumps(item, separators=(",", ":"), ensure_ascii=ascii) for item in items]
        values = codec.pack_json(texts, protocol)
        self.assertTrue(values)
        self.assertTrue(all(len(v) <= codec.MAX_VALUE for v in values))
        decoded = [item for v in values for item in codec.unpack(v, protocol)]
        self.assertEqual(decoded, [json.loads(t) for t in texts])

    def test_json_texts_compressed_once(self) -> None:
        """A backlog of records is cut into values by the ratio the last one achieved:
        each is compressed once, and values are nearly full."""
        texts = [
            json.dumps(
                {
                    "uuid": str(uuidlib.UUID(int=random.Random(i).getrandbits(128))),
                    "seq": i,
                    "username": f"user{i % 1000}",
                    "amount": -10,
                }
            )
            for i in range(20_000)
        ]
        calls: list[int] = []
        compress = zlib.compress

        def counting(data: bytes, level: int = -1) -> bytes:
            calls.append(len(data))
            return compress(data, level)

        self.patch(codec.zlib, "compress", counting)
        values = codec.pack_json(texts, 2)
        self.assertEqual(len(calls), len(values))
        self.assertGreater(len(values), 3)
        self.assertTrue(all(len(v) <= codec.MAX_VALUE for v in values))
        # All but the first (a guess) and the last (the rest) are at least 3/4 full.
        self.assertTrue(all(len(v) > 0.75 * codec.MAX_VALUE for v in values[1:-1]))
        self.assertEqual(
            [i for v in values for i in codec.unpack(v, 2)], [json.loads(t) for t in texts]
        )

    def test_json_texts_compressing_worse_than_before(self) -> None:
        """Texts that compress well, then texts that do not: a value that comes out too
        large is made again with fewer texts, and every value fits."""
        rnd = random.Random(5)
        texts = [json.dumps("a" * 2000) for _ in range(300)]
        texts += [json.dumps(rnd.randbytes(1000).hex()) for _ in range(300)]
        values = codec.pack_json(texts, 2)
        self.assertTrue(all(len(v) <= codec.MAX_VALUE for v in values))
        self.assertEqual(
            [i for v in values for i in codec.unpack(v, 2)], [json.loads(t) for t in texts]
        )


# -- 10b. outbox submission ------------------------------------------------------------


def thdSiteLedger(conn: Connection, site: str) -> list[str]:
    """The UUIDs of the primary's transactions from ``site``, in the order applied."""
    q = select(transactions.c.uuid).where(transactions.c.site == site)
    return list(conn.execute(q.order_by(transactions.c.id)).scalars())


class OutboxTests(ReplicationTestCase):
    """A site's outbox reaches the primary's ledger exactly once and in order, however
    its batches are grouped on the way, whatever fails."""

    def setUp(self) -> None:
        super().setUp()
        # Small rounds, so that a few hundred records make several.
        self.patch(site_module, "DRAIN_RECORDS", 40)
        self.north, self.wire = self.synced_north()
        #: The records of each thdApplyOutbox the primary started, in order.
        self.applied: list[int] = []
        #: Applications held back (while ``holding``) until the test fires them.
        self.held: list[Deferred[None]] = []
        self.holding = False
        run_write = self.primary.runWrite

        def runWrite(fn: Any, *args: Any, **kwargs: Any) -> Deferred[Any]:
            if fn is not outbox.thdApplyOutbox:
                return run_write(fn, *args, **kwargs)
            self.applied.append(len(args[1]))
            if not self.holding:
                return run_write(fn, *args, **kwargs)
            # Held as a busy writer would hold it, until the test releases it.
            gate: Deferred[None] = Deferred()
            gate.addCallback(lambda _: run_write(fn, *args, **kwargs))
            self.held.append(gate)
            return gate

        self.patch(self.primary, "runWrite", runWrite)

    def charge(self, count: int) -> list[str]:
        """``count`` charges of 0.01 for bob recorded at the site behind the link's back;
        their transaction UUIDs in order."""
        user = self.north.store.read(thdUser, "bob")
        uuids = [str(uuidlib.uuid4()) for _ in range(count)]
        for i, txn in enumerate(uuids):
            self.north.store.write(
                thdCharge,
                role="site",
                site="north",
                user=user,
                amount=-1,
                reason="print",
                job=None,
                offline=True,
                now=NOW + i,
                txn_uuid=txn,
            )
        return uuids

    def release(self) -> None:
        """Let the held applications run, oldest first, and deliver what follows."""
        while self.held:
            gate = self.held.pop(0)
            gate.callback(None)
            self.settle()

    def assertLedger(self, uuids: list[str]) -> None:
        self.assertEqual(self.primary.read(thdSiteLedger, "north"), uuids)
        self.assertEqual(self.primary.read(thdSite, "north").applied_seq, len(uuids))
        self.assertEqual(self.north.store.read(outbox.thdPendingCount), 0)

    def test_backlog_drains_once_in_order(self) -> None:
        uuids = self.charge(230)
        self.north.replication.outboxChanged()
        self.settle()
        self.assertLedger(uuids)
        self.assertEqual(self.north.mode, "online")
        self.assertEqual(sum(self.applied), 230)
        submitted = [e[1] for e in self.north.observer.events if e[0] == "outboxSubmitted"]
        self.assertEqual([count for count, _ in submitted], [40] * 5 + [30])
        self.assertEqual(submitted[-1][1], 230)

    def test_batches_that_queue_up_are_applied_together(self) -> None:
        """While the primary applies one batch, the site's next rounds arrive: they are
        then applied in one transaction, in order."""
        self.patch(site_module, "DRAIN_WINDOW", 3)
        self.holding = True
        uuids = self.charge(120)
        self.north.replication.outboxChanged()
        self.settle()
        self.assertEqual(self.applied, [40])  # held; two more rounds wait behind it
        self.holding = False
        self.release()
        self.assertEqual(self.applied, [40, 80])
        self.assertLedger(uuids)

    def test_failed_batch_stops_the_ones_behind_it(self) -> None:
        """A batch that fails to apply takes the batches queued behind it down with it:
        none is applied past the failure, the site closes the link, and on reconnecting
        it resends from the primary's applied_seq: each charge is applied once, in
        order."""
        self.patch(site_module, "DRAIN_WINDOW", 3)
        self.holding = True
        uuids = self.charge(120)
        self.north.replication.outboxChanged()
        self.settle()
        self.assertEqual(self.applied, [40])
        self.holding = False
        gate = self.held.pop(0)
        gate.errback(OperationalError("INSERT", {}, Exception("disk I/O error")))
        self.settle()
        self.assertTrue(self.wire.closed)
        self.assertEqual(self.applied, [40])  # the queued ones never ran
        self.assertEqual(self.primary.read(thdSiteLedger, "north"), [])
        self.assertEqual(self.primary.read(thdSite, "north").applied_seq, 0)
        self.flushLoggedErrors(OperationalError)
        self.connect(self.north)
        self.assertLedger(uuids)
        self.assertEqual(self.north.mode, "online")

    def test_a_reconnected_site_waits_for_its_old_batches(self) -> None:
        """Batches a closed connection left queued are applied before the new
        connection's (which resends some of them): once each, in order."""
        self.holding = True
        uuids = self.charge(100)
        self.north.replication.outboxChanged()
        self.settle()
        self.assertEqual(self.applied, [40])
        self.disconnect(self.wire)
        self.holding = False
        wire = self.connect(self.north)
        self.assertFalse(wire.closed)
        self.release()
        self.settle()
        self.assertLedger(uuids)

    def test_protocol_1_site_drains(self) -> None:
        """A site speaking protocol 1 sends its records as plain JSON."""
        self.disconnect(self.wire)
        self.north.replication.protocol_version = 1
        sent: list[bytes] = []
        call_remote = PrimaryLinkProtocol.callRemote

        def callRemote(protocol: Any, command: Any, **kw: Any) -> Deferred[Any]:
            if command is SubmitOutbox:
                sent.append(kw["records"])
            return call_remote(protocol, command, **kw)

        self.patch(PrimaryLinkProtocol, "callRemote", callRemote)
        uuids = self.charge(50)
        self.connect(self.north)
        self.assertLedger(uuids)
        self.assertEqual([r["uuid"] for v in sent for r in json.loads(v)], uuids)


# -- 11. password verifiers -----------------------------------------------------------


class PasswordTests(ReplicationTestCase):
    """Password verifiers reach a site only while its policy allows password login."""

    def test_refusing_site_never_gets_passwords(self) -> None:
        north = self.add_site("north")
        self.add_site("south")
        self.populate()
        self.primary.write(thdSetPolicy, "offline.password_login", "refuse", NOW, site="north")
        wire = self.connect(north)
        self.assertReplicaMatches(north, passwords=False)
        self.assertEqual(north.store.read(table_rows, "passwords"), [])
        self.assertFalse(self.primary.read(thdLink, "north").passwords_included)
        # Stream: a new password and a new user with one.
        self.primary.write(thdSetPassword, "alice", VERIFIER + "2", NOW)
        self.primary.write(thdAddUser, "ivan", NOW, password_verifier=VERIFIER)
        self.poll()
        self.assertFalse(wire.closed)
        self.assertEqual(north.store.read(table_rows, "passwords"), [])
        self.assertReplicaMatches(north, passwords=False)
        # Another site's policy changing does not disturb north.
        self.primary.write(thdSetPolicy, "offline.password_login", "refuse", NOW, site="south")
        self.poll()
        self.assertFalse(wire.closed)

    def test_allowing_password_login_resnapshots(self) -> None:
        north = self.add_site("north")
        self.add_site("south")
        self.populate()
        self.primary.write(thdSetPolicy, "offline.password_login", "refuse", NOW, site="north")
        wire = self.connect(north)
        self.primary.write(thdSetPolicy, "offline.password_login", "allow", NOW, site="north")
        self.poll()
        self.assertTrue(wire.closed)
        self.assertEqual(wire.server.dropReason, "password-login policy changed")
        wire = self.connect(north)
        self.assertEqual(
            wire.client.hello["resnapshot"], "the site's password-login policy changed"
        )
        self.assertReplicaMatches(north, passwords=True)
        self.assertEqual(len(north.store.read(table_rows, "passwords")), 2)
        self.assertTrue(self.primary.read(thdLink, "north").passwords_included)
        self.assertEqual(north.mode, "online")

    def test_refusing_password_login_removes_them(self) -> None:
        north, wire = self.synced_north()
        self.assertEqual(len(north.store.read(table_rows, "passwords")), 2)
        self.primary.write(thdSetPolicy, "offline.password_login", "refuse", NOW)
        self.poll()
        self.assertTrue(wire.closed)
        wire = self.connect(north)
        self.assertReplicaMatches(north, passwords=False)
        self.assertEqual(north.store.read(table_rows, "passwords"), [])

    def test_interrupted_resnapshot_is_retried(self) -> None:
        north, wire = self.synced_north()
        self.primary.write(thdSetPolicy, "offline.password_login", "refuse", NOW, site="north")
        self.poll()
        self.assertTrue(wire.closed)
        # The re-snapshot starts, and the link fails before it is in.
        wire = self.connect(north, settled=False)
        for _ in range(1000):
            if wire.client._snapshot is not None and wire.client._snapshot["rows"]:
                break
            wire.pump()
        self.disconnect(wire)
        self.flushLoggedErrors(ConnectionDone, ConnectionLost)
        self.assertEqual(len(north.store.read(table_rows, "passwords")), 2)
        wire = self.connect(north)
        self.assertEqual(
            wire.client.hello["resnapshot"], "the site's password-login policy changed"
        )
        self.assertEqual(north.store.read(table_rows, "passwords"), [])
        self.assertReplicaMatches(north, passwords=False)


class ObserverTests(SynchronousTestCase):
    """The recording observer used here is a faithful ``IReplicationObserver``."""

    def test_interface(self) -> None:
        verifyObject(IReplicationObserver, RecordingObserver(Failover(Clock())))
        verifyObject(IReplicationObserver, FailoverObserver(Failover(Clock())))
