"""Users, their cards, PIN and password verifiers, and groups."""

from __future__ import annotations

import functools
import uuid as uuidlib
from collections.abc import Iterable
from typing import Any

import attrs
from sqlalchemy import ARRAY, Connection, bindparam, func, select, true

from sitesrv.errors import AlreadyExists, Invalid, NotFound
from sitesrv.store import ledger
from sitesrv.store.changelog import (
    thdDelete,
    thdDeleteWhere,
    thdInsert,
    thdLogMany,
    thdRows,
    thdUpdate,
)
from sitesrv.store.engine import thdInsertMany
from sitesrv.store.schema import (
    AccountType,
    accounts,
    cards,
    group_members,
    groups,
    passwords,
    transactions,
    users,
)

MAX_NAME = 200


@attrs.frozen
class User:
    """A user with their personal account, as the core sees them."""

    id: int
    username: str
    full_name: str
    email: str
    disabled: bool
    has_pin: bool
    account_id: int
    balance: int
    restricted: bool
    credit_limit: int


@attrs.frozen
class Credentials:
    """What authentication needs to know about a user (verifiers stay inside the core)."""

    user: User
    pin_verifier: str | None
    password_verifier: str | None


def _user_query() -> Any:
    return select(
        users.c.id,
        users.c.username,
        users.c.full_name,
        users.c.email,
        users.c.disabled,
        users.c.pin_verifier,
        accounts.c.id.label("account_id"),
        accounts.c.balance,
        accounts.c.restricted,
        accounts.c.credit_limit,
    ).select_from(users.join(accounts, accounts.c.user_id == users.c.id))


def _user(row: Any) -> User:
    return User(
        id=row.id,
        username=row.username,
        full_name=row.full_name,
        email=row.email,
        disabled=bool(row.disabled),
        has_pin=row.pin_verifier is not None,
        account_id=row.account_id,
        balance=row.balance,
        restricted=bool(row.restricted),
        credit_limit=row.credit_limit,
    )


def check_name(kind: str, name: str) -> str:
    """Validate a user, group, account, printer, device or site name."""
    name = name.strip()
    if not name:
        raise Invalid(f"{kind} name must not be empty")
    if len(name) > MAX_NAME:
        raise Invalid(f"{kind} name is longer than {MAX_NAME} characters")
    if any(ord(c) < 32 for c in name):
        raise Invalid(f"{kind} name contains control characters")
    return name


def thdAddUser(
    conn: Connection,
    username: str,
    now: float,
    *,
    full_name: str = "",
    email: str = "",
    balance: int = 0,
    restricted: bool = True,
    credit_limit: int = 0,
    password_verifier: str | None = None,
    site: str = "",
) -> User:
    """Create a user with their personal account (and an opening transaction)."""
    username = check_name("user", username)
    if credit_limit < 0:
        raise Invalid("the credit limit must not be negative")
    if conn.execute(select(users.c.id).where(users.c.username == username)).first():
        raise AlreadyExists(f"user {username!r} already exists")
    if conn.execute(select(accounts.c.id).where(accounts.c.name == username)).first():
        raise AlreadyExists(f"an account named {username!r} already exists")
    user_id = thdInsert(
        conn,
        users,
        {
            "username": username,
            "full_name": full_name,
            "email": email,
            "disabled": False,
            "created_at": now,
        },
        now,
    )
    account_id = thdInsert(
        conn,
        accounts,
        {
            "name": username,
            "type": AccountType.PERSONAL.value,
            "user_id": user_id,
            "balance": 0,
            "restricted": restricted,
            "credit_limit": credit_limit,
            "created_at": now,
        },
        now,
    )
    if balance:
        ledger.thdPost(
            conn, account_id, balance, "initial", now, site=site, comment="opening balance"
        )
    if password_verifier is not None:
        thdInsert(conn, passwords, {"user_id": user_id, "verifier": password_verifier}, now)
    return thdUser(conn, username)


# Every print-provider decision looks its user up, so these are built once: building a
# statement and its cache key costs more than SQLite takes to run it.
_BY_USERNAME = _user_query().where(users.c.username == bindparam("username"))
_BY_ID = _user_query().where(users.c.id == bindparam("user_id"))


def thdUser(conn: Connection, username: str) -> User:
    """The user named ``username``; NotFound otherwise."""
    row = conn.execute(_BY_USERNAME, {"username": username}).first()
    if row is None:
        raise NotFound(f"no user named {username!r}")
    return _user(row)


def thdUserById(conn: Connection, user_id: int) -> User | None:
    """The user with this id, or None."""
    row = conn.execute(_BY_ID, {"user_id": user_id}).first()
    return None if row is None else _user(row)


