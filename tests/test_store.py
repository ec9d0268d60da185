"""Tests for the store's domain components on SQLite and PostgreSQL.

Each test class is a mixin run twice: against a SQLite file and against PostgreSQL (which
skips unless ``SITESRV_TEST_POSTGRES_URL`` is set). Tests call ``thd`` functions through
``Store.write`` / ``Store.read``, as the admin CLI does.
"""

from __future__ import annotations

import shutil
import threading
import uuid
from typing import TYPE_CHECKING, Any

from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import Connection, Table, func, insert, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError
from twisted.trial.unittest import SynchronousTestCase

from sitesrv.errors import AlreadyExists, InsufficientFunds, Invalid, NotFound
from sitesrv.secrets import check_verifier, make_verifier, token_matches
from sitesrv.store import Store
from sitesrv.store.audit import thdAudit, thdListAudit
from sitesrv.store.bootstrap import open_store, thdInitPrimary
from sitesrv.store.changelog import Change, thdChangesSince, thdState
from sitesrv.store.devices import (
    thdAddDevice,
    thdAddProvider,
    thdDevice,
    thdListDevices,
    thdListProviders,
    thdProvider,
    thdRemoveDevice,
    thdRemoveProvider,
    thdRotateProviderKey,
)
from sitesrv.store.jobs import thdListJobs, thdLogJob
from sitesrv.store.ledger import (
    OFFLINE_ACCOUNT,
    SUSPENSE_ACCOUNT,
    thdAccount,
    thdAddAccount,
    thdListTransactions,
    thdPost,
    thdTransactionByUUID,
)
from sitesrv.store.policies import (
    POLICIES,
    thdClearPolicy,
    thdEffectivePolicies,
    thdSetPolicy,
)
from sitesrv.store.printers import thdAddPrinter, thdListPrinters, thdPrinter
from sitesrv.store.schema import (
    accounts,
    cards,
    devices,
    group_members,
    passwords,
    providers,
    sites,
    transactions,
    users,
)
from sitesrv.store.sites import (
    thdAddSite,
    thdListSites,
    thdRevokeSite,
    thdRotateToken,
    thdSite,
    thdSiteTokenHash,
)
from sitesrv.store.users import (
    Credentials,
    thdAddCard,
    thdAddGroup,
    thdAddMember,
    thdAddUser,
    thdCardsOf,
    thdCredentialsByCard,
    thdCredentialsByUsername,
    thdGroupsOf,
    thdListGroups,
    thdListUsers,
    thdRemoveCard,
    thdRemoveUser,
    thdSetCredit,
    thdSetDisabled,
    thdSetPassword,
    thdSetPin,
    thdUpdateUser,
    thdUser,
)
from tests.support import NOW, POSTGRES_ENV, StoreMixin, postgres_url, sqlite_url

# Mixins are test cases to the type checker only; the concrete classes add the real base.
if TYPE_CHECKING:
    _TestCase = SynchronousTestCase
else:
    _TestCase = object

#: Why the PostgreSQL variants skip (``None``: they run).
POSTGRES_SKIP = (
    None if postgres_url() else f"PostgreSQL not configured: set {POSTGRES_ENV} (CI does)"
)

#: Cheap scrypt cost for test verifiers (the real cost is 2**14).
CHEAP_N = 2**10


def thdRows(conn: Connection, table: Table, *where: Any) -> list[dict[str, Any]]:
    """The rows of ``table`` matching ``where``, as plain dicts, in id order."""
    q = select(table).where(*where).order_by(table.c.id)
    return [dict(r) for r in conn.execute(q).mappings()]


def thdCount(conn: Connection, table: Table, *where: Any) -> int:
    """How many rows of ``table`` match ``where``."""
    return conn.execute(select(func.count()).select_from(table).where(*where)).scalar_one()


class _Base(StoreMixin, _TestCase):
    """Opens a fresh primary "hq" for every test, with helpers to read the change log."""

    def setUp(self) -> None:
        super().setUp()
        self.store = self.open_primary()

    def head(self) -> int:
        return self.store.read(thdState)[1]

    def credentials(self, username: str) -> Credentials:
        creds = self.store.read(thdCredentialsByUsername, username)
        assert creds is not None, username
        return creds

    def holder(self, number: str) -> str | None:
        """The username holding card ``number``, or None."""
        creds = self.store.read(thdCredentialsByCard, number)
        return None if creds is None else creds.user.username

    def changes_after(self, position: int, *scopes: str) -> list[Change]:
        """Every change after ``position`` visible to the global scope and ``scopes``."""
        changes, _upto, limited = self.store.read(
            thdChangesSince, position, 100_000, (None, *scopes)
        )
        assert not limited
        return changes


# -- SQLite engine set-up ---------------------------------------------------------------


class SQLiteEngineTests(SynchronousTestCase):
    """The SQLite engines are set up as the store rules in DESIGN.md ask."""

    def setUp(self) -> None:
        self.store = open_store(sqlite_url(self))
        self.addCleanup(self.store.stop)

    def pragma(self, engine: Any, name: str) -> Any:
        with engine.connect() as conn:
            return conn.exec_driver_sql(f"PRAGMA {name}").scalar()

    def test_writer_and_reader_pragmas(self) -> None:
        """WAL journal, synchronous=FULL (2) and foreign keys on, on both engines."""
        self.assertIsNot(self.store.writer, self.store.reader)
        for engine in (self.store.writer, self.store.reader):
            self.assertEqual(self.pragma(engine, "journal_mode"), "wal")
            self.assertEqual(self.pragma(engine, "synchronous"), 2)
            self.assertEqual(self.pragma(engine, "foreign_keys"), 1)

    def test_foreign_keys_enforced(self) -> None:
        """A card for a user that does not exist is refused by the database."""

        def thdOrphanCard(conn: Connection) -> None:
            conn.execute(insert(cards).values(number="1", user_id=9999, created_at=NOW))

        self.assertRaises(IntegrityError, self.store.write, thdOrphanCard)

    def test_in_memory_refused(self) -> None:
        """An in-memory SQLite URL is refused with a clear message: tests use files too."""
        for url in ("sqlite://", "sqlite:///:memory:"):
            e = self.assertRaises(ValueError, Store, url)
            self.assertIn("not an in-memory database", str(e))


