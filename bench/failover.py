"""The failover benchmark: a site under steady device traffic loses its primary and gets
it back; how fast does it switch, does any request fail, and how fast does it reconcile?

Run ``python -m bench.failover --help``. It builds a primary ``hq`` and a site ``north``
in a new temporary directory (deleted afterwards unless ``--keep``) with the set-up
helpers of ``bench.replication``: ``sitesrv-admin tls init``, TOML configs (plus
``[replication] heartbeat = --heartbeat``, and ``max_backoff = --max-backoff`` when
given), ``site add``, users bulk-imported into the
primary's database, then ``printer add p1 --site north`` and ``device add mfd --site
north --connector http --printer p1`` (whose printed API key the client uses). Both run
as real ``twistd -n sitesrv --config`` processes; the site reaches the primary's TLS
replication port through the fault proxy (``sitesrv.testing.faultproxy``, a child
process driven through its control port). It is a benchmark, not a test: it prints the
figures against the goals and exits 0 whether or not they are met (1 only when something
fails outright).

The client
    A Twisted ``Agent`` on a persistent ``HTTPConnectionPool`` in this process plays the
    MFD: ``--rate`` requests a second in all, half ``POST /api/v1/sessions`` ``{"card":
    ...}`` with a random user's card, each followed by ``POST
    /api/v1/sessions/{id}/usage`` ``{"kind": "copy", "pages": 1, "uuid": <uuid4>}``
    (open loop: cycles start on schedule whether or not earlier ones have answered). Any
    answer that is not 2xx, and not a deliberate refusal (402, 403), counts as failed, as
    does no answer within 10 s. Every charge answered 201 is remembered by its UUID.
switch (close, black-hole)
    ``--trials`` times each, under the client's load: with the site ``online`` for
    ``--settle`` seconds, the proxy cuts the link (``cut``: a FIN on every connection,
    nothing listens) or black-holes it (``stall``: connections stay open, nothing is
    forwarded). ``/health`` is polled every 10 ms; the time to ``mode`` = ``offline`` is
    reported as first seen by the poll, and as the time of the transition the site
    recorded (``transitions[].at``; same machine, same clock). Failed requests and
    latency are counted from one second before the fault to one second after the switch
    was seen, and while offline.
reconnect
    After ``--seconds`` offline under load (the backlog the site records meanwhile is
    read from ``/health``'s ``outbox_pending``), ``heal`` (or ``unstall``); the time to
    ``online``, with the times of the site's ``offline -> reconciling`` (reconnected)
    and ``reconciling -> syncing`` (outbox drained) transitions, and the failed requests
    and latency around it.
reconcile
    The client stops; once the site has drained, the link is cut and the site stopped;
    ``--records`` charges are written straight into its SQLite outbox with
    ``sitesrv.store.outbox.thdRecord``, built as the gate builds a device's copy charge
    (the device API would take minutes for 100,000); the site is started again, still
    cut, left offline ``--seconds`` (so its reconnection backoff is what a real outage
    leaves it at), then the link is healed. Timed from the heal until the site's outbox
    holds nothing above its replicated ``applied_seq`` and the primary's
    ``transactions`` hold all the new rows for the site (both SQLite files polled
    read-only every 50 ms); also split at the site's reconnection.
ledger
    Finally every acknowledged charge and every inserted record must be in the primary's
    ledger exactly once (by UUID) with its amount, and no record dead-lettered.

``--json`` prints the results as JSON (progress goes to stderr); ``--trace CSV`` writes
every request of the client (kind, start, latency, status) for a closer look.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid as uuidlib
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import attrs
from sqlalchemy import Connection, select
from twisted.internet import task
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IConsumer
from twisted.internet.task import LoopingCall, deferLater
from twisted.internet.threads import deferToThread
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

from bench.replication import (
    START_DEADLINE,
    BenchError,
    Node,
    Processes,
    admin,
    load_primary,
    machine,
    make_primary,
    make_site,
)
from sitesrv import config as sitesrv_config
from sitesrv.core.gate import JobInfo
from sitesrv.costing import job_cost
from sitesrv.store import Store, outbox
from sitesrv.store.printers import thdPrinter
from sitesrv.store.schema import AccountType, accounts, users
from sitesrv.testing.faultproxy import ProxyProcess

SITE = "north"
PRINTER = "p1"
DEVICE = "mfd"

#: How often /health is polled while waiting for a mode; the databases while reconciling.
HEALTH_INTERVAL = 0.010
DB_INTERVAL = 0.050
#: How often the client's scheduler starts the cycles that are due.
TICK = 0.005
#: Bounds (a benchmark that hangs measures nothing).
REQUEST_TIMEOUT = 10.0
ONLINE_DEADLINE = 120.0
DRAIN_DEADLINE = 600.0
#: Most login+charge cycles in flight; beyond it the client skips cycles (and says so).
MAX_IN_FLIGHT = 500
#: Outbox records written per transaction when filling the site's outbox directly.
INSERT_BATCH = 2_000
#: Failed requests are counted from this long before a fault to this long after the
#: site was seen to have switched.
WINDOW = 1.0
#: Answers that refuse on purpose (offline policy, balance): not failures.
DELIBERATE = frozenset({402, 403})


@attrs.frozen
class Goal:
    """A target from the issue."""

    limit: float
    unit: str
    at_least: bool = False

    def met(self, value: float | None) -> bool | None:
        """Whether ``value`` meets the goal; None when there is no value."""
        if value is None:
            return None
        return value >= self.limit if self.at_least else value <= self.limit

    def __str__(self) -> str:
        return f"{'>=' if self.at_least else '<='} {self.limit:,g} {self.unit}"


def goals(heartbeat: float) -> dict[str, Goal]:
    """The issue's goals; "immediate" on close is taken as within 0.1 s."""
    return {
        "failed_requests": Goal(0, "requests"),
        "close_to_offline_s": Goal(0.1, "s"),
        "blackhole_to_offline_s": Goal(3 * heartbeat, "s (3 heartbeats)"),
        "reconcile_records_per_s": Goal(10_000, "records/s", at_least=True),
        "ledger_errors": Goal(0, "errors"),
    }


