"""The devices benchmark: network card readers and MFD sessions against a real site.

Run ``python -m bench.devices --help``. It builds a primary and one site ("north") in a
new temporary directory (deleted afterwards unless ``--keep``): ``sitesrv-admin tls
init``, TOML configs, the site enrolled with its token in its ``token_file``, and, bulk
loaded into the primary's SQLite file before it starts, ``--users`` users with a card
each (balance 100.00), a hold/release printer ``p1`` at north, a print provider,
``--readers`` ``card-reader`` devices (each listening on its own loopback port, with
line feedback) and ``--http`` ``http`` devices (MFDs with API keys). Primary and site
run as real ``twistd -n sitesrv`` processes; this process plays the devices and the
print provider on one Twisted reactor, over loopback TCP. It is a benchmark, not a
test: it prints the figures against the goals and exits 0 whether or not they are met
(1 only when something fails outright).

Phases:

held
    The print provider (an AMP client of the site's provider port, as
    ``sitesrv-provider`` is) submits one 2-page job to ``p1`` for each of the first
    ``--held-users`` users; the site holds them. It answers every ``Release`` the site
    pushes at once (and never reports them printed: charging is the device API's part).
single
    One reader swipes ``--single`` cards one after another (no other load): the swipe
    latency of an idle site.
load
    For ``--seconds`` (after ``--warmup`` seconds not counted), all at once, in an open
    loop (each device on its own schedule, phases spread evenly): every reader swipes a
    card every ``--reader-interval`` seconds (2: 100 swipes a second from 200 readers,
    far more than 200 real readers see at the busiest hour), the cards taken in turn from
    the users with held jobs first and then the others, so a swipe releases one job
    until those run out; and every MFD runs a session every ``--mfd-interval`` seconds:
    ``POST /api/v1/sessions`` (card login), one copy (``POST .../usage``), ``DELETE`` the
    session. A device never has two requests outstanding: if an answer comes later than
    its next turn, it goes again at once. The goal (p99 swipe latency) is for this phase.
capacity
    (unless ``--capacity-seconds 0``) The same devices in a closed loop, each sending its
    next request as soon as the last is answered: the most swipes and logins a second the
    site sustains, and the latency when 250 requests are always waiting (queueing, not
    service time).

Swipe latency is measured here, from writing the card number to reading the feedback
line (``OK 1 job`` / ``OK 0 jobs``): the site's whole swipe-to-release-decision path
(authenticate, check the balance, record the release, push it to the provider) plus
loopback and this process's own scheduling. The readers run with ``max_rate = 1000``
(a closed loop of one reader may exceed the default flood limit of 10 lines/s).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import attrs
from twisted.internet import task
from twisted.internet.defer import Deferred, DeferredList, DeferredQueue
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectError
from twisted.protocols.basic import LineOnlyReceiver
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers

import sitesrv
from sitesrv.admin.cli import run as admin_run
from sitesrv.providers.commands import (
    PROVIDER_PROTOCOL_VERSION,
    AnnounceQueues,
    DeleteJobs,
    ProviderHello,
    Release,
    SubmitJob,
)
from sitesrv.replication.liveness import LivenessAMP
from sitesrv.store import devices, printers, sites, users
from sitesrv.store.bootstrap import open_store, thdInitPrimary
from sitesrv.testing.local import free_ports, toml_document

# Twisted warns about readBody over a pooled connection's transport; it is harmless here.
warnings.filterwarnings("ignore", category=DeprecationWarning, message="Using readBody")

#: ``twistd`` as run by this interpreter (works in any virtualenv).
TWISTD = (sys.executable, "-c", "from twisted.scripts.twistd import run; run()")
#: Bounds on the waits (a benchmark that hangs measures nothing).
START_DEADLINE = 90.0
ANSWER_DEADLINE = 30.0


@attrs.frozen
class Goal:
    """A figure's goal: at most (``below``) or at least a value."""

    value: float
    below: bool = True

    def met(self, figure: float | None) -> bool | None:
        if figure is None:
            return None
        return figure < self.value if self.below else figure >= self.value

    def __str__(self) -> str:
        return f"{'<' if self.below else '>='} {self.value:g}"


