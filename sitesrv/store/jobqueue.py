"""Provider jobs: every job a print provider asked about, with its state.

The Find-Me (hold/release) queue is the jobs in state ``held``. Owned by the server the
provider talks to and never replicated; the spool file stays at the provider. Expiry
times are absolute (``expires_at``), so the timer that expires jobs only re-checks them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import attrs
from sqlalchemy import (
    ColumnElement,
    Connection,
    and_,
    bindparam,
    delete,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.sql.elements import ClauseElement

from sitesrv.store.schema import provider_jobs

HELD = "held"
RELEASING = "releasing"
PRINTED = "printed"
FAILED = "failed"
EXPIRED = "expired"
CANCELLED = "cancelled"
DENIED = "denied"

#: Every state a job can be in.
STATES = frozenset({HELD, RELEASING, PRINTED, FAILED, EXPIRED, CANCELLED, DENIED})
#: States a job leaves only by a report of what happened to it (it may still print).
OPEN = frozenset({HELD, RELEASING})
#: States nothing changes any more.
FINAL = STATES - OPEN


@attrs.frozen
class ProviderJob:
    """One job as the server knows it."""

    id: int
    uuid: str
    provider: str
    queue: str
    queue_id: int | None
    username: str
    user_id: int | None
    document: str
    pages: int
    copies: int
    colour: bool
    duplex: bool
    size: int
    cost: int
    state: str
    reason: str
    release_id: str | None
    target: str | None
    target_id: int | None
    charged: int | None
    provider_told: bool
    created_at: float
    expires_at: float
    updated_at: float


_FIELDS = tuple(f.name for f in attrs.fields(ProviderJob))


def _job(row: Any) -> ProviderJob:
    mapping = row._mapping
    values = {name: mapping[name] for name in _FIELDS}
    for flag in ("colour", "duplex", "provider_told"):
        values[flag] = bool(values[flag])
    return ProviderJob(**values)


# Every decision a provider asks for runs the statements below, so they are built once:
# building a statement and its cache key costs more than SQLite takes to run it.

_BY_UUID = select(provider_jobs).where(provider_jobs.c.uuid == bindparam("uuid"))
#: The columns come from the parameters, as with ``.values(**values)``.
_INSERT = insert(provider_jobs).returning(*provider_jobs.c)
_RELEASING_TOTAL = select(func.coalesce(func.sum(provider_jobs.c.cost), 0)).where(
    provider_jobs.c.user_id == bindparam("user_id"), provider_jobs.c.state == RELEASING
)


def thdJob(conn: Connection, uuid: str) -> ProviderJob | None:
    """The job with this UUID, or None."""
    row = conn.execute(_BY_UUID, {"uuid": uuid}).first()
    return None if row is None else _job(row)


def thdAddJob(conn: Connection, now: float, **values: Any) -> ProviderJob:
    """Record a new job (``values`` are its columns); return it (by ``RETURNING``)."""
    if values.get("state") not in STATES:
        raise ValueError(f"unknown job state {values.get('state')!r}")
    values.setdefault("created_at", now)
    values["updated_at"] = now
    if all(k in provider_jobs.c and not isinstance(v, ClauseElement) for k, v in values.items()):
        row = conn.execute(_INSERT, values).one()
    else:
        # An unknown column name fails here (CompileError); as a parameter of the
        # prepared statement it would be silently ignored.
        row = conn.execute(
            insert(provider_jobs).values(**values).returning(*provider_jobs.c)
        ).one()
    return _job(row)


def thdUpdateJob(conn: Connection, uuid: str, now: float, **values: Any) -> ProviderJob:
    """Change some columns of a job; return it as it now is."""
    if "state" in values and values["state"] not in STATES:
        raise ValueError(f"unknown job state {values['state']!r}")
    conn.execute(
        update(provider_jobs).where(provider_jobs.c.uuid == uuid).values(updated_at=now, **values)
    )
    job = thdJob(conn, uuid)
    if job is None:
        raise KeyError(uuid)
    return job


def thdJobsOfUser(
    conn: Connection,
    user_id: int,
    states: Iterable[str] = (HELD,),
    uuids: Sequence[str] | None = None,
) -> list[ProviderJob]:
    """A user's jobs in ``states`` (optionally only those named), oldest first."""
    q = (
        select(provider_jobs)
        .where(provider_jobs.c.user_id == user_id, provider_jobs.c.state.in_(list(states)))
        .order_by(provider_jobs.c.created_at, provider_jobs.c.id)
    )
    if uuids is not None:
        q = q.where(provider_jobs.c.uuid.in_(list(uuids)))
    return [_job(r) for r in conn.execute(q)]