# -- users ------------------------------------------------------------------------------


class UsersMixin(_Base):
    """Adding, showing, listing, changing and removing users."""

    def test_add(self) -> None:
        """A new user gets a personal account and an opening-balance transaction."""
        user = self.store.write(
            thdAddUser,
            "alice",
            NOW,
            full_name="Alice Liddell",
            email="alice@example.org",
            balance=500,
            credit_limit=100,
        )
        self.assertEqual(
            (user.username, user.full_name, user.email),
            ("alice", "Alice Liddell", "alice@example.org"),
        )
        self.assertEqual((user.balance, user.restricted, user.credit_limit), (500, True, 100))
        self.assertFalse(user.disabled)
        self.assertFalse(user.has_pin)
        account = self.store.read(thdAccount, "alice")
        self.assertEqual(
            (account.id, account.type, account.user_id), (user.account_id, "personal", user.id)
        )
        self.assertEqual(account.balance, 500)
        [txn] = self.store.read(thdListTransactions, user.account_id)
        self.assertEqual((txn.amount, txn.balance_after, txn.reason), (500, 500, "initial"))
        self.assertEqual(txn.comment, "opening balance")

    def test_add_without_balance(self) -> None:
        """A user who starts at zero has no transaction."""
        user = self.store.write(thdAddUser, "bob", NOW)
        self.assertEqual(user.balance, 0)
        self.assertEqual(self.store.read(thdListTransactions, user.account_id), [])

    def test_duplicate_refused(self) -> None:
        """A second user with the same name is refused and nothing changes."""
        self.store.write(thdAddUser, "alice", NOW, balance=100)
        head = self.head()
        e = self.assertRaises(AlreadyExists, self.store.write, thdAddUser, "alice", NOW)
        self.assertIn("'alice' already exists", str(e))
        self.assertEqual([u.username for u in self.store.read(thdListUsers)], ["alice"])
        self.assertEqual(self.head(), head)

    def test_bad_names_refused(self) -> None:
        """Empty, over-long and control-character names are refused."""
        for name in ("", "   ", "x" * 201, "a\nb"):
            self.assertRaises(Invalid, self.store.write, thdAddUser, name, NOW)
        self.assertEqual(self.store.read(thdListUsers), [])

    def test_show(self) -> None:
        """A user can be looked up by name; an unknown name is NotFound."""
        added = self.store.write(thdAddUser, "alice", NOW, balance=250)
        self.assertEqual(self.store.read(thdUser, "alice"), added)
        e = self.assertRaises(NotFound, self.store.read, thdUser, "nobody")
        self.assertEqual(str(e), "no user named 'nobody'")

    def test_list(self) -> None:
        """Users are listed in name order, with paging."""
        for name in ("carol", "alice", "bob"):
            self.store.write(thdAddUser, name, NOW)
        names = [u.username for u in self.store.read(thdListUsers)]
        self.assertEqual(names, ["alice", "bob", "carol"])
        page = [u.username for u in self.store.read(thdListUsers, 1, 1)]
        self.assertEqual(page, ["bob"])

    def test_disable_enable(self) -> None:
        """Disabling and enabling a user is visible on the next lookup."""
        self.store.write(thdAddUser, "alice", NOW)
        self.assertTrue(self.store.write(thdSetDisabled, "alice", True, NOW).disabled)
        self.assertTrue(self.store.read(thdUser, "alice").disabled)
        self.store.write(thdSetDisabled, "alice", False, NOW)
        self.assertFalse(self.store.read(thdUser, "alice").disabled)

    def test_update(self) -> None:
        """The full name and email can change; other fields cannot this way."""
        self.store.write(thdAddUser, "alice", NOW)
        user = self.store.write(thdUpdateUser, "alice", NOW, full_name="Alice L", email="a@x.org")
        self.assertEqual((user.full_name, user.email), ("Alice L", "a@x.org"))
        self.assertEqual(self.store.read(thdUser, "alice"), user)
        e = self.assertRaises(
            Invalid, self.store.write, thdUpdateUser, "alice", NOW, disabled=True
        )
        self.assertEqual(str(e), "cannot change disabled")
        self.assertFalse(self.store.read(thdUser, "alice").disabled)

    def test_set_credit(self) -> None:
        """The restricted flag and credit limit can be changed; a negative limit cannot."""
        self.store.write(thdAddUser, "alice", NOW)
        self.store.write(thdSetCredit, "alice", False, 300, NOW)
        user = self.store.read(thdUser, "alice")
        self.assertEqual((user.restricted, user.credit_limit), (False, 300))
        self.assertRaises(Invalid, self.store.write, thdSetCredit, "alice", True, -1, NOW)

    def test_remove(self) -> None:
        """Removing a user removes their cards, password, memberships and account.

        Each removed row gets a delete marker in the change log, so sites drop it too;
        the ledger keeps the account's name.
        """
        user = self.store.write(thdAddUser, "alice", NOW, balance=100)
        self.store.write(thdAddUser, "bob", NOW)
        self.store.write(thdAddCard, "alice", "1111", NOW)
        self.store.write(thdAddCard, "alice", "2222", NOW)
        self.store.write(thdSetPassword, "alice", make_verifier("secret", n=CHEAP_N), NOW)
        self.store.write(thdAddGroup, "staff", NOW)
        self.store.write(thdAddMember, "staff", "alice", NOW)
        self.store.write(thdAddMember, "staff", "bob", NOW)

        def thdIds(conn: Connection) -> dict[str, set[int]]:
            return {
                "cards": {r["id"] for r in thdRows(conn, cards, cards.c.user_id == user.id)},
                "passwords": {
                    r["id"] for r in thdRows(conn, passwords, passwords.c.user_id == user.id)
                },
                "group_members": {
                    r["id"]
                    for r in thdRows(conn, group_members, group_members.c.user_id == user.id)
                },
                "accounts": {user.account_id},
                "users": {user.id},
            }

        ids = self.store.read(thdIds)
        self.assertEqual(len(ids["cards"]), 2)
        head = self.head()

        removed = self.store.write(thdRemoveUser, "alice", NOW)

        self.assertEqual(removed.username, "alice")
        self.assertRaises(NotFound, self.store.read, thdUser, "alice")
        self.assertRaises(NotFound, self.store.read, thdAccount, "alice")
        self.assertIsNone(self.store.read(thdCredentialsByCard, "1111"))
        self.assertIsNone(self.store.read(thdCredentialsByUsername, "alice"))
        self.assertEqual(self.store.read(thdCount, passwords), 0)
        self.assertEqual(self.store.read(thdCount, cards), 0)
        self.assertEqual(self.store.read(thdListGroups), [("staff", 1)])
        # Bob is untouched.
        self.assertEqual(
            self.store.read(thdGroupsOf, self.store.read(thdUser, "bob").id), ["staff"]
        )
        # One delete marker per removed row, nothing else.
        changes = self.changes_after(head)
        self.assertTrue(all(c.op == "delete" and c.image is None for c in changes))
        marked: dict[str, set[int]] = {}
        for c in changes:
            marked.setdefault(c.table, set()).add(c.row_id)
        self.assertEqual(marked, ids)
        self.assertEqual(len(changes), sum(len(v) for v in ids.values()))
        # History stays readable.
        [txn] = self.store.read(thdListTransactions, user.account_id)
        self.assertEqual((txn.account_name, txn.amount), ("alice", 100))

    def test_remove_unknown(self) -> None:
        """Removing a user who does not exist is NotFound."""
        self.assertRaises(NotFound, self.store.write, thdRemoveUser, "nobody", NOW)

    def test_set_pin(self) -> None:
        """A PIN is stored as a scrypt verifier, never as the PIN itself."""
        self.store.write(thdAddUser, "alice", NOW)
        self.store.write(thdSetPin, "alice", make_verifier("4711", n=CHEAP_N), NOW)
        self.assertTrue(self.store.read(thdUser, "alice").has_pin)
        [row] = self.store.read(thdRows, users, users.c.username == "alice")
        stored = row["pin_verifier"]
        self.assertTrue(stored.startswith("scrypt$"))
        self.assertNotIn("4711", stored)
        self.assertTrue(check_verifier("4711", stored))
        self.assertFalse(check_verifier("4712", stored))
        self.assertEqual(self.credentials("alice").pin_verifier, stored)
        # None removes the PIN.
        self.store.write(thdSetPin, "alice", None, NOW)
        self.assertFalse(self.store.read(thdUser, "alice").has_pin)

    def test_set_password(self) -> None:
        """A password is stored as a scrypt verifier; setting it again replaces it."""
        self.store.write(thdAddUser, "alice", NOW)
        self.store.write(thdSetPassword, "alice", make_verifier("first pass", n=CHEAP_N), NOW)
        self.store.write(thdSetPassword, "alice", make_verifier("second pass", n=CHEAP_N), NOW)
        [row] = self.store.read(thdRows, passwords)
        stored = row["verifier"]
        self.assertNotIn("second pass", stored)
        self.assertTrue(check_verifier("second pass", stored))
        self.assertFalse(check_verifier("first pass", stored))
        self.assertEqual(self.credentials("alice").password_verifier, stored)

    def test_add_with_password(self) -> None:
        """A user can be created with a password verifier."""
        verifier = make_verifier("hunter2", n=CHEAP_N)
        self.store.write(thdAddUser, "alice", NOW, password_verifier=verifier)
        stored = self.credentials("alice").password_verifier
        self.assertTrue(stored and check_verifier("hunter2", stored))


