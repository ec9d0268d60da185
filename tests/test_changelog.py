"""Tests for the change log: full row images in commit order, scoped to sites.

Replication streams "everything after position P" to each site, so the log must hold one
entry per row change, with no gaps, and positions must become visible in commit order even
when two processes (the server and ``sitesrv-admin``) write at the same time.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, select
from twisted.trial.unittest import SynchronousTestCase

from sitesrv.secrets import make_verifier
from sitesrv.store import Store
from sitesrv.store.changelog import (
    Change,
    thdChangesSince,
    thdNewEpoch,
    thdOldestPosition,
    thdState,
    thdTrim,
)
from sitesrv.store.devices import (
    thdAddDevice,
    thdAddProvider,
    thdRemoveDevice,
    thdRotateProviderKey,
)
from sitesrv.store.ledger import thdAddAccount
from sitesrv.store.policies import thdSetPolicy, thdSetSetting
from sitesrv.store.printers import thdAddPrinter
from sitesrv.store.schema import REPLICATED_BY_NAME
from sitesrv.store.sites import thdAddSite, thdRevokeSite
from sitesrv.store.users import (
    thdAddCard,
    thdAddGroup,
    thdAddMember,
    thdAddUser,
    thdRemoveCard,
    thdSetDisabled,
    thdSetPassword,
    thdSetPin,
)
from tests.support import NOW, POSTGRES_ENV, StoreMixin, postgres_url

# Mixins are test cases to the type checker only; the concrete classes add the real base.
if TYPE_CHECKING:
    _TestCase = SynchronousTestCase
else:
    _TestCase = object

#: Why the PostgreSQL variants skip (``None``: they run).
POSTGRES_SKIP = (
    None if postgres_url() else f"PostgreSQL not configured: set {POSTGRES_ENV} (CI does)"
)

#: Bound on any wait for another thread, so a broken lock fails instead of hanging.
JOIN_TIMEOUT = 20.0
#: How long a writer is given to show that it waits for another's lock.
BLOCK_CHECK = 0.5

EVERY_SITE = (None, "hq", "north", "south")


def thdRow(conn: Connection, table_name: str, row_id: int) -> dict[str, Any] | None:
    """Row ``row_id`` of a replicated table as a dict, or None if it is gone."""
    table = REPLICATED_BY_NAME[table_name].table
    row = conn.execute(select(table).where(table.c.id == row_id)).mappings().first()
    return None if row is None else dict(row)


class _Base(StoreMixin, _TestCase):
    """A fresh primary "hq" with helpers to read the log."""

    def setUp(self) -> None:
        super().setUp()
        self.store = self.open_primary()

    def head(self, store: Store | None = None) -> int:
        return (store or self.store).read(thdState)[1]

    def since(self, after: int, scopes: tuple[str | None, ...] = EVERY_SITE) -> list[Change]:
        changes, _upto, limited = self.store.read(thdChangesSince, after, 100_000, scopes)
        assert not limited
        return changes


class ChangeLogMixin(_Base):
    """What every write leaves in the change log."""

    def test_one_entry_per_row_write(self) -> None:
        """Each single-row write to every replicated table logs exactly one full image."""
        self.store.write(thdAddSite, "north", NOW)
        alice = self.store.write(thdAddUser, "alice", NOW)
        self.store.write(thdAddPrinter, "north-mfp", "north", 10, 50, NOW)
        self.store.write(thdAddGroup, "staff", NOW)

        writes: list[tuple[str, Callable[..., Any], tuple[Any, ...]]] = [
            ("sites", thdAddSite, ("south", NOW)),
            ("sites", thdRevokeSite, ("south", NOW)),
            ("settings", thdSetSetting, ("currency", "EUR", NOW)),
            ("users", thdSetDisabled, ("alice", True, NOW)),
            ("users", thdSetPin, ("alice", make_verifier("4711", n=2**10), NOW)),
            ("passwords", thdSetPassword, ("alice", make_verifier("pw", n=2**10), NOW)),
            ("passwords", thdSetPassword, ("alice", make_verifier("pw2", n=2**10), NOW)),
            ("cards", thdAddCard, ("alice", "0004711", NOW)),
            ("accounts", thdAddAccount, ("Physics", NOW)),
            ("groups", thdAddGroup, ("students", NOW)),
            ("group_members", thdAddMember, ("staff", "alice", NOW)),
            ("printers", thdAddPrinter, ("south-mfp", "south", 5, 5, NOW)),
            ("devices", thdAddDevice, ("north-reader", "north", "card-reader", NOW)),
            ("providers", thdAddProvider, ("north-spool", "north", NOW)),
            ("providers", thdRotateProviderKey, ("north-spool", NOW)),
            ("policies", thdSetPolicy, ("offline.release", "refuse", NOW)),
        ]
        # Every replicated table is covered, so a new one cannot slip through untested.
        self.assertEqual({w[0] for w in writes}, set(REPLICATED_BY_NAME))
        for table, fn, args in writes:
            before = self.head()
            self.store.write(fn, *args)
            [change] = self.since(before)
            self.assertEqual(change.position, before + 1)
            self.assertEqual(self.head(), before + 1)
            self.assertEqual((change.table, change.op), (table, "upsert"), fn.__name__)
            row = self.store.read(thdRow, table, change.row_id)
            assert row is not None
            secret = REPLICATED_BY_NAME[table].secret_columns
            expected = {k: v for k, v in row.items() if k not in secret}
            self.assertEqual(change.image, expected, fn.__name__)
        final = self.store.read(thdRow, "users", alice.id)
        assert final is not None
        self.assertIs(final["disabled"], True)

    def test_positions_have_no_gaps(self) -> None:
        """Positions run 1, 2, 3, ... with no gaps and end at the head."""
        self.store.write(thdAddSite, "north", NOW)
        self.store.write(thdAddUser, "alice", NOW, balance=500)
        self.store.write(thdAddCard, "alice", "1", NOW)
        self.store.write(thdRemoveCard, "1", NOW)
        self.store.write(thdAddDevice, "north-reader", "north", "card-reader", NOW)
        changes = self.since(0)
        positions = [c.position for c in changes]
        self.assertEqual(positions, list(range(1, len(positions) + 1)))
        self.assertEqual(self.head(), positions[-1])
        self.assertTrue(all(c.format == 1 for c in changes))

    def test_delete_marker(self) -> None:
        """A delete logs a marker without an image, for the deleted row."""
        self.store.write(thdAddUser, "alice", NOW)
        self.store.write(thdAddCard, "alice", "0004711", NOW)
        [added] = self.since(self.head() - 1)
        before = self.head()
        self.store.write(thdRemoveCard, "0004711", NOW)
        [marker] = self.since(before)
        self.assertEqual((marker.table, marker.row_id), ("cards", added.row_id))
        self.assertEqual((marker.op, marker.image, marker.scope), ("delete", None, None))
        self.assertIsNone(self.store.read(thdRow, "cards", added.row_id))

    def test_site_scopes(self) -> None:
        """Devices, providers and site rows carry their site's name; other rows none."""
        before = self.head()
        self.store.write(thdAddSite, "north", NOW)
        self.store.write(thdAddDevice, "north-reader", "north", "card-reader", NOW)
        self.store.write(thdAddProvider, "north-spool", "north", NOW)
        self.store.write(thdAddPrinter, "north-mfp", "north", 10, 50, NOW)
        self.store.write(thdRemoveDevice, "north-reader", NOW)
        scopes = [(c.table, c.op, c.scope) for c in self.since(before)]
        self.assertEqual(
            scopes,
            [
                ("sites", "upsert", "north"),
                ("devices", "upsert", "north"),
                ("providers", "upsert", "north"),
                ("printers", "upsert", None),
                ("devices", "delete", "north"),
            ],
        )
        # The primary's own row goes only to the primary's own name (no site has it).
        [hq] = [c for c in self.since(0) if c.table == "sites" and c.scope != "north"]
        self.assertEqual((hq.scope, hq.image and hq.image["name"]), ("hq", "hq"))

    def test_changes_since_filters_by_scope(self) -> None:
        """A site sees global entries and its own, never another site's."""
        self.store.write(thdAddSite, "north", NOW)
        self.store.write(thdAddSite, "south", NOW)
        start = self.head()
        self.store.write(thdAddDevice, "north-reader", "north", "card-reader", NOW)
        self.store.write(thdAddDevice, "south-reader", "south", "card-reader", NOW)
        self.store.write(thdAddGroup, "staff", NOW)

        def seen(*scopes: str | None) -> list[tuple[str, str | None]]:
            return [(c.table, c.scope) for c in self.since(start, scopes)]

        self.assertEqual(seen(None), [("groups", None)])
        self.assertEqual(seen(None, "north"), [("devices", "north"), ("groups", None)])
        self.assertEqual(seen(None, "south"), [("devices", "south"), ("groups", None)])
        # Only the image of a site's own device goes to it.
        [north] = [c for c in self.since(start, (None, "north")) if c.table == "devices"]
        assert north.image is not None
        self.assertEqual(north.image["name"], "north-reader")

    def test_limit(self) -> None:
        """``limit`` pages through the log; ``limited`` says when more remain."""
        for i in range(7):
            self.store.write(thdAddGroup, f"g{i}", NOW)
        start, head = 0, self.head()
        pages: list[list[int]] = []
        after = start
        while True:
            changes, upto, limited = self.store.read(thdChangesSince, after, 3, EVERY_SITE)
            pages.append([c.position for c in changes])
            if not limited:
                self.assertEqual(upto, head)
                break
            self.assertEqual(upto, changes[-1].position)
            after = upto
        self.assertTrue(all(len(p) <= 3 for p in pages))
        self.assertEqual([p for page in pages for p in page], list(range(1, head + 1)))

    def test_upto_passes_other_sites_entries(self) -> None:
        """A site whose newest entries all belong to others still moves its position."""
        self.store.write(thdAddSite, "north", NOW)
        self.store.write(thdAddSite, "south", NOW)
        start = self.head()
        for i in range(5):
            self.store.write(thdAddProvider, f"south-{i}", "south", NOW)
        head = self.head()
        north = (None, "north")
        self.assertEqual(self.store.read(thdChangesSince, start, 100, north), ([], head, False))
        # Even a page holding nothing for this site advances it.
        changes, upto, limited = self.store.read(thdChangesSince, start, 2, north)
        self.assertEqual((changes, upto, limited), ([], start + 2, True))
        # Nothing new: the position stays where it is.
        self.assertEqual(self.store.read(thdChangesSince, head, 100, north), ([], head, False))

    def test_new_epoch(self) -> None:
        """A new epoch differs from the old one and leaves the head alone."""
        epoch, head = self.store.read(thdState)
        new = self.store.write(thdNewEpoch)
        self.assertNotEqual(new, epoch)
        self.assertEqual(self.store.read(thdState), (new, head))

    def test_trim(self) -> None:
        """Trimming drops entries up to a position; the rest are still streamed."""
        for i in range(6):
            self.store.write(thdAddGroup, f"g{i}", NOW)
        head = self.head()
        self.assertEqual(self.store.read(thdOldestPosition), 1)
        self.assertEqual(self.store.write(thdTrim, head - 2), head - 2)
        self.assertEqual(self.store.read(thdOldestPosition), head - 1)
        self.assertEqual([c.position for c in self.since(0)], [head - 1, head])
        self.assertEqual(self.head(), head)
        self.assertEqual(self.store.write(thdTrim, head), 2)
        self.assertIsNone(self.store.read(thdOldestPosition))
        self.assertEqual(self.since(0), [])


