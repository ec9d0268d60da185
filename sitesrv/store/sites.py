"""Sites: the primary's own row and the enrolled site servers."""

from __future__ import annotations

from typing import Any

import attrs
from sqlalchemy import Connection, insert, select, update

from sitesrv.errors import AlreadyExists, Invalid, NotFound
from sitesrv.secrets import hash_token, new_token
from sitesrv.store.changelog import thdInsert, thdUpdate
from sitesrv.store.schema import site_links, sites
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


# -- the primary's view of each site's replication link --------------------------------


@attrs.frozen
class SiteAuth:
    """What the primary checks when a site says hello."""

    name: str
    is_primary: bool
    revoked: bool
    token_hash: str | None


@attrs.frozen
class SiteLink:
    """A site's replication link as the primary last saw it."""

    site: str
    connected: bool
    since: float
    last_seen: float
    position: int
    skew: float
    software_version: str
    protocol_version: int
    address: str
    passwords_included: bool


def thdSiteAuth(conn: Connection, name: str) -> SiteAuth | None:
    """The enrolment facts of site ``name``, or None when there is no such site."""
    row = conn.execute(
        select(sites.c.name, sites.c.is_primary, sites.c.revoked, sites.c.token_hash).where(
            sites.c.name == name
        )
    ).first()
    if row is None:
        return None
    return SiteAuth(row.name, bool(row.is_primary), bool(row.revoked), row.token_hash)


def thdSiteOfTokenHash(conn: Connection, token_hash: str) -> str | None:
    """The name of the site whose token has this hash, or None."""
    return conn.execute(select(sites.c.name).where(sites.c.token_hash == token_hash)).scalar()


def thdRevokedSites(conn: Connection) -> set[str]:
    """Names of revoked sites."""
    return set(conn.execute(select(sites.c.name).where(sites.c.revoked)).scalars())


def thdLink(conn: Connection, site: str) -> SiteLink | None:
    """The link record of a site, or None when it never connected."""
    row = conn.execute(select(site_links).where(site_links.c.site == site)).first()
    return None if row is None else SiteLink(**{k: row._mapping[k] for k in row._mapping})


def thdLinks(conn: Connection) -> dict[str, SiteLink]:
    """All link records, by site name."""
    return {
        row.site: SiteLink(**{k: row._mapping[k] for k in row._mapping})
        for row in conn.execute(select(site_links))
    }


def thdLinkUp(conn: Connection, site: str, now: float, **values: Any) -> None:
    """Record that a site connected (values: position, skew, versions, address, ...)."""
    values = {**values, "connected": True, "since": now, "last_seen": now}
    if conn.execute(update(site_links).where(site_links.c.site == site).values(**values)).rowcount:
        return
    conn.execute(insert(site_links).values(site=site, **values))


def thdLinkSeen(conn: Connection, site: str, now: float, position: int) -> None:
    """Record a site's latest applied position."""
    conn.execute(
        update(site_links)
        .where(site_links.c.site == site)
        .values(last_seen=now, position=position)
    )


def thdLinkPasswords(conn: Connection, site: str, included: bool) -> None:
    """Record whether a site's replica now holds password verifiers (after a snapshot)."""
    conn.execute(
        update(site_links).where(site_links.c.site == site).values(passwords_included=included)
    )


def thdLinkDown(conn: Connection, site: str, now: float) -> None:
    """Record that a site's link went down."""
    conn.execute(
        update(site_links)
        .where(site_links.c.site == site)
        .values(connected=False, since=now, last_seen=now)
    )
