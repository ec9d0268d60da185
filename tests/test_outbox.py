"""Tests for the outbox: what a site records reaches the primary's ledger exactly once.

A "site" here is a second database built from the primary exactly as replication builds
it, without the network: a snapshot paged out of the primary and swapped into the site's
replica, then the change log streamed with ``thdChangesSince`` / ``thdApplyChanges``.
Submitting the outbox is ``thdPending`` at the site, then ``thdApplyOutbox`` at the
primary. The site is always SQLite (as deployed); the primary-side tests also run with a
PostgreSQL primary (skipped unless ``SITESRV_TEST_POSTGRES_URL`` is set).
"""

from __future__ import annotations

import copy
import json
import os
import sqlite3
import uuid as uuidlib
from collections.abc import Sequence
from contextlib import closing
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Connection, select
from twisted.trial.unittest import SynchronousTestCase

import sitesrv
from sitesrv.core.gate import ChargeResult, JobInfo, thdCharge, thdViewBalance
from sitesrv.errors import SitesrvError
from sitesrv.replication import codec
from sitesrv.replication.primary import thdPasswordsAllowed
from sitesrv.store import Store, changelog, outbox, replica
from sitesrv.store.bootstrap import open_store, thdInitPrimary
from sitesrv.store.jobs import thdListJobs
from sitesrv.store.ledger import (
    SUSPENSE_ACCOUNT,
    Transaction,
    thdAccount,
    thdAccountById,
    thdListTransactions,
    thdTransactionByUUID,
)
from sitesrv.store.policies import thdSetPolicy
from sitesrv.store.schema import dead_letters, transactions
from sitesrv.store.sites import thdAddSite, thdSite
from sitesrv.store.snapshot import Snapshot
from sitesrv.store.users import User, thdAddUser, thdRemoveUser, thdSetCredit, thdUser
from tests.support import NOW, StoreMixin, sqlite_url

SITE = "north"

# -- building a site without the network ----------------------------------------------


def open_site_store(testcase: Any, name: str = "site.db") -> Store:
    """A fresh, migrated, empty site database (no replica yet)."""
    store = open_store(sqlite_url(testcase, name))
    testcase.addCleanup(store.stop)
    return store


def load_snapshot(
    primary: Store, site: Store, name: str = SITE, now: float = NOW, passwords: bool | None = None
) -> None:
    """Copy the primary's data for site ``name`` into ``site``'s replica, as a snapshot.

    Password verifiers are left out unless ``name``'s policy allows password login there
    (as the primary does); ``passwords`` overrides that.
    """
    if passwords is None:
        passwords = primary.read(thdPasswordsAllowed, name)
    exclude = frozenset() if passwords else frozenset({"passwords"})
    snapshot = Snapshot(primary.reader, name, exclude_tables=exclude)
    snapshot.open()
    try:
        site.write(replica.thdClearShadow)
        while (page := snapshot.next_rows()) is not None:
            table, columns, rows = page
            site.write(replica.thdLoadShadow, table, columns, rows)
        site.write(replica.thdSwapShadow, snapshot.epoch, snapshot.position, now)
    finally:
        snapshot.close()


def sync(
    primary: Store,
    site: Store,
    name: str = SITE,
    limit: int = 1000,
    now: float = NOW,
    passwords: bool | None = None,
) -> int:
    """Stream the change log into ``site`` until it is caught up; return its position."""
    if passwords is None:
        passwords = primary.read(thdPasswordsAllowed, name)
    while True:
        position = site.read(replica.thdReplicaState).position
        changes, upto, limited = primary.read(
            changelog.thdChangesSince, position, limit, (None, name)
        )
        if not passwords:
            changes = [c for c in changes if c.table != "passwords"]
        position = site.write(replica.thdApplyChanges, changes, upto, now)
        if not limited:
            return position


def copy_sqlite(url: str, target: str) -> None:
    """Copy the SQLite database at ``url`` to the file ``target``, consistently."""
    source = sqlite3.connect(url.removeprefix("sqlite:///"))
    with closing(source), closing(sqlite3.connect(target)) as copied:
        source.backup(copied)


def pending(site: Store, after: int = 0, limit: int = 10_000) -> list[outbox.Pending]:
    """The site's outbox records above ``after``, in order."""
    return site.read(outbox.thdPending, after, limit)


def submit(
    primary: Store,
    site: Store,
    after: int | None = None,
    limit: int = 10_000,
    name: str = SITE,
    now: float = NOW,
) -> int:
    """Send up to ``limit`` records above ``after`` (default: the replicated applied_seq)
    to the primary as the drain does (the stored JSON packed as it is, decoded once at
    the primary); return the primary's answer."""
    if after is None:
        after = site.read(outbox.thdOwnAppliedSeq)
    texts = [text for _, text in site.read(outbox.thdPendingText, after, limit)]
    values = codec.pack_json(texts, sitesrv.PROTOCOL_VERSION)
    records = [r for value in values for r in codec.unpack(value, sitesrv.PROTOCOL_VERSION)]
    return apply(primary, records, name, now)


def apply(primary: Store, payloads: Sequence[Any], name: str = SITE, now: float = NOW) -> int:
    """Apply records at the primary as ``SubmitOutbox`` does; return the new applied_seq."""
    return primary.write(outbox.thdApplyOutbox, name, copy.deepcopy(list(payloads)), now)


def site_charge(
    site: Store,
    user: User,
    amount: int,
    *,
    offline: bool = True,
    now: float = NOW,
    name: str = SITE,
    job: JobInfo | None = None,
    txn_uuid: str | None = None,
) -> ChargeResult:
    """Charge ``amount`` (a positive cost) at a site, as the gate does."""
    return site.write(
        thdCharge,
        role="site",
        site=name,
        user=user,
        amount=-amount,
        reason="print",
        job=job,
        offline=offline,
        now=now,
        txn_uuid=txn_uuid or str(uuidlib.uuid4()),
    )


