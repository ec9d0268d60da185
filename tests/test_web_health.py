"""``/health``, ``/health/sites`` and ``/health/sites/NAME``, as monitoring sees them.

Route tests over a real ``Server`` (inline store, ``MemoryReactorClock``, no sockets):
the fields DESIGN.md's web table names, 200 or 503 by mode, the lag from the replication
client, clock-skew warnings, and on the primary each site's state with the grace period
driven by the clock. One end-to-end test runs a primary and a site as real processes
and watches ``/health/sites`` go red when the site stops and green when it is back.
"""

from __future__ import annotations

import json
import os
from typing import Any

from twisted.internet.defer import ensureDeferred
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool, readBody

from sitesrv.config import ConfigError, from_dict
from sitesrv.replication.primary import PrimaryReplication, SiteSession
from sitesrv.replication.site import PrimaryLinkProtocol, SiteReplication
from sitesrv.server import Server
from sitesrv.sitehealth import DEFAULT_GRACE
from sitesrv.store.changelog import thdState
from sitesrv.store.sites import thdAddSite, thdLinkDown, thdLinkUp, thdRevokeSite
from tests.inprocess import get, make_server
from tests.processes import (
    ServerProcess,
    enrol,
    reactor,
    tls_init,
    twistd_unavailable,
    wait_for,
    wait_for_health,
    write_primary_config,
    write_site_config,
)
from tests.support import NOW

#: The keys DESIGN.md's web table lists for /health, in every role.
HEALTH_KEYS = {
    "role",
    "name",
    "version",
    "mode",
    "since",
    "last_sync",
    "lag",
    "outbox_pending",
    "clock_skew",
    "problems",
}

#: Failover inputs that bring a fresh site into each mode.
PATHS = {
    "unsynced": (),
    "syncing": ("snapshotLoaded",),
    "online": ("replicaFound", "connected", "outboxDrained", "caughtUp"),
    "offline": ("replicaFound",),
    "reconciling": ("replicaFound", "connected"),
    "revoked": ("replicaFound", "revoked"),
}


def link_up(server: Server, site: str, position: int = 0, skew: float = 0.25) -> None:
    """Record that ``site`` connected now, and give it a live session."""
    server.store.write(
        thdLinkUp,
        site,
        server.reactor.seconds(),
        position=position,
        skew=skew,
        software_version="0.1.0",
        protocol_version=2,
        address="192.0.2.7:40000",
    )
    assert isinstance(server.replication, PrimaryReplication)
    server.replication.sessions[site] = SiteSession(server.replication)


def link_down(server: Server, site: str) -> None:
    """Record that ``site``'s link closed now, and drop its session."""
    server.store.write(thdLinkDown, site, server.reactor.seconds())
    assert isinstance(server.replication, PrimaryReplication)
    server.replication.sessions.pop(site, None)


class PrimaryHealthTests(SynchronousTestCase):
    """``/health`` on a primary."""

    def setUp(self) -> None:
        self.server = make_server(self)

    def test_fields(self) -> None:
        """Every field of the web table, a primary's site-only facts null, 200."""
        answer = get(self.server, "/health")
        self.assertEqual(answer.code, 200)
        self.assertEqual(answer.content_type, "application/json; charset=utf-8")
        body = answer.json
        self.assertLessEqual(HEALTH_KEYS, set(body))
        self.assertEqual(
            {k: body[k] for k in ("role", "name", "mode", "since", "problems", "sites")},
            {
                "role": "primary",
                "name": "hq",
                "mode": "online",
                "since": NOW,
                "problems": [],
                "sites": [],
            },
        )
        for key in ("last_sync", "lag", "outbox_pending", "clock_skew"):
            self.assertIsNone(body[key], key)
        self.assertEqual(body["position"], self.server.store.read(thdState)[1])

    def test_trailing_slash(self) -> None:
        """``/health/`` is ``/health``; other children are not found."""
        self.assertEqual(get(self.server, "/health/").json["role"], "primary")
        self.assertEqual(get(self.server, "/health/nonsense").code, 404)

    def test_sites_listed_with_state(self) -> None:
        """Each site's state, lag and versions; never its network address."""
        store = self.server.store
        store.write(thdAddSite, "north", NOW)
        store.write(thdAddSite, "south", NOW)
        link_up(self.server, "north", position=1)
        head = store.read(thdState)[1]
        sites = {s["name"]: s for s in get(self.server, "/health").json["sites"]}
        self.assertEqual(sites["south"]["state"], "never-connected")
        self.assertIsNone(sites["south"]["lag"])
        north = sites["north"]
        self.assertEqual(
            {k: north[k] for k in ("state", "connected", "healthy", "position", "lag")},
            {
                "state": "connected",
                "connected": True,
                "healthy": True,
                "position": 1,
                "lag": head - 1,
            },
        )
        self.assertEqual(north["software_version"], "0.1.0")
        self.assertNotIn("192.0.2.7", get(self.server, "/health").text)

    def test_skewed_site_is_a_problem(self) -> None:
        """A connected site whose clock is off by more than 60 s is listed as a problem."""
        self.server.store.write(thdAddSite, "north", NOW)
        link_up(self.server, "north", skew=-95.0)
        body = get(self.server, "/health").json
        self.assertEqual(body["problems"], ["site 'north''s clock is 95 s behind the primary's"])
        self.assertEqual(get(self.server, "/health").code, 200)


