"""The primary's view of its sites' health, for ``/health``, ``/health/sites`` and metrics.

A site is *down* when it is enrolled, not revoked, has connected at least once, and has
been disconnected for longer than the grace period (``[web] site_grace``, 60 s by
default), which is what monitoring alerts on, as with PaperCut's site-server health
API. A site that never connected is waiting to be installed, and a revoked site is meant
to be away: neither is down.

Whether a site is connected comes from the live replication sessions; when it went away,
from ``site_links``. A link the table still records as up but that has no session (the
primary stopped without recording the close) counts as down since it was last heard
from, but never since before this primary started: a restarted primary gives its sites
the grace period to reconnect before calling them down.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Any

import attrs
from sqlalchemy import Connection
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from sitesrv.store.changelog import thdState
from sitesrv.store.sites import Site, SiteLink, thdLinks, thdListSites

#: Default grace period, seconds (``[web] site_grace``).
DEFAULT_GRACE = 60.0
#: A clock difference above this many seconds is reported as a problem.
SKEW_WARNING = 60.0

#: What a site's ``state`` may be.
STATES = ("connected", "disconnected", "never-connected", "revoked")


@attrs.frozen
class SiteHealth:
    """One enrolled site as monitoring sees it."""

    name: str
    state: str
    #: False only for a site that is down (see the module docstring).
    healthy: bool
    connected: bool
    #: When the link last went up or down (None: never connected).
    since: float | None
    #: When the primary last heard from the site.
    last_seen: float | None
    #: Seconds since a site that connected before went away (None while connected).
    disconnected_for: float | None
    #: The change-log position the site reported having applied, and how far behind the
    #: primary's head that is.
    position: int | None
    lag: int | None
    #: Site clock minus primary clock at its last hello, seconds.
    clock_skew: float | None
    software_version: str | None
    protocol_version: int | None
    #: Outbox records the site holds that the primary has not applied, from its last
    #: heartbeat (None when it has not said since the primary started).
    outbox_pending: int | None = None

    def asdict(self) -> dict[str, Any]:
        """The JSON form."""
        return attrs.asdict(self)

    def problems(self, grace: float) -> list[str]:
        """Sentences for ``/health``'s problems: down, or a clock too far off."""
        found = []
        if not self.healthy and self.disconnected_for is not None:
            found.append(
                f"site {self.name!r} has been disconnected for {self.disconnected_for:.0f} s "
                f"(grace period {grace:g} s)"
            )
        if self.connected and self.clock_skew is not None and abs(self.clock_skew) > SKEW_WARNING:
            found.append(skew_problem(self.clock_skew, f"site {self.name!r}"))
        return found


def skew_problem(skew: float, who: str) -> str:
    """The problem sentence for a clock that differs from the primary's by ``skew`` s."""
    direction = "ahead of" if skew > 0 else "behind"
    return f"{who}'s clock is {abs(skew):.0f} s {direction} the primary's"


def site_health(
    site: Site,
    link: SiteLink | None,
    live: bool,
    head: int,
    now: float,
    started_at: float,
    grace: float,
    outbox_pending: int | None = None,
) -> SiteHealth:
    """Judge one site from its enrolment, its link record and whether it has a session."""
    if link is None:
        state = "revoked" if site.revoked else "never-connected"
        return SiteHealth(
            name=site.name,
            state=state,
            healthy=True,
            connected=False,
            since=None,
            last_seen=None,
            disconnected_for=None,
            position=None,
            lag=None,
            clock_skew=None,
            software_version=None,
            protocol_version=None,
        )
    if live:
        state, since, away = "connected", link.since, None
    else:
        # The table says up without a session: the primary never recorded the close.
        gone = link.since if not link.connected else link.last_seen
        since = max(gone, started_at)
        state, away = ("revoked" if site.revoked else "disconnected"), max(0.0, now - since)
    healthy = site.revoked or away is None or away <= grace
    return SiteHealth(
        name=site.name,
        state=state,
        healthy=healthy,
        connected=live,
        since=since,
        last_seen=link.last_seen,
        disconnected_for=away,
        position=link.position,
        lag=max(0, head - link.position),
        clock_skew=link.skew,
        software_version=link.software_version,
        protocol_version=link.protocol_version,
        outbox_pending=outbox_pending,
    )


def thdSitesAndLinks(conn: Connection) -> tuple[list[Site], dict[str, SiteLink], int]:
    """Enrolled sites (not the primary), their link records and the change-log head."""
    sites = [s for s in thdListSites(conn) if not s.is_primary]
    _epoch, head = thdState(conn)
    return sites, thdLinks(conn), head


@attrs.frozen
class SitesReport:
    """Every enrolled site's health, at one moment."""

    sites: list[SiteHealth]
    head: int
    grace: float

    @property
    def healthy(self) -> bool:
        """Whether no site is down."""
        return all(s.healthy for s in self.sites)

    def problems(self) -> list[str]:
        """Every site's problems."""
        return [p for s in self.sites for p in s.problems(self.grace)]

    def site(self, name: str) -> SiteHealth | None:
        """The site named ``name``, or None."""
        return next((s for s in self.sites if s.name == name), None)


class SiteMonitor:
    """Reports the health of a primary's sites.

    ``read`` runs a ``thd`` function off the reactor thread (``Store.runRead``);
    ``live`` returns the names of sites with a replication session now.
    """

    def __init__(
        self,
        read: Callable[..., Deferred[Any]],
        live: Callable[[], Collection[str]],
        clock: IReactorTime,
        grace: float = DEFAULT_GRACE,
        started_at: float | None = None,
        outbox: Callable[[], Mapping[str, int | None]] = dict,
    ) -> None:
        self.read = read
        self.live = live
        self.outbox = outbox
        self.clock = clock
        self.grace = grace
        self.started_at = clock.seconds() if started_at is None else started_at

    def report(self) -> Deferred[SitesReport]:
        """Every enrolled site's health now."""
        return Deferred.fromCoroutine(self._report())

    async def _report(self) -> SitesReport:
        sites, links, head = await self.read(thdSitesAndLinks)
        live = set(self.live())
        outbox = self.outbox()
        now = self.clock.seconds()
        return SitesReport(
            [
                site_health(
                    site,
                    links.get(site.name),
                    site.name in live,
                    head,
                    now,
                    self.started_at,
                    self.grace,
                    outbox.get(site.name),
                )
                for site in sites
            ],
            head,
            self.grace,
        )
