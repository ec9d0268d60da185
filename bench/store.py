"""The store benchmark: loading users, card logins and ledger charges, with the real code.

Run ``python -m bench.store --help``. By default it measures SQLite (``synchronous=FULL``,
as ``sitesrv.store.engine`` sets it) in a new temporary directory that is deleted
afterwards; with ``--postgres URL`` (or ``SITESRV_TEST_POSTGRES_URL``) it measures that
PostgreSQL database as well. It is a benchmark, not a test: it prints figures against the
goals and exits 0 whether or not they are met (1 only when something fails outright: an
error, a wrong answer, a charge answered but not in the ledger).

Phases, per database:

load
    ``users.thdImportUsers`` (the bulk directory import), ``--batch`` users per
    transaction; then ``--per-row-sample`` more users through the one-by-one path
    (``thdAddUser`` + ``thdAddCard``, also ``--batch`` per transaction), for that path's
    rate on a full database (they stay, so the later phases see ``--users`` plus these).
    ``--load per-row`` loads all users one by one instead.
lookups
    ``thdCredentialsByCard`` in a read transaction, one after another on one thread.
logins
    ``Authenticator.card`` on the reactor, with the store's reader pool
    (``read=store.runRead``), ``--concurrency`` logins in flight, random cards.
charges
    ``store.runWrite(ledger.thdPost, ..., enforce_limit=True)`` with a fresh UUID each,
    against random users, ``--concurrency`` in flight: one charge per transaction, each
    committed before its caller hears back. Then the same with one charge in flight.

Each timed phase runs ``--warmup`` seconds unmeasured, then ``--seconds`` measured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import sqlite3
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any

import attrs
import sqlalchemy
from sqlalchemy import Connection, create_engine, func, inspect, select, text
from twisted.internet import task
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.threads import deferToThread

from sitesrv.core.auth import Authenticator, FailureThrottle
from sitesrv.errors import InsufficientFunds
from sitesrv.store import Store, ledger, users
from sitesrv.store.bootstrap import open_store, thdInitPrimary
from sitesrv.store.changelog import thdState
from sitesrv.store.engine import normalise_url
from sitesrv.store.schema import AccountType, accounts, transactions

POSTGRES_ENV = "SITESRV_TEST_POSTGRES_URL"
SITE = "hq"
#: Every loaded user starts with 10.00 on a restricted account: charges must pass the
#: credit check for real, and a few thousand charges of at most 0.50 never exhaust it.
OPENING_BALANCE = 1000
CHARGE_MIN, CHARGE_MAX = 5, 50


@attrs.frozen
class Goal:
    """A target from the issue: a figure that must be below or above ``limit``."""

    limit: float
    unit: str
    below: bool = False

    def met(self, value: float) -> bool:
        """Whether ``value`` meets the goal."""
        return value < self.limit if self.below else value >= self.limit

    def __str__(self) -> str:
        return f"{'<' if self.below else '>='} {self.limit:,.0f} {self.unit}"


GOALS = {
    "load": Goal(20, "s", below=True),
    "logins": Goal(2000, "/s"),
    "charges": Goal(1000, "/s"),
}


@attrs.frozen
class Rate:
    """What a timed phase did: operations, seconds measured, and latencies (seconds)."""

    ops: int
    seconds: float
    latencies: tuple[float, ...] = ()
    errors: int = 0
    #: Legitimate refusals (a charge beyond the credit limit), counted in ``ops``.
    refused: int = 0

    @property
    def per_second(self) -> float:
        """Operations per second."""
        return self.ops / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        """The ``q`` quantile (0-1) of the latencies, in milliseconds."""
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return 1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def summary(self) -> dict[str, Any]:
        """A JSON-friendly summary."""
        return {
            "ops": self.ops,
            "seconds": round(self.seconds, 3),
            "per_second": round(self.per_second, 1),
            "p50_ms": round(self.percentile(0.50), 3) if self.latencies else None,
            "p99_ms": round(self.percentile(0.99), 3) if self.latencies else None,
            "errors": self.errors,
            "refused": self.refused,
        }


# -- the data -------------------------------------------------------------------------


def card_number(index: int) -> str:
    """The ``index``-th card number: 10 digits, unique, in no particular order.

    (A multiplier prime to 10 makes ``index -> number`` a bijection mod 10^10, so the
    cards index sees random inserts, as with real card numbers.)
    """
    return f"{(index * 2_654_435_761 + 1_000_000_007) % 10**10:010d}"


def people(start: int, stop: int, cards_per_user: int) -> Iterator[users.NewUser]:
    """Users ``start`` to ``stop - 1``, each with their cards."""
    for i in range(start, stop):
        yield users.NewUser(
            f"u{i:07d}",
            full_name=f"Benchmark User {i}",
            email=f"u{i:07d}@example.org",
            balance=OPENING_BALANCE,
            cards=tuple(card_number(i * cards_per_user + k) for k in range(cards_per_user)),
        )


def thdAddOneByOne(conn: Connection, batch: Sequence[users.NewUser], now: float) -> None:
    """The one-by-one path: ``thdAddUser`` then ``thdAddCard`` for each card."""
    for p in batch:
        users.thdAddUser(
            conn,
            p.username,
            now,
            full_name=p.full_name,
            email=p.email,
            balance=p.balance,
            restricted=p.restricted,
            credit_limit=p.credit_limit,
            site=SITE,
        )
        for number in p.cards:
            users.thdAddCard(conn, p.username, number, now)


def load(
    store: Store, start: int, stop: int, cards_per_user: int, batch: int, bulk: bool
) -> dict[str, Any]:
    """Load users ``start`` to ``stop - 1`` in transactions of ``batch``.

    Returns the users, wall-clock and CPU seconds (this process; CPU well below wall
    means waiting for the disk or for a CPU shared with other work) and users/s.
    """
    began, cpu = time.perf_counter(), time.process_time()
    for low in range(start, stop, batch):
        chunk = list(people(low, min(stop, low + batch), cards_per_user))
        if bulk:
            store.write(users.thdImportUsers, chunk, time.time(), site=SITE)
        else:
            store.write(thdAddOneByOne, chunk, time.time())
    seconds = time.perf_counter() - began
    return {
        "users": stop - start,
        "cards": (stop - start) * cards_per_user,
        "seconds": round(seconds, 2),
        "cpu_seconds": round(time.process_time() - cpu, 2),
        "users_per_second": round((stop - start) / seconds, 1),
    }


def thdPersonalAccounts(conn: Connection) -> list[int]:
    """The ids of all personal accounts."""
    q = select(accounts.c.id).where(accounts.c.type == AccountType.PERSONAL.value)
    return list(conn.execute(q).scalars())


def thdCounts(conn: Connection) -> dict[str, int]:
    """Rows in the tables the benchmark writes, and the change-log head."""
    counts = {
        name: conn.execute(text(f"SELECT count(*) FROM {name}")).scalar_one()
        for name in ("users", "accounts", "cards", "transactions", "changelog")
    }
    counts["head"] = thdState(conn)[1]
    return counts


def thdCountUUIDs(conn: Connection, uuids: Sequence[str]) -> int:
    """How many of these transaction UUIDs the ledger holds."""
    found = 0
    for start in range(0, len(uuids), 1000):
        chunk = uuids[start : start + 1000]
        q = select(func.count()).select_from(transactions).where(transactions.c.uuid.in_(chunk))
        found += conn.execute(q).scalar_one()
    return found


# -- timed phases ---------------------------------------------------------------------


def lookups(store: Store, numbers: Sequence[str], warmup: float, seconds: float) -> Rate:
    """``thdCredentialsByCard`` lookups, one read transaction each, on this thread."""
    rng = random.Random(2)
    latencies: list[float] = []
    misses = 0
    start = time.perf_counter()
    measure_from = start + warmup
    end = measure_from + seconds
    while True:
        t0 = time.perf_counter()
        if t0 >= end:
            break
        found = store.read(users.thdCredentialsByCard, rng.choice(numbers))
        t1 = time.perf_counter()
        if t0 >= measure_from:
            latencies.append(t1 - t0)
            misses += found is None
    return Rate(len(latencies), seconds, tuple(latencies), misses)


async def closed_loop(
    operation: Callable[[random.Random], Awaitable[bool | None]],
    concurrency: int,
    warmup: float,
    seconds: float,
) -> Rate:
    """Run ``operation`` from ``concurrency`` loops at once; count those that start and
    finish inside the measured window. ``operation`` returns True for a right answer,
    False for a wrong one and None for a legitimate refusal.
    """
    latencies: list[float] = []
    errors = refused = 0
    start = time.perf_counter()
    measure_from = start + warmup
    end = measure_from + seconds

    async def loop(k: int) -> None:
        nonlocal errors, refused
        rng = random.Random(1000 + k)
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            ok = await operation(rng)
            t1 = time.perf_counter()
            if t0 >= measure_from and t1 <= end:
                latencies.append(t1 - t0)
                errors += ok is False
                refused += ok is None

    await gatherResults([Deferred.fromCoroutine(loop(k)) for k in range(concurrency)])
    return Rate(len(latencies), seconds, tuple(latencies), errors, refused)


async def card_logins(
    reactor: Any,
    store: Store,
    owners: dict[str, str],
    concurrency: int,
    warmup: float,
    seconds: float,
) -> Rate:
    """``Authenticator.card`` with random cards, as a card reader's swipes."""
    numbers = list(owners)

    def verify(fn: Callable[..., Any], *args: Any) -> Deferred[Any]:
        return deferToThread(fn, *args)

    auth = Authenticator(read=store.runRead, throttle=FailureThrottle(reactor), verify=verify)

    async def login(rng: random.Random) -> bool:
        number = rng.choice(numbers)
        # What a reader sends: the number and a line end (the normaliser strips it).
        identity = await auth.card(f"{number}\r\n", device=f"reader-{rng.randrange(50)}")
        return identity.user.username == owners[number]

    return await closed_loop(login, concurrency, warmup, seconds)


