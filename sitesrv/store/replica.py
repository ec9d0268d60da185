"""A site's replica of the primary's authoritative tables.

The replica is written only by replication: a snapshot loaded into the shadow tables and
swapped in whole, then batches of changes, each applied together with the new position
in one transaction. Changes at or below the stored position are ignored, so a batch
that is resent or overlaps is harmless.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import attrs
from sqlalchemy import Connection, Table, bindparam, delete, insert, select, update
from sqlalchemy.exc import IntegrityError

from sitesrv.errors import SitesrvError
from sitesrv.store.changelog import Change
from sitesrv.store.schema import REPLICATED, REPLICATED_BY_NAME, ROW_FORMAT, SHADOW, replica_state


class ReplicaError(SitesrvError):
    """A change or page cannot be applied (unknown table, newer format, bad row)."""


@attrs.frozen
class ReplicaState:
    """Which epoch and position the replica reflects, and whether it is complete."""

    epoch: str
    position: int
    complete: bool
    last_sync: float | None


def thdReplicaState(conn: Connection) -> ReplicaState:
    """The replica's state (an empty, incomplete replica when none was ever loaded)."""
    row = conn.execute(select(replica_state)).first()
    if row is None:
        return ReplicaState("", 0, False, None)
    return ReplicaState(row.epoch, row.position, bool(row.complete), row.last_sync)


def _thdSetState(conn: Connection, **values: Any) -> None:
    if conn.execute(update(replica_state).values(**values)).rowcount == 0:
        base = {"id": 1, "epoch": "", "position": 0, "complete": False, "last_sync": None}
        conn.execute(insert(replica_state).values(**{**base, **values}))


def _table(name: str) -> Table:
    try:
        return REPLICATED_BY_NAME[name].table
    except KeyError:
        raise ReplicaError(f"unknown replicated table {name!r}") from None


def _row(table: Table, image: dict[str, Any]) -> dict[str, Any]:
    columns = table.columns
    unknown = set(image) - set(columns.keys())
    if unknown:
        raise ReplicaError(f"{table.name}: unknown columns {', '.join(sorted(unknown))}")
    return image


def _thdUpsert(conn: Connection, table: Table, row_id: int, image: dict[str, Any]) -> None:
    values = _row(table, image)
    if conn.execute(update(table).where(table.c.id == row_id).values(**values)).rowcount == 0:
        conn.execute(insert(table).values(**values))


def thdApplyChanges(
    conn: Connection, changes: Iterable[Change], upto: int, now: float | None = None
) -> int:
    """Apply changes above the stored position, store ``upto``; return the new position.

    ``now`` marks the replica as synced at that time (the caller passes it when the
    batch brought it up to the primary's head).
    """
    state = thdReplicaState(conn)
    position = state.position
    todo: list[Change] = []
    for change in changes:
        if change.position <= position:
            continue
        if change.format > ROW_FORMAT:
            raise ReplicaError(
                f"change {change.position} has row format {change.format}; "
                f"this site understands up to {ROW_FORMAT} (upgrade the site)"
            )
        if not (change.op == "delete" or (change.op == "upsert" and change.image is not None)):
            raise ReplicaError(f"change {change.position}: bad operation {change.op!r}")
        todo.append(change)
        position = change.position
    start = 0
    while start < len(todo):
        change = todo[start]
        table = _table(change.table)
        if change.op == "delete":
            conn.execute(delete(table).where(table.c.id == change.row_id))
            start += 1
            continue
        end = start + 1
        while end < len(todo) and todo[end].op == "upsert" and todo[end].table == change.table:
            end += 1
        _thdUpsertRun(conn, table, todo[start:end])
        start = end
    new_position = max(position, upto)
    values: dict[str, Any] = {"position": new_position}
    if now is not None:
        values["last_sync"] = now
    _thdSetState(conn, **values)
    return new_position


#: Consecutive upserts of one table applied as one statement per kind from this many on.
_RUN = 8


def _thdUpsertRun(conn: Connection, table: Table, run: list[Change]) -> None:
    """Upsert consecutive changes of one table: in bulk when there are many.

    Reconciling a site's outbox brings back a balance per account; one UPDATE each would
    make the site's single writer the bottleneck. The bulk form keeps each row's last
    image (what row by row would end with); should it meet a constraint that only the
    row-by-row order satisfies, the run is applied row by row instead.
    """
    images = {c.row_id: _row(table, c.image or {}) for c in run}
    shapes = {frozenset(image) for image in images.values()}
    if len(run) >= _RUN and len(shapes) == 1:
        try:
            with conn.begin_nested():
                _thdUpsertMany(conn, table, images, sorted(next(iter(shapes))))
            return
        except IntegrityError:
            pass
    for change in run:
        _thdUpsert(conn, table, change.row_id, change.image or {})


def _thdUpsertMany(
    conn: Connection, table: Table, images: dict[int, dict[str, Any]], columns: list[str]
) -> None:
    ids = list(images)
    existing: set[int] = set()
    for first in range(0, len(ids), 500):
        chunk = ids[first : first + 500]
        existing.update(conn.execute(select(table.c.id).where(table.c.id.in_(chunk))).scalars())
    updates = [{f"v_{k}": v for k, v in images[i].items()} | {"v_key": i} for i in existing]
    if updates:
        conn.execute(
            update(table)
            .where(table.c.id == bindparam("v_key"))
            .values({name: bindparam(f"v_{name}") for name in columns}),
            updates,
        )
    inserts = [images[i] for i in ids if i not in existing]
    if inserts:
        conn.execute(insert(table), inserts)


def thdMarkIncomplete(conn: Connection) -> None:
    """Stop trusting the replica (the site was revoked): only a new snapshot restores it."""
    _thdSetState(conn, complete=False)


def thdMarkSynced(conn: Connection, now: float) -> None:
    """Record that the replica has caught up with the primary's head at ``now``."""
    _thdSetState(conn, last_sync=now)


# -- snapshots ------------------------------------------------------------------------


def thdClearShadow(conn: Connection) -> None:
    """Empty the shadow tables before a snapshot is loaded."""
    for shadow in SHADOW.values():
        conn.execute(delete(shadow))


def thdLoadShadow(
    conn: Connection, table_name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]
) -> int:
    """Add one snapshot page to a shadow table; return the number of rows."""
    table = _table(table_name)
    unknown = set(columns) - set(table.columns.keys())
    if unknown or "id" not in columns:
        raise ReplicaError(f"{table_name}: bad snapshot columns {sorted(columns)}")
    if rows:
        if any(len(r) != len(columns) for r in rows):
            raise ReplicaError(f"{table_name}: a snapshot row has the wrong number of values")
        conn.execute(
            insert(SHADOW[table_name]), [dict(zip(columns, r, strict=True)) for r in rows]
        )
    return len(rows)


def thdSwapShadow(conn: Connection, epoch: str, position: int, now: float) -> None:
    """Replace the replica with the loaded snapshot, in this one transaction."""
    for replicated in reversed(REPLICATED):  # children first
        conn.execute(delete(replicated.table))
    for replicated in REPLICATED:  # parents first
        table = replicated.table
        shadow = SHADOW[table.name]
        names = [c.name for c in table.columns]
        conn.execute(insert(table).from_select(names, select(*(shadow.c[n] for n in names))))
    thdClearShadow(conn)
    _thdSetState(conn, epoch=epoch, position=position, complete=True, last_sync=now)