class UsersSQLiteTests(UsersMixin, SynchronousTestCase):
    backend = "sqlite"


class UsersPostgresTests(UsersMixin, SynchronousTestCase):
    backend = "postgres"
    skip = POSTGRES_SKIP


# -- cards ------------------------------------------------------------------------------


class CardsMixin(_Base):
    """Card numbers belong to one user each."""

    def setUp(self) -> None:
        super().setUp()
        self.alice = self.store.write(thdAddUser, "alice", NOW)
        self.bob = self.store.write(thdAddUser, "bob", NOW)

    def test_add_and_lookup(self) -> None:
        """A card added to a user finds that user."""
        self.store.write(thdAddCard, "alice", "0004711", NOW)
        self.store.write(thdAddCard, "alice", "0001234", NOW)
        self.assertEqual(self.store.read(thdCardsOf, self.alice.id), ["0001234", "0004711"])
        creds = self.store.read(thdCredentialsByCard, "0004711")
        assert creds is not None
        self.assertEqual(creds.user, self.alice)
        self.assertIsNone(creds.password_verifier)

    def test_unknown_card(self) -> None:
        """Looking up a card nobody holds gives None."""
        self.assertIsNone(self.store.read(thdCredentialsByCard, "999"))

    def test_owned_by_another(self) -> None:
        """A card another user holds is refused, naming the owner; it stays theirs."""
        self.store.write(thdAddCard, "alice", "0004711", NOW)
        e = self.assertRaises(AlreadyExists, self.store.write, thdAddCard, "bob", "0004711", NOW)
        self.assertEqual(str(e), "card '0004711' already belongs to 'alice'")
        self.assertEqual(self.holder("0004711"), "alice")
        self.assertEqual(self.store.read(thdCardsOf, self.bob.id), [])

    def test_bad_numbers(self) -> None:
        """Empty and over-long card numbers are refused; unknown users too."""
        self.assertRaises(Invalid, self.store.write, thdAddCard, "alice", "", NOW)
        self.assertRaises(Invalid, self.store.write, thdAddCard, "alice", "1" * 201, NOW)
        self.assertRaises(NotFound, self.store.write, thdAddCard, "nobody", "1", NOW)

    def test_remove(self) -> None:
        """A removed card no longer finds its user, and can be given to someone else."""
        self.store.write(thdAddCard, "alice", "0004711", NOW)
        self.assertEqual(self.store.write(thdRemoveCard, "0004711", NOW), "alice")
        self.assertIsNone(self.store.read(thdCredentialsByCard, "0004711"))
        e = self.assertRaises(NotFound, self.store.write, thdRemoveCard, "0004711", NOW)
        self.assertEqual(str(e), "no card '0004711'")
        self.store.write(thdAddCard, "bob", "0004711", NOW)
        self.assertEqual(self.holder("0004711"), "bob")