async def charges(
    store: Store,
    account_ids: Sequence[int],
    concurrency: int,
    warmup: float,
    seconds: float,
    applied: list[str],
) -> Rate:
    """Print charges through ``runWrite(ledger.thdPost, ...)``, one per transaction.

    The UUID of every charge answered as applied, measured or not, goes into ``applied``.
    """

    async def charge(rng: random.Random) -> bool | None:
        txn_uuid = str(uuid.uuid4())
        try:
            txn = await store.runWrite(
                ledger.thdPost,
                rng.choice(account_ids),
                -rng.randint(CHARGE_MIN, CHARGE_MAX),
                "print",
                time.time(),
                site=SITE,
                txn_uuid=txn_uuid,
                enforce_limit=True,
            )
        except InsufficientFunds:
            # Only with few users and long runs: an answer, but not a charge.
            return None
        if txn.applied:
            applied.append(txn_uuid)
        return txn.applied

    return await closed_loop(charge, concurrency, warmup, seconds)


# -- one database ---------------------------------------------------------------------


def say(message: str) -> None:
    """Progress, on stderr (stdout is kept for the results)."""
    print(message, file=sys.stderr, flush=True)


async def run_backend(
    reactor: Any, name: str, url: str, options: argparse.Namespace
) -> dict[str, Any]:
    """Load and measure one database; return its results."""
    n, per_user = options.users, options.cards_per_user
    sample = options.per_row_sample if options.load == "bulk" else 0
    results: dict[str, Any] = {"backend": name, "loadavg_before": os.getloadavg()}
    say(f"[{name}] migrating")
    store = open_store(url)
    try:
        store.write(thdInitPrimary, SITE, "USD", 2, time.time())
        bulk = options.load == "bulk"
        say(f"[{name}] loading {n:,} users ({'bulk' if bulk else 'one by one'})")
        results["load"] = load(store, 0, n, per_user, options.batch, bulk)
        results["load"]["method"] = "thdImportUsers" if bulk else "thdAddUser+thdAddCard"
        if sample:
            say(f"[{name}] loading {sample:,} more users one by one")
            results["per_row_sample"] = one = load(
                store, n, n + sample, per_user, options.batch, False
            )
            one["projected_seconds"] = round(n * one["seconds"] / sample, 1)
        n += sample
        counts = store.read(thdCounts)
        results["counts"] = counts
        if counts["users"] != n or counts["cards"] != n * per_user:
            raise RuntimeError(f"loaded {counts}, expected {n} users, {n * per_user} cards")
        owners = {
            number: p.username
            for low in range(0, n, 10_000)
            for p in people(low, min(n, low + 10_000), per_user)
            for number in p.cards
        }
        numbers = list(owners)
        account_ids = store.read(thdPersonalAccounts)
        w, s, c = options.warmup, options.seconds, options.concurrency

        say(f"[{name}] raw lookups, one thread, {s} s")
        results["lookups"] = lookups(store, numbers, w, s).summary()

        store.start(reactor)
        try:
            say(f"[{name}] card logins, {c} in flight, {s} s")
            results["logins"] = (await card_logins(reactor, store, owners, c, w, s)).summary()
            before = store.read(thdCounts)
            applied: list[str] = []
            say(f"[{name}] charges, {c} in flight, {s} s")
            results["charges"] = (await charges(store, account_ids, c, w, s, applied)).summary()
            say(f"[{name}] charges, 1 in flight, {s} s")
            results["charges_1"] = (await charges(store, account_ids, 1, w, s, applied)).summary()
        finally:
            store.stop()
        after = store.read(thdCounts)
        posted = after["transactions"] - before["transactions"]
        # Every charge answered as applied was committed, nothing else was, and each
        # logged one account image.
        results["check"] = {
            "charges_answered": len(applied),
            "charges_posted": posted,
            "changelog_entries_added": after["head"] - before["head"],
            "ok": posted == len(applied) == after["head"] - before["head"]
            and store.read(thdCountUUIDs, applied) == len(applied),
        }
    finally:
        store.stop()
    results["loadavg_after"] = os.getloadavg()
    return results


