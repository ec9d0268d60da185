"""The audit log of administrative changes (never replicated, never holds secrets)."""

from __future__ import annotations

import json
from typing import Any

import attrs
from sqlalchemy import Connection, insert, select

from sitesrv.store.schema import audit_log


@attrs.frozen
class AuditEntry:
    """Who changed what, when."""

    id: int
    at: float
    actor: str
    action: str
    target: str
    details: dict[str, Any]


def thdAudit(
    conn: Connection, actor: str, action: str, target: str, now: float, **details: Any
) -> None:
    """Record an administrative change, in the same transaction as the change."""
    conn.execute(
        insert(audit_log).values(
            at=now,
            actor=actor,
            action=action,
            target=target,
            details=json.dumps(details, sort_keys=True, default=str),
        )
    )


def thdListAudit(conn: Connection, limit: int = 100) -> list[AuditEntry]:
    """The newest audit entries, newest first."""
    rows = conn.execute(select(audit_log).order_by(audit_log.c.id.desc()).limit(limit))
    return [
        AuditEntry(r.id, r.at, r.actor, r.action, r.target, json.loads(r.details)) for r in rows
    ]