def thdListUsers(conn: Connection, offset: int = 0, limit: int | None = None) -> list[User]:
    """Users in name order."""
    q = _user_query().order_by(users.c.username).offset(offset)
    if limit is not None:
        q = q.limit(limit)
    return [_user(r) for r in conn.execute(q)]


def thdSetDisabled(conn: Connection, username: str, disabled: bool, now: float) -> User:
    """Disable or enable a user."""
    user = thdUser(conn, username)
    thdUpdate(conn, users, user.id, {"disabled": disabled}, now)
    return attrs.evolve(user, disabled=disabled)


def thdUpdateUser(conn: Connection, username: str, now: float, **values: Any) -> User:
    """Change a user's full name or email."""
    allowed = {"full_name", "email"}
    if not set(values) <= allowed:
        raise Invalid(f"cannot change {', '.join(sorted(set(values) - allowed))}")
    user = thdUser(conn, username)
    thdUpdate(conn, users, user.id, values, now)
    return thdUser(conn, username)


def thdRemoveUser(conn: Connection, username: str, now: float) -> User:
    """Remove a user, their cards, password, memberships and personal account.

    Ledger transactions keep the account's id and name, so history stays readable.
    """
    user = thdUser(conn, username)
    thdDeleteWhere(conn, cards, cards.c.user_id == user.id, now)
    thdDeleteWhere(conn, passwords, passwords.c.user_id == user.id, now)
    thdDeleteWhere(conn, group_members, group_members.c.user_id == user.id, now)
    thdDelete(conn, accounts, user.account_id, now)
    thdDelete(conn, users, user.id, now)
    return user


def thdSetPin(conn: Connection, username: str, verifier: str | None, now: float) -> None:
    """Store a PIN verifier (None removes the PIN)."""
    user = thdUser(conn, username)
    thdUpdate(conn, users, user.id, {"pin_verifier": verifier}, now)


def thdSetPassword(conn: Connection, username: str, verifier: str, now: float) -> None:
    """Store a password verifier."""
    user = thdUser(conn, username)
    existing = conn.execute(select(passwords.c.id).where(passwords.c.user_id == user.id)).scalar()
    if existing is None:
        thdInsert(conn, passwords, {"user_id": user.id, "verifier": verifier}, now)
    else:
        thdUpdate(conn, passwords, existing, {"verifier": verifier}, now)


def thdSetCredit(
    conn: Connection, username: str, restricted: bool, credit_limit: int, now: float
) -> None:
    """Set whether a user's account is restricted, and its credit limit."""
    if credit_limit < 0:
        raise Invalid("the credit limit must not be negative")
    user = thdUser(conn, username)
    thdUpdate(
        conn,
        accounts,
        user.account_id,
        {"restricted": restricted, "credit_limit": credit_limit},
        now,
    )


def thdCredentialsByUsername(conn: Connection, username: str) -> Credentials | None:
    """The user and verifiers for password login, or None."""
    row = conn.execute(
        _user_query()
        .add_columns(passwords.c.verifier.label("password_verifier"))
        .outerjoin(passwords, passwords.c.user_id == users.c.id)
        .where(users.c.username == username)
    ).first()
    if row is None:
        return None
    return Credentials(_user(row), row.pin_verifier, row.password_verifier)


def thdCredentialsByCard(conn: Connection, number: str) -> Credentials | None:
    """The user holding the (normalised) card ``number`` and their PIN verifier, or None."""
    row = conn.execute(
        _user_query()
        .add_columns(cards.c.number)
        .join(cards, cards.c.user_id == users.c.id)
        .where(cards.c.number == number)
    ).first()
    if row is None:
        return None
    return Credentials(_user(row), row.pin_verifier, None)


# -- cards ----------------------------------------------------------------------------


def thdAddCard(conn: Connection, username: str, number: str, now: float) -> None:
    """Give ``username`` the (already normalised) card ``number``."""
    if not number or len(number) > MAX_NAME:
        raise Invalid("a card number must be 1 to 200 characters")
    user = thdUser(conn, username)
    owner = conn.execute(
        select(users.c.username)
        .select_from(cards.join(users, users.c.id == cards.c.user_id))
        .where(cards.c.number == number)
    ).scalar()
    if owner is not None:
        raise AlreadyExists(f"card {number!r} already belongs to {owner!r}")
    thdInsert(conn, cards, {"number": number, "user_id": user.id, "created_at": now}, now)


def thdRemoveCard(conn: Connection, number: str, now: float) -> str:
    """Remove a card; return the username it belonged to."""
    row = conn.execute(
        select(cards.c.id, users.c.username)
        .select_from(cards.join(users, users.c.id == cards.c.user_id))
        .where(cards.c.number == number)
    ).first()
    if row is None:
        raise NotFound(f"no card {number!r}")
    thdDelete(conn, cards, row.id, now)
    return row.username