# -- the client -----------------------------------------------------------------------


@implementer(IBodyProducer)
class _Body:
    """A request body already in memory."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.length = len(data)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        consumer.write(self.data)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


@attrs.frozen
class Outcome:
    """One request of the client: what, when (wall clock), and its answer."""

    kind: str
    started: float
    ended: float
    #: The status code; None when no answer came (connection error, timeout).
    code: int | None
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.code is not None and 200 <= self.code < 300

    @property
    def failed(self) -> bool:
        return not self.ok and self.code not in DELIBERATE


class HTTP:
    """JSON over a persistent connection pool, each exchange bounded in time."""

    def __init__(self, reactor: Any, port: int, key: str | None, connections: int) -> None:
        self.reactor = reactor
        self.base = f"http://127.0.0.1:{port}"
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = connections
        self.pool.retryAutomatically = False
        self.agent = Agent(reactor, pool=self.pool, connectTimeout=5)
        self.headers = {b"content-type": [b"application/json"]}
        if key is not None:
            self.headers[b"authorization"] = [f"Bearer {key}".encode()]

    async def _exchange(self, method: bytes, path: str, body: Any) -> tuple[int, Any]:
        producer = None if body is None else _Body(json.dumps(body).encode())
        response = await self.agent.request(
            method, f"{self.base}{path}".encode(), Headers(self.headers), producer
        )
        data = await readBody(response)
        return response.code, json.loads(data) if data else None

    def call(self, method: bytes, path: str, body: Any = None) -> Deferred[tuple[int, Any]]:
        d = Deferred.fromCoroutine(self._exchange(method, path, body))
        d.addTimeout(REQUEST_TIMEOUT, self.reactor)
        return d

    def close(self) -> Deferred[None]:
        return self.pool.closeCachedConnections()


class Load:
    """The MFD: login + copy charge cycles at ``rate / 2`` a second, open loop."""

    def __init__(self, reactor: Any, port: int, key: str, cards: Sequence[str], rate: float):
        self.reactor = reactor
        self.http = HTTP(reactor, port, key, connections=64)
        self.cards = list(cards)
        self.cycle_rate = rate / 2
        self.rng = random.Random(7)
        self.outcomes: list[Outcome] = []
        #: Charges answered 201: uuid -> amount charged (minor units, positive).
        self.acked: dict[str, int] = {}
        self.acked_offline = 0
        #: Charges sent, answered or not.
        self.sent: set[str] = set()
        self.started = 0
        self.skipped = 0
        self.in_flight = 0
        self.began = 0.0
        self.ended = 0.0
        self._t0 = 0.0
        self._idle: list[Deferred[None]] = []
        self._loop = LoopingCall(self._tick)
        self._loop.clock = reactor

    def start(self) -> None:
        self.began = time.time()
        self._t0 = time.monotonic()
        self._loop.start(TICK)

    async def stop(self) -> None:
        """Start no more cycles; wait for those in flight (each is bounded)."""
        if self._loop.running:
            self._loop.stop()
        self.ended = time.time()
        if self.in_flight:
            d: Deferred[None] = Deferred()
            self._idle.append(d)
            await d
        await self.http.close()

    def _tick(self) -> None:
        due = int((time.monotonic() - self._t0) * self.cycle_rate)
        while self.started < due:
            self.started += 1
            if self.in_flight >= MAX_IN_FLIGHT:
                self.skipped += 1
                continue
            self.in_flight += 1
            d = Deferred.fromCoroutine(self._cycle())
            d.addErrback(lambda f: self._record("client", time.time(), None, repr(f.value)))
            d.addBoth(self._cycleDone)

    def _cycleDone(self, _: Any) -> None:
        self.in_flight -= 1
        if not self.in_flight:
            waiting, self._idle = self._idle, []
            for d in waiting:
                d.callback(None)

    def _record(self, kind: str, started: float, code: int | None, error: str = "") -> None:
        self.outcomes.append(Outcome(kind, started, time.time(), code, error))

    async def _request(self, kind: str, path: str, body: Any) -> tuple[int, Any] | None:
        started = time.time()
        try:
            code, answer = await self.http.call(b"POST", path, body)
        except Exception as e:
            self._record(kind, started, None, f"{type(e).__name__}: {e}")
            return None
        error = answer.get("error", "") if isinstance(answer, dict) else ""
        self._record(kind, started, code, error)
        return code, answer

    async def _cycle(self) -> None:
        reply = await self._request(
            "login", "/api/v1/sessions", {"card": self.rng.choice(self.cards)}
        )
        if reply is None or reply[0] != 201:
            return
        txn = str(uuidlib.uuid4())
        self.sent.add(txn)
        path = f"/api/v1/sessions/{reply[1]['session']}/usage"
        reply = await self._request("usage", path, {"kind": "copy", "pages": 1, "uuid": txn})
        if reply is not None and reply[0] == 201:
            self.acked[txn] = int(reply[1]["charged_minor"])
            self.acked_offline += bool(reply[1]["offline"])

    def between(self, start: float, end: float) -> list[Outcome]:
        """The requests that started in ``[start, end]``."""
        return [o for o in self.outcomes if start <= o.started <= end]


def latency_ms(outcomes: Sequence[Outcome]) -> dict[str, float | None]:
    """p50, p99 and max latency of the answered requests, in ms."""
    times = sorted(o.ended - o.started for o in outcomes if o.code is not None)
    if not times:
        return {"p50_ms": None, "p99_ms": None, "max_ms": None}

    def q(p: float) -> float:
        return round(1000 * times[min(len(times) - 1, int(p * len(times)))], 1)

    return {"p50_ms": q(0.50), "p99_ms": q(0.99), "max_ms": round(1000 * times[-1], 1)}


def tally(outcomes: Sequence[Outcome]) -> dict[str, Any]:
    """Requests, answered 2xx, refused on purpose, failed (with the first few failures)."""
    failed = [o for o in outcomes if o.failed]
    return {
        "requests": len(outcomes),
        "ok": sum(o.ok for o in outcomes),
        "refused": sum(o.code in DELIBERATE for o in outcomes),
        "failed": len(failed),
        "failures": Counter(f"{o.kind} {o.code}: {o.error}"[:160] for o in failed).most_common(5),
    }


# -- the site's /health ---------------------------------------------------------------


class Health:
    """``/health`` of one server, polled on its own persistent connection."""

    def __init__(self, reactor: Any, port: int) -> None:
        self.reactor = reactor
        self.http = HTTP(reactor, port, None, connections=2)

    async def get(self) -> dict[str, Any] | None:
        try:
            _code, body = await self.http.call(b"GET", "/health")
        except Exception:
            return None
        return body if isinstance(body, dict) else None

    async def wait(
        self,
        test: Callable[[dict[str, Any]], bool],
        what: str,
        deadline: float,
        interval: float = HEALTH_INTERVAL,
        process: Any = None,
    ) -> tuple[float, dict[str, Any]]:
        """Poll every ``interval`` until ``test`` holds: (wall time seen, the reply)."""
        end = time.monotonic() + deadline
        last = None
        while True:
            began = time.monotonic()
            last = await self.get()
            if last is not None and test(last):
                return time.time(), last
            if process is not None and process.poll() is not None:
                raise BenchError(f"the site exited ({process.returncode}) before {what}")
            if time.monotonic() > end:
                mode = None if last is None else last.get("mode")
                raise BenchError(f"the site was not {what} within {deadline:g} s (mode {mode})")
            pause = interval - (time.monotonic() - began)
            if pause > 0:
                await deferLater(self.reactor, pause)

    async def mode(self, mode: str, deadline: float, **kw: Any) -> tuple[float, dict[str, Any]]:
        return await self.wait(lambda h: h.get("mode") == mode, mode, deadline, **kw)

    def close(self) -> Deferred[None]:
        return self.http.close()


def transition_at(reply: dict[str, Any], to: str, after: float) -> float | None:
    """When the site recorded its first change to mode ``to`` at or after ``after``."""
    times = [t["at"] for t in reply.get("transitions", []) if t["to"] == to and t["at"] >= after]
    return min(times) if times else None


# -- the databases (read-only, from this process) --------------------------------------


def _ro(database: str) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=10)


def query(database: str, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    """Rows of a read-only query of a SQLite file."""
    conn = _ro(database)
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


SITE_PENDING = (
    "SELECT count(*) FROM outbox WHERE seq > (SELECT coalesce(max(applied_seq), 0) FROM sites)"
)
PRIMARY_NEW = "SELECT count(*) FROM transactions WHERE id > ? AND site = ?"


def watch_reconcile(
    site_db: str, primary_db: str, after_id: int, expected: int, deadline: float
) -> tuple[dict[str, float], list[tuple[float, int]]]:
    """Poll both files until the site has nothing pending and the primary holds
    ``expected`` new rows for the site: the wall time each was first seen, and the
    primary's count at each poll that saw it change (wall time, rows)."""
    seen: dict[str, float] = {}
    progress: list[tuple[float, int]] = []
    site, primary = _ro(site_db), _ro(primary_db)
    end = time.monotonic() + deadline
    try:
        while len(seen) < 2:
            if "site_drained" not in seen and site.execute(SITE_PENDING).fetchone()[0] == 0:
                seen["site_drained"] = time.time()
            if "primary_all" not in seen:
                got = primary.execute(PRIMARY_NEW, (after_id, SITE)).fetchone()[0]
                if not progress or got != progress[-1][1]:
                    progress.append((time.time(), got))
                if got >= expected:
                    seen["primary_all"] = time.time()
            if time.monotonic() > end:
                raise BenchError(f"reconciliation not finished within {deadline:g} s: {seen}")
            time.sleep(DB_INTERVAL)
    finally:
        site.close()
        primary.close()
    return seen, progress