class CardsSQLiteTests(CardsMixin, SynchronousTestCase):
    backend = "sqlite"


class CardsPostgresTests(CardsMixin, SynchronousTestCase):
    backend = "postgres"
    skip = POSTGRES_SKIP


# -- groups -----------------------------------------------------------------------------


class GroupsMixin(_Base):
    """Groups and their members."""

    def test_groups(self) -> None:
        """Members are added once; a user's groups are listed in name order."""
        alice = self.store.write(thdAddUser, "alice", NOW)
        self.store.write(thdAddUser, "bob", NOW)
        self.store.write(thdAddGroup, "students", NOW)
        self.store.write(thdAddGroup, "staff", NOW)
        self.assertTrue(self.store.write(thdAddMember, "students", "alice", NOW))
        self.assertFalse(self.store.write(thdAddMember, "students", "alice", NOW))
        self.assertTrue(self.store.write(thdAddMember, "staff", "alice", NOW))
        self.assertTrue(self.store.write(thdAddMember, "staff", "bob", NOW))
        self.assertEqual(self.store.read(thdGroupsOf, alice.id), ["staff", "students"])
        self.assertEqual(self.store.read(thdListGroups), [("staff", 2), ("students", 1)])

    def test_refusals(self) -> None:
        """Duplicate groups, unknown groups and unknown users are refused."""
        self.store.write(thdAddUser, "alice", NOW)
        self.store.write(thdAddGroup, "staff", NOW)
        self.assertRaises(AlreadyExists, self.store.write, thdAddGroup, "staff", NOW)
        e = self.assertRaises(NotFound, self.store.write, thdAddMember, "nope", "alice", NOW)
        self.assertEqual(str(e), "no group named 'nope'")
        self.assertRaises(NotFound, self.store.write, thdAddMember, "staff", "nobody", NOW)
        self.assertEqual(self.store.read(thdListGroups), [("staff", 0)])


class GroupsSQLiteTests(GroupsMixin, SynchronousTestCase):
    backend = "sqlite"


class GroupsPostgresTests(GroupsMixin, SynchronousTestCase):
    backend = "postgres"
    skip = POSTGRES_SKIP


# -- ledger -----------------------------------------------------------------------------


class LedgerMixin(_Base):
    """Balances change only through transactions, each applied once."""

    def setUp(self) -> None:
        super().setUp()
        self.alice = self.store.write(thdAddUser, "alice", NOW, balance=40)

    def balance(self, name: str = "alice") -> int:
        return self.store.read(thdAccount, name).balance

    def test_post(self) -> None:
        """A post changes the balance and writes a transaction saying why."""
        txn = self.store.write(
            thdPost, self.alice.account_id, -25, "print", NOW, site="north", job_uuid="j-1"
        )
        self.assertTrue(txn.applied)
        self.assertEqual(self.balance(), 15)
        stored = self.store.read(thdTransactionByUUID, txn.uuid)
        assert stored is not None
        self.assertEqual(stored, txn)
        self.assertEqual((stored.amount, stored.balance_after), (-25, 15))
        self.assertEqual((stored.reason, stored.site, stored.job_uuid), ("print", "north", "j-1"))
        self.assertEqual(stored.account_name, "alice")
        newest = self.store.read(thdListTransactions, self.alice.account_id)
        self.assertEqual([t.amount for t in newest], [-25, 40])

    def test_same_uuid_applies_once(self) -> None:
        """A resent transaction (same UUID) is acknowledged but not applied again."""
        key = str(uuid.uuid4())
        first = self.store.write(
            thdPost, self.alice.account_id, -30, "print", NOW, site="north", txn_uuid=key
        )
        again = self.store.write(
            thdPost, self.alice.account_id, -30, "print", NOW, site="north", txn_uuid=key
        )
        self.assertTrue(first.applied)
        self.assertFalse(again.applied)
        self.assertEqual(again.id, first.id)
        self.assertEqual(again.balance_after, 10)
        self.assertEqual(self.balance(), 10)
        self.assertEqual(self.store.read(thdCount, transactions, transactions.c.uuid == key), 1)

    def test_enforce_limit_refuses(self) -> None:
        """A charge past a restricted account's limit is refused, and nothing changes."""
        e = self.assertRaises(
            InsufficientFunds,
            self.store.write,
            thdPost,
            self.alice.account_id,
            -120,
            "print",
            NOW,
            site="hq",
            enforce_limit=True,
        )
        self.assertEqual(str(e), "insufficient balance: 0.40 available, print costs 1.20")
        self.assertEqual(self.balance(), 40)
        self.assertEqual(len(self.store.read(thdListTransactions, self.alice.account_id)), 1)

    def test_enforce_limit_counts_credit(self) -> None:
        """A restricted account may spend down to minus its credit limit, not further."""
        self.store.write(thdSetCredit, "alice", True, 100, NOW)
        self.store.write(
            thdPost, self.alice.account_id, -120, "print", NOW, site="hq", enforce_limit=True
        )
        self.assertEqual(self.balance(), -80)
        e = self.assertRaises(
            InsufficientFunds,
            self.store.write,
            thdPost,
            self.alice.account_id,
            -21,
            "copy",
            NOW,
            site="hq",
            enforce_limit=True,
        )
        self.assertEqual(str(e), "insufficient balance: 0.20 available, copy costs 0.21")
        self.store.write(
            thdPost, self.alice.account_id, -20, "copy", NOW, site="hq", enforce_limit=True
        )
        self.assertEqual(self.balance(), -100)

    def test_unrestricted_goes_negative(self) -> None:
        """An unrestricted account is charged whatever its balance."""
        self.store.write(thdSetCredit, "alice", False, 0, NOW)
        txn = self.store.write(
            thdPost, self.alice.account_id, -500, "print", NOW, site="hq", enforce_limit=True
        )
        self.assertEqual(txn.balance_after, -460)
        self.assertEqual(self.balance(), -460)

    def test_offline_charge_overdraws(self) -> None:
        """Without enforce_limit a charge lands even past the limit (offline charges)."""
        self.store.write(thdPost, self.alice.account_id, -1000, "print", NOW, site="north")
        self.assertEqual(self.balance(), -960)

    def test_credits_not_limited(self) -> None:
        """Adding money to an account at its limit is never refused."""
        self.store.write(thdPost, self.alice.account_id, -1000, "print", NOW, site="north")
        self.store.write(
            thdPost, self.alice.account_id, 2000, "adjust", NOW, site="hq", enforce_limit=True
        )
        self.assertEqual(self.balance(), 1040)

    def test_refusals(self) -> None:
        """Unknown reasons and accounts are refused."""
        self.assertRaises(
            Invalid, self.store.write, thdPost, self.alice.account_id, 1, "gift", NOW, site="hq"
        )
        self.assertRaises(
            NotFound, self.store.write, thdPost, 999_999, 1, "adjust", NOW, site="hq"
        )
        self.assertEqual(self.balance(), 40)

    def test_system_and_shared_accounts(self) -> None:
        """The primary has the Offline and Suspense accounts; shared accounts can be added."""
        for name in (OFFLINE_ACCOUNT, SUSPENSE_ACCOUNT):
            account = self.store.read(thdAccount, name)
            self.assertEqual((account.type, account.restricted), ("shared", False))
        account_id = self.store.write(thdAddAccount, "Physics", NOW, restricted=True)
        self.assertEqual(self.store.read(thdAccount, "Physics").id, account_id)
        self.assertRaises(AlreadyExists, self.store.write, thdAddAccount, "Physics", NOW)
        # A personal account's name is taken too.
        self.assertRaises(AlreadyExists, self.store.write, thdAddAccount, "alice", NOW)


