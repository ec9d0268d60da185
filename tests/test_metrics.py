"""``/metrics``: Prometheus exposition of one server's own registry.

Each test reads ``/metrics`` from a real ``Server`` (inline store, ``MemoryReactorClock``,
no sockets) and parses it with prometheus-client's own parser, as Prometheus would.
Two servers in one process (the demo) each expose only their own series, and every
metric a server exports is documented in ``docs/metrics.rst``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from typing import Any, cast

import prometheus_client
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

import sitesrv
from sitesrv.core.auth import AuthFailed, Identity
from sitesrv.core.gate import Refused
from sitesrv.failover import MODES
from sitesrv.replication.primary import PrimaryReplication, SiteSession
from sitesrv.replication.site import PrimaryLinkProtocol, SiteReplication
from sitesrv.secrets import make_verifier
from sitesrv.server import Server
from sitesrv.store.changelog import thdState
from sitesrv.store.printers import thdAddPrinter
from sitesrv.store.sites import thdAddSite, thdLinkDown, thdLinkUp
from sitesrv.store.users import thdAddCard, thdAddUser, thdSetPin
from tests.inprocess import get, load_replica, make_server
from tests.support import NOW

CHEAP_N = 2**10
PIN = "4321"
PASSWORD = "alice's secret"
DOCS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs", "metrics.rst")


class Scrape:
    """One parsed ``/metrics`` answer."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.families = {f.name: f for f in text_string_to_metric_families(text)}

    def value(self, sample: str, **labels: str) -> float | None:
        """The value of the sample named ``sample`` with exactly these labels, or None."""
        for family in self.families.values():
            for s in family.samples:
                if s.name == sample and s.labels == labels:
                    return float(s.value)
        return None

    def labelled(self, sample: str) -> dict[tuple[tuple[str, str], ...], float]:
        """Every series of ``sample``: sorted label pairs to value."""
        return {
            tuple(sorted(s.labels.items())): float(s.value)
            for family in self.families.values()
            for s in family.samples
            if s.name == sample
        }


def scrape(server: Server) -> Scrape:
    """``GET /metrics`` and parse it."""
    answer = get(server, "/metrics")
    assert answer.code == 200, answer.text
    assert answer.content_type == prometheus_client.CONTENT_TYPE_LATEST, answer.content_type
    return Scrape(answer.text)


def run(d: Any) -> Deferred[Any]:
    """A coroutine (or Deferred) as a Deferred."""
    return d if isinstance(d, Deferred) else Deferred.fromCoroutine(d)


def ticking(*values: float) -> Iterator[float]:
    """A monotonic clock that returns ``values`` in turn."""
    yield from values


def add_alice(server: Server) -> None:
    """alice: 5.00, card 1001 with PIN 4321, a password; printer p1 at north."""
    write = server.store.write
    verifier = make_verifier(PASSWORD, n=CHEAP_N)
    write(thdAddUser, "alice", NOW, balance=500, password_verifier=verifier)
    write(thdAddCard, "alice", "1001", NOW)
    write(thdSetPin, "alice", make_verifier(PIN, n=CHEAP_N), NOW)