def per_interval(
    progress: Sequence[tuple[float, int]], start: float, step: float
) -> list[tuple[float, float]]:
    """From (wall time, rows so far) samples: the rows a second in each ``step`` seconds
    after ``start``, as (seconds after ``start`` at the interval's end, rate)."""
    rates: list[tuple[float, float]] = []
    if not progress:
        return rates
    edge, before, known = start + step, 0, 0
    for at, rows in progress:
        while at > edge:
            rates.append((round(edge - start, 1), round((known - before) / step, 1)))
            before, edge = known, edge + step
        known = rows
    last = progress[-1][0] - (edge - step)
    if last > 0:
        rates.append((round(progress[-1][0] - start, 1), round((known - before) / last, 1)))
    return rates


def thdTargets(conn: Connection) -> list[tuple[int, str, int, str]]:
    """(user id, username, account id, account name) of every user at the site."""
    q = (
        select(users.c.id, users.c.username, accounts.c.id, accounts.c.name)
        .join(accounts, accounts.c.user_id == users.c.id)
        .where(accounts.c.type == AccountType.PERSONAL.value)
        .order_by(users.c.id)
    )
    return [tuple(r) for r in conn.execute(q)]  # type: ignore[misc]


def thdRecordMany(conn: Connection, records: Sequence[dict[str, Any]], now: float) -> None:
    """What the gate does per charge at a site, for many charges in one transaction."""
    for record in records:
        outbox.thdRecord(conn, record, now)