# -- the machine ----------------------------------------------------------------------


def _first(path: str, prefix: str) -> str:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(prefix):
                    return line.split(":", 1)[1].strip() if ":" in line else line.strip()
    except OSError:
        pass
    return "?"


def fsync_latency(directory: str, count: int = 200) -> dict[str, float]:
    """p50 / p99 of writing 4 KiB and fsyncing it, in ms: what each commit waits for."""
    path = os.path.join(directory, "fsync-probe")
    latencies = []
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for i in range(count):
            os.pwrite(fd, os.urandom(4096), (i % 16) * 4096)
            t0 = time.perf_counter()
            os.fsync(fd)
            latencies.append(time.perf_counter() - t0)
    finally:
        os.close(fd)
        os.remove(path)
    rate = Rate(count, sum(latencies), tuple(latencies))
    return {"p50_ms": round(rate.percentile(0.5), 3), "p99_ms": round(rate.percentile(0.99), 3)}


def machine(directory: str) -> dict[str, Any]:
    """What the figures were measured on."""
    kib = _first("/proc/meminfo", "MemTotal").split()[0]
    os_name = _first("/etc/os-release", "PRETTY_NAME=").split("=", 1)[-1].strip('"')
    usage = shutil.disk_usage(directory)
    return {
        "nproc": os.cpu_count(),
        "cpu": _first("/proc/cpuinfo", "model name"),
        "ram_gib": round(int(kib) / 2**20, 1) if kib.isdigit() else None,
        "os": f"{os_name}, Linux {platform.release()}",
        "sqlite_dir": directory,
        "disk_gib": round(usage.total / 2**30),
        "fsync": fsync_latency(directory),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "sqlalchemy": sqlalchemy.__version__,
    }


