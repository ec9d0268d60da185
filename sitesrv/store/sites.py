"""Sites: the primary's own row and the enrolled site servers."""

from __future__ import annotations

from typing import Any

import attrs
from sqlalchemy import Connection, select

from sitesrv.errors import AlreadyExists, Invalid, NotFound
from sitesrv.secrets import hash_token, new_token
from sitesrv.store.changelog import thdInsert, thdUpdate
from sitesrv.store.schema import sites
from sitesrv.store.users import check_name


@attrs.frozen
class Site:
    """A site as administrators see it (never its token hash)."""

    id: int
    name: str
    is_primary: bool
    revoked: bool
    applied_seq: int
    created_at: float


def _site(row: Any) -> Site:
    return Site(
        id=row.id,
        name=row.name,
        is_primary=bool(row.is_primary),
        revoked=bool(row.revoked),
        applied_seq=row.applied_seq,
        created_at=row.created_at,
    )


def thdEnsurePrimarySite(conn: Connection, name: str, now: float) -> int:
    """Create the primary's own site row if missing; return its id."""
    row = conn.execute(select(sites.c.id, sites.c.is_primary).where(sites.c.name == name)).first()
    if row is not None:
        if not row.is_primary:
            raise Invalid(f"{name!r} is an enrolled site, not this primary's name")
        return row.id
    return thdInsert(
        conn,
        sites,
        {
            "name": name,
            "is_primary": True,
            "token_hash": None,
            "revoked": False,
            "applied_seq": 0,
            "created_at": now,
        },
        now,
    )


def thdAddSite(conn: Connection, name: str, now: float) -> str:
    """Enrol a site; return its token (shown once, stored only as a hash)."""
    name = check_name("site", name)
    if conn.execute(select(sites.c.id).where(sites.c.name == name)).first():
        raise AlreadyExists(f"site {name!r} already exists")
    token = new_token()
    thdInsert(
        conn,
        sites,
        {
            "name": name,
            "is_primary": False,
            "token_hash": hash_token(token),
            "revoked": False,
            "applied_seq": 0,
            "created_at": now,
        },
        now,
    )
    return token


def thdSite(conn: Connection, name: str) -> Site:
    """The site named ``name``."""
    row = conn.execute(select(sites).where(sites.c.name == name)).first()
    if row is None:
        raise NotFound(f"no site named {name!r}")
    return _site(row)


def thdSiteTokenHash(conn: Connection, name: str) -> str | None:
    """The stored hash of a site's token (for the primary's enrolment check)."""
    return conn.execute(select(sites.c.token_hash).where(sites.c.name == name)).scalar()


def thdListSites(conn: Connection) -> list[Site]:
    """All sites, the primary's own first."""
    rows = conn.execute(select(sites).order_by(sites.c.is_primary.desc(), sites.c.name))
    return [_site(r) for r in rows]


def _enrolled(conn: Connection, name: str) -> Site:
    site = thdSite(conn, name)
    if site.is_primary:
        raise Invalid(f"{name!r} is the primary itself, not an enrolled site")
    return site


def thdRevokeSite(conn: Connection, name: str, now: float) -> None:
    """Revoke a site: its link is refused from now on."""
    site = _enrolled(conn, name)
    thdUpdate(conn, sites, site.id, {"revoked": True}, now)


def thdRotateToken(conn: Connection, name: str, now: float) -> str:
    """Issue a new token for a site (and lift a revocation); return it."""
    site = _enrolled(conn, name)
    token = new_token()
    thdUpdate(conn, sites, site.id, {"token_hash": hash_token(token), "revoked": False}, now)
    return token