def thdCardsOf(conn: Connection, user_id: int) -> list[str]:
    """A user's card numbers."""
    return list(
        conn.execute(
            select(cards.c.number).where(cards.c.user_id == user_id).order_by(cards.c.number)
        ).scalars()
    )


# -- bulk import ----------------------------------------------------------------------

#: Users written per round of multi-row statements by ``thdImportUsers``.
IMPORT_CHUNK = 500


@attrs.frozen
class NewUser:
    """A user to import: what ``thdAddUser`` takes, and their normalised card numbers."""

    username: str
    full_name: str = ""
    email: str = ""
    balance: int = 0
    restricted: bool = True
    credit_limit: int = 0
    password_verifier: str | None = None
    cards: tuple[str, ...] = ()


@functools.cache
def _existing(column: Any, postgresql: bool) -> Any:
    # Built once: a statement with an ``IN`` list of hundreds of parameters is one
    # psycopg parses anew each time. On PostgreSQL the values go as one array, each
    # looked up on its own in the column's unique index: a plain ``= ANY(array)``
    # seq-scans the table while the planner thinks it small (or has no statistics yet,
    # as during a bulk load), which makes a large import quadratic.
    if not postgresql:
        return select(column.table).where(column.in_(bindparam("values", expanding=True)))
    values = (
        func.unnest(bindparam("values", type_=ARRAY(column.type)))
        .table_valued("value")
        .render_derived(name="v")
    )
    match = select(column.table).where(column == values.c.value).limit(1).lateral("m")
    return select(match).select_from(values.join(match, true())).limit(1)


def _thdExisting(conn: Connection, column: Any, values: list[str]) -> Any:
    """One of ``values`` already in ``column`` (its row), or None."""
    query = _existing(column, conn.dialect.name == "postgresql")
    for start in range(0, len(values), IMPORT_CHUNK):
        row = conn.execute(query, {"values": values[start : start + IMPORT_CHUNK]}).first()
        if row is not None:
            return row
    return None


def thdImportUsers(
    conn: Connection, new_users: Iterable[NewUser], now: float, *, site: str = ""
) -> int:
    """Create many users with their accounts and cards; return how many.

    The result, change log included, is exactly that of ``thdAddUser`` followed by
    ``thdAddCard`` for each card, user by user, but written with multi-row statements:
    a directory import of 100,000 users takes seconds, not minutes. Everything is
    checked first (the same errors as the one-by-one functions), so a refused import
    writes nothing.
    """
    batch = [
        attrs.evolve(u, username=check_name("user", u.username), cards=tuple(u.cards))
        for u in new_users
    ]
    names: set[str] = set()
    owners: dict[str, str] = {}
    for u in batch:
        if u.credit_limit < 0:
            raise Invalid("the credit limit must not be negative")
        if u.username in names:
            raise AlreadyExists(f"user {u.username!r} already exists")
        names.add(u.username)
        for number in u.cards:
            if not number or len(number) > MAX_NAME:
                raise Invalid("a card number must be 1 to 200 characters")
            if number in owners:
                raise AlreadyExists(f"card {number!r} already belongs to {owners[number]!r}")
            owners[number] = u.username
    usernames = [u.username for u in batch]
    if (row := _thdExisting(conn, users.c.username, usernames)) is not None:
        raise AlreadyExists(f"user {row.username!r} already exists")
    if (row := _thdExisting(conn, accounts.c.name, usernames)) is not None:
        raise AlreadyExists(f"an account named {row.name!r} already exists")
    if (row := _thdExisting(conn, cards.c.number, list(owners))) is not None:
        owner = conn.execute(select(users.c.username).where(users.c.id == row.user_id)).scalar()
        raise AlreadyExists(f"card {row.number!r} already belongs to {owner!r}")
    for start in range(0, len(batch), IMPORT_CHUNK):
        _thdImportChunk(conn, batch[start : start + IMPORT_CHUNK], now, site)
    return len(batch)


