"""The replication benchmark: a site's first sync, on loopback and on a slow link, and
how fast a stream of changes at the primary becomes visible at the site.

Run ``python -m bench.replication --help``. It builds a primary and two sites in a new
temporary directory (deleted afterwards; kept with ``--keep`` or when a run fails), as an
administrator would: ``sitesrv-admin tls init``, TOML configs, ``sitesrv-admin site add``
with the token in each site's ``token_file``. The users are loaded into the primary's
SQLite file with the bulk import (``users.thdImportUsers``) before it starts. Primary
and sites run as real ``twistd -n sitesrv`` processes; each site reaches the primary's
TLS replication port through the fault proxy (``sitesrv.testing.faultproxy``, a child
process), which counts the bytes and, for the slow link, adds latency and a bandwidth
cap. It is a benchmark, not a test: it prints the figures against the goals and exits 0
whether or not they are met (1 only when something fails outright).

Phases:

sync
    Start site ``fast`` (proxy transparent); time from starting its process to its
    ``/health`` reporting ``mode`` = ``online`` (polled every 50 ms); then check its
    SQLite file holds every user and card. Also: the bytes on the wire and the CPU
    seconds each server used meanwhile (from ``/proc``).
stream
    With ``fast`` online, write ``--rate`` changes a second for ``--stream-seconds`` at
    the primary, from this process, through a second ``Store`` on its database (as
    ``sitesrv-admin balance adjust`` does: ``ledger.thdPost`` and an audit row, each
    change its own transaction unless ``--changes-per-transaction`` says otherwise).
    When the writer falls behind it does not skip: the achieved rate is reported. Each
    change's change-log position and commit time are recorded; a thread polls the
    site's ``replica_state.position`` every ~5 ms (read-only) and a change counts as
    visible at the first poll that shows its position (``--trace`` writes them all to a
    CSV file). Also: the bytes the proxy carried during the phase, per change, and the
    CPU seconds the primary and the site used.
slow-sync
    (unless ``--skip-slow-link``) Start a second, empty site ``slow`` through the proxy
    set to ``--slow-delay-ms`` each way and ``--slow-rate`` bytes a second each way, and
    time it to ``online`` as above.
"""

from __future__ import annotations

import argparse
import bisect
import json
import math
import os
import platform
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import IO, Any

import attrs
from sqlalchemy import Connection
from twisted.internet.endpoints import quoteStringArgument

from sitesrv.store import Store, ledger, users
from sitesrv.store.audit import thdAudit
from sitesrv.store.bootstrap import open_store, thdInitPrimary
from sitesrv.store.changelog import thdState
from sitesrv.testing.faultproxy import ProxyProcess
from sitesrv.testing.local import free_port, toml_document

#: ``twistd`` and ``sitesrv-admin`` as run by this interpreter (works in any virtualenv).
TWISTD = (sys.executable, "-c", "from twisted.scripts.twistd import run; run()")
ADMIN = (sys.executable, "-c", "from sitesrv.admin.cli import main; main()")

#: How often /health is polled while waiting for a mode, and the site's database while
#: waiting for changes.
HEALTH_INTERVAL = 0.05
POSITION_INTERVAL = 0.005
#: Bounds on the waits (a benchmark that hangs measures nothing).
START_DEADLINE = 60.0
SYNC_DEADLINE = 600.0
CATCH_UP_DEADLINE = 60.0

#: Opening balance of every user (minor units), large enough for any number of charges.
OPENING_BALANCE = 1_000_000


@attrs.frozen
class Goal:
    """A target from the issue: a figure that must stay below ``limit``."""

    limit: float
    unit: str

    def met(self, value: float | None) -> bool:
        """Whether ``value`` meets the goal (a missing value does not)."""
        return value is not None and value < self.limit

    def __str__(self) -> str:
        return f"< {self.limit:g} {self.unit}"


GOALS = {
    "sync_seconds": Goal(10, "s"),
    "p99_ms": Goal(200, "ms"),
}


class BenchError(Exception):
    """Something failed outright (a process died, a wait timed out)."""


# -- set-up ---------------------------------------------------------------------------


