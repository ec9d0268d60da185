"""Web administrators: who may log in to the admin pages, and checking their passwords.

The primary keeps its administrators in ``web_admins``, written without the change log:
they are never replicated or put in a snapshot, so a site holds none. A site's admin
pages use the ``[web.admins]`` table of its config (name → verifier from
``sitesrv-admin admin hash``), which a primary may have too; `check_admin` consults
both. Callers audit changes (``sitesrv-admin`` does, in the same transaction).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import attrs
from sqlalchemy import Connection, delete, insert, select, update
from twisted.internet.defer import Deferred

from sitesrv.errors import AlreadyExists, Invalid, NotFound
from sitesrv.secrets import check_verifier
from sitesrv.store.schema import web_admins

MAX_ADMIN_NAME = 64

#: Checked instead when a name is unknown, so that an unknown name costs as much time as
#: a wrong password. A verifier of a random secret nobody knows, at make_verifier's cost
#: (a test keeps the two in step).
DUMMY_VERIFIER = (
    "scrypt$16384$8$1$uB+nyQ28Xwe87n2LP6209A==$TgkJyHshiBbBKXhKPgKW4WzRS5ogi17rUJoGUlqgkBg="
)


@attrs.frozen
class Admin:
    """A web administrator kept in the primary's database (never the verifier)."""

    name: str
    created_at: float
    updated_at: float


def check_admin_name(name: str) -> str:
    """Validate an administrator's name (1 to 64 characters, no control characters)."""
    name = name.strip()
    if not name:
        raise Invalid("admin name must not be empty")
    if len(name) > MAX_ADMIN_NAME:
        raise Invalid(f"admin name is longer than {MAX_ADMIN_NAME} characters")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise Invalid("admin name contains control characters")
    return name


def _thdAdminId(conn: Connection, name: str) -> int:
    admin_id = conn.execute(select(web_admins.c.id).where(web_admins.c.name == name)).scalar()
    if admin_id is None:
        raise NotFound(f"no admin named {name!r}")
    return int(admin_id)


def thdAddAdmin(conn: Connection, name: str, verifier: str, now: float) -> None:
    """Add an administrator with a password verifier; AlreadyExists if the name is taken."""
    name = check_admin_name(name)
    if conn.execute(select(web_admins.c.id).where(web_admins.c.name == name)).first():
        raise AlreadyExists(f"admin {name!r} already exists")
    # Not changelog.thdInsert: administrators must never reach a site.
    conn.execute(
        insert(web_admins).values(
            name=name, password_verifier=verifier, created_at=now, updated_at=now
        )
    )


def thdSetAdminPassword(conn: Connection, name: str, verifier: str, now: float) -> None:
    """Replace an administrator's password verifier; NotFound for an unknown name."""
    admin_id = _thdAdminId(conn, name)
    conn.execute(
        update(web_admins)
        .where(web_admins.c.id == admin_id)
        .values(password_verifier=verifier, updated_at=now)
    )


def thdRemoveAdmin(conn: Connection, name: str, now: float) -> None:
    """Remove an administrator; NotFound for an unknown name."""
    admin_id = _thdAdminId(conn, name)
    conn.execute(delete(web_admins).where(web_admins.c.id == admin_id))


def thdListAdmins(conn: Connection) -> list[Admin]:
    """The administrators in the database, in name order."""
    q = select(web_admins.c.name, web_admins.c.created_at, web_admins.c.updated_at).order_by(
        web_admins.c.name
    )
    return [Admin(r.name, r.created_at, r.updated_at) for r in conn.execute(q)]


def thdAdminVerifier(conn: Connection, name: str) -> str | None:
    """The password verifier of the administrator ``name``, or None."""
    q = select(web_admins.c.password_verifier).where(web_admins.c.name == name)
    verifier: str | None = conn.execute(q).scalar()
    return verifier


async def check_admin(
    name: str,
    password: str,
    *,
    config_admins: Mapping[str, str],
    read: Callable[..., Deferred[Any]] | None,
    run_cpu: Callable[..., Deferred[Any]],
) -> bool:
    """Whether ``password`` is the password of the administrator ``name``.

    A name in ``config_admins`` (``[web.admins]``) is checked against that verifier
    only; otherwise, when ``read`` is given (``Store.runRead``; None at a site), against
    the database's. ``run_cpu`` runs the scrypt check off the reactor thread. Exactly one
    check runs either way, against `DUMMY_VERIFIER` for an unknown name, so the time
    taken does not tell which names exist.
    """
    verifier = config_admins.get(name)
    if verifier is None and read is not None:
        verifier = await read(thdAdminVerifier, name)
    matches = await run_cpu(check_verifier, password, verifier or DUMMY_VERIFIER)
    return verifier is not None and matches is True
