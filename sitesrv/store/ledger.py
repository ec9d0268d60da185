"""Accounts and the ledger: balances change only through transactions.

Each transaction has a UUID, an amount (minor units), an account, a reason and an
optional job. Posting a transaction whose UUID is already in the ledger returns the
existing one and changes nothing, so a resent charge is never applied twice.
"""

from __future__ import annotations

import uuid as uuidlib
from typing import Any

import attrs
from sqlalchemy import Connection, bindparam, select

from sitesrv.errors import AlreadyExists, InsufficientFunds, Invalid, NotFound
from sitesrv.money import format_amount
from sitesrv.store.changelog import thdInsert, thdUpdate
from sitesrv.store.schema import AccountType, accounts, transactions

OFFLINE_ACCOUNT = "Offline Account"
SUSPENSE_ACCOUNT = "Suspense"
SYSTEM_ACCOUNTS = (OFFLINE_ACCOUNT, SUSPENSE_ACCOUNT)

#: Reasons a transaction may carry.
REASONS = frozenset(
    {"initial", "adjust", "set", "print", "copy", "scan", "fax", "refund", "suspense"}
)


@attrs.frozen
class Account:
    """A balance holder: a user's personal account or a shared account."""

    id: int
    name: str
    type: str
    user_id: int | None
    balance: int
    restricted: bool
    credit_limit: int


@attrs.frozen
class Transaction:
    """One ledger entry."""

    id: int
    uuid: str
    account_id: int
    account_name: str
    amount: int
    balance_after: int
    reason: str
    comment: str
    job_uuid: str | None
    site: str
    created_at: float
    #: False when the UUID was already in the ledger and nothing changed.
    applied: bool = True


def account_of(row: Any) -> Account:
    """An `Account` from a row of the accounts table."""
    return Account(
        id=row.id,
        name=row.name,
        type=row.type,
        user_id=row.user_id,
        balance=row.balance,
        restricted=bool(row.restricted),
        credit_limit=row.credit_limit,
    )


def _transaction(row: Any, applied: bool = True) -> Transaction:
    return Transaction(
        id=row.id,
        uuid=row.uuid,
        account_id=row.account_id,
        account_name=row.account_name,
        amount=row.amount,
        balance_after=row.balance_after,
        reason=row.reason,
        comment=row.comment,
        job_uuid=row.job_uuid,
        site=row.site,
        created_at=row.created_at,
        applied=applied,
    )


def available(balance: int, restricted: bool, credit_limit: int) -> int | None:
    """How much may be spent from an account; None when it is unrestricted."""
    return balance + credit_limit if restricted else None


def thdAddAccount(
    conn: Connection, name: str, now: float, *, restricted: bool = False, credit_limit: int = 0
) -> int:
    """Create a shared account."""
    from sitesrv.store.users import check_name

    name = check_name("account", name)
    if conn.execute(select(accounts.c.id).where(accounts.c.name == name)).first():
        raise AlreadyExists(f"an account named {name!r} already exists")
    return thdInsert(
        conn,
        accounts,
        {
            "name": name,
            "type": AccountType.SHARED.value,
            "user_id": None,
            "balance": 0,
            "restricted": restricted,
            "credit_limit": credit_limit,
            "created_at": now,
        },
        now,
    )


# Every charge and print-provider decision reads an account; built once, SQLAlchemy
# finds them compiled (bench/store.py).
_ACCOUNT_BY_NAME = select(accounts).where(accounts.c.name == bindparam("name"))
_ACCOUNT_BY_ID = select(accounts).where(accounts.c.id == bindparam("account_id"))


def thdAccount(conn: Connection, name: str) -> Account:
    """The account named ``name``."""
    row = conn.execute(_ACCOUNT_BY_NAME, {"name": name}).first()
    if row is None:
        raise NotFound(f"no account named {name!r}")
    return account_of(row)


def thdAccountById(conn: Connection, account_id: int) -> Account | None:
    """The account with this id, or None."""
    row = conn.execute(_ACCOUNT_BY_ID, {"account_id": account_id}).first()
    return None if row is None else account_of(row)