class LedgerSQLiteTests(LedgerMixin, SynchronousTestCase):
    backend = "sqlite"


class LedgerPostgresTests(LedgerMixin, SynchronousTestCase):
    backend = "postgres"
    skip = POSTGRES_SKIP


class ConcurrentPostsMixin(_Base):
    """Two writers charging one account at once (PostgreSQL runs several writer threads)."""

    def setUp(self) -> None:
        super().setUp()
        self.account_id = self.store.write(thdAddUser, "alice", NOW, balance=100).account_id

    def post_while_another_is_open(self, first_uuid: str, second_uuid: str) -> Any:
        """Post -10 in an open transaction, post -20 from another writer, then commit.

        Returns what the second post returned (or raised).
        """
        other = Store(self.store.url)
        self.addCleanup(other.stop)
        results: dict[str, Any] = {}

        def second() -> None:
            try:
                results["txn"] = other.write(
                    thdPost, self.account_id, -20, "print", NOW, site="north", txn_uuid=second_uuid
                )
            except BaseException as e:
                results["txn"] = e

        thread = threading.Thread(target=second, daemon=True)
        conn = self.store.writer.connect()
        txn = conn.begin()
        try:
            thdPost(conn, self.account_id, -10, "print", NOW, site="north", txn_uuid=first_uuid)
            thread.start()
            # Give the second writer time to read the balance, if it is going to.
            thread.join(0.5)
            self.assertTrue(thread.is_alive(), "the second writer did not wait for the first")
            txn.commit()
        finally:
            if txn.is_active:
                txn.rollback()
            conn.close()
            thread.join(20)
        self.assertFalse(thread.is_alive())
        return results["txn"]

    def test_no_lost_update(self) -> None:
        """Both charges land: the second is applied to the balance the first left."""
        txn = self.post_while_another_is_open(str(uuid.uuid4()), str(uuid.uuid4()))
        self.assertNotIsInstance(txn, BaseException)
        self.assertEqual(txn.balance_after, 70)
        self.assertEqual(self.store.read(thdAccount, "alice").balance, 70)
        ledger = self.store.read(thdListTransactions, self.account_id)
        self.assertEqual(sum(t.amount for t in ledger), 70)

    def test_concurrent_resend(self) -> None:
        """A resend arriving while the original is still being applied is acknowledged."""
        key = str(uuid.uuid4())
        txn = self.post_while_another_is_open(key, key)
        self.assertNotIsInstance(txn, BaseException)
        self.assertFalse(txn.applied)
        self.assertEqual(txn.amount, -10)
        self.assertEqual(self.store.read(thdAccount, "alice").balance, 90)


class ConcurrentPostsSQLiteTests(ConcurrentPostsMixin, SynchronousTestCase):
    backend = "sqlite"


class ConcurrentPostsPostgresTests(ConcurrentPostsMixin, SynchronousTestCase):
    backend = "postgres"
    skip = POSTGRES_SKIP


#: One post: an amount, and whether (and which earlier) UUID it reuses.
posts = st.lists(
    st.tuples(st.integers(min_value=-10_000, max_value=10_000), st.none() | st.integers(0, 50)),
    max_size=12,
)


