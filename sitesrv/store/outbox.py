"""The outbox: what a site records, on its way to the primary exactly once.

At a site, every charge (with its job log, when there is one) is written to ``outbox``
with a UUID and the next per-site sequence number, in the same transaction as the thing
it records, before the caller is answered. The site submits records in sequence order;
the primary applies each batch in one transaction (``thdApplyOutbox``), de-duplicating by
UUID, and sets the site's replicated ``applied_seq`` in that same transaction.

The balance a site shows is the replicated balance plus the amounts of its own records
above ``applied_seq``: a charge is counted once at every moment, whether the primary's
acknowledgement or the replicated balance arrives first. A record is deleted at the site
only once ``applied_seq`` covers it and the retention time has passed.

Record format 1 (JSON in ``outbox.payload``)::

    {"format": 1, "uuid": str, "seq": int, "kind": "charge", "site_time": float,
     "user_id": int|null, "username": str, "account_id": int, "account_name": str,
     "amount": int, "reason": str, "comment": str, "offline": bool,
     "job": null | {"uuid": str, "kind": "print"|"copy"|"scan"|"fax",
                    "printer_id": int|null, "printer_name": str, "document": str,
                    "pages": int, "copies": int, "colour": bool, "duplex": bool,
                    "status": str}}
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import attrs
from sqlalchemy import Connection, Table, bindparam, case, delete, func, insert, select, update
from sqlalchemy.exc import DBAPIError

from sitesrv.errors import SitesrvError
from sitesrv.store import jobs, ledger
from sitesrv.store.changelog import thdLogMany, thdRows, thdUpdate
from sitesrv.store.schema import (
    accounts,
    dead_letters,
    outbox,
    replica_state,
    sites,
    transactions,
)
from sitesrv.store.schema import jobs as job_log

#: The newest record format this software writes and applies.
RECORD_FORMAT = 1
#: Largest accepted encoded record.
MAX_RECORD = 16_384


class DeadLetter(SitesrvError):
    """A record that can never be applied; it goes to the dead-letter table."""


@attrs.frozen
class Pending:
    """One outbox record at the site."""

    seq: int
    uuid: str
    payload: dict[str, Any]


# -- at the site ----------------------------------------------------------------------


# A site's replica holds exactly one site row: its own.
_OWN_APPLIED_SEQ = select(func.max(sites.c.applied_seq))
# Every print-provider decision at a site runs this, so it is built once: building a
# statement and its cache key costs more than SQLite takes to run it.
_PENDING_AMOUNT = select(func.coalesce(func.sum(outbox.c.amount), 0)).where(
    outbox.c.account_id == bindparam("account_id"),
    outbox.c.seq > func.coalesce(_OWN_APPLIED_SEQ.scalar_subquery(), 0),
)


def thdOwnAppliedSeq(conn: Connection) -> int:
    """The primary's ``applied_seq`` for this site, as replicated (0 before any)."""
    value = conn.execute(_OWN_APPLIED_SEQ).scalar()
    return int(value or 0)


def thdRecord(conn: Connection, record: dict[str, Any], now: float) -> int:
    """Add a record to the outbox (the caller's transaction); return its sequence number."""
    # Above applied_seq too: a site rebuilt from an empty (or restored) database counts
    # from 0 again, and a record at or below applied_seq would be taken as applied and
    # never submitted.
    applied = thdOwnAppliedSeq(conn)
    last = replica_state.c.outbox_seq
    seq = conn.execute(
        update(replica_state)
        .where(replica_state.c.id == 1)
        .values(outbox_seq=case((last < applied, applied), else_=last) + 1)
        .returning(replica_state.c.outbox_seq)
    ).scalar_one_or_none()
    if seq is None:
        raise SitesrvError("site not yet synchronised with the primary")
    payload = {**record, "seq": seq, "format": RECORD_FORMAT}
    encoded = json.dumps(payload, separators=(",", ":"), sort_keys=True)
    if len(encoded) > MAX_RECORD:
        raise SitesrvError(f"record larger than {MAX_RECORD} bytes")
    conn.execute(
        insert(outbox).values(
            seq=seq,
            uuid=payload["uuid"],
            kind=payload["kind"],
            account_id=payload.get("account_id"),
            amount=payload.get("amount", 0),
            payload=encoded,
            created_at=now,
        )
    )
    return seq