def postgres_info(url: str) -> dict[str, Any]:
    """The PostgreSQL server's version and durability settings."""
    engine = create_engine(normalise_url(url))
    try:
        with engine.connect() as conn:
            return {
                name: conn.execute(text(f"SHOW {name}")).scalar_one()
                for name in ("server_version", "fsync", "synchronous_commit", "shared_buffers")
            }
    finally:
        engine.dispose()


def postgres_tables(url: str) -> list[str]:
    """The tables in the database's public schema."""
    engine = create_engine(normalise_url(url))
    try:
        with engine.connect() as conn:
            return inspect(conn).get_table_names()
    finally:
        engine.dispose()


def wipe_postgres(url: str) -> None:
    """Drop everything in the database's public schema."""
    engine = create_engine(normalise_url(url))
    try:
        with engine.begin() as conn:
            conn.execute(text("DROP SCHEMA public CASCADE"))
            conn.execute(text("CREATE SCHEMA public"))
    finally:
        engine.dispose()


# -- output ---------------------------------------------------------------------------


def wrong_answers(run: dict[str, Any]) -> int:
    """Lookups that found nothing, logins answered with the wrong user, charges not applied."""
    return sum(run[k]["errors"] for k in ("lookups", "logins", "charges", "charges_1"))


def _ms(rate: dict[str, Any]) -> str:
    if rate["p50_ms"] is None:
        return "-"
    return f"{rate['p50_ms']:.2f} / {rate['p99_ms']:.2f}"