def write_toml(path: str, top: Mapping[str, Any], tables: Mapping[str, Mapping[str, Any]]) -> None:
    """Write a TOML file of top-level keys and tables."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(toml_document(top, tables))


@attrs.define
class Node:
    """One server: its config, files and ports."""

    name: str
    directory: str
    web_port: int

    @property
    def config(self) -> str:
        return os.path.join(self.directory, f"{self.name}.toml")

    @property
    def data_dir(self) -> str:
        return os.path.join(self.directory, self.name)

    @property
    def database(self) -> str:
        return os.path.join(self.data_dir, "sitesrv.db")

    @property
    def log(self) -> str:
        return os.path.join(self.directory, f"{self.name}.log")


def admin(node: Node | None, *args: str) -> str:
    """Run ``sitesrv-admin [--config node] ARGS`` as a process; return its output."""
    config = ["--config", node.config] if node is not None else []
    done = subprocess.run(
        [*ADMIN, *config, *args], capture_output=True, text=True, timeout=START_DEADLINE
    )
    if done.returncode != 0:
        raise BenchError(f"sitesrv-admin {' '.join(args)}: {done.stderr.strip()}{done.stdout}")
    return done.stdout


def make_primary(directory: str) -> tuple[Node, int, str]:
    """Certificates and config of the primary ``hq``; returns it, its replication port, CA."""
    node = Node("hq", directory, free_port())
    tls = os.path.join(node.data_dir, "tls")
    os.makedirs(node.data_dir)
    admin(None, "tls", "init", "--hostname", "localhost", "--ip", "127.0.0.1", "--out", tls)
    key, cert = os.path.join(tls, "server.key"), os.path.join(tls, "server.crt")
    replication = free_port()
    write_toml(
        node.config,
        {"role": "primary", "name": node.name, "data_dir": node.data_dir},
        {
            "listen": {
                "web": f"tcp:{node.web_port}:interface=127.0.0.1",
                "providers": f"tcp:{free_port()}:interface=127.0.0.1",
                "replication": f"ssl:{replication}:interface=127.0.0.1"
                f":privateKey={quoteStringArgument(key)}:certKey={quoteStringArgument(cert)}",
            },
            "tls": {"cert": cert, "key": key, "ca": os.path.join(tls, "ca.crt")},
        },
    )
    return node, replication, os.path.join(tls, "ca.crt")


def make_site(directory: str, name: str, primary: Node, proxy_port: int, ca: str) -> Node:
    """A site's config reaching the primary through the proxy, enrolled, token in place."""
    node = Node(name, directory, free_port())
    os.makedirs(node.data_dir)
    token_file = os.path.join(node.data_dir, "token")
    write_toml(
        node.config,
        {"role": "site", "name": name, "data_dir": node.data_dir},
        {
            "listen": {
                "web": f"tcp:{node.web_port}:interface=127.0.0.1",
                "providers": f"tcp:{free_port()}:interface=127.0.0.1",
            },
            "primary": {
                "endpoint": f"tcp:127.0.0.1:{proxy_port}",
                "ca": ca,
                "hostname": "localhost",
                "token_file": token_file,
            },
        },
    )
    token = admin(primary, "site", "add", name).splitlines()[0].strip()
    fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(token + "\n")
    return node


def people(start: int, stop: int, cards_per_user: int) -> Iterator[users.NewUser]:
    """Users ``start`` to ``stop - 1``, each with ``cards_per_user`` unique card numbers."""
    for i in range(start, stop):
        yield users.NewUser(
            f"u{i:07d}",
            full_name=f"Benchmark User {i}",
            email=f"u{i:07d}@example.org",
            balance=OPENING_BALANCE,
            cards=tuple(f"{i * cards_per_user + k:010d}" for k in range(cards_per_user)),
        )


def load_primary(primary: Node, count: int, cards_per_user: int) -> float:
    """Create the primary's database and bulk-import the users; return the seconds taken."""
    began = time.perf_counter()
    store = open_store(f"sqlite:///{primary.database}")
    try:
        now = time.time()
        store.write(thdInitPrimary, primary.name, "USD", 2, now)
        batch = 10_000
        for low in range(0, count, batch):
            chunk = list(people(low, min(count, low + batch), cards_per_user))
            store.write(users.thdImportUsers, chunk, now, site=primary.name)
    finally:
        store.stop()
    return time.perf_counter() - began


# -- processes ------------------------------------------------------------------------