def fill_outbox(url: str, count: int) -> tuple[dict[str, int], float]:
    """Write ``count`` offline copy charges into a stopped site's outbox.

    Each is the record ``gate.thdCharge`` writes for a one-page copy at the ``http``
    device (priced with its printer, as the device API prices it), for users in turn.
    Returns uuid -> amount charged (positive) and the seconds taken.
    """
    began = time.perf_counter()
    store = Store(url, readers=1)
    try:
        targets = store.read(thdTargets)
        printer = store.read(thdPrinter, PRINTER)
        if not targets:
            raise BenchError("the site's replica holds no users")
        cost = job_cost(printer.prices, 1, 1, False, False)
        amounts: dict[str, int] = {}
        for low in range(0, count, INSERT_BATCH):
            now = time.time()
            batch = []
            for i in range(low, min(count, low + INSERT_BATCH)):
                user_id, username, account_id, account_name = targets[i % len(targets)]
                txn = str(uuidlib.uuid4())
                job = JobInfo(
                    kind="copy",
                    printer_id=printer.id,
                    printer_name=printer.name,
                    pages=1,
                    copies=1,
                    colour=False,
                    duplex=False,
                    document=f"copy at {DEVICE}",
                    status="done",
                    uuid=txn,
                )
                batch.append(
                    {
                        "uuid": txn,
                        "kind": "charge",
                        "site_time": now,
                        "user_id": user_id,
                        "username": username,
                        "account_id": account_id,
                        "account_name": account_name,
                        "amount": -cost,
                        "reason": "copy",
                        "comment": "",
                        "offline": True,
                        "job": attrs.asdict(job),
                    }
                )
                amounts[txn] = cost
            store.write(thdRecordMany, batch, now)
    finally:
        store.stop()
    return amounts, time.perf_counter() - began


def check_ledger(
    primary_db: str, acked: dict[str, int], inserted: dict[str, int], sent: set[str]
) -> dict[str, Any]:
    """Every acknowledged charge and inserted record once in the primary's ledger."""
    rows = query(primary_db, "SELECT uuid, amount FROM transactions WHERE site = ?", SITE)
    times = Counter(u for u, _ in rows)
    amounts = dict(rows)
    expected = {**acked, **inserted}
    missing = [u for u in expected if u not in amounts]
    duplicated = [u for u, n in times.items() if n > 1]
    wrong = [u for u, cost in expected.items() if u in amounts and amounts[u] != -cost]
    unexpected = [u for u in amounts if u not in expected]
    # A charge that was recorded but whose answer never reached the client is applied,
    # correctly, but not acknowledged; anything else is a stranger.
    unanswered = [u for u in unexpected if u in sent]
    dead = query(primary_db, "SELECT count(*) FROM dead_letters WHERE site = ?", SITE)[0][0]
    errors = len(missing) + len(duplicated) + len(wrong) + (len(unexpected) - len(unanswered))
    return {
        "acknowledged": len(acked),
        "inserted": len(inserted),
        "ledger_rows": len(rows),
        "missing": len(missing),
        "duplicated": len(duplicated),
        "wrong_amount": len(wrong),
        "applied_but_unanswered": len(unanswered),
        "unexpected": len(unexpected) - len(unanswered),
        "dead_letters": dead,
        "sum_expected": -sum(expected.values()),
        "sum_ledger": sum(a for u, a in rows if u in expected),
        "errors": errors + dead,
        "examples": (missing + duplicated + wrong)[:5],
    }