def view(site: Store, account_id: int) -> int:
    """An account's balance as the site shows it."""
    return int(site.read(thdViewBalance, "site", account_id))


def balance(primary: Store, account_id: int) -> int:
    """An account's balance at the primary."""
    account = primary.read(thdAccountById, account_id)
    assert account is not None
    return account.balance


def ledger_uuids(primary: Store) -> list[str]:
    """Every transaction UUID in the primary's ledger (with repeats, if any)."""

    def thd(conn: Connection) -> list[str]:
        return list(conn.execute(select(transactions.c.uuid)).scalars())

    return primary.read(thd)


def applied_seq(primary: Store, name: str = SITE) -> int:
    """The primary's applied_seq for site ``name``."""
    return primary.read(thdSite, name).applied_seq


def transaction(primary: Store, txn_uuid: str) -> Transaction:
    """The primary's transaction with this UUID (it must exist)."""
    txn = primary.read(thdTransactionByUUID, txn_uuid)
    assert txn is not None, f"no transaction {txn_uuid}"
    return txn


def thdOverdraft(conn: Connection, txn_uuid: str) -> bool:
    """Whether the transaction with this UUID carries the offline-overdraft flag."""
    return bool(
        conn.execute(
            select(transactions.c.overdraft).where(transactions.c.uuid == txn_uuid)
        ).scalar_one()
    )


def thdDeadLetters(conn: Connection) -> list[tuple[str, str, int, str]]:
    """Dead letters as ``(site, uuid, seq, error)``, in arrival order."""
    rows = conn.execute(
        select(
            dead_letters.c.site, dead_letters.c.uuid, dead_letters.c.seq, dead_letters.c.error
        ).order_by(dead_letters.c.id)
    ).all()
    return [(r.site, r.uuid, r.seq, r.error) for r in rows]


# -- at the site ----------------------------------------------------------------------


class SiteRecordTests(SynchronousTestCase):
    """What a charge at a site writes to its outbox (SQLite, as a site runs)."""

    def setUp(self) -> None:
        self.primary = open_store(sqlite_url(self, "primary.db"))
        self.addCleanup(self.primary.stop)
        self.primary.write(thdInitPrimary, "hq", "USD", 2, NOW)
        self.primary.write(thdAddSite, SITE, NOW)
        self.alice = self.primary.write(thdAddUser, "alice", NOW, balance=10_00, restricted=False)
        self.site = open_site_store(self)
        load_snapshot(self.primary, self.site)

    def test_one_record_per_charge(self) -> None:
        """Each charge adds exactly one record, with consecutive sequence numbers and
        everything the primary needs to apply it."""
        job = JobInfo("print", None, "north-laser", pages=3, document="report.pdf")
        results = [
            site_charge(self.site, self.alice, 30, job=job, now=NOW + 1),
            site_charge(self.site, self.alice, 45, now=NOW + 2),
            site_charge(self.site, self.alice, 5, offline=False, now=NOW + 3),
        ]
        records = pending(self.site)
        self.assertEqual([r.seq for r in records], [1, 2, 3])
        self.assertEqual([r.uuid for r in records], [c.txn_uuid for c in results])
        first = records[0].payload
        self.assertEqual(
            {k: first[k] for k in ("format", "seq", "kind", "user_id", "username", "amount")},
            {
                "format": 1,
                "seq": 1,
                "kind": "charge",
                "user_id": self.alice.id,
                "username": "alice",
                "amount": -30,
            },
        )
        self.assertEqual(
            (first["account_id"], first["account_name"]), (self.alice.account_id, "alice")
        )
        self.assertEqual(
            (first["reason"], first["site_time"], first["offline"]), ("print", NOW + 1, True)
        )
        self.assertEqual(first["job"]["uuid"], job.uuid)
        self.assertEqual(first["job"]["printer_name"], "north-laser")
        self.assertIsNone(records[1].payload["job"])
        self.assertFalse(records[2].payload["offline"])
        self.assertEqual(self.site.read(outbox.thdPendingCount), 3)
        self.assertEqual(self.site.read(outbox.thdPendingAmount, self.alice.account_id), -80)
        self.assertEqual(view(self.site, self.alice.account_id), 10_00 - 80)
        self.assertEqual([r.balance for r in results], [970, 925, 920])
        # The replica itself is untouched: only the primary changes balances.
        self.assertEqual(self.site.read(thdAccountById, self.alice.account_id).balance, 10_00)

    def test_pending_text_is_the_record_as_stored(self) -> None:
        """What the drain reads is each record's stored JSON, undecoded, in order."""
        for cost in (30, 45, 5):
            site_charge(self.site, self.alice, cost)
        texts = self.site.read(outbox.thdPendingText, 1, 10)
        self.assertEqual([seq for seq, _ in texts], [2, 3])
        self.assertEqual(
            [json.loads(t) for _, t in texts], [r.payload for r in pending(self.site, 1)]
        )
        self.assertEqual(self.site.read(outbox.thdPendingText, 0, 1)[0][0], 1)

    def test_record_is_part_of_the_callers_transaction(self) -> None:
        """When the transaction that recorded fails, neither the record nor its
        sequence number remains."""

        class Boom(Exception):
            pass

        def thdChargeThenFail(conn: Connection) -> None:
            thdCharge(
                conn,
                role="site",
                site=SITE,
                user=self.alice,
                amount=-30,
                reason="print",
                job=None,
                offline=True,
                now=NOW,
                txn_uuid=str(uuidlib.uuid4()),
            )
            self.assertEqual(len(outbox.thdPending(conn, 0, 10)), 1)
            raise Boom()

        self.assertRaises(Boom, self.site.write, thdChargeThenFail)
        self.assertEqual(pending(self.site), [])
        self.assertEqual(view(self.site, self.alice.account_id), 10_00)
        self.assertEqual(site_charge(self.site, self.alice, 10).balance, 990)
        self.assertEqual([r.seq for r in pending(self.site)], [1])

    def test_record_needs_a_replica(self) -> None:
        """A site with no replica yet cannot record anything."""
        empty = open_site_store(self, "empty.db")
        record = {"uuid": str(uuidlib.uuid4()), "kind": "charge", "amount": -1}
        error = self.assertRaises(SitesrvError, empty.write, outbox.thdRecord, record, NOW)
        self.assertEqual(str(error), "site not yet synchronised with the primary")
        self.assertEqual(pending(empty), [])

    def test_sequence_survives_a_resnapshot(self) -> None:
        """Sequence numbers keep counting up across a new snapshot (they are never
        reused, or the primary would take a new record for an applied one)."""
        site_charge(self.site, self.alice, 10)
        load_snapshot(self.primary, self.site)
        site_charge(self.site, self.alice, 10)
        self.assertEqual([r.seq for r in pending(self.site)], [1, 2])

    def test_rebuilt_site_numbers_above_applied_seq(self) -> None:
        """A site whose database was lost and rebuilt under the same name gets the
        primary's applied_seq with its first snapshot: its new records are numbered
        above it, so they count in its balances and are submitted."""
        for cost in (10, 20, 30):
            site_charge(self.site, self.alice, cost)
        submit(self.primary, self.site)
        rebuilt = open_site_store(self, "rebuilt.db")
        load_snapshot(self.primary, rebuilt)
        self.assertEqual(rebuilt.read(outbox.thdOwnAppliedSeq), 3)
        charge = site_charge(rebuilt, self.alice, 7)
        self.assertEqual([r.seq for r in pending(rebuilt)], [4])
        self.assertEqual(rebuilt.read(outbox.thdPendingCount), 1)
        self.assertEqual(view(rebuilt, self.alice.account_id), 10_00 - 67)
        self.assertEqual(submit(self.primary, rebuilt), 4)
        self.assertEqual(transaction(self.primary, charge.txn_uuid).amount, -7)
        self.assertEqual(balance(self.primary, self.alice.account_id), 10_00 - 67)

    def test_pending_amount_per_account(self) -> None:
        """Only unapplied records of that account count."""
        bob = self.primary.write(thdAddUser, "bob", NOW, balance=5_00, restricted=False)
        sync(self.primary, self.site)
        site_charge(self.site, self.alice, 100)
        site_charge(self.site, bob, 7)
        site_charge(self.site, self.alice, 20)
        self.assertEqual(self.site.read(outbox.thdPendingAmount, self.alice.account_id), -120)
        self.assertEqual(self.site.read(outbox.thdPendingAmount, bob.account_id), -7)
        submit(self.primary, self.site, limit=2)  # alice 1.00, bob 0.07
        sync(self.primary, self.site)
        self.assertEqual(self.site.read(outbox.thdPendingAmount, self.alice.account_id), -20)
        self.assertEqual(self.site.read(outbox.thdPendingAmount, bob.account_id), 0)
        self.assertEqual(view(self.site, self.alice.account_id), 10_00 - 120)
        self.assertEqual(view(self.site, bob.account_id), 5_00 - 7)
        self.assertEqual(self.site.read(outbox.thdPendingCount), 1)


