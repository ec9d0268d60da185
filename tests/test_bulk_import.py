"""``users.thdImportUsers`` gives exactly what ``thdAddUser`` + ``thdAddCard`` give."""

from __future__ import annotations

import os
from typing import Any

from sqlalchemy import create_engine, select, text
from twisted.trial.unittest import TestCase

from sitesrv.errors import AlreadyExists, Invalid
from sitesrv.store import Store
from sitesrv.store.bootstrap import open_store, thdInitPrimary
from sitesrv.store.engine import normalise_url, thdInsertMany
from sitesrv.store.schema import (
    accounts,
    cards,
    changelog,
    passwords,
    replication_state,
    transactions,
    users,
)
from sitesrv.store.users import (
    IMPORT_CHUNK,
    NewUser,
    thdAddCard,
    thdAddUser,
    thdImportUsers,
    thdUser,
)

NOW = 1_800_000_000.0
POSTGRES_ENV = "SITESRV_TEST_POSTGRES_URL"

# Enough users to span more than one import chunk, with every optional field used.
PEOPLE = [
    NewUser(
        f"user{i:04d}",
        full_name=f"User {i}" if i % 3 else "",
        email=f"user{i}@example.org" if i % 4 else "",
        balance=(i * 25) if i % 5 else 0,
        restricted=bool(i % 7),
        credit_limit=100 if i % 2 else 0,
        password_verifier=f"$scrypt$fake${i}" if i % 6 == 0 else None,
        cards=tuple(f"{i:05d}{k}" for k in range(i % 3)),
    )
    for i in range(IMPORT_CHUNK + 37)
]


def _thdOneByOne(conn: Any, people: list[NewUser], now: float) -> None:
    for p in people:
        thdAddUser(
            conn,
            p.username,
            now,
            full_name=p.full_name,
            email=p.email,
            balance=p.balance,
            restricted=p.restricted,
            credit_limit=p.credit_limit,
            password_verifier=p.password_verifier,
            site="hq",
        )
        for number in p.cards:
            thdAddCard(conn, p.username, number, now)


def _thdDump(conn: Any) -> dict[str, list[Any]]:
    """Every row the import touches; transaction UUIDs are random, so left out."""
    dump = {
        t.name: [tuple(r) for r in conn.execute(select(t).order_by(t.c.id))]
        for t in (users, accounts, cards, passwords)
    }
    dump["transactions"] = [
        tuple(v for k, v in r.items() if k != "uuid")
        for r in conn.execute(select(transactions).order_by(transactions.c.id)).mappings()
    ]
    # Which entries a site applies together may differ (a bulk import is grouped per
    # call, not per database transaction); every entry and position must not.
    dump["changelog"] = [
        tuple(v for k, v in r.items() if k != "txn")
        for r in conn.execute(select(changelog).order_by(changelog.c.position)).mappings()
    ]
    dump["head"] = [conn.execute(select(replication_state.c.head)).scalar_one()]
    return dump


