"""Applying change batches at a site: runs of upserts in bulk, with the same result."""

from __future__ import annotations

from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from sitesrv.store.bootstrap import open_store
from sitesrv.store.changelog import Change
from sitesrv.store.replica import thdApplyChanges
from sitesrv.store.schema import ROW_FORMAT, cards, users
from tests.support import NOW, sqlite_url


def upsert(position: int, table: str, image: dict[str, Any]) -> Change:
    return Change(position, table, image["id"], "upsert", image, None, ROW_FORMAT, position)


def user(user_id: int, name: str) -> dict[str, Any]:
    return {
        "id": user_id,
        "username": name,
        "full_name": "",
        "email": "",
        "disabled": False,
        "pin_verifier": None,
        "created_at": NOW,
    }


def card(card_id: int, number: str, user_id: int) -> dict[str, Any]:
    return {"id": card_id, "number": number, "user_id": user_id, "created_at": NOW}


class BulkApplyTests(SynchronousTestCase):
    """Runs of upserts are applied in bulk; the result equals row-by-row application."""

    def setUp(self) -> None:
        self.store = open_store(sqlite_url(self))
        self.addCleanup(self.store.stop)

    def rows(self, table: Any) -> list[tuple[Any, ...]]:
        def thd(conn: Any) -> list[tuple[Any, ...]]:
            return [tuple(r) for r in conn.execute(table.select().order_by(table.c.id))]

        return self.store.read(thd)

    def test_many_updates_of_few_rows(self) -> None:
        """Twenty images of two rows in a run: each row ends with its last image."""
        changes = [upsert(1, "users", user(1, "a")), upsert(2, "users", user(2, "b"))]
        for n in range(20):
            changes.append(upsert(3 + n, "users", user(1 + n % 2, f"name-{n}")))
        position = self.store.write(thdApplyChanges, changes, 22)
        self.assertEqual(position, 22)
        self.assertEqual([r[1] for r in self.rows(users)], ["name-18", "name-19"])

    def test_constraint_only_order_satisfies(self) -> None:
        """Two cards swap numbers through a temporary one: the bulk form would collide
        on the unique number; the run is applied row by row and ends right."""
        self.store.write(
            thdApplyChanges,
            [upsert(1, "users", user(1, "a"))]
            + [upsert(2 + i, "cards", card(1 + i, f"n{i}", 1)) for i in range(10)],
            11,
        )
        swap = [
            upsert(12, "cards", card(1, "tmp", 1)),
            upsert(13, "cards", card(2, "n0", 1)),
            upsert(14, "cards", card(1, "n1", 1)),
        ] + [upsert(15 + i, "cards", card(3 + i, f"m{i}", 1)) for i in range(8)]
        self.store.write(thdApplyChanges, swap, 22)
        numbers = [r[1] for r in self.rows(cards)]
        self.assertEqual(numbers[:2], ["n1", "n0"])
        self.assertEqual(numbers[2:], [f"m{i}" for i in range(8)])

    def test_inserts_and_updates_mixed(self) -> None:
        """A run with new and existing rows inserts the new and updates the old."""
        self.store.write(thdApplyChanges, [upsert(1, "users", user(1, "old"))], 1)
        run = [upsert(2 + i, "users", user(1 + i, f"u{i}")) for i in range(10)]
        self.store.write(thdApplyChanges, run, 11)
        self.assertEqual([r[1] for r in self.rows(users)], [f"u{i}" for i in range(10)])