class SiteHealthTests(SynchronousTestCase):
    """``/health`` on a site: mode, 200 or 503, lag, skew, outbox."""

    def setUp(self) -> None:
        self.server = make_server(self, "site")
        assert self.server.failover is not None
        self.failover = self.server.failover

    def enter(self, mode: str) -> None:
        """Feed the failover machine into ``mode``."""
        for name in PATHS[mode]:
            getattr(self.failover.inputs, name)(f"test: {name}")
        self.assertEqual(self.failover.mode, mode)

    def test_codes_by_mode(self) -> None:
        """200 while serving (syncing, online, offline, reconciling), 503 otherwise."""
        for mode, code in (
            ("unsynced", 503),
            ("syncing", 200),
            ("online", 200),
            ("offline", 200),
            ("reconciling", 200),
            ("revoked", 503),
        ):
            server = make_server(self, "site")
            assert server.failover is not None
            for name in PATHS[mode]:
                getattr(server.failover.inputs, name)(f"test: {name}")
            answer = get(server, "/health")
            self.assertEqual((mode, answer.code), (mode, code))
            self.assertEqual(answer.json["mode"], mode)
            self.assertLessEqual(HEALTH_KEYS, set(answer.json))

    def test_unsynced_site(self) -> None:
        """A fresh site: no sync yet, nothing known of the primary, nothing pending."""
        body = get(self.server, "/health").json
        self.assertEqual(
            {k: body[k] for k in ("role", "name", "mode", "last_sync", "lag", "clock_skew")},
            {
                "role": "site",
                "name": "north",
                "mode": "unsynced",
                "last_sync": None,
                "lag": None,
                "clock_skew": None,
            },
        )
        self.assertEqual(body["outbox_pending"], 0)
        self.assertEqual(body["position"], 0)

    def test_since_and_transitions(self) -> None:
        """``since`` is when the mode began; transitions carry their reasons."""
        self.server.reactor.advance(30)
        self.enter("offline")
        self.server.reactor.advance(5)
        body = get(self.server, "/health").json
        self.assertEqual(body["since"], NOW + 30)
        self.assertEqual(body["transitions"][0]["to"], "offline")
        self.assertEqual(body["transitions"][0]["reason"], "test: replicaFound")

    def test_lag_from_the_replication_client(self) -> None:
        """Lag is the primary's head minus the replica's position, as the link last saw
        them, and stays reported after the link closes."""
        replication = self.server.replication
        assert isinstance(replication, SiteReplication)
        link = PrimaryLinkProtocol(replication)
        link.position, link.primaryHead = 40, 52
        replication.current = replication.last = link
        self.enter("reconciling")
        self.assertEqual(get(self.server, "/health").json["lag"], 12)
        link.position = 52
        self.assertEqual(get(self.server, "/health").json["lag"], 0)
        replication.current = None
        link.primaryHead = 60
        self.assertEqual(get(self.server, "/health").json["lag"], 8)

    def test_last_sync(self) -> None:
        """``last_sync`` is when the replica last reached the primary's head."""
        self.enter("reconciling")
        self.server.reactor.advance(7)
        self.failover.inputs.caughtUp("caught up at position 3")
        self.assertEqual(get(self.server, "/health").json["last_sync"], NOW + 7)

    def test_clock_skew_warning(self) -> None:
        """A site clock more than 60 s off the primary's is a problem, still 200."""
        assert self.server.observer is not None
        self.enter("offline")
        self.server.observer.connected(skew=90.4)
        answer = get(self.server, "/health")
        self.assertEqual(answer.code, 200)
        self.assertEqual(answer.json["clock_skew"], 90.4)
        self.assertIn("this site's clock is 90 s ahead of the primary's", answer.json["problems"])
        self.server.observer.connected(skew=12.0)
        self.assertEqual(get(self.server, "/health").json["problems"], [])

    def test_refusal_is_a_problem(self) -> None:
        """Why the primary refused the site shows in ``problems``."""
        assert self.server.observer is not None
        self.server.observer.refused("wrong enrolment token for site 'north'")
        answer = get(self.server, "/health")
        self.assertEqual(answer.json["problems"], ["wrong enrolment token for site 'north'"])

    def test_no_site_health_on_a_site(self) -> None:
        """``/health/sites`` belongs to the primary: a site answers 404 in JSON."""
        for path in ("/health/sites", "/health/sites/north"):
            answer = get(self.server, path)
            self.assertEqual(answer.code, 404)
            self.assertIn("primary only", answer.json["error"])

    def test_status_failure_is_500_without_traceback(self) -> None:
        """A status that cannot be read answers 500 with one line; the log has the rest."""

        def broken() -> Any:
            raise RuntimeError("database on fire")

        self.server.store.runRead = lambda *a, **k: broken()  # type: ignore[method-assign]
        answer = get(self.server, "/health")
        self.assertEqual((answer.code, answer.json), (500, {"error": "status unavailable"}))
        self.assertNotIn("on fire", answer.text)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class SitesHealthTests(SynchronousTestCase):
    """``/health/sites`` on the primary: 500 once a site is down past the grace period."""

    def setUp(self) -> None:
        self.server = make_server(self)
        self.clock = self.server.reactor
        for name in ("north", "south", "west"):
            self.server.store.write(thdAddSite, name, NOW)

    def sites(self, path: str = "/health/sites") -> tuple[int, dict[str, Any]]:
        """The code and the sites by name."""
        answer = get(self.server, path)
        body = answer.json
        self.assertEqual(answer.content_type, "application/json; charset=utf-8")
        self.assertEqual(body["healthy"], answer.code == 200)
        return answer.code, {s["name"]: s for s in body.get("sites", [])}

    def test_all_fine(self) -> None:
        """Never-connected and connected sites are healthy: 200."""
        link_up(self.server, "north")
        code, sites = self.sites()
        self.assertEqual(code, 200)
        self.assertEqual(
            {n: s["state"] for n, s in sites.items()},
            {"north": "connected", "south": "never-connected", "west": "never-connected"},
        )
        self.assertEqual(get(self.server, "/health/sites").json["grace"], DEFAULT_GRACE)

    def test_grace_period(self) -> None:
        """Disconnected up to 60 s is fine; past it the site, and the whole, are down."""
        link_up(self.server, "north")
        self.clock.advance(300)
        link_down(self.server, "north")
        self.clock.advance(60)
        code, sites = self.sites()
        self.assertEqual((code, sites["north"]["state"]), (200, "disconnected"))
        self.assertEqual(sites["north"]["disconnected_for"], 60.0)
        self.clock.advance(0.5)
        code, sites = self.sites()
        self.assertEqual(code, 500)
        self.assertFalse(sites["north"]["healthy"])
        self.assertTrue(sites["south"]["healthy"])
        body = get(self.server, "/health/sites").json
        self.assertEqual(
            body["problems"], ["site 'north' has been disconnected for 60 s (grace period 60 s)"]
        )
        # /health itself stays 200 (the primary serves) and lists the problem.
        health = get(self.server, "/health")
        self.assertEqual(health.code, 200)
        self.assertEqual(health.json["problems"], body["problems"])
        # Back: green at once.
        link_up(self.server, "north")
        self.assertEqual(self.sites()[0], 200)

    def test_one_site(self) -> None:
        """``/health/sites/NAME`` judges that site alone."""
        link_up(self.server, "north")
        link_up(self.server, "south")
        link_down(self.server, "south")
        self.clock.advance(61)
        north = get(self.server, "/health/sites/north")
        self.assertEqual(north.code, 200)
        self.assertEqual(north.json["site"]["state"], "connected")
        self.assertTrue(north.json["healthy"])
        south = get(self.server, "/health/sites/south/")
        self.assertEqual(south.code, 500)
        self.assertEqual(south.json["site"]["disconnected_for"], 61.0)
        self.assertEqual(len(south.json["problems"]), 1)
        self.assertEqual(get(self.server, "/health/sites").code, 500)

    def test_unknown_site(self) -> None:
        """An unknown name, the primary's own name and deeper paths are 404 in JSON."""
        for path, error in (
            ("/health/sites/nowhere", "no site named 'nowhere' is enrolled"),
            ("/health/sites/hq", "no site named 'hq' is enrolled"),
            ("/health/sites/north/extra", "no such page"),
        ):
            answer = get(self.server, path)
            self.assertEqual((answer.code, answer.json), (404, {"error": error}))

    def test_revoked_site_is_not_down(self) -> None:
        """A revoked site is meant to be away."""
        link_up(self.server, "north")
        self.server.store.write(thdRevokeSite, "north", NOW)
        link_down(self.server, "north")
        self.clock.advance(3600)
        code, sites = self.sites()
        self.assertEqual((code, sites["north"]["state"]), (200, "revoked"))

    def test_restarted_primary_gives_sites_the_grace_period(self) -> None:
        """A link recorded as up whose close was never recorded (the primary stopped)
        counts as down only from this primary's start, not from its last message."""
        link_up(self.server, "north")
        self.clock.advance(3600)
        # A new primary process over the same database: no session for north yet.
        restarted = make_server(self, store=self.server.store, start=NOW + 3600)
        restarted.reactor.advance(59)
        answer = get(restarted, "/health/sites")
        north = {s["name"]: s for s in answer.json["sites"]}["north"]
        self.assertEqual((answer.code, north["disconnected_for"]), (200, 59.0))
        restarted.reactor.advance(2)
        self.assertEqual(get(restarted, "/health/sites").code, 500)

    def test_grace_from_config(self) -> None:
        """``[web] site_grace`` sets the grace period."""
        server = make_server(self, web={"site_grace": 5})
        server.store.write(thdAddSite, "north", NOW)
        link_up(server, "north")
        link_down(server, "north")
        server.reactor.advance(5)
        self.assertEqual(get(server, "/health/sites").code, 200)
        server.reactor.advance(0.1)
        answer = get(server, "/health/sites")
        self.assertEqual((answer.code, answer.json["grace"]), (500, 5.0))

    def test_grace_must_be_positive(self) -> None:
        """A zero grace period is a configuration error naming the key."""
        base = {"role": "primary", "name": "hq", "data_dir": "x"}
        error = self.assertRaises(ConfigError, from_dict, {**base, "web": {"site_grace": 0}})
        self.assertEqual(error.key, "web.site_grace")
        error = self.assertRaises(
            ConfigError,
            from_dict,
            {
                "role": "site",
                "name": "north",
                "data_dir": "x",
                "primary": {"endpoint": "tcp:h:9192", "token_file": "t", "insecure": True},
                "web": {"site_grace": 30},
            },
        )
        self.assertIn('only used with role = "primary"', str(error))

    def test_failure_is_500_without_traceback(self) -> None:
        """A database error answers 500 and one line."""

        def broken(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("disk gone")

        assert self.server.sites is not None
        self.server.sites.read = broken
        answer = get(self.server, "/health/sites")
        self.assertEqual((answer.code, answer.json), (500, {"error": "site health unavailable"}))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


_agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False), connectTimeout=2)