def table(report: dict[str, Any]) -> str:
    """The results as a plain-text table, one column per database."""
    runs = report["runs"]
    rows: list[tuple[str, str, list[str]]] = []

    def verdict(goal: str, value: float, text: str) -> str:
        return f"{text} {'ok' if GOALS[goal].met(value) else 'MISSED'}"

    cards = report["users"] * report["cards_per_user"]
    methods = {"thdImportUsers": "bulk import", "thdAddUser+thdAddCard": "one by one"}
    method = methods[runs[0]["load"]["method"]]
    rows.append(
        (
            f"load {report['users']:,} users, {cards:,} cards ({method})",
            str(GOALS["load"]),
            [verdict("load", r["load"]["seconds"], f"{r['load']['seconds']:.1f} s") for r in runs],
        )
    )
    rows.append(
        (
            "  rate; CPU seconds",
            "",
            [
                f"{r['load']['users_per_second']:,.0f} users/s; {r['load']['cpu_seconds']:.1f} s"
                for r in runs
            ],
        )
    )
    if all("per_row_sample" in r for r in runs):
        samples = [r["per_row_sample"] for r in runs]
        rows.append(
            (
                f"then {samples[0]['users']:,} more users one by one",
                "",
                [f"{x['users_per_second']:,.0f} users/s" for x in samples],
            )
        )
        rows.append(
            (
                f"  projected for {report['users']:,} users",
                str(GOALS["load"]),
                [
                    verdict("load", x["projected_seconds"], f"{x['projected_seconds']:.0f} s")
                    for x in samples
                ],
            )
        )
    rows.append(
        ("raw card lookups, 1 thread", "", [f"{r['lookups']['per_second']:,.0f} /s" for r in runs])
    )
    rows.append(("  p50 / p99 ms", "", [_ms(r["lookups"]) for r in runs]))
    c = report["concurrency"]
    rows.append(
        (
            f"card logins, {c} in flight",
            str(GOALS["logins"]),
            [
                verdict(
                    "logins", r["logins"]["per_second"], f"{r['logins']['per_second']:,.0f} /s"
                )
                for r in runs
            ],
        )
    )
    rows.append(("  p50 / p99 ms", "", [_ms(r["logins"]) for r in runs]))
    rows.append(
        (
            f"charges, {c} in flight",
            str(GOALS["charges"]),
            [
                verdict(
                    "charges", r["charges"]["per_second"], f"{r['charges']['per_second']:,.0f} /s"
                )
                for r in runs
            ],
        )
    )
    rows.append(("  p50 / p99 ms", "", [_ms(r["charges"]) for r in runs]))
    rows.append(
        ("charges, 1 in flight", "", [f"{r['charges_1']['per_second']:,.0f} /s" for r in runs])
    )
    rows.append(("  p50 / p99 ms", "", [_ms(r["charges_1"]) for r in runs]))
    errors = [str(wrong_answers(r)) + ("" if r["check"]["ok"] else " CHECK FAILED") for r in runs]
    rows.append(("wrong answers / misses", "0", errors))
    if any(r[k]["refused"] for r in runs for k in ("charges", "charges_1")):
        rows.append(
            (
                "charges refused (credit limit)",
                "",
                [str(r["charges"]["refused"] + r["charges_1"]["refused"]) for r in runs],
            )
        )
    rows.append(
        (
            "load average before / after",
            "",
            [f"{r['loadavg_before'][0]:.1f} / {r['loadavg_after'][0]:.1f}" for r in runs],
        )
    )

    header = ("", "goal", [r["backend"] for r in runs])
    widths = [
        max(len(row[0]) for row in [header, *rows]),
        max(len(row[1]) for row in [header, *rows]),
    ]
    columns = [max(len(row[2][i]) for row in [header, *rows]) for i in range(len(runs))]
    lines = []
    for label, goal, values in [header, *rows]:
        cells = [label.ljust(widths[0]), goal.ljust(widths[1])]
        cells += [v.rjust(w) for v, w in zip(values, columns, strict=True)]
        lines.append("  ".join(cells).rstrip())
    rule = "-" * len(lines[0])
    return "\n".join([lines[0], rule, *lines[1:]])