# -- the phases -----------------------------------------------------------------------


@attrs.define
class Bench:
    """What a run holds: options, reactor, nodes, processes, client, results."""

    options: argparse.Namespace
    reactor: Any
    directory: str
    processes: Processes
    primary: Node | None = None
    site: Node | None = None
    proxy: ProxyProcess | None = None
    key: str = ""
    cards: list[str] = attrs.field(factory=list)

    def say(self, text: str) -> None:
        print(text, file=sys.stderr if self.options.json else sys.stdout, flush=True)

    async def proxy_command(self, command: str) -> float:
        """Send a command to the proxy; the wall time just before it was sent."""
        assert self.proxy is not None
        at = time.time()
        await deferToThread(self.proxy.command, command)
        return at

    def setup(self) -> None:
        """Configs, users, printer, device; start the proxy, the primary and the site."""
        o = self.options
        primary, replication_port, ca = make_primary(self.directory)
        self.primary = primary
        self.say(f"loading {o.users:,} users with a card each into the primary")
        load_primary(primary, o.users, 1)
        self.cards = [f"{i:010d}" for i in range(o.users)]
        self.proxy = self.processes.start_proxy(
            replication_port, os.path.join(self.directory, "proxy.log")
        )
        self.site = site = make_site(self.directory, SITE, primary, self.proxy.port, ca)
        for node in (primary, site):
            with open(node.config, "a", encoding="utf-8") as f:
                f.write(f"\n[replication]\nheartbeat = {o.heartbeat!r}\n")
                if o.max_backoff is not None:
                    f.write(f"max_backoff = {o.max_backoff!r}\n")
        admin(
            primary,
            *("printer", "add", PRINTER, "--site", SITE),
            *("--price-mono", "0.10", "--price-colour", "0.50"),
        )
        added = admin(
            primary,
            *("device", "add", DEVICE, "--site", SITE, "--connector", "http"),
            *("--printer", PRINTER),
        )
        self.key = added.strip().splitlines()[0].strip()

    async def start(self) -> tuple[Health, Health]:
        assert self.primary is not None and self.site is not None
        self.say("starting the primary and the site")
        hq = self.processes.start(self.primary)
        primary_health = Health(self.reactor, self.primary.web_port)
        await primary_health.wait(lambda h: True, "up", START_DEADLINE, 0.05, hq)
        process = self.processes.start(self.site)
        site_health = Health(self.reactor, self.site.web_port)
        await site_health.mode("online", ONLINE_DEADLINE, interval=0.05, process=process)
        return primary_health, site_health

    async def switch(self, load: Load, health: Health, fault: str) -> dict[str, Any]:
        """One fault under load: to offline, offline a while, healed, back online."""
        o = self.options
        command, undo = ("cut", "heal") if fault == "close" else ("stall", "unstall")
        process = self.processes.servers[SITE]
        await health.mode("online", ONLINE_DEADLINE, process=process)
        await deferLater(self.reactor, o.settle)
        faulted = await self.proxy_command(command)
        limit = max(30.0, 10 * o.heartbeat)
        seen, reply = await health.mode("offline", limit, process=process)
        recorded = transition_at(reply, "offline", faulted - 0.5)
        await deferLater(self.reactor, o.seconds)
        before = await health.get()
        backlog = None if before is None else before.get("outbox_pending")
        healed = await self.proxy_command(undo)
        online, reply = await health.mode("online", ONLINE_DEADLINE, process=process)
        reconnected = transition_at(reply, "reconciling", healed - 0.5)
        drained = transition_at(reply, "syncing", healed - 0.5)
        return {
            "fault": fault,
            "to_offline_s": round(seen - faulted, 3),
            "to_offline_recorded_s": None if recorded is None else round(recorded - faulted, 3),
            "switch": (faulted - WINDOW, seen + WINDOW),
            "offline": (seen, healed),
            "backlog": backlog,
            "heal_to_reconnected_s": None
            if reconnected is None
            else round(reconnected - healed, 3),
            "heal_to_drained_s": None if drained is None else round(drained - healed, 3),
            "heal_to_online_s": round(online - healed, 3),
            "reconnect": (healed - WINDOW, online + WINDOW),
        }

    async def drained(self, health: Health, deadline: float) -> None:
        """Wait for the site to be online with nothing left in its outbox."""

        def done(h: dict[str, Any]) -> bool:
            return h.get("mode") == "online" and h.get("outbox_pending") == 0

        await health.wait(done, "online and drained", deadline, 0.05)

    async def reconcile(self, health: Health) -> tuple[dict[str, Any], dict[str, int]]:
        """Cut, stop the site, fill its outbox, start it, heal, time the drain."""
        o = self.options
        assert self.site is not None and self.primary is not None
        await self.drained(health, ONLINE_DEADLINE)
        ((after_id,),) = query(
            self.primary.database, "SELECT coalesce(max(id), 0) FROM transactions"
        )
        await self.proxy_command("cut")
        await health.mode("offline", max(30.0, 10 * o.heartbeat))
        self.say("  link cut; stopping the site")
        await deferToThread(self.processes.stop, SITE)
        url = sitesrv_config.load(self.site.config).database
        self.say(f"  writing {o.records:,} charges into the site's outbox ({url})")
        inserted, fill_seconds = await deferToThread(fill_outbox, url, o.records)
        self.say(f"  written in {fill_seconds:.1f} s; starting the site again (still cut)")
        process = self.processes.start(self.site)
        await health.mode("offline", START_DEADLINE, interval=0.05, process=process)
        ((pending,),) = query(self.site.database, SITE_PENDING)
        await deferLater(self.reactor, o.seconds)
        self.say(f"  healing the link with {pending:,} records pending")
        watching = deferToThread(
            watch_reconcile,
            self.site.database,
            self.primary.database,
            after_id,
            o.records,
            DRAIN_DEADLINE,
        )
        healed = await self.proxy_command("heal")
        seen, progress = await watching
        online, reply = await health.mode("online", ONLINE_DEADLINE, interval=0.05)
        reconnected = transition_at(reply, "reconciling", healed - 0.5)
        drained_at = transition_at(reply, "syncing", healed - 0.5)
        done = max(seen.values())
        result: dict[str, Any] = {
            "records": o.records,
            "pending_at_heal": pending,
            "fill_seconds": round(fill_seconds, 1),
            "heal_to_reconnected_s": None
            if reconnected is None
            else round(reconnected - healed, 3),
            "heal_to_primary_all_s": round(seen["primary_all"] - healed, 3),
            "heal_to_site_drained_s": round(seen["site_drained"] - healed, 3),
            "heal_to_outbox_drained_recorded_s": None
            if drained_at is None
            else round(drained_at - healed, 3),
            "heal_to_online_s": round(online - healed, 3),
            "records_per_s": round(o.records / (done - healed), 1),
        }
        if reconnected is not None:
            result["reconnected_to_done_s"] = round(done - reconnected, 3)
            result["records_per_s_after_reconnect"] = round(o.records / (done - reconnected), 1)
        # How the primary's rate moved along the way: (seconds after the heal, rows/s).
        result["primary_rate_by_5s"] = per_interval(progress, healed, 5.0)
        return result, inserted


