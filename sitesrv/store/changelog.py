"""The change log: every authoritative write, as full row images, in commit order.

All writes to replicated tables at the primary go through ``thdInsert``, ``thdUpdate``
and ``thdDelete`` (or ``thdDeleteWhere``), which append to the change log in the same
transaction; bulk imports write many rows at once and log them with ``thdLogMany``.
Positions come from the single ``replication_state`` row, incremented inside the writing
transaction: a second writer waits on that row until the first commits, so positions
become visible in commit order and a site streaming "everything after P" can never skip
a change that committed late.
"""

from __future__ import annotations

import functools
import json
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs
from sqlalchemy import Connection, Table, bindparam, delete, func, insert, select, update
from sqlalchemy.sql.elements import ClauseElement, ColumnElement

from sitesrv.store.engine import thdInsertMany
from sitesrv.store.schema import (
    REPLICATED_BY_NAME,
    ROW_FORMAT,
    changelog,
    replication_state,
    site_links,
    sites,
)


@attrs.frozen
class Change:
    """One change-log entry, as replication sends it."""

    position: int
    table: str
    row_id: int
    op: str  # "upsert" | "delete"
    image: dict[str, Any] | None
    scope: str | None
    format: int
    #: The first position of the transaction that wrote this change.
    txn: int = 0


@attrs.frozen
class ChangeBatch:
    """What ``thdChangeBatch`` returns (synapse's "rows since X", plus ``partial``)."""

    changes: list[Change]
    #: The position the reader has now seen through.
    upto: int
    #: More entries remain after ``upto``.
    limited: bool
    #: The transaction of the last entry continues after ``upto``.
    partial: bool


def thdEnsureState(conn: Connection) -> None:
    """Create the replication state row (a fresh epoch, head 0) if it is missing."""
    if conn.execute(select(replication_state.c.id)).first() is None:
        conn.execute(insert(replication_state).values(id=1, epoch=str(uuid.uuid4()), head=0))


def thdState(conn: Connection) -> tuple[str, int]:
    """The change log's ``(epoch, head)``."""
    row = conn.execute(select(replication_state.c.epoch, replication_state.c.head)).one()
    return row.epoch, row.head


def thdNewEpoch(conn: Connection) -> str:
    """Renew the epoch (after a restore from backup): every site will re-snapshot."""
    epoch = str(uuid.uuid4())
    conn.execute(update(replication_state).values(epoch=epoch))
    return epoch


# Every write runs the statements below, so they are built once: building a statement
# and computing its cache key costs more than SQLite takes to run it (bench/store.py).

_NEXT_POSITION = (
    update(replication_state)
    .where(replication_state.c.id == 1)
    .values(head=replication_state.c.head + 1)
    .returning(replication_state.c.head)
)
_APPEND = insert(changelog)
#: ``json.dumps(image, separators=(",", ":"))``, without making an encoder each time.
_encode = json.JSONEncoder(separators=(",", ":")).encode


@functools.cache
def _selectById(table: Table) -> Any:
    return select(table).where(table.c.id == bindparam("_where_id"))


@functools.cache
def _insertReturningId(table: Table) -> Any:
    # The columns come from the parameters, as with ``.values(**values)``.
    return insert(table).returning(table.c.id)


@functools.cache
def _updateById(table: Table) -> Any:
    # The SET clause comes from the parameters, as with ``.values(**values)``.
    return update(table).where(table.c.id == bindparam("_where_id"))


def _bindable(table: Table, values: Mapping[str, Any]) -> bool:
    # Plain values for known columns can be parameters of a prepared statement; SQL
    # expressions, and unknown names (a CompileError), go through ``.values()``.
    return bool(values) and all(
        k in table.c and not isinstance(v, ClauseElement) for k, v in values.items()
    )


def _thdNextPosition(conn: Connection) -> int:
    # The UPDATE takes the row lock (PostgreSQL) / the write lock (SQLite) that orders
    # writers; RETURNING gives the value this transaction owns.
    return conn.execute(_NEXT_POSITION).scalar_one()


def _image(table: Table, row: Any) -> dict[str, Any]:
    secret = REPLICATED_BY_NAME[table.name].secret_columns
    if not secret:
        return dict(row)
    return {k: v for k, v in row.items() if k not in secret}


def _thdScope(conn: Connection, table: Table, row: Any) -> str | None:
    column = REPLICATED_BY_NAME[table.name].scope_column
    if column is None:
        return None
    site_id = row[column]
    return conn.execute(select(sites.c.name).where(sites.c.id == site_id)).scalar_one()