def thdListAccounts(conn: Connection, shared_only: bool = False) -> list[Account]:
    """Accounts in name order."""
    q = select(accounts).order_by(accounts.c.name)
    if shared_only:
        q = q.where(accounts.c.type == AccountType.SHARED.value)
    return [account_of(r) for r in conn.execute(q)]


# Every charge runs these; built once, SQLAlchemy finds them compiled (bench/store.py).
_BY_UUID = select(transactions).where(transactions.c.uuid == bindparam("txn_uuid"))
_LOCK_ACCOUNT = select(accounts).where(accounts.c.id == bindparam("account_id")).with_for_update()
_INSERT_TRANSACTION = transactions.insert().returning(transactions.c.id)


def thdTransactionByUUID(conn: Connection, txn_uuid: str) -> Transaction | None:
    """The transaction with this UUID, or None."""
    row = conn.execute(_BY_UUID, {"txn_uuid": txn_uuid}).first()
    return None if row is None else _transaction(row)


def thdPost(
    conn: Connection,
    account_id: int,
    amount: int,
    reason: str,
    now: float,
    *,
    site: str,
    comment: str = "",
    job_uuid: str | None = None,
    txn_uuid: str | None = None,
    enforce_limit: bool = False,
    decimals: int = 2,
) -> Transaction:
    """Post ``amount`` (negative for a charge) to an account; return the transaction.

    With ``enforce_limit``, a charge that would take a restricted account below its
    credit limit raises InsufficientFunds; otherwise it is applied (charges recorded
    offline must land even when they overdraw).
    """
    if reason not in REASONS:
        raise Invalid(f"unknown transaction reason {reason!r}")
    # Lock the account row first (PostgreSQL runs several writers): a concurrent post
    # to it waits here until we commit, then sees our balance and our UUID, so neither
    # a charge nor a resend's de-duplication is lost. SQLite's writer lock does this.
    row = conn.execute(_LOCK_ACCOUNT, {"account_id": account_id}).first()
    if txn_uuid is None:
        txn_uuid = str(uuidlib.uuid4())
    else:
        existing = thdTransactionByUUID(conn, txn_uuid)
        if existing is not None:
            return attrs.evolve(existing, applied=False)
    if row is None:
        raise NotFound(f"no account with id {account_id}")
    account = account_of(row)
    new_balance = account.balance + amount
    limit = available(account.balance, account.restricted, account.credit_limit)
    if enforce_limit and amount < 0 and limit is not None and -amount > limit:
        raise InsufficientFunds(
            f"insufficient balance: {format_amount(max(limit, 0), decimals)} available, "
            f"{reason} costs {format_amount(-amount, decimals)}"
        )
    thdUpdate(conn, accounts, account_id, {"balance": new_balance}, now)
    values = {
        "uuid": txn_uuid,
        "account_id": account_id,
        "account_name": account.name,
        "amount": amount,
        "balance_after": new_balance,
        "reason": reason,
        "comment": comment,
        "job_uuid": job_uuid,
        "site": site,
        "created_at": now,
    }
    txn_id = conn.execute(_INSERT_TRANSACTION, values).scalar_one()
    return Transaction(id=txn_id, **values)  # type: ignore[arg-type]


def thdListTransactions(
    conn: Connection, account_id: int | None = None, limit: int = 100
) -> list[Transaction]:
    """The newest transactions, optionally of one account, newest first."""
    q = select(transactions).order_by(transactions.c.id.desc()).limit(limit)
    if account_id is not None:
        q = q.where(transactions.c.account_id == account_id)
    return [_transaction(r) for r in conn.execute(q)]


def thdOverdrafts(conn: Connection, limit: int = 100) -> list[Transaction]:
    """Charges recorded offline that took an account past its credit limit, newest first."""
    rows = conn.execute(
        select(transactions)
        .where(transactions.c.overdraft.is_(True))
        .order_by(transactions.c.id.desc())
        .limit(limit)
    )
    return [_transaction(r) for r in rows]


def thdSuspense(conn: Connection, limit: int = 100) -> list[Transaction]:
    """The newest charges posted to the Suspense account (their user or account was gone)."""
    return thdListTransactions(conn, thdAccount(conn, SUSPENSE_ACCOUNT).id, limit)
