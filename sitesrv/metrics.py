"""Prometheus metrics of one server, in a registry of its own.

The demo runs a primary and a site in one process, so nothing here touches
prometheus-client's global registry: each ``Server`` makes a ``Metrics`` and ``/metrics``
exposes that server's registry only. Gauges that describe state (mode, replication
position and lag, outbox, sites) are set from ``Server.status()`` when ``/metrics`` is
scraped, so ``/metrics`` and ``/health`` never disagree; counters and histograms are
updated as things happen: mode transitions (a failover listener), authentications,
charges and gate latency (``MeasuredGate``), web requests (``sitesrv.web.metrics``),
and jobs and connector connections (incremented by the Find-Me queue and the
connectors through ``Server.metrics``). ``docs/metrics.rst`` lists every metric.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Coroutine, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import attrs
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Summary
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.process_collector import ProcessCollector

import sitesrv
from sitesrv.core.auth import AuthFailed, Identity
from sitesrv.core.gate import ChargeResult, Gate, JobInfo, Refused
from sitesrv.failover import MODES, Transition

#: Authentication methods, as the gate is asked for them.
AUTH_METHODS = ("card", "card+pin", "password")
#: Outcomes of an authentication: accepted; refused (wrong or unknown credentials,
#: throttled, disabled user, policy); unavailable (the site is unsynced or revoked).
#: ("error", for an unexpected failure, appears only when one happens.)
AUTH_RESULTS = ("accepted", "refused", "unavailable")
#: Job events the Find-Me queue and the providers count (others may be added).
JOB_EVENTS = (
    "held",
    "direct",
    "released",
    "printed",
    "denied",
    "failed",
    "expired",
    "cancelled",
)
#: Operations of the gate whose latency is measured.
GATE_OPERATIONS = ("card", "password", "may_release", "charge", "balance")

ROLES_BOTH = ("primary", "site")


class Metrics:
    """The metrics of one server (``role`` "primary" or "site", named ``name``).

    Metrics that mean nothing in a role (the outbox on a primary, per-site link state on
    a site) are not exported there. ``monotonic`` measures durations (tests inject it).
    """

    def __init__(
        self, role: str, name: str, monotonic: Callable[[], float] = time.monotonic
    ) -> None:
        self.role = role
        self.name = name
        self.monotonic = monotonic
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)

        def metric(kind: Any, metric_name: str, text: str, *labels: str, **kw: Any) -> Any:
            roles = kw.pop("roles", ROLES_BOTH)
            made = kind(metric_name, text, labels, registry=None, **kw)
            if role in roles:
                self.registry.register(made)
            return made

        self.info: Gauge = metric(
            Gauge, "sitesrv_info", "Always 1; labels name this server.", "role", "name", "version"
        )
        self.info.labels(role, name, sitesrv.__version__).set(1)
        self.mode: Gauge = metric(
            Gauge, "sitesrv_mode", "1 for the server's current mode, 0 for the others.", "mode"
        )
        self.mode_since: Gauge = metric(
            Gauge,
            "sitesrv_mode_since_timestamp_seconds",
            "When the current mode began (a primary: when it started).",
        )
        self.transitions: Counter = metric(
            Counter,
            "sitesrv_mode_transitions",
            "Changes of the failover mode, by old and new mode.",
            "from",
            "to",
            roles=("site",),
        )
        self.position: Gauge = metric(
            Gauge,
            "sitesrv_replication_position",
            "Change-log position: a site's replica position, the primary's head.",
        )
        self.lag: Gauge = metric(
            Gauge,
            "sitesrv_replication_lag",
            "Changes a site's replica is behind the primary's head (by site).",
            "site",
        )
        self.last_sync: Gauge = metric(
            Gauge,
            "sitesrv_replication_last_sync_timestamp_seconds",
            "When the site's replica last reached the primary's head.",
            roles=("site",),
        )
        self.skew: Gauge = metric(
            Gauge,
            "sitesrv_clock_skew_seconds",
            "Site clock minus primary clock, measured at the replication hello (by site).",
            "site",
        )
        self.outbox: Gauge = metric(
            Gauge,
            "sitesrv_outbox_pending",
            "Outbox records the primary has not applied yet.",
            roles=("site",),
        )
        self.site_connected: Gauge = metric(
            Gauge,
            "sitesrv_site_connected",
            "1 while the site's replication link is up (by site).",
            "site",
            roles=("primary",),
        )
        self.site_healthy: Gauge = metric(
            Gauge,
            "sitesrv_site_healthy",
            "0 when /health/sites counts the site as down (past the grace period).",
            "site",
            roles=("primary",),
        )
        self.site_down: Gauge = metric(
            Gauge,
            "sitesrv_site_disconnected_seconds",
            "How long a site that connected before has been disconnected (0 while up).",
            "site",
            roles=("primary",),
        )
        self.authentications: Counter = metric(
            Counter,
            "sitesrv_authentications",
            "Authentications asked of the gate, by method and result.",
            "method",
            "result",
        )
        self.jobs: Counter = metric(
            Counter, "sitesrv_jobs", "Print jobs by event (held, released, printed, ...).", "event"
        )
        self.charges: Summary = metric(
            Summary,
            "sitesrv_charge_minor_units",
            "Charges recorded by this server: count and sum in minor units of the currency.",
            "reason",
            "offline",
        )
        self.connector_connections: Gauge = metric(
            Gauge,
            "sitesrv_connector_connections",
            "Open connections of device connectors, by connector.",
            "connector",
        )
        self.http_seconds: Histogram = metric(
            Histogram,
            "sitesrv_http_request_duration_seconds",
            "Web port requests: time from the request's arrival to its last byte, by route.",
            "route",
        )
        self.http_responses: Counter = metric(
            Counter,
            "sitesrv_http_responses",
            "Web port responses by route and status code.",
            "route",
            "code",
        )
        self.gate_seconds: Histogram = metric(
            Histogram,
            "sitesrv_gate_operation_duration_seconds",
            "Time the gate took to answer, by operation.",
            "operation",
        )
        # Series that exist from the start, so dashboards and rate() see zeros.
        for method in AUTH_METHODS:
            for result in AUTH_RESULTS:
                self.authentications.labels(method, result)
        for event in JOB_EVENTS:
            self.jobs.labels(event)
        for operation in GATE_OPERATIONS:
            self.gate_seconds.labels(operation)
        self.setMode("online" if role == "primary" else "unsynced")

    # -- events ---------------------------------------------------------------------

    def setMode(self, mode: str) -> None:
        """Make ``mode`` the one mode whose gauge is 1."""
        for each in MODES:
            self.mode.labels(each).set(1 if each == mode else 0)

    def transition(self, transition: Transition) -> None:
        """A failover listener: count the transition and switch the mode gauge."""
        self.transitions.labels(transition.old, transition.new).inc()
        self.setMode(transition.new)
        self.mode_since.set(transition.at)

    def authenticated(self, method: str, result: str) -> None:
        """Count one authentication attempt."""
        self.authentications.labels(method, result).inc()

    def charged(self, result: ChargeResult, reason: str) -> None:
        """Count a recorded charge and its amount (a resend is not counted again)."""
        if result.recorded:
            offline = "true" if result.offline else "false"
            self.charges.labels(reason, offline).observe(-result.amount)

    @contextmanager
    def timed(self, histogram: Histogram, *labels: str) -> Iterator[None]:
        """Observe the time the body of the ``with`` takes (also when it raises)."""
        start = self.monotonic()
        try:
            yield
        finally:
            histogram.labels(*labels).observe(max(0.0, self.monotonic() - start))

    # -- state, from Server.status() -------------------------------------------------

    def observeStatus(self, status: Mapping[str, Any]) -> None:
        """Set the state gauges from a ``Server.status()`` dict."""
        self.setMode(status["mode"])
        self.mode_since.set(status["since"])
        if status.get("position") is not None:
            self.position.set(status["position"])
        for gauge in (self.lag, self.skew, self.site_connected, self.site_healthy, self.site_down):
            _clear(gauge)
        if self.role == "site":
            if status.get("lag") is not None:
                self.lag.labels(self.name).set(status["lag"])
            if status.get("clock_skew") is not None:
                self.skew.labels(self.name).set(status["clock_skew"])
            if status.get("last_sync") is not None:
                self.last_sync.set(status["last_sync"])
            if status.get("outbox_pending") is not None:
                self.outbox.set(status["outbox_pending"])
            return
        for site in status.get("sites", ()):
            name = site["name"]
            self.site_connected.labels(name).set(1 if site["connected"] else 0)
            self.site_healthy.labels(name).set(1 if site["healthy"] else 0)
            self.site_down.labels(name).set(site["disconnected_for"] or 0)
            if site["lag"] is not None:
                self.lag.labels(name).set(site["lag"])
            if site["clock_skew"] is not None:
                self.skew.labels(name).set(site["clock_skew"])


def _clear(metric: MetricWrapperBase) -> None:
    # Forget every labelled series (sites come and go); they are set again at once.
    metric.clear()


@attrs.define
class MeasuredGate(Gate):
    """The gate, counting authentications and charges and timing every operation."""

    metrics: Metrics | None = None

    @contextmanager
    def _timed(self, operation: str) -> Iterator[None]:
        if self.metrics is None:
            yield
            return
        with self.metrics.timed(self.metrics.gate_seconds, operation):
            yield

    async def _authenticate(self, method: str, attempt: Coroutine[Any, Any, Identity]) -> Identity:
        result = "error"
        try:
            identity = await attempt
            result = "accepted"
            return identity
        except AuthFailed:
            result = "refused"
            raise
        except Refused:
            result = "unavailable"
            raise
        finally:
            if self.metrics is not None:
                self.metrics.authenticated(method, result)

    async def card(self, number: str, device: str = "", pin: str | None = None) -> Identity:
        """``Gate.card``, counted and timed."""
        method = "card" if pin is None else "card+pin"
        with self._timed("card"):
            return await self._authenticate(method, super().card(number, device, pin))

    async def password(self, username: str, password: str, device: str = "") -> Identity:
        """``Gate.password``, counted and timed."""
        with self._timed("password"):
            return await self._authenticate(
                "password", super().password(username, password, device)
            )

    async def may_release(self) -> None:
        """``Gate.may_release``, timed."""
        with self._timed("may_release"):
            await super().may_release()

    async def charge(
        self,
        identity: Identity,
        amount: int,
        reason: str,
        job: JobInfo | None = None,
        txn_uuid: str | None = None,
    ) -> ChargeResult:
        """``Gate.charge``, counted and timed."""
        with self._timed("charge"):
            result = await super().charge(identity, amount, reason, job, txn_uuid)
        if self.metrics is not None:
            self.metrics.charged(result, reason)
        return result

    async def balance(self, identity: Identity) -> int:
        """``Gate.balance``, timed."""
        with self._timed("balance"):
            return await super().balance(identity)