class PruneTests(SynchronousTestCase):
    """Applied records are kept for the retention time, then deleted; a primary restored
    from a backup gets the retained ones again."""

    def setUp(self) -> None:
        self.primary_url = sqlite_url(self, "primary.db")
        self.primary = open_store(self.primary_url)
        self.addCleanup(lambda: self.primary.stop())
        self.primary.write(thdInitPrimary, "hq", "USD", 2, NOW)
        self.primary.write(thdAddSite, SITE, NOW)
        self.alice = self.primary.write(thdAddUser, "alice", NOW, balance=10_00, restricted=False)
        self.site = open_site_store(self)
        load_snapshot(self.primary, self.site)
        self.account = self.alice.account_id
        # Five charges of 0.01, 0.02, ... at NOW+1 ... NOW+5.
        self.charges = [site_charge(self.site, self.alice, i, now=NOW + i) for i in range(1, 6)]

    def seqs(self) -> list[int]:
        return [r.seq for r in pending(self.site)]

    def test_prunes_only_applied_and_old(self) -> None:
        """Only records at or below applied_seq and older than the cutoff go."""
        self.assertEqual(self.site.write(outbox.thdPrune, NOW + 100), 0)  # nothing applied
        submit(self.primary, self.site, limit=3)
        # Applied at the primary, but the replica does not show it yet: keep everything.
        self.assertEqual(self.site.write(outbox.thdPrune, NOW + 100), 0)
        sync(self.primary, self.site)
        self.assertEqual(self.site.read(outbox.thdOwnAppliedSeq), 3)
        # Records 1 and 2 were created before NOW+3; 3 is applied but not old enough;
        # 4 and 5 are old enough but not applied.
        self.assertEqual(self.site.write(outbox.thdPrune, NOW + 3), 2)
        self.assertEqual(self.seqs(), [3, 4, 5])
        self.assertEqual(self.site.write(outbox.thdPrune, NOW + 100), 1)
        self.assertEqual(self.seqs(), [4, 5])
        # Pruning does not change what the site shows.
        self.assertEqual(view(self.site, self.account), 10_00 - 15)
        self.assertEqual(self.site.read(outbox.thdPendingCount), 2)
        # New records keep counting up from the last sequence number.
        site_charge(self.site, self.alice, 6, now=NOW + 6)
        self.assertEqual(self.seqs(), [4, 5, 6])

    def backup(self) -> str:
        """A consistent copy of the primary's database file, as a backup tool makes."""
        target = self.primary_url.removeprefix("sqlite:///") + ".backup"
        copy_sqlite(self.primary_url, target)
        return target

    def restore(self, backup: str) -> None:
        """Replace the primary's database with ``backup`` and renew the epoch, as
        ``sitesrv-admin db restored`` does."""
        self.primary.stop()
        path = self.primary_url.removeprefix("sqlite:///")
        for suffix in ("-wal", "-shm"):
            if os.path.exists(path + suffix):
                os.remove(path + suffix)
        os.replace(backup, path)
        self.primary = open_store(self.primary_url)
        self.primary.write(changelog.thdNewEpoch)

    def test_restored_primary_gets_retained_records_again(self) -> None:
        """After a restore from backup, the re-snapshot brings back an older applied_seq:
        retained records are pending again and resubmitting them applies only the
        missing ones, exactly once."""
        total = sum(range(1, 6))
        submit(self.primary, self.site, limit=3)
        sync(self.primary, self.site)
        saved = self.backup()  # holds records 1-3
        submit(self.primary, self.site)  # 4 and 5
        sync(self.primary, self.site)
        self.assertEqual(self.site.read(outbox.thdPendingCount), 0)
        self.assertEqual(self.site.write(outbox.thdPrune, NOW + 2), 1)  # record 1 goes
        self.restore(saved)
        self.assertEqual(applied_seq(self.primary), 3)
        self.assertEqual(balance(self.primary, self.account), 10_00 - 6)

        # The site notices the new epoch and takes a new snapshot.
        epoch = self.site.read(replica.thdReplicaState).epoch
        load_snapshot(self.primary, self.site)
        self.assertNotEqual(self.site.read(replica.thdReplicaState).epoch, epoch)
        self.assertEqual(self.site.read(outbox.thdOwnAppliedSeq), 3)
        self.assertEqual(self.site.read(outbox.thdPendingCount), 2)
        self.assertEqual([r.seq for r in pending(self.site, 3)], [4, 5])
        self.assertEqual(view(self.site, self.account), 10_00 - total)

        # The site resubmits everything it retained (2-5): only 4 and 5 are new.
        self.assertEqual(apply(self.primary, [r.payload for r in pending(self.site)]), 5)
        self.assertEqual(balance(self.primary, self.account), 10_00 - total)
        self.assertEqual(view(self.site, self.account), 10_00 - total)
        sync(self.primary, self.site)
        self.assertEqual(view(self.site, self.account), 10_00 - total)
        self.assertEqual(self.site.read(outbox.thdPendingCount), 0)
        uuids = ledger_uuids(self.primary)
        for charge in self.charges:
            self.assertEqual(uuids.count(charge.txn_uuid), 1)


