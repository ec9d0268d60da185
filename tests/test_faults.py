"""Faults end to end: nothing a site acknowledged is lost or charged twice.

A primary and its sites run as real ``twistd`` processes on loopback; each site reaches
its primary through a `FaultProxy` in this process, which cuts, black-holes, delays and
throttles the replication link (TLS runs end to end through it). An MFD is played by
`Device`, which uses the site's JSON device API as real embedded software would: every
usage record carries a fresh UUID, and a record that got no answer is sent again with
the same UUID until it gets one.

Every scenario ends with the same check (`FaultTestCase.converge`): the primary's ledger
holds each charge a site acknowledged (201) exactly once, on the right account, with its
job log; no charge that got another answer is there; and each balance equals its opening
balance less the acknowledged charges. Every answer a device got also showed the balance
as the site saw it then, which must count every earlier charge exactly once (the site
view = replicated balance + its own records above ``applied_seq``).

Scenarios: a partition by close and by black-hole during steady charging; ``kill -9`` of
the primary and of the site while the site drains a backlog; a flapping link; a site
restarted during an outage; the primary restored from an older backup (with charges
while the site re-snapshots); a user removed at the primary while a site charged them
offline; two sites charging one user offline; a backlog over a slow, throttled link.
Clock jumps cannot be made for real processes, so they are covered in-process with a
``task.Clock`` and an injected monotonic clock (`LivenessClockTests`).
"""

from __future__ import annotations

import itertools
import json
import os
import random
import shutil
import sqlite3
import time
import uuid as uuidlib
from collections import Counter
from collections.abc import Iterable
from io import BytesIO
from typing import Any

import attrs
from twisted.internet import defer, error
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase
from twisted.web import _newclient
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers

from sitesrv.replication.liveness import MISSED_BEATS, LivenessAMP
from sitesrv.testing.faultproxy import FaultProxy
from tests.processes import (
    CLEAN_EXITS,
    Health,
    Node,
    ProcessTestCase,
    ServerProcess,
    WaitTimeout,
    admin,
    admin_sync,
    connect_readonly,
    enrol,
    free_port,
    reactor,
    scalar,
    sleep,
    tls_init,
    wait_for,
    wait_for_health,
    wait_for_log,
    wait_for_mode,
    write_primary_config,
    write_site_config,
)

log = Logger()

#: Heartbeat interval of every server here: a black-holed link is noticed in ~1 s.
HEARTBEAT = 0.3
#: The sites' longest reconnection delay.
MAX_BACKOFF = 0.5
#: How long a device keeps resending one usage record that gets no answer.
RESEND_DEADLINE = 20.0
#: One HTTP request's bound.
REQUEST_TIMEOUT = 5.0
#: How long the primary's ledger and the site may take to converge after a fault.
CONVERGE_DEADLINE = 30.0
#: A mono copy page costs this at every site's printer (minor units).
PAGE_PRICE = 10
#: The most charges one steady stream makes, whatever happens.
MAX_STEADY = 2_000
#: Charges recorded offline before the link comes back, to give the site a backlog.
BACKLOG = 300

# -- what the devices were told ---------------------------------------------------------


@attrs.frozen
class Ack:
    """A charge a site acknowledged (201)."""

    uuid: str
    site: str
    account: str
    cost: int
    offline: bool
    balance: int


@attrs.define
class Charges:
    """Every answer the devices of one test got, for the final checks."""

    acked: dict[str, Ack] = attrs.Factory(dict)
    #: uuid -> (status, error) of charges answered with anything but 201.
    refused: dict[str, tuple[int, str]] = attrs.Factory(dict)
    #: Refusals nobody asked for (a failure): "uuid status error".
    unexpected: list[str] = attrs.Factory(list)
    #: Charges that got no answer at all within RESEND_DEADLINE.
    unanswered: list[str] = attrs.Factory(list)
    #: Answers whose balance did not count every earlier charge exactly once.
    miscounted: list[str] = attrs.Factory(list)
    #: How many usage records had to be sent more than once.
    resent: int = 0

    def cost(self, account: str, uuids: Iterable[str] | None = None) -> int:
        """The sum of acknowledged charges to ``account`` (of ``uuids``, if given)."""
        chosen = self.acked.values() if uuids is None else (self.acked[u] for u in uuids)
        return sum(a.cost for a in chosen if a.account == account)

    def summary(self) -> str:
        """One line for the log."""
        offline = sum(a.offline for a in self.acked.values())
        return (
            f"{len(self.acked)} acknowledged ({offline} offline), {len(self.refused)} refused "
            f"({len(self.unexpected)} unexpectedly), {len(self.unanswered)} unanswered, "
            f"{self.resent} resent"
        )