def thdPendingAmount(conn: Connection, account_id: int) -> int:
    """The sum of this site's not-yet-applied amounts for an account."""
    # Above ``thdOwnAppliedSeq``, read in the same statement.
    total = conn.execute(_PENDING_AMOUNT, {"account_id": account_id}).scalar_one()
    return int(total)


def thdPending(conn: Connection, after: int, limit: int) -> list[Pending]:
    """Records with a sequence number above ``after``, in order."""
    rows = conn.execute(
        select(outbox.c.seq, outbox.c.uuid, outbox.c.payload)
        .where(outbox.c.seq > after)
        .order_by(outbox.c.seq)
        .limit(limit)
    )
    return [Pending(r.seq, r.uuid, json.loads(r.payload)) for r in rows]


# What the drain reads, several times a second while reconciling: built once.
_PENDING_TEXT = (
    select(outbox.c.seq, outbox.c.payload)
    .where(outbox.c.seq > bindparam("after"))
    .order_by(outbox.c.seq)
    .limit(bindparam("limit"))
)


def thdPendingText(conn: Connection, after: int, limit: int) -> list[tuple[int, str]]:
    """Records with a sequence number above ``after``, in order, as (seq, the JSON text
    stored): what the drain sends, without decoding it (``codec.pack_json``)."""
    rows = conn.execute(_PENDING_TEXT, {"after": after, "limit": limit})
    return [(seq, payload) for seq, payload in rows]


def thdRecordByUUID(conn: Connection, uuid: str) -> Pending | None:
    """The record with this UUID still in the outbox, or None."""
    row = conn.execute(
        select(outbox.c.seq, outbox.c.uuid, outbox.c.payload).where(outbox.c.uuid == uuid)
    ).first()
    return None if row is None else Pending(row.seq, row.uuid, json.loads(row.payload))


def thdPendingCount(conn: Connection) -> int:
    """How many records the primary has not applied yet."""
    applied = thdOwnAppliedSeq(conn)
    return int(conn.execute(select(func.count()).where(outbox.c.seq > applied)).scalar_one())


def thdPrune(conn: Connection, older_than: float) -> int:
    """Delete applied records older than ``older_than``; return how many."""
    applied = thdOwnAppliedSeq(conn)
    return conn.execute(
        delete(outbox).where(outbox.c.seq <= applied, outbox.c.created_at < older_than)
    ).rowcount


# -- at the primary -------------------------------------------------------------------

_REQUIRED: dict[str, type | tuple[type, ...]] = {
    "uuid": str,
    "seq": int,
    "kind": str,
    "username": str,
    "account_id": int,
    "account_name": str,
    "amount": int,
    "reason": str,
}
_JOB_REQUIRED: dict[str, type | tuple[type, ...]] = {
    "uuid": str,
    "kind": str,
    "printer_name": str,
    "pages": int,
    "copies": int,
    "colour": bool,
    "duplex": bool,
}


_INT = 2**31 - 1
_BIGINT = 2**63 - 1
#: The most each field may hold at the primary (its column's length or range): a record
#: beyond them can never be stored there, on any backend.
_LIMITS = {
    "uuid": 36,
    "seq": _BIGINT,
    "username": 200,
    "account_id": _INT,
    "account_name": 200,
    "amount": _BIGINT,
}
_JOB_LIMITS = {"uuid": 36, "printer_name": 200, "pages": _INT, "copies": _INT}


def _is(value: Any, kind: type | tuple[type, ...]) -> bool:
    # JSON booleans are Python ints: an int field must not accept true/false.
    return isinstance(value, kind) and (kind is bool or not isinstance(value, bool))


def _fits(value: Any, limit: int) -> bool:
    # PostgreSQL text cannot hold NUL; lengths and ranges are the columns'.
    if isinstance(value, str):
        return len(value) <= limit and "\x00" not in value
    return not _is(value, int) or -limit - 1 <= value <= limit


def _checkFields(
    where: str, values: dict[str, Any], limits: dict[str, int], optional_id: str
) -> None:
    for key, limit in limits.items():
        if not _fits(values[key], limit):
            raise DeadLetter(f"{where} {key!r} too long, out of range or containing NUL")
    value = values.get(optional_id)
    if value is not None and not (_is(value, int) and _fits(value, _INT)):
        raise DeadLetter(f"{where} {optional_id!r} must be null or an id")