# -- any interleaving --------------------------------------------------------------------

#: One step of a site's life: a charge (who, cost, offline?), submitting up to k records
#: (and whether the answer arrives), streaming the change log, resending everything
#: retained, or pruning records older than some age.
steps = st.lists(
    st.one_of(
        st.tuples(
            st.just("charge"),
            st.sampled_from(["alice", "bob"]),
            st.integers(1, 300),
            st.booleans(),
        ),
        st.tuples(st.just("submit"), st.integers(1, 4), st.booleans()),
        st.tuples(st.just("sync")),
        st.tuples(st.just("resubmit")),
        st.tuples(st.just("prune"), st.integers(0, 5)),
    ),
    max_size=30,
)


class InterleavingTests(SynchronousTestCase):
    """Whatever the order of charges, submissions, lost answers, streaming, resending
    and pruning, every charge is counted once at the site and applied once at the
    primary."""

    def setUp(self) -> None:
        # One primary and one site database, copied for each example (migrating costs
        # more than the example itself).
        primary = open_store(sqlite_url(self, "primary.db"))
        primary.write(thdInitPrimary, "hq", "USD", 2, NOW)
        primary.write(thdAddSite, SITE, NOW)
        self.users = {
            name: primary.write(thdAddUser, name, NOW, balance=opening, restricted=False)
            for name, opening in (("alice", 20_00), ("bob", 5_00))
        }
        site = open_store(sqlite_url(self, "site.db"))
        load_snapshot(primary, site)
        self.templates = [primary.url, site.url]
        primary.stop()
        site.stop()

    def fresh(self) -> tuple[Store, Store]:
        """A copy of the primary and of the site, in a new temporary directory."""
        urls = []
        for template in self.templates:
            url = sqlite_url(self, os.path.basename(template))
            copy_sqlite(template, url.removeprefix("sqlite:///"))
            urls.append(url)
        return Store(urls[0]), Store(urls[1])

    @settings(
        max_examples=30,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    @given(steps)
    def test_counted_once(self, plan: list[tuple[Any, ...]]) -> None:
        primary, site = self.fresh()
        try:
            self.run_plan(primary, site, plan)
        finally:
            primary.stop()
            site.stop()

    def run_plan(self, primary: Store, site: Store, plan: list[tuple[Any, ...]]) -> None:
        opening = {name: user.balance for name, user in self.users.items()}
        charged: dict[str, int] = {name: 0 for name in self.users}
        amounts: dict[str, tuple[str, int]] = {}  # txn uuid -> (user, amount)
        acked = 0
        last_applied = 0
        now = NOW
        for step in plan:
            now += 1
            kind = step[0]
            if kind == "charge":
                _, name, cost, offline = step
                result = site_charge(site, self.users[name], cost, offline=offline, now=now)
                charged[name] += cost
                amounts[result.txn_uuid] = (name, cost)
            elif kind == "submit":
                _, k, answered = step
                after = max(acked, site.read(outbox.thdOwnAppliedSeq))
                answer = submit(primary, site, after, k, now=now)
                if answered:
                    acked = max(acked, answer)
            elif kind == "sync":
                sync(primary, site, now=now)
            elif kind == "resubmit":
                submit(primary, site, 0, now=now)
            else:
                site.write(outbox.thdPrune, now - step[1])
            # At every step: the site counts each charge once ...
            for name, user in self.users.items():
                self.assertEqual(view(site, user.account_id), opening[name] - charged[name])
            # ... the primary holds each UUID at most once, and exactly what it holds ...
            uuids = ledger_uuids(primary)
            charges = [u for u in uuids if u in amounts]
            self.assertEqual(len(charges), len(set(charges)))
            for name, user in self.users.items():
                applied = sum(c for u, (n, c) in amounts.items() if n == name and u in charges)
                self.assertEqual(balance(primary, user.account_id), opening[name] - applied)
            # ... and applied_seq only moves forward, ahead of what the replica shows.
            seq = applied_seq(primary)
            self.assertGreaterEqual(seq, last_applied)
            self.assertLessEqual(site.read(outbox.thdOwnAppliedSeq), seq)
            last_applied = seq
        # Reconnect: drain, then stream.
        submit(primary, site, max(acked, site.read(outbox.thdOwnAppliedSeq)), now=now + 1)
        sync(primary, site, now=now + 1)
        uuids = ledger_uuids(primary)
        for txn_uuid in amounts:
            self.assertEqual(uuids.count(txn_uuid), 1)
        for name, user in self.users.items():
            self.assertEqual(balance(primary, user.account_id), opening[name] - charged[name])
            self.assertEqual(view(site, user.account_id), opening[name] - charged[name])
        self.assertEqual(site.read(outbox.thdPendingCount), 0)


# -- at the primary (SQLite and PostgreSQL) ----------------------------------------------


class PrimarySideMixin(StoreMixin):
    """A primary (SQLite or PostgreSQL) with sites north and south, and their replicas."""

    def setUp(self) -> None:
        self.primary = self.open_primary()
        self.primary.write(thdAddSite, SITE, NOW)
        self.primary.write(thdAddSite, "south", NOW)
        self.alice = self.primary.write(thdAddUser, "alice", NOW, balance=10_00, restricted=False)
        self.bob = self.primary.write(thdAddUser, "bob", NOW, balance=5_00, restricted=False)
        # carol: restricted, 1.00, no credit.
        self.carol = self.primary.write(thdAddUser, "carol", NOW, balance=1_00)
        self.primary.write(thdSetPolicy, "offline.allowance", "5.00", NOW)
        self.site = open_site_store(self)
        load_snapshot(self.primary, self.site)

    def south(self) -> Store:
        south = open_site_store(self, "south.db")
        load_snapshot(self.primary, south, "south")
        return south


class ExactlyOnceMixin(PrimarySideMixin):
    """A charge is counted once at every moment, whichever of the primary's answer
    ("ack") and the replicated change ("stream") reaches the site first."""

    def assertCounted(self, total: int) -> None:
        """The site's view is the opening balance less every charge, exactly once."""
        self.assertEqual(view(self.site, self.alice.account_id), 10_00 - total)

    def test_ack_first(self) -> None:
        """Applied at the primary, stream not yet arrived: still counted once."""
        amounts = [30, 45, 25]
        charges = [site_charge(self.site, self.alice, a) for a in amounts]
        self.assertCounted(100)
        acked = submit(self.primary, self.site)  # the answer reaches the site
        self.assertEqual(acked, 3)
        self.assertEqual(balance(self.primary, self.alice.account_id), 10_00 - 100)
        self.assertCounted(100)
        # Charged again before the stream arrives: the new record is counted too.
        later = site_charge(self.site, self.alice, 7)
        self.assertCounted(107)
        # The drain goes on from what was acknowledged.
        self.assertEqual([r.seq for r in pending(self.site, acked)], [4])
        sync(self.primary, self.site)
        self.assertCounted(107)
        self.assertEqual(self.site.read(outbox.thdOwnAppliedSeq), 3)
        self.assertEqual(self.site.read(outbox.thdPendingCount), 1)
        self.assertEqual(submit(self.primary, self.site), 4)
        self.assertCounted(107)
        sync(self.primary, self.site)
        self.assertCounted(107)
        self.assertEqual(self.site.read(outbox.thdPendingCount), 0)
        self.assertEqual(self.site.read(outbox.thdPending, 4, 10), [])
        uuids = ledger_uuids(self.primary)
        for charge in [*charges, later]:
            self.assertEqual(uuids.count(charge.txn_uuid), 1)
        self.assertEqual(balance(self.primary, self.alice.account_id), 10_00 - 107)

    def test_stream_first(self) -> None:
        """Applied at the primary and streamed to the site before the answer arrives:
        counted once throughout, and the late answer changes nothing."""
        site_charge(self.site, self.alice, 30)
        site_charge(self.site, self.alice, 45)
        self.assertCounted(75)
        payloads = [r.payload for r in pending(self.site)]
        answer = apply(self.primary, payloads)  # the answer is still on its way
        self.assertCounted(75)
        site_charge(self.site, self.alice, 5)
        self.assertCounted(80)
        sync(self.primary, self.site)
        self.assertCounted(80)
        self.assertEqual(self.site.read(outbox.thdOwnAppliedSeq), 2)
        self.assertEqual(self.site.read(outbox.thdPendingCount), 1)
        # The answer arrives now: the drain continues after it; nothing is counted twice.
        self.assertEqual(answer, 2)
        self.assertEqual([r.seq for r in pending(self.site, max(answer, 2))], [3])
        self.assertCounted(80)
        submit(self.primary, self.site)
        sync(self.primary, self.site)
        self.assertCounted(80)
        self.assertEqual(balance(self.primary, self.alice.account_id), 10_00 - 80)
        self.assertEqual(self.site.read(outbox.thdPendingCount), 0)

    def test_stream_split_inside_an_applied_batch(self) -> None:
        """The primary streams in batches of limited size; one may end between the
        balance changes and the applied_seq change of one applied outbox batch. Such a
        batch is flagged partial and the site holds it (as ``PrimaryLinkProtocol._pull``
        does), so it counts each charge once after every batch it applies."""
        for cost in (30, 45, 25):
            site_charge(self.site, self.alice, cost)
        submit(self.primary, self.site)
        held: list[changelog.Change] = []
        seen = self.site.read(replica.thdReplicaState).position
        partials = 0
        while True:
            batch = self.primary.read(changelog.thdChangeBatch, seen, 1, (None, SITE))
            held.extend(batch.changes)
            seen = batch.upto
            if batch.partial:
                partials += 1
                continue
            self.site.write(replica.thdApplyChanges, held, batch.upto, NOW)
            held = []
            self.assertCounted(100)
            if not batch.limited:
                break
        # The applied batch really was one transaction spanning several stream batches.
        self.assertGreater(partials, 0)

    def test_answer_lost_and_batch_resent(self) -> None:
        """The answer never arrives (the link dropped): the site resends the same batch
        after reconnecting, and nothing is counted twice anywhere."""
        site_charge(self.site, self.alice, 30)
        site_charge(self.site, self.alice, 45)
        submit(self.primary, self.site)  # answer lost
        submit(self.primary, self.site)  # resent: the replica still says applied_seq 0
        self.assertCounted(75)
        self.assertEqual(balance(self.primary, self.alice.account_id), 10_00 - 75)
        sync(self.primary, self.site)
        self.assertCounted(75)

    def test_job_log_applied_once(self) -> None:
        """A charge's job reaches the primary's job log once, with the site's cost."""
        job = JobInfo("copy", None, "north-mfd", pages=4, copies=2, colour=True)
        site_charge(self.site, self.alice, 80, job=job, now=NOW + 5)
        submit(self.primary, self.site, now=NOW + 60)
        submit(self.primary, self.site, now=NOW + 61)
        jobs = self.primary.read(thdListJobs, "alice")
        self.assertEqual(len(jobs), 1)
        logged = jobs[0]
        self.assertEqual(
            (logged.uuid, logged.kind, logged.cost, logged.pages, logged.copies, logged.colour),
            (job.uuid, "copy", 80, 4, 2, True),
        )
        self.assertEqual(
            (logged.site, logged.printer_name, logged.created_at), (SITE, "north-mfd", NOW + 5)
        )
        self.assertEqual(logged.account_id, self.alice.account_id)
        txn = self.primary.read(thdListTransactions, self.alice.account_id)[0]
        self.assertEqual((txn.amount, txn.job_uuid, txn.site), (-80, job.uuid, SITE))


class ResubmissionMixin(PrimarySideMixin):
    """Applying the same records again changes nothing at the primary."""

    def setUp(self) -> None:
        super().setUp()
        self.charges = [site_charge(self.site, self.alice, a) for a in (10, 20, 30, 40, 50)]
        self.payloads = [r.payload for r in pending(self.site)]

    def state(self) -> tuple[int, int, list[str]]:
        return (
            balance(self.primary, self.alice.account_id),
            applied_seq(self.primary),
            sorted(ledger_uuids(self.primary)),
        )

    def test_same_batch_twice(self) -> None:
        """A resent batch is acknowledged with the same applied_seq and applies nothing."""
        self.assertEqual(apply(self.primary, self.payloads[:3]), 3)
        before = self.state()
        self.assertEqual(before[0], 10_00 - 60)
        self.assertEqual(apply(self.primary, self.payloads[:3], now=NOW + 10), 3)
        self.assertEqual(self.state(), before)

    def test_overlapping_batch(self) -> None:
        """An overlapping batch applies only its new records."""
        apply(self.primary, self.payloads[:3])
        self.assertEqual(apply(self.primary, self.payloads[1:]), 5)
        balance_, seq, uuids = self.state()
        self.assertEqual((balance_, seq), (10_00 - 150, 5))
        for charge in self.charges:
            self.assertEqual(uuids.count(charge.txn_uuid), 1)

    def test_applied_seq_never_goes_back(self) -> None:
        """An old batch arriving late leaves applied_seq where it was."""
        apply(self.primary, self.payloads)
        self.assertEqual(apply(self.primary, self.payloads[:2]), 5)
        self.assertEqual(apply(self.primary, []), 5)
        self.assertEqual(self.state()[:2], (10_00 - 150, 5))
        sync(self.primary, self.site)
        self.assertEqual(self.site.read(outbox.thdOwnAppliedSeq), 5)

    def test_only_the_submitting_sites_seq(self) -> None:
        """applied_seq is per site: north's batch does not move south's, and south's
        replica never holds north's row."""
        apply(self.primary, self.payloads)
        south = self.south()
        self.assertEqual(applied_seq(self.primary, "south"), 0)
        self.assertEqual(south.read(outbox.thdOwnAppliedSeq), 0)
        sync(self.primary, south, "south")
        self.assertEqual(south.read(outbox.thdOwnAppliedSeq), 0)
        self.assertEqual(view(south, self.alice.account_id), 10_00 - 150)


class SuspenseMixin(PrimarySideMixin):
    """A charge whose user vanished at the primary lands on the Suspense account."""

    def test_removed_user(self) -> None:
        """bob is removed at the primary while north charges him offline: the charge
        goes to Suspense with a comment naming him; the rest of the batch applies."""
        job = JobInfo("print", None, "north-laser", pages=2)
        first = site_charge(self.site, self.alice, 10)
        lost = site_charge(self.site, self.bob, 25, job=job)
        last = site_charge(self.site, self.alice, 15)
        self.primary.write(thdRemoveUser, "bob", NOW + 1)
        suspense = self.primary.read(thdAccount, SUSPENSE_ACCOUNT)

        self.assertEqual(submit(self.primary, self.site, now=NOW + 2), 3)
        txn = transaction(self.primary, lost.txn_uuid)
        self.assertEqual((txn.account_id, txn.amount), (suspense.id, -25))
        self.assertIn("'bob'", txn.comment)
        self.assertIn("suspense", txn.comment)
        self.assertEqual(balance(self.primary, suspense.id), suspense.balance - 25)
        self.assertEqual(transaction(self.primary, first.txn_uuid).account_name, "alice")
        self.assertEqual(transaction(self.primary, last.txn_uuid).account_name, "alice")
        self.assertEqual(balance(self.primary, self.alice.account_id), 10_00 - 25)
        jobs = self.primary.read(thdListJobs, "bob")
        self.assertEqual(
            [(j.uuid, j.account_id, j.cost) for j in jobs], [(job.uuid, suspense.id, 25)]
        )
        self.assertEqual(applied_seq(self.primary), 3)

        # Resent: nothing more lands on Suspense.
        self.assertEqual(submit(self.primary, self.site, 0), 3)
        self.assertEqual(balance(self.primary, suspense.id), suspense.balance - 25)
        self.assertEqual(ledger_uuids(self.primary).count(lost.txn_uuid), 1)

        # The site learns both: bob is gone, alice's charges are applied.
        sync(self.primary, self.site)
        self.assertEqual(self.site.read(outbox.thdPendingCount), 0)
        self.assertEqual(view(self.site, self.alice.account_id), 10_00 - 25)
        self.assertIsNone(self.site.read(thdAccountById, self.bob.account_id))

    def test_account_name_mismatch(self) -> None:
        """A record whose account id now names another account is not booked to that
        account: it goes to Suspense."""
        site_charge(self.site, self.alice, 10)
        record = dict(pending(self.site)[0].payload, account_id=self.bob.account_id)
        apply(self.primary, [record])
        txn = transaction(self.primary, record["uuid"])
        self.assertEqual(txn.account_name, SUSPENSE_ACCOUNT)
        self.assertEqual(balance(self.primary, self.bob.account_id), 5_00)
        self.assertEqual(balance(self.primary, self.alice.account_id), 10_00)


class DeadLetterMixin(PrimarySideMixin):
    """Records that can never apply go to the dead-letter table, once; the batch goes on."""

    def record(self, seq: int, **changes: Any) -> dict[str, Any]:
        """A well-formed record of a 0.01 charge to alice, with ``changes``."""
        base = dict(self.template, uuid=str(uuidlib.uuid4()), seq=seq)
        base.update(changes)
        return base

    def setUp(self) -> None:
        super().setUp()
        site_charge(self.site, self.alice, 1)
        self.template = pending(self.site)[0].payload

    def test_malformed_records(self) -> None:
        """Each kind of malformed record is kept once; the good ones apply; applied_seq
        passes them all."""
        missing = self.record(2)
        del missing["amount"]
        bad_job = self.record(9, job={"uuid": "j", "kind": "print", "printer_name": "p"})
        bad = [
            missing,
            self.record(3, amount="-1"),  # wrong type
            self.record(4, amount=True),  # a JSON boolean is not an amount
            self.record(5, kind="refund-request"),
            self.record(6, reason="gift"),
            self.record(7, format=2),
            self.record(8, account_id=False),
            bad_job,
            self.record(10, job=dict(self.job(), pages=True)),
            self.record(11, job=dict(self.job(), kind="teleport")),
        ]
        good = [self.record(1), self.record(12)]
        batch = [good[0], *bad, good[1]]
        self.assertEqual(apply(self.primary, batch), 12)
        letters = self.primary.read(thdDeadLetters)
        self.assertEqual(
            [(s, u, q) for s, u, q, _e in letters], [(SITE, r["uuid"], r["seq"]) for r in bad]
        )
        errors = [e for _s, _u, _q, e in letters]
        self.assertIn("'amount'", errors[0])
        self.assertIn("'amount'", errors[2])
        self.assertIn("refund-request", errors[3])
        self.assertIn("gift", errors[4])
        self.assertIn("format 2", errors[5])
        self.assertIn("teleport", errors[9])
        self.assertEqual(balance(self.primary, self.alice.account_id), 10_00 - 2)
        self.assertEqual(applied_seq(self.primary), 12)
        for record in bad:
            self.assertIsNone(self.primary.read(thdTransactionByUUID, record["uuid"]))

        # Resent, nothing is duplicated.
        self.assertEqual(apply(self.primary, batch, now=NOW + 5), 12)
        self.assertEqual(len(self.primary.read(thdDeadLetters)), len(bad))
        self.assertEqual(balance(self.primary, self.alice.account_id), 10_00 - 2)
        # A batch that ends with a dead letter still moves applied_seq past it.
        self.assertEqual(apply(self.primary, [self.record(13, kind="x")]), 13)
        sync(self.primary, self.site)
        self.assertEqual(self.site.read(outbox.thdOwnAppliedSeq), 13)

    def job(self) -> dict[str, Any]:
        return {
            "uuid": str(uuidlib.uuid4()),
            "kind": "print",
            "printer_id": None,
            "printer_name": "north-laser",
            "document": "",
            "pages": 1,
            "copies": 1,
            "colour": False,
            "duplex": False,
            "status": "printed",
        }

    def test_not_a_record(self) -> None:
        """Values that are not records at all are kept too, and do not stop the batch."""
        self.assertEqual(apply(self.primary, ["junk", 42, None, self.record(3)]), 3)
        self.assertEqual(len(self.primary.read(thdDeadLetters)), 3)
        self.assertEqual(balance(self.primary, self.alice.account_id), 10_00 - 1)

    def test_records_without_uuid_are_all_kept(self) -> None:
        """Two different records without a UUID are two dead letters, not one."""
        first = self.record(2)
        second = self.record(3, amount=-5)
        del first["uuid"], second["uuid"]
        apply(self.primary, [first, second])
        letters = self.primary.read(thdDeadLetters)
        self.assertEqual(sorted(q for _s, _u, q, _e in letters), [2, 3])
        apply(self.primary, [first, second])
        self.assertEqual(len(self.primary.read(thdDeadLetters)), 2)

    def test_unstorable_values(self) -> None:
        """Records the primary's database cannot store (an overlong UUID or name, a NUL
        in a name, a number beyond its column) go to the dead-letter table on every
        backend instead of failing the whole batch; NULs in free text are dropped."""
        nul_document = self.record(3, job=dict(self.job(), document="a\x00b"))
        bad = [
            self.record(1, uuid="u" * 37),
            self.record(2, username="x" * 201),
            self.record(4, job=dict(self.job(), uuid="j" * 37)),
            self.record(5, amount=-(2**70)),
            self.record(6, job=dict(self.job(), pages=2**40)),
            self.record(7, user_id="abc"),
            self.record(8, username="a\x00b"),
            self.record(2**70),  # a sequence number no column can hold
        ]
        good = self.record(9)
        batch = [*bad[:2], nul_document, *bad[2:], good]
        self.assertEqual(apply(self.primary, batch), 9)
        self.assertEqual(applied_seq(self.primary), 9)
        self.assertEqual(balance(self.primary, self.alice.account_id), 10_00 - 2)
        self.assertEqual(len(self.primary.read(thdDeadLetters)), len(bad))
        jobs = self.primary.read(thdListJobs, "alice")
        self.assertEqual([j.document for j in jobs], ["ab"])
        self.assertEqual(apply(self.primary, batch), 9)
        self.assertEqual(len(self.primary.read(thdDeadLetters)), len(bad))


class OverdraftMixin(PrimarySideMixin):
    """Offline charges that took an account past its limit apply, flagged."""

    def test_flagged(self) -> None:
        """carol (1.00, no credit) is charged 0.60 then 3.00 offline (allowance 5.00):
        both apply; only the second carries the overdraft flag."""
        within = site_charge(self.site, self.carol, 60)
        beyond = site_charge(self.site, self.carol, 3_00)
        self.assertEqual(view(self.site, self.carol.account_id), 1_00 - 3_60)
        submit(self.primary, self.site)
        self.assertEqual(balance(self.primary, self.carol.account_id), 1_00 - 3_60)
        self.assertFalse(self.primary.read(thdOverdraft, within.txn_uuid))
        self.assertTrue(self.primary.read(thdOverdraft, beyond.txn_uuid))

    def test_two_sites(self) -> None:
        """north and south both charge carol 0.80 offline: both apply, the second to
        arrive overdraws her and is flagged."""
        south = self.south()
        from_north = site_charge(self.site, self.carol, 80)
        from_south = site_charge(south, self.carol, 80, name="south")
        self.assertEqual(view(self.site, self.carol.account_id), 20)
        self.assertEqual(view(south, self.carol.account_id), 20)
        self.assertEqual(submit(self.primary, self.site), 1)
        self.assertEqual(submit(self.primary, south, name="south"), 1)
        self.assertEqual(balance(self.primary, self.carol.account_id), 1_00 - 1_60)
        self.assertFalse(self.primary.read(thdOverdraft, from_north.txn_uuid))
        self.assertTrue(self.primary.read(thdOverdraft, from_south.txn_uuid))
        self.assertEqual(transaction(self.primary, from_south.txn_uuid).site, "south")
        sync(self.primary, self.site)
        sync(self.primary, south, "south")
        self.assertEqual(view(self.site, self.carol.account_id), -60)
        self.assertEqual(view(south, self.carol.account_id), -60)

    def test_credit_limit_counts(self) -> None:
        """With a credit limit, only a balance below -limit is an overdraft."""
        self.primary.write(thdSetCredit, "carol", True, 2_00, NOW)
        sync(self.primary, self.site)
        carol = self.site.read(thdUser, "carol")
        to_limit = site_charge(self.site, carol, 3_00)  # -2.00: at the limit
        past = site_charge(self.site, carol, 1)  # -2.01
        submit(self.primary, self.site)
        self.assertFalse(self.primary.read(thdOverdraft, to_limit.txn_uuid))
        self.assertTrue(self.primary.read(thdOverdraft, past.txn_uuid))


class ExactlyOnceSQLiteTests(ExactlyOnceMixin, SynchronousTestCase):
    backend = "sqlite"


class ExactlyOncePostgresTests(ExactlyOnceMixin, SynchronousTestCase):
    backend = "postgres"


class ResubmissionSQLiteTests(ResubmissionMixin, SynchronousTestCase):
    backend = "sqlite"


class ResubmissionPostgresTests(ResubmissionMixin, SynchronousTestCase):
    backend = "postgres"


class SuspenseSQLiteTests(SuspenseMixin, SynchronousTestCase):
    backend = "sqlite"


class SuspensePostgresTests(SuspenseMixin, SynchronousTestCase):
    backend = "postgres"


class DeadLetterSQLiteTests(DeadLetterMixin, SynchronousTestCase):
    backend = "sqlite"


class DeadLetterPostgresTests(DeadLetterMixin, SynchronousTestCase):
    backend = "postgres"


class OverdraftSQLiteTests(OverdraftMixin, SynchronousTestCase):
    backend = "sqlite"


class OverdraftPostgresTests(OverdraftMixin, SynchronousTestCase):
    backend = "postgres"