def _thdImportChunk(conn: Connection, chunk: list[NewUser], now: float, site: str) -> None:
    # Insert in the order the one-by-one path would, table by table (so the ids come out
    # the same), then log the rows in its per-user order.
    user_ids: dict[str, int] = thdInsertMany(
        conn,
        users,
        ("username", "full_name", "email", "disabled", "created_at"),
        [(u.username, u.full_name, u.email, False, now) for u in chunk],
        key="username",
    )
    account_ids: dict[int, int] = thdInsertMany(
        conn,
        accounts,
        ("name", "type", "user_id", "balance", "restricted", "credit_limit", "created_at"),
        [
            # Written with its opening balance at once; logged as the one-by-one path
            # logs it: opened with 0, then given the balance by ledger.thdPost.
            (
                u.username,
                AccountType.PERSONAL.value,
                user_ids[u.username],
                u.balance,
                u.restricted,
                u.credit_limit,
                now,
            )
            for u in chunk
        ],
        key="user_id",
    )
    user_rows = thdRows(conn, users, list(user_ids.values()))
    balanced = thdRows(conn, accounts, list(account_ids.values()))
    opened = {
        account_id: {**row, "balance": 0} if row["balance"] else row
        for account_id, row in balanced.items()
    }
    funded = [u for u in chunk if u.balance]
    if funded:
        # The transaction ledger.thdPost records for an opening balance (its own UUID;
        # transactions are not in the change log).
        thdInsertMany(
            conn,
            transactions,
            (
                "uuid",
                "account_id",
                "account_name",
                "amount",
                "balance_after",
                "reason",
                "comment",
                "job_uuid",
                "site",
                "created_at",
            ),
            [
                (
                    str(uuidlib.uuid4()),
                    account_ids[user_ids[u.username]],
                    u.username,
                    u.balance,
                    u.balance,
                    "initial",
                    "opening balance",
                    None,
                    site,
                    now,
                )
                for u in funded
            ],
        )
    verifiers = [u for u in chunk if u.password_verifier is not None]
    password_rows: dict[int, dict[str, Any]] = {}
    if verifiers:
        password_ids: dict[int, int] = thdInsertMany(
            conn,
            passwords,
            ("user_id", "verifier"),
            [(user_ids[u.username], u.password_verifier) for u in verifiers],
            key="user_id",
        )
        rows = thdRows(conn, passwords, list(password_ids.values()))
        password_rows = {row["user_id"]: row for row in rows.values()}
    card_rows: dict[str, dict[str, Any]] = {}
    numbers = [(number, user_ids[u.username]) for u in chunk for number in u.cards]
    if numbers:
        card_ids = thdInsertMany(
            conn,
            cards,
            ("number", "user_id", "created_at"),
            [(n, uid, now) for n, uid in numbers],
            key="number",
        )
        rows = thdRows(conn, cards, list(card_ids.values()))
        card_rows = {row["number"]: row for row in rows.values()}
    entries: list[tuple[Any, dict[str, Any]]] = []
    for u in chunk:
        user_id = user_ids[u.username]
        account_id = account_ids[user_id]
        entries.append((users, user_rows[user_id]))
        entries.append((accounts, opened[account_id]))
        if balanced[account_id]["balance"]:
            entries.append((accounts, balanced[account_id]))
        if user_id in password_rows:
            entries.append((passwords, password_rows[user_id]))
        entries.extend((cards, card_rows[number]) for number in u.cards)
    # Each import call is its own group: a large import is not held whole at a site.
    thdLogMany(conn, entries, now, own_group=True)


# -- groups ---------------------------------------------------------------------------


def thdAddGroup(conn: Connection, name: str, now: float) -> int:
    """Create a group."""
    name = check_name("group", name)
    if conn.execute(select(groups.c.id).where(groups.c.name == name)).first():
        raise AlreadyExists(f"group {name!r} already exists")
    return thdInsert(conn, groups, {"name": name}, now)


def thdAddMember(conn: Connection, group: str, username: str, now: float) -> bool:
    """Add a user to a group; False when they were already a member."""
    group_id = conn.execute(select(groups.c.id).where(groups.c.name == group)).scalar()
    if group_id is None:
        raise NotFound(f"no group named {group!r}")
    user = thdUser(conn, username)
    if conn.execute(
        select(group_members.c.id).where(
            group_members.c.group_id == group_id, group_members.c.user_id == user.id
        )
    ).first():
        return False
    thdInsert(conn, group_members, {"group_id": group_id, "user_id": user.id}, now)
    return True


def thdGroupsOf(conn: Connection, user_id: int) -> list[str]:
    """The names of a user's groups."""
    return list(
        conn.execute(
            select(groups.c.name)
            .select_from(group_members.join(groups, groups.c.id == group_members.c.group_id))
            .where(group_members.c.user_id == user_id)
            .order_by(groups.c.name)
        ).scalars()
    )


def thdListGroups(conn: Connection) -> list[tuple[str, int]]:
    """Groups with their member counts."""
    from sqlalchemy import func

    q = (
        select(groups.c.name, func.count(group_members.c.id))
        .select_from(groups.outerjoin(group_members, group_members.c.group_id == groups.c.id))
        .group_by(groups.c.name)
        .order_by(groups.c.name)
    )
    return [(r[0], r[1]) for r in conn.execute(q)]
