"""Users, their cards, PIN and password verifiers, and groups."""

from __future__ import annotations

from typing import Any

import attrs
from sqlalchemy import Connection, select

from sitesrv.errors import AlreadyExists, Invalid, NotFound
from sitesrv.store import ledger
from sitesrv.store.changelog import thdDelete, thdDeleteWhere, thdInsert, thdUpdate
from sitesrv.store.schema import (
    AccountType,
    accounts,
    cards,
    group_members,
    groups,
    passwords,
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


def thdUser(conn: Connection, username: str) -> User:
    """The user named ``username``; NotFound otherwise."""
    row = conn.execute(_user_query().where(users.c.username == username)).first()
    if row is None:
        raise NotFound(f"no user named {username!r}")
    return _user(row)


def thdUserById(conn: Connection, user_id: int) -> User | None:
    """The user with this id, or None."""
    row = conn.execute(_user_query().where(users.c.id == user_id)).first()
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