def _seq(value: Any) -> int | None:
    """A record's sequence number, if it is one a column can hold."""
    return value if _is(value, int) and _fits(value, _BIGINT) else None


def _text(value: Any, size: int | None = None) -> str:
    # Free text (a document title, a comment) loses NULs rather than the whole charge.
    return str(value).replace("\x00", "")[:size]


def _check(record: Any) -> None:
    if not isinstance(record, dict):
        raise DeadLetter("a record must be a JSON object")
    if record.get("format") != RECORD_FORMAT:
        raise DeadLetter(f"record format {record.get('format')!r} is not {RECORD_FORMAT}")
    for key, kind in _REQUIRED.items():
        if not _is(record.get(key), kind):
            raise DeadLetter(f"field {key!r} missing or of the wrong type")
    _checkFields("field", record, _LIMITS, "user_id")
    if record["kind"] != "charge":
        raise DeadLetter(f"unknown record kind {record['kind']!r}")
    if record["reason"] not in ledger.REASONS:
        raise DeadLetter(f"unknown reason {record['reason']!r}")
    job = record.get("job")
    if job is not None:
        if not isinstance(job, dict):
            raise DeadLetter("field 'job' must be an object")
        for key, kind in _JOB_REQUIRED.items():
            if not _is(job.get(key), kind):
                raise DeadLetter(f"job field {key!r} missing or wrong type")
        _checkFields("job field", job, _JOB_LIMITS, "printer_id")
        if job["kind"] not in jobs.KINDS:
            raise DeadLetter(f"unknown job kind {job['kind']!r}")


def _thdApplyOne(conn: Connection, site: str, record: dict[str, Any], now: float) -> None:
    account = ledger.thdAccountById(conn, record["account_id"])
    comment = _text(record.get("comment", "") or "")
    if account is None or account.name != record["account_name"]:
        # The user or account is gone (or its id now means something else): never lose
        # the charge; book it to Suspense for an administrator to resolve.
        account = ledger.thdAccount(conn, ledger.SUSPENSE_ACCOUNT)
        comment = (
            f"suspense: account {record['account_name']!r} of user {record['username']!r} "
            f"(id {record['account_id']}) no longer exists at the primary; {comment}"
        ).strip("; ")
    job = record.get("job")
    if job is not None:
        jobs.thdLogJob(
            conn,
            now,
            uuid=job["uuid"],
            kind=job["kind"],
            user_id=record.get("user_id"),
            username=record["username"],
            account_id=account.id,
            printer_id=job.get("printer_id"),
            printer_name=job["printer_name"],
            site=site,
            document=_text(job.get("document", ""), 500),
            pages=job["pages"],
            copies=job["copies"],
            colour=job["colour"],
            duplex=job["duplex"],
            cost=-record["amount"],
            status=_text(job.get("status", "printed"), 20),
            created_at=float(record.get("site_time", now)),
        )
    if record["amount"] == 0:
        return
    txn = ledger.thdPost(
        conn,
        account.id,
        record["amount"],
        record["reason"],
        now,
        site=site,
        comment=comment,
        job_uuid=None if job is None else job["uuid"],
        txn_uuid=record["uuid"],
    )
    overdrawn = (
        txn.applied
        and account.restricted
        and record["amount"] < 0
        and txn.balance_after < -account.credit_limit
    )
    if overdrawn:
        conn.execute(
            update(transactions).where(transactions.c.id == txn.id).values(overdraft=True)
        )


def thdApplyOutbox(conn: Connection, site: str, records: Sequence[Any], now: float) -> int:
    """Apply a site's batch in this transaction; return the site's new ``applied_seq``.

    Every well-formed record is applied once (a resent UUID changes nothing); a record
    that can never apply goes to the dead-letter table, so the batch never blocks.
    The well-formed records are applied together, a few statements for the whole batch
    (reconciling after an outage is thousands of records a second); should that fail on
    something the checks did not foresee, they are applied one by one so that only the
    offending record is dead-lettered.
    """
    row = conn.execute(select(sites.c.id, sites.c.applied_seq).where(sites.c.name == site)).one()
    applied = row.applied_seq
    good: list[dict[str, Any]] = []
    for record in records:
        seq = _seq(record.get("seq")) if isinstance(record, dict) else None
        try:
            _check(record)
            good.append(record)
        except DeadLetter as e:
            thdDeadLetter(conn, site, record, str(e), now)
        if seq is not None:
            applied = max(applied, seq)
    try:
        with conn.begin_nested():
            _thdApplyMany(conn, site, good, now)
    except _APPLY_ERRORS:
        for record in good:
            try:
                with conn.begin_nested():
                    _thdApplyOne(conn, site, record, now)
            except _APPLY_ERRORS as e:
                thdDeadLetter(conn, site, record, str(e), now)
    if applied != row.applied_seq:
        thdUpdate(conn, sites, row.id, {"applied_seq": applied}, now)
    return applied