class Processes:
    """The child processes of a run; all are killed at the end, whatever happened."""

    def __init__(self) -> None:
        self.servers: dict[str, subprocess.Popen[bytes]] = {}
        self.proxy: ProxyProcess | None = None
        self._logs: list[IO[bytes]] = []

    def start_proxy(self, target_port: int, log_path: str) -> ProxyProcess:
        log = open(log_path, "ab")  # noqa: SIM115 (closed in close())
        self._logs.append(log)
        self.proxy = ProxyProcess.start("127.0.0.1", target_port, log_file=log)
        return self.proxy

    def start(self, node: Node) -> subprocess.Popen[bytes]:
        """``twistd -n sitesrv --config`` for ``node``, output to its log."""
        log = open(node.log, "ab")  # noqa: SIM115 (closed in close())
        self._logs.append(log)
        argv = [*TWISTD, "-n", "--pidfile=", "sitesrv", "--config", node.config]
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=node.directory,
        )
        self.servers[node.name] = process
        return process

    def stop(self, name: str, timeout: float = 15.0) -> None:
        """SIGTERM a server (a clean shutdown), SIGKILL if it takes too long."""
        process = self.servers.pop(name, None)
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout)

    def close(self) -> None:
        """Kill everything still running."""
        for process in self.servers.values():
            if process.poll() is None:
                process.kill()
            process.wait(START_DEADLINE)
        self.servers.clear()
        if self.proxy is not None:
            self.proxy.stop()
            self.proxy = None
        for log in self._logs:
            log.close()


def health(port: int) -> tuple[int, dict[str, Any]] | None:
    """``GET /health``: (status, JSON), or None when nothing answers."""
    url = f"http://127.0.0.1:{port}/health"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        body = e.read()
        e.close()
        try:
            return e.code, json.loads(body)
        except ValueError:
            return e.code, {}
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


def wait_health(
    process: subprocess.Popen[bytes],
    node: Node,
    test: Callable[[tuple[int, dict[str, Any]] | None], bool],
    what: str,
    deadline: float,
) -> tuple[int, dict[str, Any]] | None:
    """Poll ``/health`` every 50 ms until ``test`` holds; BenchError at the deadline."""
    end = time.monotonic() + deadline
    last = None
    while True:
        last = health(node.web_port)
        if test(last):
            return last
        if process.poll() is not None:
            raise BenchError(
                f"{node.name} exited ({process.returncode}) before {what}; "
                f"the end of {node.log}:\n{tail(node.log)}"
            )
        if time.monotonic() > end:
            raise BenchError(f"{node.name}: not {what} within {deadline:g} s (last {last})")
        time.sleep(HEALTH_INTERVAL)