class LedgerPropertyTests(SynchronousTestCase):
    """Ledger invariants for any sequence of posts, resends included."""

    def setUp(self) -> None:
        # Migrate once; each example gets its own copy of this fresh database.
        url = sqlite_url(self)
        store = open_store(url)
        store.write(thdInitPrimary, "hq", "USD", 2, NOW)
        store.stop()
        self.template = make_url(url).database

    def fresh_store(self) -> Store:
        url = sqlite_url(self)
        copy = make_url(url).database
        assert self.template is not None and copy is not None
        shutil.copyfile(self.template, copy)
        return Store(url)

    @settings(max_examples=50, deadline=None)
    @given(opening=st.integers(min_value=0, max_value=10_000), ops=posts)
    def test_balance_is_sum_of_distinct_transactions(
        self, opening: int, ops: list[tuple[int, int | None]]
    ) -> None:
        """Balance == opening + each distinct UUID's amount == the sum of the ledger."""
        store = self.fresh_store()
        try:
            account_id = store.write(thdAddUser, "alice", NOW, balance=opening).account_id
            used: list[str] = []
            applied: dict[str, int] = {}
            for amount, reuse in ops:
                if reuse is not None and used:
                    key = used[reuse % len(used)]
                else:
                    key = str(uuid.uuid4())
                    used.append(key)
                txn = store.write(
                    thdPost, account_id, amount, "adjust", NOW, site="hq", txn_uuid=key
                )
                self.assertEqual(txn.applied, key not in applied)
                applied.setdefault(key, amount)

            def thdLedger(conn: Connection) -> tuple[int, list[tuple[str, int]]]:
                balance = conn.execute(
                    select(accounts.c.balance).where(accounts.c.id == account_id)
                ).scalar_one()
                rows = conn.execute(
                    select(transactions.c.uuid, transactions.c.amount).where(
                        transactions.c.account_id == account_id
                    )
                ).all()
                return balance, [(r.uuid, r.amount) for r in rows]

            balance, ledger = store.read(thdLedger)
        finally:
            store.stop()
        self.assertEqual(balance, opening + sum(applied.values()))
        self.assertEqual(balance, sum(amount for _uuid, amount in ledger))
        uuids = [u for u, _amount in ledger]
        self.assertEqual(len(uuids), len(set(uuids)))
        self.assertEqual(len(uuids), len(applied) + (1 if opening else 0))


# -- sites ------------------------------------------------------------------------------


class SitesMixin(_Base):
    """Enrolled sites: tokens shown once, stored hashed, revocable and rotatable."""

    def test_add(self) -> None:
        """Adding a site returns a token; only its hash is stored."""
        token = self.store.write(thdAddSite, "north", NOW)
        stored = self.store.read(thdSiteTokenHash, "north")
        self.assertNotIn(token, stored)
        self.assertTrue(token_matches(token, stored))
        self.assertFalse(token_matches(token + "x", stored))
        self.assertFalse(token_matches(self.store.write(thdAddSite, "south", NOW), stored))
        site = self.store.read(thdSite, "north")
        self.assertEqual((site.name, site.is_primary, site.revoked), ("north", False, False))
        self.assertEqual([s.name for s in self.store.read(thdListSites)], ["hq", "north", "south"])
        self.assertRaises(AlreadyExists, self.store.write, thdAddSite, "north", NOW)

    def test_change_log_has_no_token_hash(self) -> None:
        """The replicated image of a site row leaves the token hash out."""
        head = self.head()
        self.store.write(thdAddSite, "north", NOW)
        self.store.write(thdRotateToken, "north", NOW)
        [row] = self.store.read(thdRows, sites, sites.c.name == "north")
        images = [c.image for c in self.changes_after(head, "north") if c.table == "sites"]
        self.assertEqual(len(images), 2)
        expected = {k: v for k, v in row.items() if k != "token_hash"}
        for image in images:
            assert image is not None
            self.assertNotIn("token_hash", image)
            self.assertEqual(image, expected)

    def test_revoke(self) -> None:
        """A revoked site shows as revoked."""
        self.store.write(thdAddSite, "north", NOW)
        self.store.write(thdRevokeSite, "north", NOW)
        self.assertTrue(self.store.read(thdSite, "north").revoked)
        self.assertRaises(NotFound, self.store.write, thdRevokeSite, "nowhere", NOW)

    def test_rotate_token(self) -> None:
        """A new token works, the old one stops, and a revocation is lifted."""
        old = self.store.write(thdAddSite, "north", NOW)
        self.store.write(thdRevokeSite, "north", NOW)
        new = self.store.write(thdRotateToken, "north", NOW)
        self.assertNotEqual(new, old)
        stored = self.store.read(thdSiteTokenHash, "north")
        self.assertTrue(token_matches(new, stored))
        self.assertFalse(token_matches(old, stored))
        self.assertFalse(self.store.read(thdSite, "north").revoked)

    def test_primary_row_protected(self) -> None:
        """The primary's own row cannot be revoked or given a token."""
        e = self.assertRaises(Invalid, self.store.write, thdRevokeSite, "hq", NOW)
        self.assertIn("primary", str(e))
        self.assertRaises(Invalid, self.store.write, thdRotateToken, "hq", NOW)
        hq = self.store.read(thdSite, "hq")
        self.assertTrue(hq.is_primary)
        self.assertFalse(hq.revoked)
        self.assertIsNone(self.store.read(thdSiteTokenHash, "hq"))
        self.assertFalse(token_matches("", self.store.read(thdSiteTokenHash, "hq")))


class SitesSQLiteTests(SitesMixin, SynchronousTestCase):
    backend = "sqlite"


class SitesPostgresTests(SitesMixin, SynchronousTestCase):
    backend = "postgres"
    skip = POSTGRES_SKIP


# -- printers, devices, providers ---------------------------------------------------------