class ImportSQLiteTests(TestCase):
    """On SQLite files."""

    def database_url(self) -> str:
        """A fresh, empty database."""
        directory = self.mktemp()
        os.makedirs(directory)
        return f"sqlite:///{os.path.abspath(os.path.join(directory, 'sitesrv.db'))}"

    def primary(self) -> Store:
        """A migrated primary database named "hq"."""
        store = open_store(self.database_url())
        self.addCleanup(store.stop)
        store.write(thdInitPrimary, "hq", "USD", 2, NOW)
        return store

    def test_same_as_one_by_one(self) -> None:
        """Same users, accounts, cards, passwords, transactions and change log."""
        one = self.primary()
        one.write(_thdOneByOne, PEOPLE, NOW)
        expected = one.read(_thdDump)
        one.stop()
        bulk = self.primary()
        self.assertEqual(bulk.write(thdImportUsers, PEOPLE, NOW, site="hq"), len(PEOPLE))
        self.assertEqual(bulk.read(_thdDump), expected)
        self.assertGreater(len(expected["changelog"]), 2 * len(PEOPLE))

    def test_refused_import_writes_nothing(self) -> None:
        """A duplicate, an existing card or a bad name refuses the whole import."""
        store = self.primary()
        store.write(thdAddUser, "alice", NOW)
        store.write(thdAddCard, "alice", "42", NOW)
        before = store.read(_thdDump)
        cases: list[tuple[list[NewUser], type[Exception], str]] = [
            ([NewUser("bob"), NewUser("bob")], AlreadyExists, "user 'bob' already exists"),
            ([NewUser("bob"), NewUser("alice")], AlreadyExists, "user 'alice' already exists"),
            ([NewUser("bob", cards=("42",))], AlreadyExists, "card '42' already belongs to"),
            (
                [NewUser("bob", cards=("7",)), NewUser("carol", cards=("7",))],
                AlreadyExists,
                "card '7' already belongs to 'bob'",
            ),
            ([NewUser("bob"), NewUser(" ")], Invalid, "must not be empty"),
            ([NewUser("bob", credit_limit=-1)], Invalid, "must not be negative"),
            ([NewUser("bob", cards=("",))], Invalid, "card number"),
        ]
        for people, error, message in cases:
            e = self.assertRaises(error, store.write, thdImportUsers, people, NOW)
            self.assertIn(message, str(e))
            self.assertEqual(store.read(_thdDump), before)

    def test_awkward_values_same_as_one_by_one(self) -> None:
        """Text that COPY must escape (tabs, newlines, backslashes, "\\N", non-ASCII)
        and an import after rows written one by one come out as the one-by-one path."""
        awkward = [
            NewUser(
                "back\\slash\\N",
                full_name="line\nbreak\r\\N back\\slash",
                email="\u00e9t\u00e9@\U0001f600.example",
                balance=-5,
                restricted=False,
                credit_limit=2**40,
                password_verifier="$x$\\.\t",
                cards=("\\N", "a\tb"),
            ),
            NewUser("\u00e9mile", cards=("\u20ac1",)),
        ]
        first, rest = PEOPLE[:3], [*awkward, *PEOPLE[3:10]]
        one = self.primary()
        one.write(_thdOneByOne, first + rest, NOW)
        expected = one.read(_thdDump)
        one.stop()
        bulk = self.primary()
        bulk.write(_thdOneByOne, first, NOW)
        bulk.write(thdImportUsers, rest, NOW, site="hq")
        self.assertEqual(bulk.read(_thdDump), expected)
        # Later one-by-one inserts take the ids after the imported ones.
        bulk.write(thdAddUser, "later", NOW)
        one = self.primary()
        one.write(_thdOneByOne, first + rest, NOW)
        one.write(thdAddUser, "later", NOW)
        self.assertEqual(bulk.read(_thdDump), one.read(_thdDump))

    def test_insert_many(self) -> None:
        """``thdInsertMany``: ids in row order by key, defaults, iterators, no rows."""
        store = self.primary()
        store.write(thdAddUser, "alice", NOW)

        def thdInsert(conn: Any) -> tuple[dict[Any, int], dict[Any, int], dict[Any, int]]:
            columns = ("username", "full_name", "email", "created_at")
            ids = thdInsertMany(
                conn,
                users,
                columns,
                [(name, "", "", NOW) for name in ("zed", "bob", "\\N")],
                key="username",
            )
            empty = thdInsertMany(conn, users, columns, [], key="username")
            rows = iter([(ids["zed"], "1234", NOW), (ids["bob"], "5678", NOW)])
            none = thdInsertMany(conn, cards, ("user_id", "number", "created_at"), rows)
            return ids, empty, none

        ids, empty, none = store.write(thdInsert)
        alice = store.read(thdUser, "alice").id
        self.assertEqual(ids, {"zed": alice + 1, "bob": alice + 2, "\\N": alice + 3})
        self.assertEqual((empty, none), ({}, {}))
        # Left-out columns have their defaults: disabled False, no PIN.
        self.assertEqual(
            store.read(
                lambda c: c.execute(
                    select(users.c.id, users.c.username, users.c.disabled, users.c.pin_verifier)
                    .where(users.c.id > alice)
                    .order_by(users.c.id)
                ).all()
            ),
            [
                (alice + 1, "zed", False, None),
                (alice + 2, "bob", False, None),
                (alice + 3, "\\N", False, None),
            ],
        )
        self.assertEqual(
            store.read(lambda c: c.execute(select(cards.c.number).order_by(cards.c.id)).all()),
            [("1234",), ("5678",)],
        )
        # The sequence goes on after the ids taken.
        self.assertEqual(store.write(thdAddUser, "carol", NOW).id, alice + 4)
        # A column without a default must be given.
        self.assertRaises(
            ValueError, store.write, thdInsertMany, users, ("username",), [("dora",)]
        )

    def test_imported_users_work(self) -> None:
        """Imported users are found like any other, with their balance."""
        store = self.primary()
        store.write(thdImportUsers, [NewUser("dave", balance=250, cards=("9",))], NOW)
        user = store.read(thdUser, "dave")
        self.assertEqual((user.balance, user.restricted), (250, True))


class ImportPostgresTests(ImportSQLiteTests):
    """On PostgreSQL (skipped unless SITESRV_TEST_POSTGRES_URL is set)."""

    def database_url(self) -> str:
        """The PostgreSQL test database, emptied."""
        url = os.environ.get(POSTGRES_ENV)
        if not url:
            raise self.skipTest(f"PostgreSQL not configured: set {POSTGRES_ENV}")
        engine = create_engine(normalise_url(url))
        with engine.begin() as conn:
            conn.execute(text("DROP SCHEMA public CASCADE"))
            conn.execute(text("CREATE SCHEMA public"))
        engine.dispose()
        return url