GOALS = {"swipe_p99_ms": Goal(50.0)}


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile of sorted ``values`` (nearest rank)."""
    if not values:
        return float("nan")
    rank = max(0, min(len(values) - 1, round(q * len(values) + 0.5) - 1))
    return values[rank]


def summary(latencies: list[float]) -> dict[str, Any]:
    """p50/p90/p99/max/mean of latencies in seconds, in milliseconds."""
    values = sorted(latencies)
    if not values:
        return {"count": 0}
    return {
        "count": len(values),
        "p50_ms": round(1000 * percentile(values, 0.50), 2),
        "p90_ms": round(1000 * percentile(values, 0.90), 2),
        "p99_ms": round(1000 * percentile(values, 0.99), 2),
        "max_ms": round(1000 * values[-1], 2),
        "mean_ms": round(1000 * sum(values) / len(values), 2),
    }


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    model = "unknown"
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        model = next(
            (ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), model
        )
    with open("/proc/meminfo", encoding="utf-8") as f:
        kib = next((int(ln.split()[1]) for ln in f if ln.startswith("MemTotal")), 0)
    return {
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "cpus": os.cpu_count(),
        "cpu": model,
        "ram": f"{kib / 1024 / 1024:.1f} GiB",
        "os": f"Linux {platform.release()}",
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
    }


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used (from /proc)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- set-up ---------------------------------------------------------------------------


@attrs.define
class Setup:
    """The servers' files and ports, and the keys and cards the devices use."""

    directory: str
    primary_config: str
    site_config: str
    primary_web: int
    site_web: int
    site_providers: int
    reader_ports: list[int]
    http_keys: list[str]
    provider_key: str
    cards: list[str]


def admin(config: str, *args: str) -> str:
    """``sitesrv-admin --config CONFIG ARGS`` in this process; its output."""
    out, err = io.StringIO(), io.StringIO()
    code = admin_run(["--config", config, *args], stdin=io.StringIO(""), stdout=out, stderr=err)
    if code != 0:
        raise RuntimeError(f"sitesrv-admin {' '.join(args)} exited {code}: {err.getvalue()}")
    return out.getvalue()


def set_up(options: argparse.Namespace, directory: str) -> Setup:
    """Write configs, make the TLS files and load the primary's database."""
    tls = os.path.join(directory, "tls")
    hq_data, north_data = os.path.join(directory, "hq"), os.path.join(directory, "north")
    os.makedirs(hq_data)
    os.makedirs(north_data)
    names = ("hq_web", "hq_prov", "hq_repl", "n_web", "n_prov")
    picked = free_ports(len(names) + options.readers)
    ports = dict(zip(names, picked, strict=False))
    primary_config = os.path.join(directory, "hq.toml")
    with open(primary_config, "w", encoding="utf-8") as f:
        key, cert = os.path.join(tls, "server.key"), os.path.join(tls, "server.crt")
        f.write(
            toml_document(
                {"role": "primary", "name": "hq", "data_dir": hq_data},
                {
                    "listen": {
                        "web": f"tcp:{ports['hq_web']}:interface=127.0.0.1",
                        "providers": f"tcp:{ports['hq_prov']}:interface=127.0.0.1",
                        "replication": f"ssl:{ports['hq_repl']}:interface=127.0.0.1"
                        f":privateKey={key}:certKey={cert}",
                    },
                    "tls": {"key": key, "cert": cert, "ca": os.path.join(tls, "ca.crt")},
                },
            )
        )
    admin(
        primary_config, "tls", "init", "--hostname", "localhost", "--ip", "127.0.0.1", "--out", tls
    )
    token_file = os.path.join(north_data, "token")
    site_config = os.path.join(directory, "north.toml")
    with open(site_config, "w", encoding="utf-8") as f:
        f.write(
            toml_document(
                {"role": "site", "name": "north", "data_dir": north_data},
                {
                    "listen": {
                        "web": f"tcp:{ports['n_web']}:interface=127.0.0.1",
                        "providers": f"tcp:{ports['n_prov']}:interface=127.0.0.1",
                    },
                    "primary": {
                        "endpoint": f"tcp:127.0.0.1:{ports['hq_repl']}",
                        "ca": os.path.join(tls, "ca.crt"),
                        "hostname": "localhost",
                        "token_file": token_file,
                    },
                },
            )
        )
    now = time.time()
    cards = [f"{9_000_000 + n:08d}" for n in range(options.users)]
    store = open_store(f"sqlite:///{os.path.join(hq_data, 'sitesrv.db')}")
    try:
        store.write(thdInitPrimary, "hq", "USD", 2, now)
        token = store.write(sites.thdAddSite, "north", now)
        fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(token + "\n")
        for start in range(0, options.users, 1000):
            batch = [
                users.NewUser(username=f"user{n:06d}", balance=100_00, cards=(cards[n],))
                for n in range(start, min(start + 1000, options.users))
            ]
            store.write(users.thdImportUsers, batch, now)
        store.write(printers.thdAddPrinter, "p1", "north", 10, 50, now, hold=True)
        provider_key = store.write(devices.thdAddProvider, "spool", "north", now)
        reader_ports = picked[len(names) :]
        for n, port in enumerate(reader_ports):
            store.write(
                devices.thdAddDevice,
                f"reader{n:03d}",
                "north",
                "card-reader",
                now,
                printer="p1",
                options={
                    "listen": f"tcp:{port}:interface=127.0.0.1",
                    "feedback": "line",
                    "max_rate": "1000",
                },
            )
        http_keys = [
            store.write(devices.thdAddDevice, f"mfd{n:03d}", "north", "http", now, printer="p1")
            for n in range(options.http)
        ]
    finally:
        store.stop()
    return Setup(
        directory=directory,
        primary_config=primary_config,
        site_config=site_config,
        primary_web=ports["hq_web"],
        site_web=ports["n_web"],
        site_providers=ports["n_prov"],
        reader_ports=reader_ports,
        http_keys=http_keys,
        provider_key=provider_key,
        cards=cards,
    )