async def run(bench: Bench) -> dict[str, Any]:
    """Every phase; the results."""
    o = bench.options
    results: dict[str, Any] = {"machine": machine(), "options": vars(o).copy()}
    results["load_average_before"] = os.getloadavg()
    bench.setup()
    primary_health, health = await bench.start()
    assert bench.site is not None and bench.primary is not None
    load = Load(bench.reactor, bench.site.web_port, bench.key, bench.cards, o.rate)
    trials: list[dict[str, Any]] = []
    try:
        bench.say(f"client: {o.rate:g} requests/s ({o.rate / 2:g} login + charge cycles/s)")
        load.start()
        await deferLater(bench.reactor, o.seconds)
        for trial in range(1, o.trials + 1):
            for fault in ("close", "black-hole"):
                bench.say(f"trial {trial}: {fault}")
                t = await bench.switch(load, health, fault)
                t["trial"] = trial
                trials.append(t)
                bench.say(
                    f"  offline after {t['to_offline_s']} s (site recorded "
                    f"{t['to_offline_recorded_s']} s); backlog {t['backlog']}; online "
                    f"{t['heal_to_online_s']} s after the heal"
                )
        await deferLater(bench.reactor, o.settle)
    finally:
        await load.stop()
    span = load.ended - load.began
    results["client"] = {
        "target_rate": o.rate,
        "achieved_rate": round(len(load.outcomes) / span, 1) if span else None,
        "seconds": round(span, 1),
        "skipped_cycles": load.skipped,
        "charges_acknowledged": len(load.acked),
        "charges_acknowledged_offline": load.acked_offline,
        **tally(load.outcomes),
        **latency_ms(load.outcomes),
    }
    for t in trials:
        switch, offline, reconnect = t.pop("switch"), t.pop("offline"), t.pop("reconnect")
        during = load.between(*switch)
        t["failed_in_switch"] = sum(o.failed for o in during)
        t["switch_latency"] = latency_ms(during)
        t["offline_latency"] = latency_ms(load.between(*offline))
        after = load.between(*reconnect)
        t["failed_at_reconnect"] = sum(o.failed for o in after)
        t["reconnect_latency"] = latency_ms(after)
    results["trials"] = trials
    results["summary"] = {
        fault: {
            key: _spread([t[key] for t in trials if t["fault"] == fault])
            for key in (
                "to_offline_s",
                "to_offline_recorded_s",
                "heal_to_reconnected_s",
                "heal_to_online_s",
            )
        }
        for fault in ("close", "black-hole")
    }
    if o.trace:
        write_trace(o.trace, load.outcomes, load.began)
    bench.say(f"client: {results['client']}")

    inserted: dict[str, int] = {}
    if o.records:
        bench.say(f"reconcile: {o.records:,} offline records")
        results["reconcile"], inserted = await bench.reconcile(health)
        bench.say(f"  {results['reconcile']}")
    else:
        await bench.drained(health, ONLINE_DEADLINE)
    bench.say("checking the primary's ledger")
    results["ledger"] = check_ledger(bench.primary.database, load.acked, inserted, load.sent)
    await health.close()
    await primary_health.close()
    results["load_average_after"] = os.getloadavg()
    results["goals"] = judge(results, o.heartbeat)
    return results