def cpu_seconds(process: subprocess.Popen[bytes] | None) -> float | None:
    """CPU time (user + system) a running child process has used, from /proc; else None."""
    if process is None:
        return None
    try:
        with open(f"/proc/{process.pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tail(path: str, lines: int = 20) -> str:
    """The last lines of a log file."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError as e:
        return f"({e})"


def count(database: str, sql: str) -> Any:
    """One value from a read-only query of a SQLite file."""
    conn = sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=10)
    try:
        return conn.execute(sql).fetchone()[0]
    finally:
        conn.close()


# -- phases ---------------------------------------------------------------------------


def online(reply: tuple[int, dict[str, Any]] | None) -> bool:
    return reply is not None and reply[1].get("mode") == "online"


def sync(
    processes: Processes, site: Node, proxy: ProxyProcess, users_expected: int, cards: int
) -> dict[str, Any]:
    """Start an empty site; time it to ``online``; check its replica is complete."""
    before = proxy.stats()
    primary = processes.servers.get("hq")
    primary_cpu = cpu_seconds(primary)
    began = time.perf_counter()
    process = processes.start(site)
    wait_health(process, site, lambda r: r is not None, "answering /health", START_DEADLINE)
    answering = time.perf_counter() - began
    wait_health(process, site, online, "online", SYNC_DEADLINE)
    seconds = time.perf_counter() - began
    after = proxy.stats()
    site_cpu = cpu_seconds(process)
    primary_cpu_after = cpu_seconds(primary)
    got_users = count(site.database, "SELECT count(*) FROM users")
    got_cards = count(site.database, "SELECT count(*) FROM cards")
    if (got_users, got_cards) != (users_expected, cards):
        raise BenchError(
            f"{site.name}: replica has {got_users} users and {got_cards} cards, "
            f"expected {users_expected} and {cards}"
        )
    return {
        "seconds": round(seconds, 2),
        "process_start_seconds": round(answering, 2),
        "users": got_users,
        "cards": got_cards,
        "bytes_from_primary": after["down"] - before["down"],
        "bytes_to_primary": after["up"] - before["up"],
        "site_cpu_seconds": None if site_cpu is None else round(site_cpu, 2),
        "primary_cpu_seconds": (
            None
            if primary_cpu is None or primary_cpu_after is None
            else round(primary_cpu_after - primary_cpu, 2)
        ),
    }


def thdChanges(
    conn: Connection, targets: Sequence[tuple[int, str]], amount: int, now: float
) -> list[int]:
    """Balance adjustments as ``sitesrv-admin balance adjust`` makes them; their positions."""
    positions = []
    for account_id, name in targets:
        ledger.thdPost(conn, account_id, amount, "adjust", now, site="hq", comment="bench")
        thdAudit(conn, "bench", "balance.adjust", name, now, amount=amount)
        positions.append(thdState(conn)[1])
    return positions


class PositionWatcher(threading.Thread):
    """Polls a site's ``replica_state.position`` (read-only); records when it moves."""

    def __init__(self, database: str) -> None:
        super().__init__(name="position-watcher", daemon=True)
        self.database = database
        self.times: list[float] = []
        self.positions: list[int] = []
        self.stopping = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            conn = sqlite3.connect(f"file:{self.database}?mode=ro", uri=True, timeout=10)
            try:
                while not self.stopping.is_set():
                    # fetchall: step the statement to its end, so no read stays open.
                    rows = conn.execute("SELECT position FROM replica_state").fetchall()
                    position = rows[0][0] if rows else -1
                    now = time.perf_counter()
                    if not self.positions or position > self.positions[-1]:
                        self.times.append(now)
                        self.positions.append(position)
                    self.stopping.wait(POSITION_INTERVAL)
            finally:
                conn.close()
        except BaseException as e:
            self.error = e

    @property
    def position(self) -> int:
        return self.positions[-1] if self.positions else -1

    def seen_at(self, position: int) -> float | None:
        """When the site was first seen at or past ``position``."""
        i = bisect.bisect_left(self.positions, position)
        return self.times[i] if i < len(self.times) else None


def percentile(ordered: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0-1) of sorted values (nearest rank)."""
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def stream(
    primary: Node,
    site: Node,
    proxy: ProxyProcess,
    rate: float,
    seconds: float,
    per_transaction: int = 1,
    trace_path: str | None = None,
    servers: Mapping[str, subprocess.Popen[bytes]] | None = None,
) -> dict[str, Any]:
    """Write ``rate`` changes a second for ``seconds``; when does each show at the site?"""
    conn = sqlite3.connect(f"file:{primary.database}?mode=ro", uri=True, timeout=10)
    try:
        accounts = conn.execute(
            "SELECT id, name FROM accounts WHERE user_id IS NOT NULL ORDER BY id"
        ).fetchall()
    finally:
        conn.close()
    store = Store(f"sqlite:///{primary.database}", readers=1)
    watcher = PositionWatcher(site.database)
    watcher.start()
    written: list[tuple[int, float]] = []
    total = int(rate * seconds)
    try:
        time.sleep(0.2)  # let the watcher see the starting position
        before = proxy.stats()
        cpu_before = {name: cpu_seconds(p) for name, p in (servers or {}).items()}
        began = time.perf_counter()
        per = max(1, per_transaction)
        for i in range(0, total, per):
            due = began + i / rate
            wait = due - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            targets = [accounts[(j * 7919) % len(accounts)] for j in range(i, min(total, i + per))]
            amount = -1 if (i // per) % 2 else 1
            positions = store.write(thdChanges, targets, amount, time.time())
            committed = time.perf_counter()
            written.extend((position, committed) for position in positions)
        writing = time.perf_counter() - began
        last = written[-1][0] if written else 0
        end = time.perf_counter() + CATCH_UP_DEADLINE
        while watcher.position < last and time.perf_counter() < end and watcher.is_alive():
            time.sleep(0.01)
        # Heartbeats and acknowledgements over the same span as the writes.
        after = proxy.stats()
        cpu_after = {name: cpu_seconds(p) for name, p in (servers or {}).items()}
    finally:
        watcher.stopping.set()
        watcher.join(10)
        store.stop()
    if watcher.error is not None:
        raise BenchError(f"watching the site's position failed: {watcher.error!r}")
    latencies = []
    unseen = 0
    trace = []
    for position, at in written:
        seen = watcher.seen_at(position)
        trace.append((position, at - began, None if seen is None else seen - began))
        if seen is None:
            unseen += 1
        else:
            latencies.append(max(0.0, seen - at))
    if trace_path:
        with open(trace_path, "w", encoding="utf-8") as f:
            f.write("position,written_s,seen_s\n")
            f.writelines(f"{p},{w:.4f},{'' if v is None else f'{v:.4f}'}\n" for p, w, v in trace)
    latencies.sort()
    down, up = after["down"] - before["down"], after["up"] - before["up"]
    cpu_used = {}
    for name, used in cpu_before.items():
        used_after = cpu_after.get(name)
        if used is not None and used_after is not None:
            cpu_used[name] = round(used_after - used, 2)
    result: dict[str, Any] = {
        "changes": len(written),
        "changes_per_transaction": per_transaction,
        "seconds": round(writing, 2),
        "achieved_rate": round(len(written) / writing, 1) if writing else None,
        "unseen": unseen,
        "bytes_from_primary": down,
        "bytes_to_primary": up,
        "bytes_per_change": round((down + up) / len(written), 1) if written else None,
        "bytes_per_change_from_primary": round(down / len(written), 1) if written else None,
        "positions_seen": len(watcher.positions),
        "cpu_seconds": cpu_used,
    }
    if latencies:
        result.update(
            p50_ms=round(1000 * percentile(latencies, 0.50), 1),
            p99_ms=round(1000 * percentile(latencies, 0.99), 1),
            max_ms=round(1000 * latencies[-1], 1),
            mean_ms=round(1000 * sum(latencies) / len(latencies), 1),
        )
    return result


# -- the run --------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    model = ram = os_name = "unknown"
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        model = next(
            (ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), model
        )
    with open("/proc/meminfo", encoding="utf-8") as f:
        kib = next((int(ln.split()[1]) for ln in f if ln.startswith("MemTotal")), 0)
        ram = f"{kib / 1024 / 1024:.1f} GiB"
    with open("/etc/os-release", encoding="utf-8") as f:
        fields = dict(ln.rstrip("\n").split("=", 1) for ln in f if "=" in ln)
        os_name = fields.get("PRETTY_NAME", os_name).strip('"')
    return {
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "cpus": os.cpu_count(),
        "cpu": model,
        "ram": ram,
        "os": f"{os_name}, Linux {platform.release()}",
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
    }


def run(options: argparse.Namespace, directory: str) -> dict[str, Any]:
    """Every phase, in ``directory``; the results."""
    results: dict[str, Any] = {"machine": machine(), "options": vars(options).copy()}
    say = options.say
    cards = options.users * options.cards_per_user
    primary, replication_port, ca = make_primary(directory)
    say(f"loading {options.users:,} users and {cards:,} cards into the primary")
    results["load_seconds"] = round(
        load_primary(primary, options.users, options.cards_per_user), 2
    )
    processes = Processes()
    try:
        proxy = processes.start_proxy(replication_port, os.path.join(directory, "proxy.log"))
        fast = make_site(directory, "fast", primary, proxy.port, ca)
        slow = make_site(directory, "slow", primary, proxy.port, ca)
        say("starting the primary")
        hq = processes.start(primary)
        wait_health(hq, primary, lambda r: r is not None and r[0] == 200, "up", START_DEADLINE)

        say("sync: site 'fast' from empty, through the proxy with no faults")
        results["sync"] = sync(processes, fast, proxy, options.users, cards)
        say(f"  {results['sync']}")

        say(f"stream: {options.rate:g} changes/s for {options.stream_seconds:g} s")
        results["stream"] = stream(
            primary,
            fast,
            proxy,
            options.rate,
            options.stream_seconds,
            options.changes_per_transaction,
            options.trace,
            processes.servers,
        )
        say(f"  {results['stream']}")
        processes.stop(fast.name)

        if not options.skip_slow_link:
            delay_ms, rate = options.slow_delay_ms, options.slow_rate
            proxy.command(f"delay {delay_ms:g}")
            proxy.command(f"rate {rate}")
            say(f"slow-sync: site 'slow' from empty, {delay_ms:g} ms each way, {rate:,} B/s")
            results["slow_sync"] = {
                "delay_ms": delay_ms,
                "rate_bytes_per_second": rate,
                **sync(processes, slow, proxy, options.users, cards),
            }
            say(f"  {results['slow_sync']}")
    finally:
        processes.close()
    results["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    results["goals"] = {
        "sync_seconds": {
            "goal": str(GOALS["sync_seconds"]),
            "value": results.get("sync", {}).get("seconds"),
            "met": GOALS["sync_seconds"].met(results.get("sync", {}).get("seconds")),
        },
        "p99_ms": {
            "goal": str(GOALS["p99_ms"]),
            "value": results.get("stream", {}).get("p99_ms"),
            "met": GOALS["p99_ms"].met(results.get("stream", {}).get("p99_ms")),
        },
    }
    return results


def report(results: dict[str, Any]) -> str:
    """The results as text."""
    m = results["machine"]
    lines = [
        f"machine: {m['cpus']} x {m['cpu']}, {m['ram']}, {m['os']}, "
        f"Python {m['python']}, SQLite {m['sqlite']}",
        f"primary load (bulk import): {results['load_seconds']} s",
    ]
    s = results.get("sync")
    if s:
        lines.append(
            f"initial sync on loopback: {s['seconds']} s to online "
            f"(process answering /health after {s['process_start_seconds']} s); "
            f"{s['users']:,} users, {s['cards']:,} cards; "
            f"{s['bytes_from_primary']:,} bytes from the primary"
        )
    t = results.get("stream")
    if t:
        lines.append(
            f"stream: {t['changes']:,} changes in {t['seconds']} s ({t['achieved_rate']}/s); "
            f"change-to-visible p50 {t.get('p50_ms')} ms, p99 {t.get('p99_ms')} ms, "
            f"max {t.get('max_ms')} ms; {t['unseen']} not seen; "
            f"{t['bytes_per_change']} bytes on the wire per change "
            f"({t['bytes_per_change_from_primary']} from the primary)"
        )
    w = results.get("slow_sync")
    if w:
        lines.append(
            f"initial sync, {w['delay_ms']:g} ms each way and {w['rate_bytes_per_second']:,} B/s:"
            f" {w['seconds']} s to online; {w['bytes_from_primary']:,} bytes from the primary"
        )
    for name, goal in results["goals"].items():
        verdict = "met" if goal["met"] else "MISSED"
        lines.append(f"goal {name} {goal['goal']}: {goal['value']} -> {verdict}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(
        prog="python -m bench.replication",
        description="Benchmark a site's initial sync and change stream over TLS.",
    )
    p.add_argument("--users", type=int, default=100_000, help="users at the primary")
    p.add_argument("--cards-per-user", type=int, default=2, help="cards per user")
    p.add_argument("--stream-seconds", type=float, default=10.0, help="length of the stream")
    p.add_argument("--rate", type=float, default=1000.0, help="changes a second in the stream")
    p.add_argument(
        "--changes-per-transaction",
        type=int,
        default=1,
        metavar="N",
        help="changes written in each transaction of the stream",
    )
    p.add_argument("--skip-slow-link", action="store_true", help="skip the slow-link sync")
    p.add_argument("--slow-delay-ms", type=float, default=100.0, help="slow link: one-way ms")
    p.add_argument(
        "--slow-rate", type=int, default=1_250_000, help="slow link: bytes/s each way (10 Mbit/s)"
    )
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    p.add_argument(
        "--trace", metavar="CSV", help="write each change's position, write and seen times"
    )
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    options = p.parse_args(argv)
    if options.users < 1 or options.cards_per_user < 0 or options.rate <= 0:
        p.error("--users must be at least 1, --cards-per-user 0 or more, --rate above 0")
    return options


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; 0 when it ran (goals met or not), 1 when something failed."""
    options = parse_args(sys.argv[1:] if argv is None else argv)
    quiet = options.json
    # On SIGTERM too, unwind (SystemExit) so that every child process is killed.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))

    def say(text: str) -> None:
        if not quiet:
            print(text, flush=True)
        else:
            print(text, file=sys.stderr, flush=True)

    options.say = say
    directory = tempfile.mkdtemp(prefix="sitesrv-bench-replication-")
    say(f"working in {directory}")
    try:
        results = run(options, directory)
    except BenchError as e:
        print(f"benchmark failed: {e}\nkept {directory} for a look", file=sys.stderr)
        return 1
    if options.keep:
        say(f"kept {directory}")
    else:
        shutil.rmtree(directory, ignore_errors=True)
    del results["options"]["say"]
    if options.json:
        print(json.dumps(results, indent=2))
    else:
        print(report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