class Servers:
    """The ``twistd`` processes, stopped (SIGTERM, then SIGKILL) on ``close``."""

    def __init__(self) -> None:
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, config: str, directory: str) -> subprocess.Popen[bytes]:
        log = open(os.path.join(directory, f"{name}.log"), "ab")  # noqa: SIM115
        process = subprocess.Popen(
            [*TWISTD, "-n", "--pidfile=", "sitesrv", "--config", config],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=directory,
        )
        log.close()
        self.processes[name] = process
        return process

    def close(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def health(port: int) -> dict[str, Any] | None:
    """``/health`` of a server, or None while it does not answer."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
            return dict(json.load(r))
    except urllib.error.HTTPError as e:
        return dict(json.load(e))
    except (OSError, ValueError):
        return None


def wait(condition: Callable[[], bool], what: str, deadline: float = START_DEADLINE) -> None:
    """Poll ``condition`` every 50 ms until it holds."""
    end = time.monotonic() + deadline
    while not condition():
        if time.monotonic() > end:
            raise RuntimeError(f"{what}: not within {deadline:g} s")
        time.sleep(0.05)


# -- the devices ------------------------------------------------------------------------


class Reader(LineOnlyReceiver):
    """A card reader: one card number a line, one feedback line back."""

    delimiter = b"\r\n"

    def __init__(self) -> None:
        self.answers: DeferredQueue[str] = DeferredQueue()

    def lineReceived(self, line: bytes) -> None:
        self.answers.put(line.decode("ascii"))

    async def swipe(self, card: str) -> tuple[str, float]:
        """Swipe ``card``: the answer and the seconds it took."""
        assert self.transport is not None
        started = time.perf_counter()
        self.transport.write(card.encode("ascii") + b"\r\n")
        answer = await self.answers.get()
        return answer, time.perf_counter() - started


class Provider(LivenessAMP):
    """The print provider: submits jobs, accepts every release at once."""

    def __init__(self, reactor: Any) -> None:
        super().__init__(clock=reactor)
        self.released = 0

    @Release.responder
    def release(self, job: str, release_id: str, printer: str, uri: str) -> dict[str, Any]:
        self.released += 1
        return {}

    @DeleteJobs.responder
    def deleteJobs(self, jobs: list[str], reason: str) -> dict[str, Any]:
        return {}


@attrs.define
class Load:
    """What the load phase saw."""

    measuring: bool = False
    stop: bool = False
    swipe_release: list[float] = attrs.Factory(list)
    swipe_none: list[float] = attrs.Factory(list)
    denied: list[str] = attrs.Factory(list)
    http_logins: list[float] = attrs.Factory(list)
    http_copies: list[float] = attrs.Factory(list)
    http_errors: list[str] = attrs.Factory(list)


async def connect_reader(reactor: Any, port: int) -> Reader:
    """Connect to a reader port, waiting for the site to open it."""
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=2)
    end = time.monotonic() + START_DEADLINE
    while True:
        try:
            return await connectProtocol(endpoint, Reader())
        except ConnectError:
            if time.monotonic() > end:
                raise
            await task.deferLater(reactor, 0.1, lambda: None)


async def paced(reactor: Any, load: Load, interval: float, phase: float) -> Any:
    """Yield once per ``interval`` seconds (from ``phase``), or at once when behind.

    An open loop: a device acts on its own schedule, not when the server has answered
    the last request (unless that answer is later than its next turn).
    """
    next_at = time.monotonic() + phase
    while not load.stop:
        delay = next_at - time.monotonic()
        if delay > 0:
            await task.deferLater(reactor, delay, lambda: None)
        if load.stop:
            return
        yield
        next_at += interval if interval > 0 else 0.0
        if interval <= 0:
            next_at = time.monotonic()


async def reader_loop(
    reactor: Any, reader: Reader, cards: Iterator[str], load: Load, interval: float, phase: float
) -> None:
    """Swipe every ``interval`` seconds (0: as soon as the last was answered)."""
    async for _ in paced(reactor, load, interval, phase):
        card = next(cards)
        answer, seconds = await reader.swipe(card)
        if not load.measuring:
            continue
        if answer == "OK 0 jobs":
            load.swipe_none.append(seconds)
        elif answer.startswith("OK "):
            load.swipe_release.append(seconds)
        else:
            load.denied.append(answer)


async def http_loop(
    reactor: Any,
    agent: Agent,
    port: int,
    key: str,
    cards: Iterator[str],
    load: Load,
    interval: float,
    phase: float,
) -> None:
    """An MFD session every ``interval`` seconds (0: back to back): login, a copy, end."""
    base = f"http://127.0.0.1:{port}/api/v1/"
    auth = {b"authorization": [f"Bearer {key}".encode()]}

    async def call(method: bytes, path: str, body: Any = None) -> tuple[int, Any]:
        headers = Headers(auth)
        producer = None
        if body is not None:
            headers.addRawHeader(b"content-type", b"application/json")
            producer = FileBodyProducer(io.BytesIO(json.dumps(body).encode()))
        response = await agent.request(method, (base + path).encode(), headers, producer)
        data = await readBody(response)
        return response.code, json.loads(data) if data else None

    async for _ in paced(reactor, load, interval, phase):
        started = time.perf_counter()
        code, session = await call(b"POST", "sessions", {"card": next(cards)})
        login = time.perf_counter() - started
        if code != 201:
            load.http_errors.append(f"login {code} {session}")
            continue
        started = time.perf_counter()
        code, charged = await call(
            b"POST", f"sessions/{session['session']}/usage", {"kind": "copy", "pages": 1}
        )
        copy = time.perf_counter() - started
        await call(b"DELETE", f"sessions/{session['session']}")
        if code != 201:
            load.http_errors.append(f"copy {code} {charged}")
        if load.measuring:
            load.http_logins.append(login)
            load.http_copies.append(copy)


def cycle(first: list[str], rest: list[str]) -> Iterator[str]:
    """``first`` once, then ``rest`` round and round."""
    yield from first
    while True:
        yield from rest


async def drive(reactor: Any, options: argparse.Namespace, setup: Setup) -> dict[str, Any]:
    """The held, single and load phases; their results."""
    results: dict[str, Any] = {}
    say = options.say
    provider: Provider = await connectProtocol(
        TCP4ClientEndpoint(reactor, "127.0.0.1", setup.site_providers), Provider(reactor)
    )
    hello = await provider.callRemote(
        ProviderHello,
        provider="spool",
        key=setup.provider_key,
        software_version=f"bench {sitesrv.__version__}",
        protocol_version=PROVIDER_PROTOCOL_VERSION,
        provider_time=time.time(),
    )
    provider.startHeartbeat(hello["heartbeat"])
    await provider.callRemote(AnnounceQueues, queues=["p1"])

    held_users = min(options.held_users, len(setup.cards))
    say(f"held: submitting {held_users:,} jobs")
    started = time.perf_counter()
    for n in range(held_users):
        answer = await provider.callRemote(
            SubmitJob,
            job=f"00000000-0000-4000-8000-{n:012d}",
            queue="p1",
            user=f"user{n:06d}",
            document=f"doc{n}.pdf",
            pages=2,
            copies=1,
            colour=False,
            duplex=False,
            size=10_000,
            submitted_at=time.time(),
        )
        if answer["decision"] != "hold":
            raise RuntimeError(f"job {n} was not held: {answer}")
    held_seconds = time.perf_counter() - started
    results["held"] = {
        "jobs": held_users,
        "seconds": round(held_seconds, 2),
        "per_second": round(held_users / held_seconds, 1) if held_seconds else None,
    }
    say(f"  {results['held']}")

    say(f"connecting {len(setup.reader_ports)} readers")
    readers = [await connect_reader(reactor, port) for port in setup.reader_ports]

    # Cards without held jobs for the idle measurement, so the load phase still starts
    # with every held job in place.
    idle_cards = setup.cards[held_users:] or setup.cards
    say(f"single: {options.single} swipes from one reader, nothing else running")
    single = []
    for n in range(5):  # warm the site's caches and connections first
        await readers[0].swipe(idle_cards[-1 - n % len(idle_cards)])
    for n in range(options.single):
        answer, seconds = await readers[0].swipe(idle_cards[n % len(idle_cards)])
        if not answer.startswith("OK"):
            raise RuntimeError(f"single swipe denied: {answer}")
        single.append(seconds)
    results["single"] = summary(single)
    say(f"  {results['single']}")

    swipe_cards = cycle(setup.cards[:held_users], setup.cards[held_users:] or setup.cards)
    # The MFDs log in as users from the end of the list.
    http_cards = cycle([], list(reversed(setup.cards)))
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = max(1, len(setup.http_keys))
    agent = Agent(reactor, pool=pool)

    async def phase(name: str, seconds: float, reader_every: float, http_every: float) -> None:
        say(
            f"{name}: {len(readers)} readers (a swipe each every {reader_every:g} s) and "
            f"{len(setup.http_keys)} MFDs (a session each every {http_every:g} s; 0 = as "
            f"fast as answered) for {seconds:g} s (+{options.warmup:g} s warm-up)"
        )
        load = Load()
        released_before = provider.released
        loops = [
            reader_loop(
                reactor, r, swipe_cards, load, reader_every, n * reader_every / len(readers)
            )
            for n, r in enumerate(readers)
        ] + [
            http_loop(
                reactor,
                agent,
                setup.site_web,
                key,
                http_cards,
                load,
                http_every,
                n * http_every / len(setup.http_keys),
            )
            for n, key in enumerate(setup.http_keys)
        ]
        running = DeferredList(
            [Deferred.fromCoroutine(loop) for loop in loops],
            fireOnOneErrback=True,
            consumeErrors=True,
        )
        await task.deferLater(reactor, options.warmup, lambda: None)
        load.measuring = True
        cpu_before = cpu_seconds(options.site_pid)
        measured_from = time.perf_counter()
        await task.deferLater(reactor, seconds, lambda: None)
        load.measuring = False
        elapsed = time.perf_counter() - measured_from
        cpu_used = cpu_seconds(options.site_pid) - cpu_before
        load.stop = True
        await running
        swipes = load.swipe_release + load.swipe_none
        logins = len(swipes) + len(load.http_logins)
        result: dict[str, Any] = {
            "readers": len(readers),
            "reader_interval": reader_every,
            "mfds": len(setup.http_keys),
            "mfd_interval": http_every,
            "seconds": round(elapsed, 2),
            "swipes": len(swipes),
            "swipes_per_second": round(len(swipes) / elapsed, 1),
            "swipe": summary(swipes),
            "swipe_releasing": summary(load.swipe_release),
            "swipe_nothing_held": summary(load.swipe_none),
            "swipes_denied": len(load.denied),
            "jobs_released": provider.released - released_before,
            "http_sessions": len(load.http_logins),
            "http_logins_per_second": round(len(load.http_logins) / elapsed, 1),
            "http_login": summary(load.http_logins),
            "http_copy": summary(load.http_copies),
            "http_errors": len(load.http_errors),
            "logins_per_second": round(logins / elapsed, 1),
            "site_cpu_seconds": round(cpu_used, 2),
            "site_cpu_percent": round(100 * cpu_used / elapsed, 1),
        }
        if load.denied:
            result["first_denial"] = load.denied[0]
        if load.http_errors:
            result["first_http_error"] = load.http_errors[0]
        results[name] = result
        say(f"  {result}")

    await phase("load", options.seconds, options.reader_interval, options.mfd_interval)
    if options.capacity_seconds > 0:
        await phase("capacity", options.capacity_seconds, 0.0, 0.0)
    await pool.closeCachedConnections()
    for r in readers:
        assert r.transport is not None
        r.transport.loseConnection()
    assert provider.transport is not None
    provider.stopHeartbeat()
    provider.transport.loseConnection()
    await task.deferLater(reactor, 0.2, lambda: None)
    return results


def run(options: argparse.Namespace, directory: str) -> dict[str, Any]:
    """Set up, start the servers, drive the devices; the results."""
    results: dict[str, Any] = {
        "machine": machine(),
        "options": {k: v for k, v in vars(options).items() if k not in ("say", "site_pid")},
    }
    say = options.say
    say(
        f"setting up in {directory}: {options.users:,} users, {options.readers} readers, "
        f"{options.http} MFDs"
    )
    setup = set_up(options, directory)
    servers = Servers()
    try:
        servers.start("hq", setup.primary_config, directory)
        wait(lambda: (health(setup.primary_web) or {}).get("mode") == "online", "primary up")
        site = servers.start("north", setup.site_config, directory)
        options.site_pid = site.pid
        started = time.monotonic()
        wait(lambda: (health(setup.site_web) or {}).get("mode") == "online", "site online")
        results["site_online_seconds"] = round(time.monotonic() - started, 2)
        outcome: dict[str, Any] = {}

        def main(reactor: Any) -> Deferred[None]:
            d = Deferred.fromCoroutine(drive(reactor, options, setup))
            d.addCallback(outcome.update)
            return d.addCallback(lambda _: None)

        _react(main)
        results.update(outcome)
        problems = (health(setup.site_web) or {}).get("problems", [])
        results["site_problems"] = problems
    finally:
        servers.close()
    results["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    p99 = results.get("load", {}).get("swipe", {}).get("p99_ms")  # the paced phase
    results["goals"] = {
        "swipe_p99_ms": {
            "goal": str(GOALS["swipe_p99_ms"]),
            "value": p99,
            "met": GOALS["swipe_p99_ms"].met(p99),
        }
    }
    return results


def _react(main: Callable[[Any], Deferred[None]]) -> None:
    """Run ``main`` on the reactor until it finishes (without ``sys.exit``)."""
    from twisted.internet import reactor

    failures: list[Any] = []

    def go() -> None:
        main(reactor).addErrback(failures.append).addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(go)
    reactor.run()
    if failures:
        failures[0].raiseException()


def _phase_lines(name: str, ld: dict[str, Any]) -> list[str]:
    sw, rel, none = ld["swipe"], ld["swipe_releasing"], ld["swipe_nothing_held"]

    def every(seconds: float) -> str:
        return f"every {seconds:g} s" if seconds > 0 else "as fast as answered"

    return [
        f"{name}: {ld['readers']} readers (a swipe each {every(ld['reader_interval'])}) + "
        f"{ld['mfds']} MFDs (a session each {every(ld['mfd_interval'])}) for {ld['seconds']} s",
        f"  swipes: {ld['swipes']:,} ({ld['swipes_per_second']}/s), "
        f"p50 {sw.get('p50_ms')} ms, p90 {sw.get('p90_ms')} ms, p99 {sw.get('p99_ms')} ms, "
        f"max {sw.get('max_ms')} ms; {ld['swipes_denied']} denied",
        f"    releasing a job: {rel.get('count', 0):,} swipes, p50 {rel.get('p50_ms')} ms, "
        f"p99 {rel.get('p99_ms')} ms; nothing held: {none.get('count', 0):,}, "
        f"p50 {none.get('p50_ms')} ms, p99 {none.get('p99_ms')} ms; "
        f"{ld['jobs_released']:,} releases pushed",
        f"  MFD sessions: {ld['http_sessions']:,} ({ld['http_logins_per_second']}/s), "
        f"login p50 {ld['http_login'].get('p50_ms')} ms, "
        f"p99 {ld['http_login'].get('p99_ms')} ms; copy p50 "
        f"{ld['http_copy'].get('p50_ms')} ms, p99 {ld['http_copy'].get('p99_ms')} ms; "
        f"{ld['http_errors']} errors",
        f"  logins (swipes + MFD): {ld['logins_per_second']}/s; site CPU "
        f"{ld['site_cpu_percent']}% of one core",
    ]


def report(results: dict[str, Any]) -> str:
    """The results as text."""
    m = results["machine"]
    lines = [
        f"machine: {m['cpus']} x {m['cpu']}, {m['ram']}, {m['os']}, Python {m['python']}, "
        f"SQLite {m['sqlite']}; load average {m['load_average']} -> "
        f"{results['load_average_end']}",
        f"site online {results['site_online_seconds']} s after start",
    ]
    h = results.get("held")
    if h:
        lines.append(
            f"held: {h['jobs']:,} jobs submitted and held in {h['seconds']} s "
            f"({h['per_second']}/s)"
        )
    s = results.get("single")
    if s:
        lines.append(
            f"single reader, idle site: p50 {s['p50_ms']} ms, p99 {s['p99_ms']} ms, "
            f"max {s['max_ms']} ms ({s['count']} swipes)"
        )
    for name in ("load", "capacity"):
        if name in results:
            lines += _phase_lines(name, results[name])
    lines += goal_lines(results["goals"])
    if results.get("site_problems"):
        lines.append(f"site problems: {results['site_problems']}")
    return "\n".join(lines)


def goal_lines(goals: dict[str, dict[str, Any]]) -> list[str]:
    """One report line per goal: its figure and whether it was met."""
    lines = []
    for name, goal in goals.items():
        verdict = {True: "met", False: "NOT met", None: "not measured"}[goal["met"]]
        lines.append(f"goal {name} {goal['goal']}: {goal['value']} ({verdict})")
    return lines


def parse(argv: list[str]) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(
        prog="python -m bench.devices", description=(__doc__ or "").split("\n\n")[0]
    )
    p.add_argument("--readers", type=int, default=200, help="card readers (default 200)")
    p.add_argument("--http", type=int, default=50, help="MFDs on the device API (default 50)")
    p.add_argument("--users", type=int, default=5000, help="users with a card (default 5000)")
    p.add_argument(
        "--held-users",
        type=int,
        default=1000,
        help="users given one held job each (default 1000)",
    )
    p.add_argument(
        "--single", type=int, default=200, help="swipes of the idle single-reader phase"
    )
    p.add_argument(
        "--reader-interval",
        type=float,
        default=2.0,
        help="load: seconds between one reader's swipes (default 2: 100 swipes/s in all)",
    )
    p.add_argument(
        "--mfd-interval",
        type=float,
        default=2.0,
        help="load: seconds between one MFD's sessions (default 2: 25 sessions/s in all)",
    )
    p.add_argument("--seconds", type=float, default=20.0, help="measured load (default 20)")
    p.add_argument(
        "--capacity-seconds",
        type=float,
        default=10.0,
        help="measured closed-loop capacity phase; 0 skips it (default 10)",
    )
    p.add_argument("--warmup", type=float, default=2.0, help="unmeasured start of each phase")
    p.add_argument(
        "--tmpdir",
        default=None,
        help="where to make the temporary directory (default: the system's); e.g. a tmpfs "
        "such as /dev/shm to see what the disk's fsync costs",
    )
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    p.add_argument("--json", action="store_true", help="results as JSON on stdout")
    options = p.parse_args(argv)
    options.say = lambda text: print(text, file=sys.stderr, flush=True)
    options.site_pid = 0
    return options


def run_benchmark(
    name: str,
    options: argparse.Namespace,
    run: Callable[[argparse.Namespace, str], dict[str, Any]],
    report: Callable[[dict[str, Any]], str],
) -> int:
    """Run a benchmark in a temporary directory (kept on failure) and print its report."""
    directory = tempfile.mkdtemp(prefix=f"sitesrv-bench-{name}-", dir=options.tmpdir)
    try:
        results = run(options, directory)
    except Exception as e:
        print(f"bench.{name} failed: {e!r}", file=sys.stderr)
        print(f"(logs in {directory})", file=sys.stderr)
        options.keep = True
        return 1
    finally:
        if not options.keep:
            shutil.rmtree(directory, ignore_errors=True)
    print(json.dumps(results, indent=2) if options.json else report(results))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_benchmark("devices", parse(sys.argv[1:] if argv is None else argv), run, report)


if __name__ == "__main__":
    sys.exit(main())