#: Errors of a request that may never have reached the site, or whose answer was lost.
NO_ANSWER = (
    error.ConnectError,
    error.ConnectionLost,
    error.ConnectionDone,
    error.TimeoutError,
    defer.TimeoutError,
    defer.CancelledError,
    _newclient.ResponseNeverReceived,
    _newclient.ResponseFailed,
    _newclient.RequestTransmissionFailed,
)


class Device:
    """An MFD using one site's device API for one user's card.

    It resends a usage record with the same UUID until it gets an answer (and logs in
    again when the site forgot its session in a restart), as the API asks devices to.
    With ``balance`` it also checks that every answer's balance is that opening balance
    less every charge acknowledged so far: only right when nothing else charges the
    user at this site and nobody changes the balance at the primary meanwhile.
    """

    def __init__(
        self,
        site: Node,
        key: str,
        card: str,
        charges: Charges,
        balance: int | None = None,
    ) -> None:
        self.site = site
        self.key = key
        self.card = card
        self.charges = charges
        self.expected_balance = balance
        self.session: str | None = None
        self.username = ""
        self.agent = Agent(
            reactor, pool=HTTPConnectionPool(reactor, persistent=False), connectTimeout=2
        )

    async def request(self, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """POST ``body`` to ``/api/v1/PATH``; (status, JSON answer)."""
        url = f"http://127.0.0.1:{self.site.web_port}/api/v1/{path}".encode()
        headers = Headers(
            {
                b"authorization": [f"Bearer {self.key}".encode()],
                b"content-type": [b"application/json"],
            }
        )
        producer = FileBodyProducer(BytesIO(json.dumps(body).encode()))
        d = self.agent.request(b"POST", url, headers, producer)
        d.addTimeout(REQUEST_TIMEOUT, reactor)
        response = await d
        answer = readBody(response)
        answer.addTimeout(REQUEST_TIMEOUT, reactor)
        data = json.loads(await answer)
        return response.code, data

    async def login(self, deadline: float = RESEND_DEADLINE) -> dict[str, Any]:
        """Start a session by card, trying until the site answers 201."""
        end = time.monotonic() + deadline
        last: Any = None
        while time.monotonic() < end:
            try:
                code, data = await self.request("sessions", {"card": self.card})
            except NO_ANSWER as e:
                last = e
            else:
                if code == 201:
                    self.session = data["session"]
                    self.username = data["user"]["username"]
                    return data
                last = (code, data)
            await sleep(0.1)
        raise AssertionError(f"{self.site.name}: no session for card {self.card}: {last!r}")

    async def charge(self, pages: int = 1, expect: Iterable[int] = ()) -> int | None:
        """Record a copy of ``pages`` mono pages; the final status (None: no answer).

        Statuses in ``expect`` are deliberate refusals; any other but 201 is a failure
        the final checks report.
        """
        if self.session is None:
            await self.login()
        txn = str(uuidlib.uuid4())
        body = {"kind": "copy", "pages": pages, "uuid": txn}
        end = time.monotonic() + RESEND_DEADLINE
        attempts = 0
        while True:
            attempts += 1
            try:
                code, data = await self.request(f"sessions/{self.session}/usage", body)
            except NO_ANSWER:
                if time.monotonic() >= end:
                    self.charges.unanswered.append(txn)
                    return None
                await sleep(0.1)
                continue
            if code == 404 and "no such session" in data.get("error", ""):
                # The site restarted and forgot its sessions: log in and resend.
                await self.login(max(1.0, end - time.monotonic()))
                continue
            break
        if attempts > 1:
            self.charges.resent += 1
        if code != 201:
            self.charges.refused[txn] = (code, data.get("error", ""))
            if code not in set(expect):
                self.charges.unexpected.append(f"{txn} {code} {data.get('error')!r}")
            return code
        assert data["uuid"] == txn and data["charged_minor"] == pages * PAGE_PRICE, data
        ack = Ack(
            uuid=txn,
            site=self.site.name,
            account=data["account"],
            cost=data["charged_minor"],
            offline=data["offline"],
            balance=data["balance_minor"],
        )
        self.charges.acked[txn] = ack
        if self.expected_balance is not None:
            self.expected_balance -= ack.cost
            if ack.balance != self.expected_balance:
                self.charges.miscounted.append(
                    f"{txn}: balance {ack.balance}, expected {self.expected_balance}"
                    f" (offline {ack.offline})"
                )
                # Follow the site, so that one miscount is reported once.
                self.expected_balance = ack.balance
        return code

    async def charge_many(self, count: int, pages: int = 1) -> list[int | None]:
        """``count`` charges one after the other, as fast as the site answers."""
        return [await self.charge(pages) for _ in range(count)]


class Steady:
    """A device charging one page every ``interval`` seconds until stopped."""

    def __init__(self, device: Device, interval: float = 0.02, limit: int = MAX_STEADY):
        self.device = device
        self.interval = interval
        self.limit = limit
        self.count = 0
        self._running = True
        self._done: Deferred[None] = ensureDeferred(self._run())

    async def _run(self) -> None:
        while self._running and self.count < self.limit:
            started = time.monotonic()
            await self.device.charge()
            self.count += 1
            await sleep(max(0.0, self.interval - (time.monotonic() - started)))

    async def stop(self) -> int:
        """Stop after the charge in flight; return how many were made."""
        self._running = False
        await self._done
        return self.count


# -- the servers, the link and the ledger -------------------------------------------------


@attrs.define
class SiteRig:
    """A running site, its proxied link to the primary and its MFD's API key."""

    node: Node
    server: ServerProcess
    proxy: FaultProxy
    key: str


@attrs.define
class Rig:
    """A running primary and its sites."""

    primary: Node
    server: ServerProcess
    sites: dict[str, SiteRig]
    #: Every account's balance at the primary before any charge.
    opening: dict[str, int]

    @property
    def site(self) -> SiteRig:
        """The first site."""
        return next(iter(self.sites.values()))


#: (username, card, opening balance, more `user add` arguments) of the default users.
USERS = (("alice", "1001", "1000", ()),)
#: Two users: one for a backlog, one charging steadily meanwhile.
TWO_USERS = (("alice", "1001", "1000", ()), ("bob", "1002", "1000", ()))


class FaultTestCase(ProcessTestCase):
    """Starts a primary and sites behind fault proxies, and checks the ledger after."""

    timeout = 120

    def setUp(self) -> None:
        super().setUp()
        self.charges = Charges()

    async def rig(
        self,
        sites: Iterable[str] = ("north",),
        users: Iterable[tuple[str, str, str, Iterable[str]]] = USERS,
        policies: Iterable[tuple[str, str]] = (),
    ) -> Rig:
        """Set up and start a primary and ``sites``, each online through its own proxy."""
        # Every port a server or proxy binds is out of the way of outgoing connections.
        primary = write_primary_config(self.directory, "hq", heartbeat=HEARTBEAT)
        tls_init(primary)
        assert primary.replication_port is not None
        for name, card, balance, more in users:
            admin_sync(primary, "user", "add", name, "--balance", balance, *more)
            admin_sync(primary, "card", "add", name, card)
        for key, value in policies:
            admin_sync(primary, "policy", "set", key, value)
        prepared = []
        for name in sites:
            proxy = FaultProxy("127.0.0.1", primary.replication_port, reactor=reactor)
            proxy.listen(free_port())
            self.addCleanup(proxy.stop)
            # The site's endpoint is the proxy; TLS still checks the primary's certificate.
            via_proxy = attrs.evolve(primary, replication_port=proxy.port)
            node = write_site_config(
                self.directory, name, via_proxy, heartbeat=HEARTBEAT, max_backoff=MAX_BACKOFF
            )
            enrol(primary, node)
            printer = f"{name}-copier"
            admin_sync(
                primary,
                *("printer", "add", printer, "--site", name),
                *("--price-mono", "0.10", "--price-colour", "0.50"),
            )
            device = ("device", "add", f"{name}-mfd", "--site", name, "--connector", "http")
            key = admin_sync(primary, "--json", *device, "--printer", printer).json()["key"]
            prepared.append((node, proxy, key))
        opening = dict(_rows(primary.database, "SELECT name, balance FROM accounts"))
        server = await self.start_primary(primary)
        rigs = {}
        for node, proxy, key in prepared:
            rigs[node.name] = SiteRig(node, self.start(node), proxy, key)
        for site in rigs.values():
            await wait_for_mode(site.server, "online")
        return Rig(primary, server, rigs, opening)

    def device(
        self, rig: Rig, card: str = "1001", site: str | None = None, check_balance: bool = True
    ) -> Device:
        """An MFD at ``site`` (default: the first) for the user with ``card``."""
        s = rig.sites[site] if site else rig.site
        username = scalar(
            rig.primary.database,
            "SELECT u.username FROM users u JOIN cards c ON c.user_id = u.id WHERE c.number = ?",
            card,
        )
        balance = rig.opening[username] if check_balance else None
        return Device(s.node, s.key, card, self.charges, balance)

    async def converge(
        self, rig: Rig, removed: Iterable[str] = (), deadline: float = CONVERGE_DEADLINE
    ) -> None:
        """Wait until the primary's ledger has every acknowledged charge; check it all.

        ``removed`` are accounts deleted at the primary during the test (their balances
        cannot be checked).
        """
        charges = self.charges
        log.info("faults: {test}: {summary}", test=self.id(), summary=charges.summary())
        self.assertEqual(charges.unanswered, [], "charges that never got an answer")
        self.assertEqual(charges.unexpected, [], "charges refused though they should not be")
        wanted = set(charges.acked)

        def missing() -> set[str]:
            return wanted - {
                u for (u,) in _rows(rig.primary.database, "SELECT uuid FROM transactions")
            }

        try:
            await wait_for(lambda: not missing(), "the primary's ledger", deadline)
        except WaitTimeout:
            lost = sorted(missing(), key=list(charges.acked).index)
            self.fail(
                f"{len(lost)} of {len(wanted)} acknowledged charges not in the primary's "
                f"ledger within {deadline:g} s; the first: {lost[:3]}"
            )
        for site in rig.sites.values():
            await wait_for_health(
                site.server,
                lambda h: h.mode == "online" and h.body.get("outbox_pending") == 0,
                "online with nothing left in the outbox",
                deadline,
            )
        self.assertLedger(rig, removed)

    def assertLedger(self, rig: Rig, removed: Iterable[str] = ()) -> None:
        """Exactly once, on the right account, with the job; refused ones absent; balances."""
        charges = self.charges
        db = rig.primary.database
        rows = _rows(db, "SELECT uuid, amount, account_name, site, job_uuid FROM transactions")
        counts = Counter(r[0] for r in rows)
        self.assertEqual([u for u, n in counts.items() if n > 1], [], "charged twice")
        found = {r[0]: r for r in rows}
        self.assertEqual(sorted(set(charges.acked) - set(found)), [], "acknowledged, not applied")
        self.assertEqual(sorted(set(charges.refused) & set(found)), [], "refused, yet applied")
        wrong = [
            (found[u], ack)
            for u, ack in charges.acked.items()
            if found[u][1:] != (-ack.cost, ack.account, ack.site, u)
        ]
        self.assertEqual(wrong, [], "applied with the wrong amount, account, site or job")
        jobs = {u for (u,) in _rows(db, "SELECT uuid FROM jobs")}
        self.assertEqual(sorted(set(charges.acked) - jobs), [], "charges without their job log")
        self.assertEqual(sorted(set(charges.refused) & jobs), [], "job logs of refused charges")
        balances = dict(_rows(db, "SELECT name, balance FROM accounts"))
        gone = set(removed)
        for account in {a.account for a in charges.acked.values()} - gone:
            self.assertEqual(
                balances[account],
                rig.opening.get(account, 0) - charges.cost(account),
                f"balance of {account!r}: opening less the acknowledged charges",
            )
            # Each entry's balance follows from the one before, and the last is the balance.
            entries = _rows(
                db,
                "SELECT t.uuid, t.amount, t.balance_after FROM transactions t"
                " JOIN accounts a ON a.id = t.account_id WHERE a.name = ? ORDER BY t.id",
                account,
            )
            broken = [
                (after[0], before[2], after[1], after[2])
                for before, after in itertools.pairwise(entries)
                if before[2] + after[1] != after[2]
            ]
            self.assertEqual(broken, [], f"{account!r}: (uuid, previous, amount, after)")
            self.assertEqual(entries[-1][2], balances[account], f"{account!r}: last entry")
        self.assertEqual(charges.miscounted, [], "balances shown by the site, counted wrong")
        self.assertEqual(_rows(db, "SELECT site, uuid, error FROM dead_letters"), [])

    async def offline(self, site: SiteRig) -> float:
        """Wait until the site reports offline; how long that took."""
        started = time.monotonic()
        health = await wait_for_mode(site.server, "offline")
        self.assertEqual(health.code, 200)
        return time.monotonic() - started

    async def backlog(self, site: SiteRig, device: Device, count: int = BACKLOG) -> list[str]:
        """Cut the site's link and charge ``count`` times offline; their uuids."""
        await site.proxy.cut()
        await self.offline(site)
        before = set(self.charges.acked)
        started = time.monotonic()
        await device.charge_many(count)
        made = [u for u in self.charges.acked if u not in before]
        log.info(
            "faults: {n} offline charges in {t:.1f} s", n=len(made), t=time.monotonic() - started
        )
        self.assertEqual(len(made), count)
        self.assertTrue(all(self.charges.acked[u].offline for u in made))
        return made

    async def first_applied(self, rig: Rig, uuids: Iterable[str]) -> int:
        """Wait until the primary has committed some of ``uuids``; how many it has."""
        wanted = set(uuids)

        def applied() -> int:
            rows = _rows(rig.primary.database, "SELECT uuid FROM transactions")
            return len(wanted & {u for (u,) in rows})

        result: int = await wait_for(applied, "the backlog reaching the primary", interval=0.005)
        return result


def _rows(path: str, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    conn = connect_readonly(path)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


class PartitionTests(FaultTestCase):
    """The link fails while a device charges steadily; no charge fails or is lost."""

    async def test_cut_during_steady_charging(self) -> None:
        """Closed link (the proxy closes and refuses): charging goes on offline; heal."""
        rig = await self.rig()
        site = rig.site
        steady = Steady(self.device(rig))
        await sleep(1.5)
        await site.proxy.cut()
        took = await self.offline(site)
        await sleep(2.0)
        await site.proxy.heal()
        await wait_for_mode(site.server, "online")
        await sleep(1.0)
        count = await steady.stop()
        log.info(
            "faults: cut: offline {took:.2f} s after the cut; {n} charges", took=took, n=count
        )
        offline = [a for a in self.charges.acked.values() if a.offline]
        self.assertTrue(offline, "no charge was made while offline")
        self.assertLess(len(offline), len(self.charges.acked), "no charge was made online")
        await self.converge(rig)

    async def test_black_hole_during_steady_charging(self) -> None:
        """Stalled link (nothing passes, nothing closes): offline within ~3 heartbeats."""
        rig = await self.rig()
        site = rig.site
        steady = Steady(self.device(rig))
        await sleep(1.5)
        site.proxy.stall()
        took = await self.offline(site)
        # Three silent intervals, plus up to one more until the check runs, plus polling.
        self.assertLess(took, (MISSED_BEATS + 1) * HEARTBEAT + 1.0)
        health = await site.server.health()
        self.assertEqual(health.body["transitions"][0]["input"], "heartbeatMissed", health.body)
        before = steady.count
        await sleep(2.0)
        self.assertGreater(steady.count, before + 10, "charging stalled with the link")
        site.proxy.unstall()
        await wait_for_mode(site.server, "online")
        await sleep(1.0)
        count = await steady.stop()
        log.info(
            "faults: stall: offline {took:.2f} s after the stall; {n} charges", took=took, n=count
        )
        self.assertTrue(any(a.offline for a in self.charges.acked.values()))
        await self.converge(rig)


class CrashTests(FaultTestCase):
    """``kill -9`` of either server while the site drains a backlog loses nothing."""

    async def test_kill_primary_while_draining(self) -> None:
        """The primary dies after committing part of the backlog, its answer lost."""
        rig = await self.rig(users=TWO_USERS)
        site = rig.site
        uuids = await self.backlog(site, self.device(rig, "1001"))
        steady = Steady(self.device(rig, "1002"))
        # Slow the link so the primary's answer is still on its way when it dies.
        site.proxy.delay(0.2)
        await site.proxy.heal()
        committed = await self.first_applied(rig, uuids)
        site.proxy.reset()  # the answer in flight is lost with the primary
        rig.server.kill()
        log.info(
            "faults: primary killed with {n} of {total} backlog charges committed",
            n=committed,
            total=len(uuids),
        )
        await self.offline(site)
        site.proxy.delay(0)
        await sleep(1.0)
        rig.server.start()
        await wait_for_mode(site.server, "online")
        await sleep(0.5)
        await steady.stop()
        await self.converge(rig)

    async def test_kill_site_while_draining(self) -> None:
        """The site dies after the primary committed part of its backlog: it resubmits."""
        rig = await self.rig(users=TWO_USERS)
        site = rig.site
        uuids = await self.backlog(site, self.device(rig, "1001"))
        steady = Steady(self.device(rig, "1002"))
        site.proxy.delay(0.2)
        await site.proxy.heal()
        committed = await self.first_applied(rig, uuids)
        site.server.kill()
        db = site.node.database
        known = scalar(db, "SELECT applied_seq FROM sites")
        last = scalar(db, "SELECT max(seq) FROM outbox WHERE uuid IN (?, ?)", uuids[0], uuids[-1])
        log.info(
            "faults: site killed with {n} of {total} backlog charges committed; it knew of "
            "records up to {known} applied, the backlog ends at {last}",
            n=committed,
            total=len(uuids),
            known=known,
            last=last,
        )
        # Otherwise this would not test a resubmission.
        self.assertLess(known, last, "the site learnt its backlog was applied before it died")
        site.proxy.delay(0)
        await sleep(0.5)
        site.server.start()
        health = await wait_for_mode(site.server, "online")
        self.assertEqual(health.body["transitions"][-1]["input"], "replicaFound")
        await sleep(0.5)
        await steady.stop()
        await self.converge(rig)


class FlappingTests(FaultTestCase):
    """A link that keeps dropping and coming back, under steady charging."""

    #: How long the link flaps, seconds.
    DURATION = 15.0

    async def test_flapping_link(self) -> None:
        """Cut and heal every 0.5-2 s (seeded) for 15 s; every charge lands once."""
        seed = int(os.environ.get("SITESRV_FLAP_SEED", "20251125"))
        rng = random.Random(seed)
        rig = await self.rig()
        site = rig.site
        steady = Steady(self.device(rig))
        end = time.monotonic() + self.DURATION
        flips = 0
        while time.monotonic() < end:
            await sleep(rng.uniform(0.5, 2.0))
            if site.proxy.isCut:
                await site.proxy.heal()
            else:
                await site.proxy.cut()
            flips += 1
        await site.proxy.heal()
        await wait_for_mode(site.server, "online")
        await sleep(0.5)
        count = await steady.stop()
        health = await site.server.health()
        log.info(
            "faults: flapping (seed {seed}): {flips} cuts and heals, {conns} connections, "
            "{n} charges",
            seed=seed,
            flips=flips,
            conns=site.proxy.stats().connections,
            n=count,
        )
        self.assertGreaterEqual(flips, 8)
        self.assertGreater(len(health.body["transitions"]), 4, "the site never noticed")
        await self.converge(rig)


class OutageRestartTests(FaultTestCase):
    """A site restarted while the primary is unreachable serves from its replica."""

    async def test_site_restarted_during_outage(self) -> None:
        """Login and charging work at once after the restart, offline; then converge."""
        rig = await self.rig()
        site = rig.site
        device = self.device(rig)
        await device.charge_many(10)
        await site.proxy.cut()
        await self.offline(site)
        await device.charge_many(10)
        self.assertIn(site.server.stop(), CLEAN_EXITS)
        site.server.start()
        health = await wait_for_health(site.server, lambda h: h.code is not None, "/health")
        self.assertEqual((health.code, health.mode), (200, "offline"), health.body)
        session = await device.login()
        self.assertTrue(session["offline"])
        self.assertEqual(session["balance_minor"], device.expected_balance)
        await device.charge_many(10)
        self.assertTrue(all(a.offline for a in list(self.charges.acked.values())[10:]))
        self.assertEqual((await site.server.health()).mode, "offline", "the link is still cut")
        await site.proxy.heal()
        await wait_for_mode(site.server, "online")
        await device.charge_many(10)
        await self.converge(rig)


class RestoreTests(FaultTestCase):
    """The primary restored from an older backup gets every charge back, once."""

    async def test_primary_restored_from_backup(self) -> None:
        """Backup, more charges, restore, ``db restored``: the site resubmits what it kept.

        Charges keep coming while the site loads the restored primary's snapshot: they
        must not be submitted against the old replica's ``applied_seq``, which is ahead
        of the restored primary's (it would skip the records the primary lost).
        """
        rig = await self.rig()
        site = rig.site
        device = self.device(rig)
        db = rig.primary.database
        await device.charge_many(20)
        await self.first_applied(rig, list(self.charges.acked)[-1:])
        backup = os.path.join(self.directory, "hq-backup.db")
        source, target = connect_readonly(db), sqlite3.connect(backup)
        try:
            source.backup(target)  # a consistent copy of the running primary's database
        finally:
            source.close()
            target.close()
        in_backup = {u for (u,) in _rows(backup, "SELECT uuid FROM transactions")}
        self.assertLessEqual(set(self.charges.acked), in_backup)

        await device.charge_many(20)
        await self.first_applied(rig, list(self.charges.acked)[-1:])
        self.assertIn(rig.server.stop(), CLEAN_EXITS)
        await self.offline(site)
        await device.charge_many(10)  # recorded while the primary is down

        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(db + suffix):
                os.remove(db + suffix)
        shutil.copyfile(backup, db)
        lost = set(self.charges.acked) - {u for (u,) in _rows(db, "SELECT uuid FROM transactions")}
        self.assertEqual(len(lost), 30, "the restored primary lacks the newer charges")
        await admin(rig.primary, "db", "restored")
        # The device keeps charging while the site loads the restored primary's snapshot
        # (slowed down by the link, so that it takes a while).
        steady = Steady(device)
        site.proxy.delay(0.1)
        rig.server.start()
        await wait_for_log(site.server, "loading a snapshot from the primary: .* new epoch")
        during = steady.count
        await wait_for_log(site.server, "snapshot at position .* loaded", count=2)
        during = steady.count - during
        site.proxy.delay(0)
        await wait_for_mode(site.server, "online")
        await sleep(0.5)
        count = await steady.stop()
        log.info(
            "faults: restore: {n} charges after the restart, {during} while re-snapshotting",
            n=count,
            during=during,
        )
        self.assertGreater(during, 0, "no charge was made during the re-snapshot")
        await self.converge(rig)


class SuspenseTests(FaultTestCase):
    """A user removed at the primary while a site charged them offline."""

    async def test_removed_user_charged_offline(self) -> None:
        """Their offline charges go to Suspense; the outbox drains on past them."""
        rig = await self.rig(users=TWO_USERS)
        site = rig.site
        alice, bob = self.device(rig, "1001"), self.device(rig, "1002")
        await alice.charge_many(3)
        await bob.charge_many(3)
        # Drained before the cut: these stay on bob's account (removed with him).
        await self.first_applied(rig, list(self.charges.acked)[-1:])
        await site.proxy.cut()
        await self.offline(site)
        await admin(rig.primary, "user", "remove", "bob")
        before = set(self.charges.acked)
        await bob.charge_many(5)
        suspended = [u for u in self.charges.acked if u not in before]
        await alice.charge_many(5)
        await site.proxy.heal()
        await wait_for_mode(site.server, "online")
        await alice.charge_many(5)
        # Once the removal has reached the site, bob's open session can charge no more.
        await wait_for(
            lambda: not scalar(site.node.database, "SELECT 1 FROM users WHERE username = 'bob'"),
            "bob's removal replicated to the site",
        )
        self.assertEqual(await bob.charge(expect=[403]), 403)
        # What the primary must do with bob's offline charges: book them to Suspense.
        for u in suspended:
            self.charges.acked[u] = attrs.evolve(self.charges.acked[u], account="Suspense")
        await self.converge(rig, removed=["bob"])
        report = (await admin(rig.primary, "--json", "report", "suspense")).json()
        self.assertEqual(sorted(r["uuid"] for r in report), sorted(suspended))
        self.assertTrue(all("bob" in r["comment"] for r in report), report)
        dead = (await admin(rig.primary, "--json", "report", "dead-letter")).json()
        self.assertEqual(dead, [])


class TwoSitesTests(FaultTestCase):
    """Two sites offline charge the same user, each within its offline allowance."""

    async def test_two_sites_overdraw_one_user(self) -> None:
        """Both sites' charges apply; those past the limit are in the overdraft report."""
        rig = await self.rig(
            sites=("north", "south"),
            users=[("carol", "1003", "1", ())],
            policies=[("offline.allowance", "2")],
        )
        devices = [self.device(rig, "1003", name) for name in rig.sites]
        for site in rig.sites.values():
            await site.proxy.cut()
        for site in rig.sites.values():
            await self.offline(site)
        for device in devices:
            # 1.00 each: from 1.00 down to the -2.00 floor, then refused.
            self.assertEqual(await device.charge_many(3, pages=10), [201] * 3)
            self.assertEqual(await device.charge(pages=10, expect=[402]), 402)
        for site in rig.sites.values():
            await site.proxy.heal()
        for site in rig.sites.values():
            await wait_for_mode(site.server, "online")
        await self.converge(rig)
        db = rig.primary.database
        self.assertEqual(scalar(db, "SELECT balance FROM accounts WHERE name = 'carol'"), -500)
        below = {u for (u,) in _rows(db, "SELECT uuid FROM transactions WHERE balance_after < 0")}
        self.assertEqual(len(below), 5)
        report = (await admin(rig.primary, "--json", "report", "offline-overdraft")).json()
        self.assertEqual({r["uuid"] for r in report}, below)
        # Online again, the normal credit limit applies.
        self.assertEqual(await devices[0].charge(pages=10, expect=[402]), 402)
        self.assertLedger(rig)


class SlowLinkTests(FaultTestCase):
    """A slow but working link is not taken for a dead one."""

    #: Bytes a second each way: a 16 KiB TLS record takes two seconds, several heartbeats.
    RATE = 8_000

    async def test_backlog_over_a_throttled_link(self) -> None:
        """A backlog drains over a throttled, delayed link in one connection, no drops."""
        rig = await self.rig()
        site = rig.site
        await self.backlog(site, self.device(rig))
        site.proxy.delay(0.05)
        site.proxy.rate(self.RATE)
        connections = site.proxy.stats().connections
        await site.proxy.heal()
        healed = time.monotonic()

        def settled(health: Health) -> bool:
            # Online, or dropped again (then this test has failed: no need to wait on).
            dropped = [t for t in health.body.get("transitions", []) if t["to"] == "offline"]
            return health.mode == "online" or len(dropped) > 1

        health = await wait_for_health(site.server, settled, "online or dropped", 30)
        stats = site.proxy.stats()
        log.info(
            "faults: slow link: {mode} {t:.1f} s after the heal; {up} bytes up, {down} down",
            mode=health.mode,
            t=time.monotonic() - healed,
            up=stats.bytes_up,
            down=stats.bytes_down,
        )
        self.assertEqual(
            [(t["from"], t["to"], t["input"]) for t in health.body["transitions"][:3]],
            [
                ("syncing", "online", "caughtUp"),
                ("reconciling", "syncing", "outboxDrained"),
                ("offline", "reconciling", "connected"),
            ],
        )
        self.assertEqual(stats.connections, connections + 1, "the site had to reconnect")
        self.assertEqual(rig.server.count("dropping link"), 0, rig.server.tail(20))
        site.proxy.rate(0)
        site.proxy.delay(0)
        await self.converge(rig)


class _Probe(LivenessAMP):
    """A heartbeat-only AMP peer that remembers whether it dropped its peer."""

    silent: str | None = None

    def peerSilent(self, reason: str) -> None:
        self.silent = reason


class LivenessClockTests(SynchronousTestCase):
    """Wall-clock steps neither drop a live link nor keep a dead one (in-process).

    Real processes' clocks cannot be stepped, so this drives `LivenessAMP` (what both
    ends of the replication link use) with a ``task.Clock`` for the reactor's wall-clock
    timers and a separate fake monotonic clock.
    """

    #: The heartbeat interval here (exact in binary, so sums of it compare exactly).
    interval = 1.0

    def link(self) -> tuple[Clock, list[float], _Probe, StringTransport]:
        clock, monotonic = Clock(), [5000.0]
        probe = _Probe(clock=clock, monotonic=lambda: monotonic[0])
        transport = StringTransport()
        probe.makeConnection(transport)
        probe.startHeartbeat(self.interval)
        return clock, monotonic, probe, transport

    def test_wall_clock_jumps_forward(self) -> None:
        """A day's jump of the wall clock in a moment of real time: no drop, beats go on."""
        clock, monotonic, probe, transport = self.link()
        for _ in range(5):
            monotonic[0] += self.interval / 2
            clock.advance(86_400)
            self.assertIsNone(probe.silent)
        self.assertFalse(transport.disconnecting)
        self.assertEqual(transport.value().count(b"Heartbeat"), 5)

    def test_real_silence_drops(self) -> None:
        """Real (monotonic) silence of three intervals drops the peer at the next check."""
        clock, monotonic, probe, transport = self.link()
        for _ in range(MISSED_BEATS - 1):
            monotonic[0] += self.interval
            clock.advance(self.interval)
        monotonic[0] += 0.75 * self.interval
        clock.advance(0.75 * self.interval)
        self.assertIsNone(probe.silent, "dropped before three silent intervals")
        # The wall clock moves a quarter interval, but half an interval more really passed.
        monotonic[0] += 0.75 * self.interval
        clock.advance(0.25 * self.interval)
        self.assertEqual(probe.silent, "peer silent for 3.5 s (heartbeat 1.0 s)")
        self.assertTrue(transport.disconnected)

    def test_bytes_keep_alive_through_jumps(self) -> None:
        """Bytes arriving every two intervals keep the link, whatever the wall clock does."""
        clock, monotonic, probe, transport = self.link()
        for step in (86_400, self.interval, 3_600, self.interval, self.interval):
            monotonic[0] += 2 * self.interval
            probe.dataReceived(b"")
            clock.advance(step)
        self.assertIsNone(probe.silent)
        self.assertFalse(transport.disconnecting)