#: What applying a checked record can still run into (all of them dead-letter it).
_APPLY_ERRORS = (DeadLetter, SitesrvError, ValueError, KeyError, TypeError, DBAPIError)
#: Values per IN (...) list.
_IN_CHUNK = 500


def _thdExisting(conn: Connection, column: Any, values: Sequence[str]) -> set[str]:
    found: set[str] = set()
    for start in range(0, len(values), _IN_CHUNK):
        chunk = values[start : start + _IN_CHUNK]
        found.update(conn.execute(select(column).where(column.in_(chunk))).scalars())
    return found


def _thdLockAccounts(conn: Connection, ids: Sequence[int]) -> dict[int, ledger.Account]:
    # Locked (PostgreSQL) so that a concurrent post cannot interleave with the batch.
    found: dict[int, ledger.Account] = {}
    ordered = sorted(set(ids))
    for start in range(0, len(ordered), _IN_CHUNK):
        chunk = ordered[start : start + _IN_CHUNK]
        q = select(accounts).where(accounts.c.id.in_(chunk)).order_by(accounts.c.id)
        for row in conn.execute(q.with_for_update()):
            found[row.id] = ledger.account_of(row)
    return found


def _thdApplyMany(conn: Connection, site: str, records: list[dict[str, Any]], now: float) -> None:
    """Apply checked records together: what ``_thdApplyOne`` does, record by record."""
    unique: dict[str, dict[str, Any]] = {}
    for record in records:
        unique.setdefault(record["uuid"], record)
    batch = list(unique.values())
    if not batch:
        return
    posted = _thdExisting(conn, transactions.c.uuid, [r["uuid"] for r in batch])
    logged = _thdExisting(conn, job_log.c.uuid, [r["job"]["uuid"] for r in batch if r.get("job")])
    suspense = ledger.thdAccount(conn, ledger.SUSPENSE_ACCOUNT)
    found = _thdLockAccounts(conn, [r["account_id"] for r in batch] + [suspense.id])
    balances: dict[int, int] = {}
    job_rows: list[dict[str, Any]] = []
    txn_rows: list[dict[str, Any]] = []
    for record in batch:
        account = found.get(record["account_id"])
        comment = _text(record.get("comment", "") or "")
        if account is None or account.name != record["account_name"]:
            account = found[suspense.id]
            comment = (
                f"suspense: account {record['account_name']!r} of user "
                f"{record['username']!r} (id {record['account_id']}) no longer exists at "
                f"the primary; {comment}"
            ).strip("; ")
        job = record.get("job")
        if job is not None and job["uuid"] not in logged:
            logged.add(job["uuid"])
            job_rows.append(
                {
                    "uuid": job["uuid"],
                    "kind": job["kind"],
                    "user_id": record.get("user_id"),
                    "username": record["username"],
                    "account_id": account.id,
                    "printer_id": job.get("printer_id"),
                    "printer_name": job["printer_name"],
                    "site": site,
                    "document": _text(job.get("document", ""), 500),
                    "pages": job["pages"],
                    "copies": job["copies"],
                    "colour": job["colour"],
                    "duplex": job["duplex"],
                    "cost": -record["amount"],
                    "status": _text(job.get("status", "printed"), 20),
                    "created_at": float(record.get("site_time", now)),
                }
            )
        amount = record["amount"]
        if amount == 0 or record["uuid"] in posted:
            continue
        balance = balances.get(account.id, account.balance) + amount
        balances[account.id] = balance
        txn_rows.append(
            {
                "uuid": record["uuid"],
                "account_id": account.id,
                "account_name": account.name,
                "amount": amount,
                "balance_after": balance,
                "reason": record["reason"],
                "comment": comment,
                "job_uuid": None if job is None else job["uuid"],
                "site": site,
                "created_at": now,
                "overdraft": account.restricted and amount < 0 and balance < -account.credit_limit,
            }
        )
    _thdInsertRows(conn, job_log, job_rows)
    _thdInsertRows(conn, transactions, txn_rows)
    if balances:
        conn.execute(
            update(accounts)
            .where(accounts.c.id == bindparam("account"))
            .values(balance=bindparam("new_balance")),
            [{"account": k, "new_balance": v} for k, v in balances.items()],
        )
        rows = thdRows(conn, accounts, list(balances))
        thdLogMany(conn, [(accounts, rows[k]) for k in sorted(balances)], now)