def thdReleasingTotal(conn: Connection, user_id: int) -> int:
    """What a user's jobs on their way to a printer (``releasing``) are expected to cost.

    Counted against the balance when deciding and releasing, so that a user cannot
    release more than they can pay for before the first of those jobs is charged.
    """
    total = conn.execute(_RELEASING_TOTAL, {"user_id": user_id}).scalar_one()
    return int(total)


def thdDueToExpire(conn: Connection, now: float) -> list[ProviderJob]:
    """Open jobs whose stored expiry time has passed."""
    rows = conn.execute(
        select(provider_jobs)
        .where(provider_jobs.c.state.in_(list(OPEN)), provider_jobs.c.expires_at <= now)
        .order_by(provider_jobs.c.expires_at, provider_jobs.c.id)
    )
    return [_job(r) for r in rows]


def thdNextExpiry(conn: Connection) -> float | None:
    """The earliest expiry time of an open job, or None when there is none."""
    value = conn.execute(
        select(func.min(provider_jobs.c.expires_at)).where(provider_jobs.c.state.in_(list(OPEN)))
    ).scalar()
    return None if value is None else float(value)


def thdUntold(conn: Connection, provider: str, limit: int) -> list[ProviderJob]:
    """Jobs the provider still has to be told to delete (expired or cancelled here)."""
    rows = conn.execute(
        select(provider_jobs)
        .where(provider_jobs.c.provider == provider, provider_jobs.c.provider_told.is_(False))
        .order_by(provider_jobs.c.id)
        .limit(limit)
    )
    return [_job(r) for r in rows]


def thdMarkTold(conn: Connection, uuids: Sequence[str], now: float) -> int:
    """Record that the provider answered ``DeleteJobs`` for these jobs."""
    if not uuids:
        return 0
    result = conn.execute(
        update(provider_jobs)
        .where(provider_jobs.c.uuid.in_(list(uuids)))
        .values(provider_told=True, updated_at=now)
    )
    return int(result.rowcount)


def thdPurgeFinished(conn: Connection, older_than: float) -> int:
    """Delete finished jobs last changed before ``older_than`` (the job log keeps prints).

    A job the provider has not yet been told to delete is kept.
    """
    result = conn.execute(
        delete(provider_jobs).where(
            provider_jobs.c.state.in_(list(FINAL)),
            provider_jobs.c.updated_at < older_than,
            provider_jobs.c.provider_told.is_(True),
        )
    )
    return int(result.rowcount)


def thdListJobs(
    conn: Connection,
    *,
    states: Iterable[str] | None = None,
    provider: str | None = None,
    username: str | None = None,
    limit: int = 100,
) -> list[ProviderJob]:
    """The newest jobs, optionally filtered, newest first (for the CLI and the web)."""
    conditions: list[ColumnElement[bool]] = []
    if states is not None:
        conditions.append(provider_jobs.c.state.in_(list(states)))
    if provider is not None:
        conditions.append(provider_jobs.c.provider == provider)
    if username is not None:
        conditions.append(provider_jobs.c.username == username)
    q = select(provider_jobs).order_by(provider_jobs.c.id.desc()).limit(limit)
    if conditions:
        q = q.where(and_(*conditions))
    return [_job(r) for r in conn.execute(q)]


def thdCountByState(conn: Connection) -> dict[str, int]:
    """How many jobs are in each state (for ``/health`` and metrics)."""
    rows = conn.execute(
        select(provider_jobs.c.state, func.count()).group_by(provider_jobs.c.state)
    ).all()
    return {state: int(count) for state, count in rows}


def thdOpenJobsOfProvider(conn: Connection, provider: str) -> list[ProviderJob]:
    """A provider's held and releasing jobs, oldest first."""
    rows = conn.execute(
        select(provider_jobs)
        .where(
            provider_jobs.c.provider == provider,
            or_(provider_jobs.c.state == HELD, provider_jobs.c.state == RELEASING),
        )
        .order_by(provider_jobs.c.id)
    )
    return [_job(r) for r in rows]