class ChangeLogSQLiteTests(ChangeLogMixin, SynchronousTestCase):
    backend = "sqlite"


class ChangeLogPostgresTests(ChangeLogMixin, SynchronousTestCase):
    backend = "postgres"
    skip = POSTGRES_SKIP


class ConcurrentWritersMixin(_Base):
    """Two processes writing at once: positions still become visible in commit order."""

    def other_process(self) -> Store:
        """A second ``Store`` on the same database, as ``sitesrv-admin`` would open."""
        store = Store(self.store.url)
        self.addCleanup(store.stop)
        return store

    def test_late_commit_is_not_skipped(self) -> None:
        """A writer that takes a position waits for nobody; a second waits for it.

        While the first transaction is open, a reader sees neither change and the head
        does not include them, so a site streaming "after P" cannot pass a position whose
        change has yet to commit.
        """
        admin = self.other_process()
        start = self.head()
        results: dict[str, Any] = {}

        def second_writer() -> None:
            try:
                results["id"] = admin.write(thdAddGroup, "second", NOW)
            except BaseException as e:
                results["error"] = e

        thread = threading.Thread(target=second_writer, daemon=True)
        conn = self.store.writer.connect()
        txn = conn.begin()
        try:
            first_id = thdAddGroup(conn, "first", NOW)
            thread.start()
            thread.join(BLOCK_CHECK)
            self.assertTrue(thread.is_alive(), f"second writer did not wait: {results}")
            self.assertEqual(self.store.read(thdChangesSince, start, 100), ([], start, False))
            self.assertEqual(self.head(), start)
            txn.commit()
        finally:
            if txn.is_active:
                txn.rollback()
            conn.close()
            thread.join(JOIN_TIMEOUT)
        self.assertFalse(thread.is_alive(), "second writer still blocked after the commit")
        self.assertNotIn("error", results)
        changes = self.since(start)
        self.assertEqual(
            [(c.position, c.table, c.row_id) for c in changes],
            [(start + 1, "groups", first_id), (start + 2, "groups", results["id"])],
        )
        self.assertEqual([c.image["name"] for c in changes if c.image], ["first", "second"])
        self.assertEqual(self.head(), start + 2)

    def test_other_process_writes_visible(self) -> None:
        """Changes made through another Store show up to this one's readers."""
        admin = self.other_process()
        start = self.head()
        admin.write(thdAddUser, "alice", NOW, balance=100)
        self.assertEqual(self.head(), self.head(admin))
        tables = [c.table for c in self.since(start)]
        self.assertEqual(tables, ["users", "accounts", "accounts"])


class ConcurrentWritersSQLiteTests(ConcurrentWritersMixin, SynchronousTestCase):
    backend = "sqlite"


class ConcurrentWritersPostgresTests(ConcurrentWritersMixin, SynchronousTestCase):
    backend = "postgres"
    skip = POSTGRES_SKIP