def _thdInsertRows(conn: Connection, table: Table, rows: list[dict[str, Any]]) -> None:
    """Insert rows of plain values, each with the same keys (column names).

    On SQLite straight to the driver's ``executemany``: SQLAlchemy's processing of
    each row's parameters (none is needed for plain values) took a quarter of the
    primary's time applying a reconciling site's batches.
    """
    if not rows:
        return
    if conn.dialect.name != "sqlite":
        conn.execute(insert(table), rows)
        return
    names = list(rows[0])
    quote = conn.dialect.identifier_preparer
    statement = (
        f"INSERT INTO {quote.format_table(table)} "
        f"({', '.join(quote.format_column(table.c[n]) for n in names)}) "
        f"VALUES ({', '.join('?' * len(names))})"
    )
    conn.exec_driver_sql(statement, [tuple(row[n] for n in names) for row in rows])


def thdDeadLetter(conn: Connection, site: str, record: Any, error: str, now: float) -> None:
    """Keep a record that cannot be applied, once per (site, uuid)."""
    payload = json.dumps(record, sort_keys=True, default=str)
    uuid = record.get("uuid") if isinstance(record, dict) else None
    if not (isinstance(uuid, str) and uuid and _fits(uuid, 100)):
        # No usable UUID: key the letter by its content, so that two different records
        # are both kept and a resent one is still kept once.
        uuid = "sha256:" + hashlib.sha256(payload.encode("utf-8")).hexdigest()
    seq = _seq(record.get("seq")) if isinstance(record, dict) else None
    exists = conn.execute(
        select(dead_letters.c.id).where(dead_letters.c.site == site, dead_letters.c.uuid == uuid)
    ).first()
    if exists:
        return
    conn.execute(
        insert(dead_letters).values(
            site=site,
            seq=seq or 0,
            uuid=uuid,
            payload=payload[:MAX_RECORD],
            error=_text(error, 1000),
            created_at=now,
        )
    )


@attrs.frozen
class DeadLetterRecord:
    """A site record the primary could not apply."""

    id: int
    site: str
    seq: int
    uuid: str
    payload: str
    error: str
    created_at: float
    resolved_at: float | None
    resolution: str


def thdListDeadLetters(conn: Connection, include_resolved: bool = False) -> list[DeadLetterRecord]:
    """Dead letters, oldest first; unresolved only unless asked."""
    q = select(dead_letters).order_by(dead_letters.c.id)
    if not include_resolved:
        q = q.where(dead_letters.c.resolved_at.is_(None))
    return [
        DeadLetterRecord(
            r.id,
            r.site,
            r.seq,
            r.uuid,
            r.payload,
            r.error,
            r.created_at,
            r.resolved_at,
            r.resolution,
        )
        for r in conn.execute(q)
    ]


def thdResolveDeadLetter(conn: Connection, letter_id: int, resolution: str, now: float) -> None:
    """Mark a dead letter resolved, with what the administrator did about it."""
    done = conn.execute(
        update(dead_letters)
        .where(dead_letters.c.id == letter_id, dead_letters.c.resolved_at.is_(None))
        .values(resolved_at=now, resolution=resolution[:1000])
    ).rowcount
    if not done:
        raise SitesrvError(f"no unresolved dead letter with id {letter_id}")


def thdOutbox(conn: Connection, limit: int) -> tuple[int, list[Pending]]:
    """This site's ``applied_seq`` and its newest records (pending and retained)."""
    rows = conn.execute(
        select(outbox.c.seq, outbox.c.uuid, outbox.c.payload)
        .order_by(outbox.c.seq.desc())
        .limit(limit)
    )
    return thdOwnAppliedSeq(conn), [Pending(r.seq, r.uuid, json.loads(r.payload)) for r in rows]