class PrintersDevicesMixin(_Base):
    """Printers with prices; devices and providers with keys shown once."""

    def setUp(self) -> None:
        super().setUp()
        self.store.write(thdAddSite, "north", NOW)

    def test_printer(self) -> None:
        """A printer round-trips with its prices and site."""
        added = self.store.write(
            thdAddPrinter,
            "north-mfp",
            "north",
            10,
            50,
            NOW,
            duplex_discount=20,
            uri="ipp://mfp.north/ipp/print",
            hold=True,
        )
        self.assertEqual(self.store.read(thdPrinter, "north-mfp"), added)
        self.assertEqual((added.site, added.price_mono, added.price_colour), ("north", 10, 50))
        self.assertEqual(
            (added.duplex_discount, added.uri, added.hold), (20, "ipp://mfp.north/ipp/print", True)
        )
        self.assertEqual((added.prices.mono, added.prices.colour), (10, 50))
        self.store.write(thdAddPrinter, "hq-laser", "hq", 5, 5, NOW)
        self.assertEqual(
            [p.name for p in self.store.read(thdListPrinters)], ["hq-laser", "north-mfp"]
        )
        self.assertEqual([p.name for p in self.store.read(thdListPrinters, "hq")], ["hq-laser"])

    def test_printer_refusals(self) -> None:
        """Duplicates, negative prices, bad discounts and unknown sites are refused."""
        self.store.write(thdAddPrinter, "p", "hq", 5, 5, NOW)
        self.assertRaises(AlreadyExists, self.store.write, thdAddPrinter, "p", "hq", 5, 5, NOW)
        self.assertRaises(Invalid, self.store.write, thdAddPrinter, "q", "hq", -1, 5, NOW)
        self.assertRaises(
            Invalid, self.store.write, thdAddPrinter, "q", "hq", 1, 5, NOW, duplex_discount=101
        )
        self.assertRaises(NotFound, self.store.write, thdAddPrinter, "q", "nowhere", 1, 5, NOW)
        self.assertRaises(NotFound, self.store.read, thdPrinter, "q")

    def test_device(self) -> None:
        """A device's key is returned once and stored hashed; options round-trip."""
        self.store.write(thdAddPrinter, "north-mfp", "north", 10, 50, NOW)
        options = {"listen": "tcp:7000", "convert": "hex2dec,pad:10"}
        key = self.store.write(
            thdAddDevice,
            "north-reader",
            "north",
            "card-reader",
            NOW,
            printer="north-mfp",
            options=options,
        )
        device = self.store.read(thdDevice, "north-reader")
        self.assertEqual(
            (device.site, device.connector, device.printer), ("north", "card-reader", "north-mfp")
        )
        self.assertEqual(device.options, options)
        self.assertTrue(token_matches(key, device.api_key_hash))
        [row] = self.store.read(thdRows, devices)
        self.assertFalse(any(key in str(value) for value in row.values()))
        self.assertEqual(
            [d.name for d in self.store.read(thdListDevices, "north")], ["north-reader"]
        )
        self.assertEqual(self.store.read(thdListDevices, "hq"), [])

    def test_device_without_printer(self) -> None:
        """A device need not drive a printer; its options default to empty."""
        self.store.write(thdAddDevice, "kiosk", "hq", "http", NOW)
        device = self.store.read(thdDevice, "kiosk")
        self.assertIsNone(device.printer)
        self.assertEqual(device.options, {})

    def test_device_printer_same_site(self) -> None:
        """A device cannot drive a printer at another site."""
        self.store.write(thdAddPrinter, "hq-laser", "hq", 5, 5, NOW)
        e = self.assertRaises(
            Invalid,
            self.store.write,
            thdAddDevice,
            "north-reader",
            "north",
            "card-reader",
            NOW,
            printer="hq-laser",
        )
        self.assertEqual(str(e), "printer 'hq-laser' is at site 'hq', not 'north'")
        self.assertEqual(self.store.read(thdListDevices), [])

    def test_device_refusals_and_removal(self) -> None:
        """Duplicate devices and over-long options are refused; a device can be removed."""
        self.store.write(thdAddDevice, "kiosk", "hq", "http", NOW)
        self.assertRaises(
            AlreadyExists, self.store.write, thdAddDevice, "kiosk", "hq", "http", NOW
        )
        self.assertRaises(
            Invalid,
            self.store.write,
            thdAddDevice,
            "big",
            "hq",
            "http",
            NOW,
            options={"x": "y" * 9000},
        )
        self.store.write(thdRemoveDevice, "kiosk", NOW)
        self.assertRaises(NotFound, self.store.read, thdDevice, "kiosk")
        self.assertRaises(NotFound, self.store.write, thdRemoveDevice, "kiosk", NOW)

    def test_provider(self) -> None:
        """A provider's key is stored hashed; rotating it retires the old key."""
        key = self.store.write(thdAddProvider, "north-spool", "north", NOW)
        provider = self.store.read(thdProvider, "north-spool")
        self.assertEqual(provider.site, "north")
        self.assertNotIn(key, provider.key_hash)
        self.assertTrue(token_matches(key, provider.key_hash))
        self.assertRaises(
            AlreadyExists, self.store.write, thdAddProvider, "north-spool", "hq", NOW
        )

        new = self.store.write(thdRotateProviderKey, "north-spool", NOW)
        stored = self.store.read(thdProvider, "north-spool").key_hash
        self.assertNotEqual(new, key)
        self.assertTrue(token_matches(new, stored))
        self.assertFalse(token_matches(key, stored))

        self.store.write(thdAddProvider, "hq-spool", "hq", NOW)
        names = [p.name for p in self.store.read(thdListProviders)]
        self.assertEqual(names, ["hq-spool", "north-spool"])
        self.store.write(thdRemoveProvider, "north-spool", NOW)
        self.assertRaises(NotFound, self.store.read, thdProvider, "north-spool")
        self.assertEqual(self.store.read(thdCount, providers), 1)


class PrintersDevicesSQLiteTests(PrintersDevicesMixin, SynchronousTestCase):
    backend = "sqlite"


class PrintersDevicesPostgresTests(PrintersDevicesMixin, SynchronousTestCase):
    backend = "postgres"
    skip = POSTGRES_SKIP


# -- policies ---------------------------------------------------------------------------


