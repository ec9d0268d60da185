"""Group commit on SQLite: writes queued while the writer is busy share one transaction.

Real threads and a real SQLite file (this is about the writer thread): every write's
result reaches its caller only after the commit; one that fails is undone alone (its
savepoint), the others in its group are kept; many writes in flight take fewer commits.
"""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import Connection, func, select
from twisted.internet import reactor
from twisted.internet.defer import DeferredList, gatherResults
from twisted.trial.unittest import TestCase

from sitesrv.errors import InsufficientFunds
from sitesrv.store import GROUP_MAX, Store
from sitesrv.store.bootstrap import open_store, thdInitPrimary
from sitesrv.store.ledger import thdPost
from sitesrv.store.schema import transactions
from sitesrv.store.users import thdAddUser, thdUser
from tests.support import NOW, sqlite_url


class Boom(Exception):
    """A write that fails after writing."""


def thdChargeThenFail(conn: Connection, account_id: int) -> None:
    thdPost(conn, account_id, -5, "copy", NOW, site="hq", txn_uuid=str(uuid.uuid4()))
    raise Boom()


def thdCount(conn: Connection) -> int:
    return int(conn.execute(select(func.count()).select_from(transactions)).scalar_one())


class GroupCommitTests(TestCase):
    def setUp(self) -> None:
        self.store: Store = open_store(sqlite_url(self, "group.db"))
        self.store.write(thdInitPrimary, "hq", "USD", 2, NOW)
        self.store.write(thdAddUser, "alice", NOW, balance=10_000)
        self.account = self.store.read(thdUser, "alice").account_id
        self.groups: list[int] = []
        real = self.store._thdWriteGroup

        def recording(group: list[Any]) -> Any:
            self.groups.append(len(group))
            return real(group)

        self.store._thdWriteGroup = recording  # type: ignore[method-assign]
        self.store.start(reactor)
        self.addCleanup(self.store.stop)
        self.before = self.store.read(thdCount)

    def charge(self) -> Any:
        return self.store.runWrite(
            thdPost, self.account, -1, "copy", NOW, site="hq", txn_uuid=str(uuid.uuid4())
        )

    async def test_many_writes_fewer_commits(self) -> None:
        """200 charges in flight: all recorded, in fewer transactions than charges."""
        await gatherResults([self.charge() for _ in range(200)])
        self.assertEqual(self.store.read(thdCount) - self.before, 200)
        self.assertEqual(sum(self.groups), 200)
        self.assertLess(len(self.groups), 200)
        self.assertLessEqual(max(self.groups), GROUP_MAX)
        self.assertEqual(self.store.read(thdUser, "alice").balance, 10_000 - 200)

    async def test_a_failure_is_undone_alone(self) -> None:
        """A write that fails mid-group loses its own changes and nobody else's."""
        ds = [self.charge() for _ in range(5)]
        ds.append(self.store.runWrite(thdChargeThenFail, self.account))
        ds += [self.charge() for _ in range(5)]
        results = await DeferredList(ds, consumeErrors=True)
        self.assertEqual([ok for ok, _ in results], [True] * 5 + [False] + [True] * 5)
        results[5][1].trap(Boom)
        self.assertEqual(self.store.read(thdCount) - self.before, 10)
        self.assertEqual(self.store.read(thdUser, "alice").balance, 10_000 - 10)
        self.assertGreater(max(self.groups), 1)

    async def test_refusals_are_per_write(self) -> None:
        """A charge refused for funds in a group fails alone, as in its own transaction."""
        self.store.write(thdAddUser, "bob", NOW, balance=1)
        bob = self.store.read(thdUser, "bob").account_id
        ds = [
            self.store.runWrite(
                thdPost,
                bob,
                -1,
                "copy",
                NOW,
                site="hq",
                txn_uuid=str(uuid.uuid4()),
                enforce_limit=True,
            )
            for _ in range(4)
        ]
        results = await DeferredList(ds, consumeErrors=True)
        self.assertEqual([ok for ok, _ in results], [True, False, False, False])
        for _, failure in results[1:]:
            failure.trap(InsufficientFunds)
        self.assertEqual(self.store.read(thdUser, "bob").balance, 0)