def write_trace(path: str, outcomes: Sequence[Outcome], began: float) -> None:
    """Every request of the client as CSV: kind, start (s after the load began), ms, code."""
    with open(path, "w", encoding="utf-8") as f:
        f.write("kind,started_s,latency_ms,code,error\n")
        for o in outcomes:
            error = o.error.replace(",", ";").replace("\n", " ")[:200]
            f.write(
                f"{o.kind},{o.started - began:.4f},{1000 * (o.ended - o.started):.2f},"
                f"{'' if o.code is None else o.code},{error}\n"
            )


def _spread(values: Sequence[float | None]) -> dict[str, float | None]:
    known = [v for v in values if v is not None]
    if not known:
        return {"min": None, "median": None, "max": None}
    return {"min": min(known), "median": round(statistics.median(known), 3), "max": max(known)}


def judge(results: dict[str, Any], heartbeat: float) -> dict[str, Any]:
    """Each goal with the figure it is judged on (the worst trial) and the verdict."""
    g = goals(heartbeat)
    trials = results["trials"]

    def worst(fault: str) -> float | None:
        values = [t["to_offline_s"] for t in trials if t["fault"] == fault]
        return max(values) if values else None

    figures = {
        "failed_requests": results["client"]["failed"],
        "close_to_offline_s": worst("close"),
        "blackhole_to_offline_s": worst("black-hole"),
        "reconcile_records_per_s": results.get("reconcile", {}).get("records_per_s"),
        "ledger_errors": results["ledger"]["errors"],
    }
    return {
        name: {"goal": str(g[name]), "value": value, "met": g[name].met(value)}
        for name, value in figures.items()
    }


# -- the report -----------------------------------------------------------------------


def report(results: dict[str, Any]) -> str:
    """The results as a table."""
    m, c = results["machine"], results["client"]
    o = results["options"]
    lines = [
        f"machine: {m['cpus']} x {m['cpu']}, {m['ram']}, {m['os']}, "
        f"Python {m['python']}, SQLite {m['sqlite']}",
        "load average before / after: "
        + " / ".join(
            " ".join(f"{x:.2f}" for x in results[k])
            for k in ("load_average_before", "load_average_after")
        ),
        f"heartbeat {o['heartbeat']:g} s; {o['users']:,} users; client {c['target_rate']:g} "
        f"requests/s asked, {c['achieved_rate']} achieved over {c['seconds']} s",
        f"requests: {c['requests']:,}, ok {c['ok']:,}, refused on purpose {c['refused']}, "
        f"failed {c['failed']}; latency p50 {c['p50_ms']} ms, p99 {c['p99_ms']} ms, "
        f"max {c['max_ms']} ms; charges acknowledged {c['charges_acknowledged']:,} "
        f"({c['charges_acknowledged_offline']:,} offline); cycles skipped {c['skipped_cycles']}",
    ]
    for failure, n in c["failures"]:
        lines.append(f"  failed x{n}: {failure}")
    lines += [
        "",
        f"{'fault':<11} {'trial':>5} {'to offline':>11} {'(recorded)':>11} {'failed':>7} "
        f"{'p99 ms':>7} {'off p99':>8} {'backlog':>8} {'reconnect':>10} {'drained':>9} "
        f"{'online':>8} {'failed':>7} {'p99 ms':>7}",
    ]
    for t in results["trials"]:
        lines.append(
            f"{t['fault']:<11} {t['trial']:>5} {t['to_offline_s']:>10.3f}s "
            f"{_s(t['to_offline_recorded_s']):>11} {t['failed_in_switch']:>7} "
            f"{_n(t['switch_latency']['p99_ms']):>7} {_n(t['offline_latency']['p99_ms']):>8} "
            f"{_n(t['backlog']):>8} {_s(t['heal_to_reconnected_s']):>10} "
            f"{_s(t['heal_to_drained_s']):>9} {t['heal_to_online_s']:>7.3f}s "
            f"{t['failed_at_reconnect']:>7} {_n(t['reconnect_latency']['p99_ms']):>7}"
        )
    lines.append(
        "  to offline: from the fault to /health showing it, and to the transition the site "
        "recorded; failed, p99: requests around the switch (and, after the heal, around the "
        "reconnect); off p99: while offline; backlog: outbox pending at the heal; reconnect "
        "(offline -> reconciling), drained (reconciling -> syncing), online: from the heal"
    )
    for fault, figures in results["summary"].items():
        lines.append(
            f"  {fault}: "
            + "; ".join(
                f"{key} min {_n(v['min'])} median {_n(v['median'])} max {_n(v['max'])}"
                for key, v in figures.items()
            )
        )
    r = results.get("reconcile")
    if r:
        lines += [
            "",
            f"reconcile {r['records']:,} offline records ({r['pending_at_heal']:,} pending at "
            f"the heal): reconnected {_s(r['heal_to_reconnected_s'])}, outbox applied "
            f"(site recorded) {_s(r['heal_to_outbox_drained_recorded_s'])}, primary holds all "
            f"{r['heal_to_primary_all_s']:.3f}s, site outbox drained "
            f"{r['heal_to_site_drained_s']:.3f}s, online {r['heal_to_online_s']:.3f}s "
            "after the heal",
            f"  {r['records_per_s']:,.0f} records/s from the heal"
            + (
                f"; {r['records_per_s_after_reconnect']:,.0f} records/s from the reconnection "
                f"({r['reconnected_to_done_s']:.3f} s)"
                if "records_per_s_after_reconnect" in r
                else ""
            ),
            "  primary's rate by 5 s after the heal (records/s): "
            + ", ".join(f"{rate:,.0f}" for _at, rate in r["primary_rate_by_5s"]),
        ]
    v = results["ledger"]
    lines += [
        "",
        f"ledger at the primary: {v['ledger_rows']:,} rows for {SITE}; "
        f"{v['acknowledged']:,} acknowledged + {v['inserted']:,} inserted expected; "
        f"missing {v['missing']}, duplicated {v['duplicated']}, wrong amount "
        f"{v['wrong_amount']}, unexpected {v['unexpected']}, applied but unanswered "
        f"{v['applied_but_unanswered']}, dead letters {v['dead_letters']}; sum "
        f"{v['sum_ledger']} (expected {v['sum_expected']})",
        "",
    ]
    for name, goal in results["goals"].items():
        verdict = {True: "met", False: "MISSED", None: "not measured"}[goal["met"]]
        lines.append(f"goal {name} {goal['goal']}: {goal['value']} -> {verdict}")
    return "\n".join(lines)


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}s"