def describe(report: dict[str, Any]) -> str:
    """The machine, as a few lines."""
    m = report["machine"]
    lines = [
        f"{m['nproc']} x {m['cpu']}, {m['ram_gib']} GiB RAM, {m['os']}",
        f"Python {m['python']}, SQLite {m['sqlite']}, SQLAlchemy {m['sqlalchemy']}",
        f"fsync of 4 KiB in {m['sqlite_dir']}: p50 {m['fsync']['p50_ms']:.2f} ms, "
        f"p99 {m['fsync']['p99_ms']:.2f} ms",
    ]
    if "postgres" in report:
        p = report["postgres"]
        lines.append(
            f"PostgreSQL {p['server_version']} (fsync={p['fsync']}, "
            f"synchronous_commit={p['synchronous_commit']}, "
            f"shared_buffers={p['shared_buffers']})"
        )
    return "\n".join(lines)


# -- command line ---------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(
        prog="python -m bench.store", description=__doc__.split("\n\n")[0] if __doc__ else ""
    )
    p.add_argument("--users", type=int, default=100_000, help="users to load (100000)")
    p.add_argument("--cards-per-user", type=int, default=2, help="cards per user (2)")
    p.add_argument("--seconds", type=float, default=5.0, help="measured seconds per phase (5)")
    p.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds first (1)")
    p.add_argument("--concurrency", type=int, default=50, help="requests in flight (50)")
    p.add_argument("--batch", type=int, default=1000, help="users per load transaction (1000)")
    p.add_argument(
        "--load",
        choices=("bulk", "per-row"),
        default="bulk",
        help="load with thdImportUsers (bulk, default) or thdAddUser/thdAddCard (per-row)",
    )
    p.add_argument(
        "--per-row-sample",
        type=int,
        default=2000,
        help="with --load bulk, then load this many more users one by one (2000; 0: none)",
    )
    p.add_argument(
        "--postgres",
        metavar="URL",
        default=os.environ.get(POSTGRES_ENV) or None,
        help=f"also measure this PostgreSQL database (default: ${POSTGRES_ENV})",
    )
    p.add_argument(
        "--wipe",
        action="store_true",
        help="empty the PostgreSQL database's public schema first if it has tables",
    )
    p.add_argument("--no-sqlite", action="store_true", help="measure PostgreSQL only")
    p.add_argument("--dir", help="where to make the temporary SQLite directory")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    options = p.parse_args(argv)
    if options.users < 1 or options.cards_per_user < 1 or options.concurrency < 1:
        p.error("--users, --cards-per-user and --concurrency must be at least 1")
    if options.no_sqlite and not options.postgres:
        p.error("--no-sqlite needs --postgres")
    return options


async def main(reactor: Any, options: argparse.Namespace) -> None:
    """Measure each database and print the report."""
    directory = tempfile.mkdtemp(prefix="sitesrv-bench-store-", dir=options.dir)
    # Also when interrupted (Ctrl-C, SIGTERM stop the reactor before main returns).
    reactor.addSystemEventTrigger("before", "shutdown", shutil.rmtree, directory, True)
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(["python -m bench.store", *sys.argv[1:]]),
        "users": options.users,
        "cards_per_user": options.cards_per_user,
        "seconds": options.seconds,
        "concurrency": options.concurrency,
        "batch": options.batch,
        "machine": machine(directory),
        "goals": {k: str(g) for k, g in GOALS.items()},
        "runs": [],
    }
    try:
        if not options.no_sqlite:
            url = f"sqlite:///{os.path.join(directory, 'bench.db')}"
            report["runs"].append(await run_backend(reactor, "SQLite", url, options))
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    if options.postgres:
        url = options.postgres
        report["postgres"] = postgres_info(url)
        tables = postgres_tables(url)
        if tables and not options.wipe:
            raise SystemExit(
                f"the PostgreSQL database has {len(tables)} tables; the benchmark needs an "
                "empty one (--wipe drops its public schema)"
            )
        wipe_postgres(url)
        try:
            report["runs"].append(await run_backend(reactor, "PostgreSQL", url, options))
        finally:
            # The database was empty (or wiped): leave it empty again.
            wipe_postgres(url)
    if options.json:
        print(json.dumps(report, indent=2))
    else:
        print(describe(report))
        print()
        print(table(report))
    if not all(r["check"]["ok"] and wrong_answers(r) == 0 for r in report["runs"]):
        # Slow is a finding; a wrong answer or a lost charge is a failure.
        raise SystemExit(1)


def run(argv: Sequence[str] | None = None) -> None:
    """Parse the command line and run the benchmark on a reactor."""
    options = parse_args(sys.argv[1:] if argv is None else argv)
    task.react(lambda reactor: Deferred.fromCoroutine(main(reactor, options)))


if __name__ == "__main__":
    run()