def _thdAppend(
    conn: Connection,
    table: Table,
    row_id: int,
    op: str,
    image: dict[str, Any] | None,
    scope: str | None,
    now: float,
) -> int:
    position = _thdNextPosition(conn)
    conn.execute(
        _APPEND,
        {
            "position": position,
            "table_name": table.name,
            "row_id": row_id,
            "op": op,
            "image": None if image is None else _encode(image),
            "scope": scope,
            "format": ROW_FORMAT,
            "created_at": now,
            "txn": _thdTxn(conn, position),
        },
    )
    return position


def _thdTxn(conn: Connection, position: int) -> int:
    # All entries of one database transaction share its first position. The current
    # transaction object is kept (strongly) with the connection, so a later transaction
    # can never be mistaken for it.
    current = conn.get_transaction()
    mark = conn.info.get("sitesrv.txn")
    if mark is None or mark[0] is not current:
        mark = (current, position)
        conn.info["sitesrv.txn"] = mark
    return int(mark[1])


def _thdLogRow(conn: Connection, table: Table, row_id: int, now: float) -> None:
    row = conn.execute(_selectById(table), {"_where_id": row_id}).mappings().one()
    _thdAppend(conn, table, row_id, "upsert", _image(table, row), _thdScope(conn, table, row), now)


def thdInsert(conn: Connection, table: Table, values: Mapping[str, Any], now: float) -> int:
    """Insert a row into a replicated table, log its image, and return its id."""
    if _bindable(table, values):
        row_id = conn.execute(_insertReturningId(table), dict(values)).scalar_one()
    else:
        row_id = conn.execute(insert(table).values(**values).returning(table.c.id)).scalar_one()
    _thdLogRow(conn, table, row_id, now)
    return row_id


#: Most ids put in one ``IN (...)`` list (SQLite allows 32766 variables per statement).
_IN_CHUNK = 1000


def thdRows(conn: Connection, table: Table, row_ids: Sequence[int]) -> dict[int, dict[str, Any]]:
    """The current rows of ``table`` with these ids, by id (for ``thdLogMany``)."""
    keys = [c.key for c in table.c]
    where = keys.index("id")
    wanted = set(row_ids)
    ordered = sorted(wanted)
    rows: dict[int, dict[str, Any]] = {}
    for start in range(0, len(ordered), _IN_CHUNK):
        chunk = ordered[start : start + _IN_CHUNK]
        low, high = chunk[0], chunk[-1]
        # Rows just inserted have (nearly) consecutive ids: a range reads them faster
        # than a list of a thousand parameters does.
        dense = high - low < 2 * len(chunk)
        q = select(table).where(table.c.id.between(low, high) if dense else table.c.id.in_(chunk))
        for row in conn.execute(q):
            if row[where] in wanted:
                rows[row[where]] = dict(zip(keys, row, strict=True))
    return rows


def thdLogMany(
    conn: Connection,
    entries: Sequence[tuple[Table, Mapping[str, Any]]],
    now: float,
    *,
    own_group: bool = False,
) -> int:
    """Log upsert images of rows already written, in this order; return the last position.

    The bulk form of what ``thdInsert`` and ``thdUpdate`` log: ``entries`` are
    ``(table, row)`` with the row as ``thdRows`` read it. All positions come from one
    counter update, so they are consecutive and ordered like those of one writer.
    They belong to this transaction's group (a site applies them with the rest of the
    transaction), unless ``own_group``: a bulk import is applied call by call.
    """
    if not entries:
        return thdState(conn)[1]
    last = conn.execute(
        update(replication_state)
        .where(replication_state.c.id == 1)
        .values(head=replication_state.c.head + len(entries))
        .returning(replication_state.c.head)
    ).scalar_one()
    first = last - len(entries) + 1
    group = first if own_group else _thdTxn(conn, first)
    # Scopes first (they may need queries); the images are encoded as the rows go out,
    # so that on PostgreSQL the server stores the first while the rest are encoded.
    known: dict[tuple[str, Any], str | None] = {}
    scopes = []
    for table, row in entries:
        column = REPLICATED_BY_NAME[table.name].scope_column
        key = (table.name, None if column is None else row[column])
        if key not in known:
            known[key] = _thdScope(conn, table, row)
        scopes.append(known[key])
    rows = (
        (
            first + offset,
            table.name,
            row["id"],
            "upsert",
            _encode(_image(table, row)),
            scope,
            ROW_FORMAT,
            now,
            group,
        )
        for offset, ((table, row), scope) in enumerate(zip(entries, scopes, strict=True))
    )
    thdInsertMany(
        conn,
        changelog,
        (
            "position",
            "table_name",
            "row_id",
            "op",
            "image",
            "scope",
            "format",
            "created_at",
            "txn",
        ),
        rows,
    )
    return last