class ExpositionTests(SynchronousTestCase):
    """The format, the registry of each server, and the documentation."""

    def test_parses(self) -> None:
        """A primary's exposition parses and names this server."""
        found = scrape(make_server(self))
        self.assertEqual(
            found.value("sitesrv_info", role="primary", name="hq", version=sitesrv.__version__),
            1.0,
        )

    def test_a_registry_per_server(self) -> None:
        """Two servers in one process (the demo) expose only their own series, and
        nothing goes to prometheus-client's global registry."""
        primary = make_server(self)
        site = make_server(self, "site")
        primary.metrics.jobs.labels(event="held").inc(3)
        mine, theirs = scrape(primary), scrape(site)
        self.assertEqual(mine.value("sitesrv_jobs_total", event="held"), 3.0)
        self.assertEqual(theirs.value("sitesrv_jobs_total", event="held"), 0.0)
        self.assertNotIn('name="north"', mine.text)
        self.assertNotIn('name="hq"', theirs.text)
        self.assertNotIn("sitesrv_", prometheus_client.generate_latest().decode())

    def test_role_specific_metrics(self) -> None:
        """The outbox only on a site; per-site link state only on the primary."""
        primary, site = scrape(make_server(self)), scrape(make_server(self, "site"))
        self.assertNotIn("sitesrv_outbox_pending", primary.families)
        self.assertIn("sitesrv_site_connected", primary.families)
        self.assertIn("sitesrv_outbox_pending", site.families)
        self.assertNotIn("sitesrv_site_connected", site.families)
        self.assertIn("sitesrv_mode_transitions", site.families)

    def test_every_metric_is_documented(self) -> None:
        """Each sitesrv metric either role exports is described in docs/metrics.rst."""
        with open(DOCS, encoding="utf-8") as f:
            # Counters are documented as exposed (``..._total``); families drop the suffix.
            found = re.findall(r"``(sitesrv_[a-z_]+)``", f.read())
            documented = {re.sub(r"_total$", "", name) for name in found}
        exported = set()
        for server in (make_server(self), make_server(self, "site")):
            names = scrape(server).families
            # prometheus-client's own ``_created`` companions are not ours to document.
            exported |= {n for n in names if n.startswith("sitesrv_") and "_created" not in n}
        self.assertEqual(exported - documented, set())
        self.assertEqual(documented - exported, set(), "documented but not exported")

    def test_status_failure(self) -> None:
        """A status that cannot be read: 500 and one line, no traceback."""
        server = make_server(self, "site")

        def broken(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("database on fire")

        server.store.runRead = broken  # type: ignore[method-assign]
        answer = get(server, "/metrics")
        self.assertEqual((answer.code, answer.text), (500, "metrics unavailable\n"))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class ModeTests(SynchronousTestCase):
    """The mode gauge and the transitions counter."""

    def test_primary_is_online(self) -> None:
        """A primary is always online."""
        found = scrape(make_server(self))
        self.assertEqual(
            {m: found.value("sitesrv_mode", mode=m) for m in MODES},
            {m: 1.0 if m == "online" else 0.0 for m in MODES},
        )
        self.assertEqual(found.value("sitesrv_mode_since_timestamp_seconds"), NOW)

    def test_site_modes_and_transitions(self) -> None:
        """One gauge per mode, 1 for the current; each transition counted by from/to."""
        server = make_server(self, "site")
        assert server.failover is not None
        inputs = server.failover.inputs
        self.assertEqual(scrape(server).value("sitesrv_mode", mode="unsynced"), 1.0)
        inputs.replicaFound("test")
        server.reactor.advance(10)
        inputs.connected("test")
        inputs.lost("test")
        inputs.connected("test")
        found = scrape(server)
        self.assertEqual(
            {m: found.value("sitesrv_mode", mode=m) for m in MODES},
            {m: 1.0 if m == "reconciling" else 0.0 for m in MODES},
        )
        self.assertEqual(found.value("sitesrv_mode_since_timestamp_seconds"), NOW + 10)
        self.assertEqual(
            found.labelled("sitesrv_mode_transitions_total"),
            {
                (("from", "unsynced"), ("to", "offline")): 1.0,
                (("from", "offline"), ("to", "reconciling")): 2.0,
                (("from", "reconciling"), ("to", "offline")): 1.0,
            },
        )


class ReplicationTests(SynchronousTestCase):
    """Position, lag, skew, last sync, outbox; the primary's view of each site."""

    def test_site(self) -> None:
        """A site's replica position (stored), lag and skew (from the link), last sync."""
        server = make_server(self, "site")
        assert server.failover is not None and server.observer is not None
        replication = server.replication
        assert isinstance(replication, SiteReplication)
        found = scrape(server)
        self.assertEqual(found.value("sitesrv_replication_position"), 0.0)
        self.assertEqual(found.labelled("sitesrv_replication_lag"), {})
        self.assertEqual(found.value("sitesrv_outbox_pending"), 0.0)
        link = PrimaryLinkProtocol(replication)
        link.position, link.primaryHead = 7, 19
        replication.current = replication.last = link
        server.failover.inputs.replicaFound("test")
        server.observer.connected(skew=-2.5)
        server.reactor.advance(3)
        server.failover.inputs.caughtUp("test")
        found = scrape(server)
        self.assertEqual(found.value("sitesrv_replication_lag", site="north"), 12.0)
        self.assertEqual(found.value("sitesrv_clock_skew_seconds", site="north"), -2.5)
        self.assertEqual(found.value("sitesrv_replication_last_sync_timestamp_seconds"), NOW + 3)

    def test_primary(self) -> None:
        """The head, and per site: connected, healthy, disconnected time, lag, skew."""
        server = make_server(self)
        store = server.store
        for name in ("north", "south"):
            store.write(thdAddSite, name, NOW)
        head = store.read(thdState)[1]
        store.write(
            thdLinkUp,
            "north",
            NOW,
            position=head - 2,
            skew=1.5,
            software_version="0.1.0",
            protocol_version=2,
            address="192.0.2.7:1",
        )
        assert isinstance(server.replication, PrimaryReplication)
        server.replication.sessions["north"] = SiteSession(server.replication)
        found = scrape(server)
        self.assertEqual(found.value("sitesrv_replication_position"), float(head))
        self.assertEqual(found.value("sitesrv_site_connected", site="north"), 1.0)
        self.assertEqual(found.value("sitesrv_site_healthy", site="north"), 1.0)
        self.assertEqual(found.value("sitesrv_replication_lag", site="north"), 2.0)
        self.assertEqual(found.value("sitesrv_clock_skew_seconds", site="north"), 1.5)
        # south never connected: healthy, no lag known.
        self.assertEqual(found.value("sitesrv_site_healthy", site="south"), 1.0)
        self.assertIsNone(found.value("sitesrv_replication_lag", site="south"))
        # north goes away for longer than the grace period.
        server.replication.sessions.clear()
        store.write(thdLinkDown, "north", NOW)
        server.reactor.advance(90)
        found = scrape(server)
        self.assertEqual(found.value("sitesrv_site_connected", site="north"), 0.0)
        self.assertEqual(found.value("sitesrv_site_healthy", site="north"), 0.0)
        self.assertEqual(found.value("sitesrv_site_disconnected_seconds", site="north"), 90.0)


class GateTests(SynchronousTestCase):
    """Authentications, charges and gate latency, counted where the gate answers."""

    def setUp(self) -> None:
        self.server = make_server(self)
        add_alice(self.server)
        self.server.store.write(thdAddPrinter, "p1", "hq", 10, 50, NOW)
        self.gate = self.server.gate

    def login(self) -> Identity:
        """alice by card and PIN."""
        identity: Identity = self.successResultOf(run(self.gate.card("1001", "mfd", PIN)))
        return identity

    def test_authentications(self) -> None:
        """By method and result; series exist at zero before anything happens."""
        found = scrape(self.server)
        self.assertEqual(
            found.value("sitesrv_authentications_total", method="password", result="refused"), 0
        )
        self.login()
        self.successResultOf(run(self.gate.card("1001", "mfd")))
        self.failureResultOf(run(self.gate.card("1001", "mfd", "0000")), AuthFailed)
        self.failureResultOf(run(self.gate.card("9999", "mfd")), AuthFailed)
        self.successResultOf(run(self.gate.password("alice", PASSWORD, "web")))
        self.failureResultOf(run(self.gate.password("alice", "guess", "web")), AuthFailed)
        counts = {
            (dict(k)["method"], dict(k)["result"]): v
            for k, v in scrape(self.server).labelled("sitesrv_authentications_total").items()
            if v
        }
        self.assertEqual(
            counts,
            {
                ("card+pin", "accepted"): 1.0,
                ("card", "accepted"): 1.0,
                ("card+pin", "refused"): 1.0,
                ("card", "refused"): 1.0,
                ("password", "accepted"): 1.0,
                ("password", "refused"): 1.0,
            },
        )

    def test_unavailable_at_an_unsynced_site(self) -> None:
        """A site that is not serving refuses logins: counted as unavailable."""
        site = make_server(self, "site")
        self.failureResultOf(run(site.gate.card("1001", "mfd")), Refused)
        found = scrape(site)
        self.assertEqual(
            found.value("sitesrv_authentications_total", method="card", result="unavailable"), 1
        )

    def test_charges(self) -> None:
        """Count and sum in minor units, by reason; a resend is not counted twice."""
        identity = self.login()
        self.successResultOf(run(self.gate.charge(identity, 30, "copy", txn_uuid="a" * 32)))
        self.successResultOf(run(self.gate.charge(identity, 30, "copy", txn_uuid="a" * 32)))
        self.successResultOf(run(self.gate.charge(identity, 120, "copy")))
        self.successResultOf(run(self.gate.charge(identity, 5, "scan")))
        found = scrape(self.server)
        copy = {"reason": "copy", "offline": "false"}
        self.assertEqual(found.value("sitesrv_charge_minor_units_count", **copy), 2.0)
        self.assertEqual(found.value("sitesrv_charge_minor_units_sum", **copy), 150.0)
        scan = {"reason": "scan", "offline": "false"}
        self.assertEqual(found.value("sitesrv_charge_minor_units_sum", **scan), 5.0)

    def test_gate_latency(self) -> None:
        """Each gate operation's time goes into its histogram."""
        self.server.metrics.monotonic = ticking(100.0, 100.25, 200.0, 200.5).__next__
        identity = self.login()
        self.successResultOf(run(self.gate.balance(identity)))
        found = scrape(self.server)
        for operation, seconds in (("card", 0.25), ("balance", 0.5)):
            labels = {"operation": operation}
            name = "sitesrv_gate_operation_duration_seconds"
            self.assertEqual(found.value(f"{name}_count", **labels), 1.0)
            self.assertEqual(found.value(f"{name}_sum", **labels), seconds)
        self.assertEqual(
            found.value("sitesrv_gate_operation_duration_seconds_count", operation="may_release"),
            0.0,
        )


class SiteOutboxTests(SynchronousTestCase):
    """An offline charge at a site: in the outbox and counted as offline."""

    def test_offline_charge(self) -> None:
        primary = make_server(self)
        primary.store.write(thdAddSite, "north", NOW)
        add_alice(primary)
        site = make_server(self, "site")
        load_replica(primary.store, site.store, "north")
        assert site.failover is not None
        site.failover.inputs.replicaFound("test")
        identity = self.successResultOf(run(site.gate.card("1001", "mfd", PIN)))
        self.successResultOf(run(site.gate.charge(identity, 40, "copy")))
        found = scrape(site)
        self.assertEqual(found.value("sitesrv_outbox_pending"), 1.0)
        offline = {"reason": "copy", "offline": "true"}
        self.assertEqual(found.value("sitesrv_charge_minor_units_count", **offline), 1.0)
        self.assertEqual(found.value("sitesrv_charge_minor_units_sum", **offline), 40.0)


class CounterHookTests(SynchronousTestCase):
    """Counters other parts of the server increment through ``Server.metrics``."""

    def test_jobs(self) -> None:
        """Job events start at zero and count what the Find-Me queue reports."""
        server = make_server(self)
        found = scrape(server)
        for event in ("held", "released", "printed", "denied"):
            self.assertEqual(found.value("sitesrv_jobs_total", event=event), 0.0)
        server.metrics.jobs.labels(event="held").inc()
        server.metrics.jobs.labels(event="held").inc()
        server.metrics.jobs.labels(event="denied").inc()
        found = scrape(server)
        self.assertEqual(found.value("sitesrv_jobs_total", event="held"), 2.0)
        self.assertEqual(found.value("sitesrv_jobs_total", event="denied"), 1.0)

    def test_connector_connections(self) -> None:
        """A gauge per connector that connectors move up and down."""
        server = make_server(self, "site")
        gauge = server.metrics.connector_connections.labels(connector="card-reader")
        gauge.inc()
        gauge.inc()
        gauge.dec()
        found = scrape(server)
        self.assertEqual(
            found.value("sitesrv_connector_connections", connector="card-reader"), 1.0
        )


class RequestTests(SynchronousTestCase):
    """Web requests: a latency histogram and a response counter by route."""

    def setUp(self) -> None:
        self.server = make_server(self)

    def test_latency_and_codes(self) -> None:
        """Timed from arrival to the last byte; routes are the root's children only."""
        self.server.site.monotonic = ticking(1.0, 1.125, 5.0, 5.5, 9.0, 9.0, 20.0, 20.0).__next__
        get(self.server, "/health")
        get(self.server, "/no/such/thing")
        get(self.server, "/health/sites/nowhere")
        found = scrape(self.server)
        name = "sitesrv_http_request_duration_seconds"
        self.assertEqual(found.value(f"{name}_count", route="/health"), 2.0)
        self.assertEqual(found.value(f"{name}_sum", route="/health"), 0.125)
        self.assertEqual(found.value(f"{name}_sum", route="other"), 0.5)
        self.assertEqual(found.value(f"{name}_bucket", route="/health", le="0.25"), 2.0)
        codes = {
            (dict(k)["route"], dict(k)["code"]): v
            for k, v in found.labelled("sitesrv_http_responses_total").items()
        }
        self.assertEqual(
            codes, {("/health", "200"): 1.0, ("other", "404"): 1.0, ("/health", "404"): 1.0}
        )

    def test_root_and_aborted(self) -> None:
        """``/`` is its own route; a client that goes away is counted as aborted."""
        request = DummyRequest([b""])
        self.server.site.getResourceFor(cast(Any, request))
        request.processingFailed(Failure(ConnectionError("gone")))
        codes = scrape(self.server).labelled("sitesrv_http_responses_total")
        self.assertEqual(codes[(("code", "aborted"), ("route", "/"))], 1.0)