async def get_json(port: int, path: str) -> tuple[int, Any]:
    """``GET path`` on 127.0.0.1:port: the status code and the JSON body."""
    response = await _agent.request(b"GET", f"http://127.0.0.1:{port}{path}".encode())
    return response.code, json.loads(await readBody(response))


class EndToEndTests(TestCase):
    """A primary and a site as real processes: /health/sites follows the site's link."""

    timeout = 90

    def setUp(self) -> None:
        reason = twistd_unavailable()
        if reason is not None:
            raise SkipTest(reason)
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)

    async def test_site_down_and_back(self) -> None:
        """Connected: 200 and a small lag; the site stops: 500 after the grace period;
        it starts again: 200."""
        primary = write_primary_config(self.directory, "hq")
        with open(primary.config, "a", encoding="utf-8") as f:
            f.write("\n[web]\nsite_grace = 1.0\n")
        tls_init(primary)
        site = write_site_config(self.directory, "north", primary)
        enrol(primary, site)
        hq = ServerProcess(primary).start(self)
        await wait_for_health(hq, lambda h: h.code == 200, "primary answers")
        north = ServerProcess(site).start(self)
        health = await wait_for_health(north, lambda h: h.mode == "online", "site online")
        self.assertIsNotNone(health.body["last_sync"])

        async def sites() -> tuple[int, dict[str, Any]]:
            return await get_json(primary.web_port, "/health/sites/north")

        async def state(code: int, wanted: str) -> bool:
            got, body = await sites()
            return got == code and body["site"]["state"] == wanted

        await wait_for(lambda: ensureDeferred(state(200, "connected")), "north connected")
        health = await wait_for_health(north, lambda h: h.body.get("lag") == 0, "lag 0")
        self.assertEqual(health.body["outbox_pending"], 0)
        north.stop()
        await wait_for(lambda: ensureDeferred(state(500, "disconnected")), "north down past 1 s")
        north.start(self)
        await wait_for(lambda: ensureDeferred(state(200, "connected")), "north back")