def thdUpdate(
    conn: Connection, table: Table, row_id: int, values: Mapping[str, Any], now: float
) -> None:
    """Update one row of a replicated table by id and log its new image."""
    if _bindable(table, values):
        conn.execute(_updateById(table), {"_where_id": row_id, **values})
    else:
        conn.execute(update(table).where(table.c.id == row_id).values(**values))
    _thdLogRow(conn, table, row_id, now)


def thdDelete(conn: Connection, table: Table, row_id: int, now: float) -> None:
    """Delete one row of a replicated table by id and log a delete marker."""
    row = conn.execute(select(table).where(table.c.id == row_id)).mappings().first()
    if row is None:
        return
    scope = _thdScope(conn, table, row)
    conn.execute(delete(table).where(table.c.id == row_id))
    _thdAppend(conn, table, row_id, "delete", None, scope, now)


def thdDeleteWhere(conn: Connection, table: Table, where: ColumnElement[bool], now: float) -> int:
    """Delete the matching rows one by one, each with its delete marker; return how many.

    Used for children before their parent, so that the database's ``ON DELETE CASCADE``
    never removes a replicated row without a marker.
    """
    ids = conn.execute(select(table.c.id).where(where)).scalars().all()
    for row_id in ids:
        thdDelete(conn, table, row_id, now)
    return len(ids)


def thdChangesSince(
    conn: Connection, after: int, limit: int, scopes: Iterable[str | None] = (None,)
) -> tuple[list[Change], int, bool]:
    """Changes after position ``after`` visible to ``scopes``: ``(changes, upto, limited)``.

    ``upto`` is the position the caller has now seen through (it may be beyond the last
    returned change, when later entries belong to other sites); ``limited`` says whether
    more remain. Follows synapse's "rows since X" shape.
    """
    batch = thdChangeBatch(conn, after, limit, scopes)
    return batch.changes, batch.upto, batch.limited


def thdChangeBatch(
    conn: Connection, after: int, limit: int, scopes: Iterable[str | None] = (None,)
) -> ChangeBatch:
    """Like ``thdChangesSince``, and says whether the batch ends inside a transaction."""
    named = {s for s in scopes if s is not None}
    head = conn.execute(select(replication_state.c.head)).scalar_one()
    rows = list(
        conn.execute(
            select(changelog)
            .where(changelog.c.position > after, changelog.c.position <= head)
            .order_by(changelog.c.position)
            .limit(limit + 1)
        ).mappings()
    )
    limited = len(rows) > limit
    partial = limited and rows[limit]["txn"] == rows[limit - 1]["txn"]
    rows = rows[:limit]
    changes = [
        Change(
            position=row["position"],
            table=row["table_name"],
            row_id=row["row_id"],
            op=row["op"],
            image=None if row["image"] is None else json.loads(row["image"]),
            scope=row["scope"],
            format=row["format"],
            txn=row["txn"],
        )
        for row in rows
        if row["scope"] is None or row["scope"] in named
    ]
    upto = rows[-1]["position"] if rows else after
    if not limited:
        upto = max(upto, head)
    return ChangeBatch(changes, upto, limited, partial)


def thdTrim(conn: Connection, upto: int) -> int:
    """Delete change-log entries at or below ``upto``; return how many went."""
    return conn.execute(delete(changelog).where(changelog.c.position <= upto)).rowcount


def thdTrimOld(conn: Connection, older_than: float) -> int:
    """Trim what every connected, unrevoked site has applied, and anything older than
    ``older_than`` (a site that lagged that long re-snapshots). Return how many went."""
    slowest = conn.execute(
        select(func.min(site_links.c.position))
        .select_from(site_links.join(sites, sites.c.name == site_links.c.site))
        .where(sites.c.revoked.is_(False))
    ).scalar()
    trimmed = 0
    if slowest is not None:
        trimmed += thdTrim(conn, slowest)
    trimmed += conn.execute(delete(changelog).where(changelog.c.created_at < older_than)).rowcount
    return trimmed


def thdOldestPosition(conn: Connection) -> int | None:
    """The lowest position still in the log, or None when it is empty."""
    return conn.execute(select(func.min(changelog.c.position))).scalar()