class PoliciesMixin(_Base):
    """Offline policies: defaults, global values and per-site overrides."""

    def setUp(self) -> None:
        super().setUp()
        self.store.write(thdAddSite, "north", NOW)
        self.store.write(thdAddSite, "south", NOW)

    def effective(self, site: str = "") -> dict[str, tuple[str, str]]:
        return self.store.read(thdEffectivePolicies, site)

    def test_defaults(self) -> None:
        """With nothing set, every policy has its default."""
        expected = {key: (default, "default") for key, (_check, default) in POLICIES.items()}
        self.assertEqual(self.effective(), expected)
        self.assertEqual(self.effective("north"), expected)
        self.assertEqual(self.effective()["offline.account"], ("personal", "default"))
        self.assertEqual(self.effective()["offline.unknown_card"], ("refuse", "default"))

    def test_global_and_site(self) -> None:
        """A global value applies everywhere; a site override only at that site."""
        self.store.write(thdSetPolicy, "offline.account", "refuse", NOW)
        self.store.write(thdSetPolicy, "offline.account", "offline-account", NOW, "north")
        self.assertEqual(self.effective()["offline.account"], ("refuse", "global"))
        self.assertEqual(self.effective("north")["offline.account"], ("offline-account", "site"))
        self.assertEqual(self.effective("south")["offline.account"], ("refuse", "global"))
        # Overwriting keeps one row per (site, key).
        self.store.write(thdSetPolicy, "offline.account", "personal", NOW, "north")
        self.assertEqual(self.effective("north")["offline.account"], ("personal", "site"))
        # Clearing the override falls back to the global value.
        self.assertTrue(self.store.write(thdClearPolicy, "offline.account", "north", NOW))
        self.assertFalse(self.store.write(thdClearPolicy, "offline.account", "north", NOW))
        self.assertEqual(self.effective("north")["offline.account"], ("refuse", "global"))

    def test_refusals(self) -> None:
        """Bad values, unknown keys and unknown sites are refused with a clear message."""
        e = self.assertRaises(
            Invalid, self.store.write, thdSetPolicy, "offline.account", "maybe", NOW
        )
        self.assertEqual(
            str(e),
            "policy offline.account: expected one of personal, offline-account, refuse, "
            "got 'maybe'",
        )
        e = self.assertRaises(
            Invalid, self.store.write, thdSetPolicy, "offline.colour", "allow", NOW
        )
        self.assertIn("unknown policy 'offline.colour'", str(e))
        self.assertIn("offline.release", str(e))
        for bad in ("lots", "-1.00", "1.234"):
            e = self.assertRaises(
                Invalid, self.store.write, thdSetPolicy, "offline.allowance", bad, NOW
            )
            self.assertTrue(str(e).startswith("policy offline.allowance: "), str(e))
        self.assertRaises(
            NotFound, self.store.write, thdSetPolicy, "offline.release", "refuse", NOW, "nowhere"
        )
        self.assertEqual(self.effective()["offline.allowance"], ("0", "default"))

    def test_allowance_in_minor_units(self) -> None:
        """An allowance typed as an amount is stored in minor units; "unlimited" as is."""
        self.assertEqual(self.store.write(thdSetPolicy, "offline.allowance", "5.00", NOW), "500")
        self.assertEqual(self.effective()["offline.allowance"], ("500", "global"))
        self.store.write(thdSetPolicy, "offline.allowance", " unlimited ", NOW, "north")
        self.assertEqual(self.effective("north")["offline.allowance"], ("unlimited", "site"))


class PoliciesSQLiteTests(PoliciesMixin, SynchronousTestCase):
    backend = "sqlite"


class PoliciesPostgresTests(PoliciesMixin, SynchronousTestCase):
    backend = "postgres"
    skip = POSTGRES_SKIP


# -- audit log and job log ----------------------------------------------------------------


class AuditJobsMixin(_Base):
    """The audit log and the job log."""

    def test_audit(self) -> None:
        """Audit entries round-trip, newest first."""
        self.store.write(thdAudit, "admin", "user.add", "alice", NOW, balance="5.00")
        self.store.write(thdAudit, "admin", "user.disable", "alice", NOW + 1)
        newest, oldest = self.store.read(thdListAudit)
        self.assertEqual(
            (oldest.at, oldest.actor, oldest.action, oldest.target, oldest.details),
            (NOW, "admin", "user.add", "alice", {"balance": "5.00"}),
        )
        self.assertEqual((newest.action, newest.details), ("user.disable", {}))
        self.assertEqual(len(self.store.read(thdListAudit, 1)), 1)

    def job(self, job_uuid: str, **values: Any) -> dict[str, Any]:
        job = {
            "uuid": job_uuid,
            "kind": "print",
            "username": "alice",
            "user_id": 7,
            "account_id": 8,
            "printer_id": 9,
            "printer_name": "north-mfp",
            "site": "north",
            "document": "report.pdf",
            "pages": 3,
            "copies": 2,
            "colour": True,
            "duplex": False,
            "cost": 300,
            "status": "printed",
        }
        job.update(values)
        return job

    def test_jobs(self) -> None:
        """Jobs round-trip; a job logged twice (same UUID) is logged once."""
        first = self.store.write(thdLogJob, NOW, **self.job("u-1"))
        self.assertEqual(first.created_at, NOW)
        for key, value in self.job("u-1").items():
            self.assertEqual(getattr(first, key), value, key)
        again = self.store.write(thdLogJob, NOW + 5, **self.job("u-1", cost=999))
        self.assertEqual(again, first)
        self.store.write(thdLogJob, NOW, **self.job("u-2", username="bob", kind="copy"))
        self.assertEqual([j.uuid for j in self.store.read(thdListJobs)], ["u-2", "u-1"])
        self.assertEqual(self.store.read(thdListJobs, "alice"), [first])

    def test_job_kind_checked(self) -> None:
        """A job of an unknown kind is refused."""
        self.assertRaises(
            Invalid, self.store.write, thdLogJob, NOW, **self.job("u-3", kind="fold")
        )
        self.assertEqual(self.store.read(thdListJobs), [])


class AuditJobsSQLiteTests(AuditJobsMixin, SynchronousTestCase):
    backend = "sqlite"


class AuditJobsPostgresTests(AuditJobsMixin, SynchronousTestCase):
    backend = "postgres"
    skip = POSTGRES_SKIP


class DecimalsTests(SynchronousTestCase):
    """Amounts are stored in minor units: the currency's decimals cannot change under them."""

    def test_decimals_change_refused_once_money_is_stored(self) -> None:
        store = open_store(sqlite_url(self, "decimals.db"))
        self.addCleanup(store.stop)
        store.write(thdInitPrimary, "hq", "USD", 2, NOW)
        # Nothing priced or charged yet: the choice can still be changed.
        store.write(thdInitPrimary, "hq", "JPY", 0, NOW)
        store.write(thdInitPrimary, "hq", "USD", 2, NOW)
        store.write(thdAddUser, "alice", NOW, balance=150)
        error = self.assertRaises(Invalid, store.write, thdInitPrimary, "hq", "USD", 3, NOW)
        self.assertEqual(
            str(error),
            "decimals = 3 in the config, but the database's amounts use 2: changing it "
            "would change every balance and price; set decimals = 2",
        )
        store.write(thdInitPrimary, "hq", "USD", 2, NOW)
