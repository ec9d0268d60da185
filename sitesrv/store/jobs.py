"""The job log: printed, copied, scanned and faxed jobs with their cost."""

from __future__ import annotations

from typing import Any

import attrs
from sqlalchemy import Connection, insert, select

from sitesrv.errors import Invalid
from sitesrv.store.schema import jobs

KINDS = frozenset({"print", "copy", "scan", "fax"})


@attrs.frozen
class Job:
    """One logged job."""

    id: int
    uuid: str
    kind: str
    username: str
    user_id: int | None
    account_id: int | None
    printer_id: int | None
    printer_name: str
    site: str
    document: str
    pages: int
    copies: int
    colour: bool
    duplex: bool
    cost: int
    status: str
    created_at: float


def _job(row: Any) -> Job:
    return Job(
        **{f.name: row._mapping[f.name] for f in attrs.fields(Job) if f.name in row._mapping}
    )


def thdLogJob(conn: Connection, now: float, **values: Any) -> Job:
    """Log a job; a job whose UUID is already logged is returned unchanged."""
    if values.get("kind") not in KINDS:
        raise Invalid(f"unknown job kind {values.get('kind')!r}")
    existing = conn.execute(select(jobs).where(jobs.c.uuid == values["uuid"])).first()
    if existing is not None:
        return _job(existing)
    values.setdefault("created_at", now)
    job_id = conn.execute(insert(jobs).values(**values).returning(jobs.c.id)).scalar_one()
    return _job(conn.execute(select(jobs).where(jobs.c.id == job_id)).one())


def thdListJobs(conn: Connection, username: str | None = None, limit: int = 100) -> list[Job]:
    """The newest jobs, optionally of one user, newest first."""
    q = select(jobs).order_by(jobs.c.id.desc()).limit(limit)
    if username is not None:
        q = q.where(jobs.c.username == username)
    return [_job(r) for r in conn.execute(q)]