def _n(value: Any) -> str:
    return "-" if value is None else str(value)


# -- the command line -----------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(
        prog="python -m bench.failover",
        description="Benchmark a site's failover, reconnection and reconciliation under load.",
    )
    p.add_argument("--rate", type=float, default=200.0, help="client requests a second")
    p.add_argument(
        "--seconds", type=float, default=10.0, help="load before the faults; each outage"
    )
    p.add_argument("--records", type=int, default=100_000, help="offline records to reconcile")
    p.add_argument("--heartbeat", type=float, default=1.0, help="[replication] heartbeat, s")
    p.add_argument(
        "--max-backoff",
        type=float,
        default=None,
        help="[replication] max_backoff, s (the site's longest wait between reconnection "
        "attempts; default: the server's, 5 s)",
    )
    p.add_argument("--trials", type=int, default=3, help="cuts and black-holes, each")
    p.add_argument("--settle", type=float, default=2.0, help="seconds online before a fault")
    p.add_argument("--users", type=int, default=1_000, help="users (one card each)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    p.add_argument("--trace", metavar="CSV", help="write every request of the client to CSV")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    options = p.parse_args(argv)
    if options.rate <= 0 or options.seconds <= 0 or options.heartbeat <= 0:
        p.error("--rate, --seconds and --heartbeat must be above 0")
    if options.max_backoff is not None and options.max_backoff <= 0:
        p.error("--max-backoff must be above 0")
    if options.records < 0 or options.trials < 1 or options.users < 1 or options.settle < 0:
        p.error("--records 0 or more, --trials and --users 1 or more, --settle 0 or more")
    return options


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; 0 when it ran (goals met or not), 1 when something failed."""
    options = parse_args(sys.argv[1:] if argv is None else argv)
    # Agent's own response transport lacks abortConnection; nothing to act on here.
    warnings.filterwarnings("ignore", "Using readBody with a transport", DeprecationWarning)
    directory = tempfile.mkdtemp(prefix="sitesrv-bench-failover-")
    processes = Processes()
    results: list[dict[str, Any]] = []
    errors: list[str] = []

    async def body(reactor: Any) -> None:
        bench = Bench(options, reactor, directory, processes)
        bench.say(f"working in {directory}")
        try:
            results.append(await run(bench))
        except BenchError as e:
            errors.append(str(e))
        finally:
            # The twistd children and the proxy, whatever happened.
            await deferToThread(processes.close)

    try:
        task.react(lambda reactor: Deferred.fromCoroutine(body(reactor)))
    except SystemExit:
        pass
    finally:
        processes.close()
        if options.keep:
            print(f"kept {directory}", file=sys.stderr)
        else:
            shutil.rmtree(directory, ignore_errors=True)
    if errors or not results:
        print(f"benchmark failed: {errors[0] if errors else 'see above'}", file=sys.stderr)
        return 1
    out = results[0]
    if options.json:
        print(json.dumps(out, indent=2))
    else:
        print(report(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
