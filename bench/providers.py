"""The print-provider benchmark: decisions per second, bytes per job, submit→held latency.

Run ``python -m bench.providers --help``. It builds a primary ``hq`` in a new temporary
directory (deleted afterwards unless ``--keep``): a TOML config with the provider port on
plain loopback TCP, ``sitesrv-admin tls init``, and with ``sitesrv-admin``: ``--connections``
users (balance 10,000.00 each), a hold/release printer ``find-me`` (``printer add --hold``)
and a plain printer ``direct`` at site ``hq`` (0.10 a mono page), and two providers
(``provider add NAME --site hq``, whose key is printed once): ``bench000`` ... one per
AMP connection of this process (a second connection of one provider would replace its
first) and ``spool`` for ``sitesrv-provider``. The server runs as a real
``twistd -n sitesrv --config`` process. It is a benchmark, not a test: it prints the
figures against the goals and exits 0 whether or not they are met (1 only when something
fails outright).

Phases:

latency
    ``sitesrv-provider`` (the reference provider, a child process, ``insecure = true`` to
    the server's TCP provider port, its IPP port on loopback) is sent ``--latency-jobs``
    IPP Print-Job requests, one at a time, each a ~1 MB PDF (3 pages plus a 1 MiB
    attachment) for the ``find-me`` queue, over HTTP POST with ``sitesrv.provider.ipp``'s
    encoder (what ``ipptool`` sends). Measured from the first byte sent until the server's
    SQLite file (read-only) shows the job ``held``; the IPP answer's arrival (the provider
    answers once it has spooled the document, counted its pages and had the server's
    decision) is reported too. Two unmeasured jobs warm it up first.
decisions
    AMP clients of the provider port (as ``sitesrv-provider`` is: ``ProviderHello``,
    ``AnnounceQueues``, then ``SubmitJob`` per job) submit 2-page jobs with fresh UUIDs
    to ``find-me`` as fast as they are answered, for ``--seconds`` each (after one
    unmeasured second): one connection with one job outstanding; one connection with
    ``--connections`` jobs outstanding (AMP pipelines them); and ``--connections``
    connections (``--connections`` providers) with one each. Every answer must be
    ``hold``. Bytes are counted on the client's transport (both ways, heartbeats
    included) over the measured window.
lifecycle
    ``--lifecycle-jobs`` jobs, one at a time on one connection, to ``direct``: ``SubmitJob``
    (answered ``print`` with a release id) and then ``JobPrinted`` (the server logs and
    charges it): the bytes a printed job costs on the provider link, end to end.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import sqlite3
import subprocess
import sys
import time
import uuid
from typing import Any

import attrs
from pypdf import PdfWriter
from twisted.internet import task
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

import sitesrv
from bench.devices import (
    Goal,
    Provider,
    Servers,
    _react,
    admin,
    cpu_seconds,
    goal_lines,
    health,
    machine,
    run_benchmark,
    summary,
    wait,
)
from sitesrv.provider import ipp
from sitesrv.providers.commands import (
    PROVIDER_PROTOCOL_VERSION,
    AnnounceQueues,
    JobPrinted,
    ProviderHello,
    SubmitJob,
)
from sitesrv.testing.local import free_ports, toml_document

#: ``sitesrv-provider`` run by this interpreter (works in any virtualenv).
PROVIDER = (sys.executable, "-c", "from sitesrv.provider.main import main; main()")
SITE = "hq"
HOLD_QUEUE = "find-me"
DIRECT_QUEUE = "direct"

GOALS = {
    "decisions_per_second": Goal(1000.0, below=False),
    # PaperCut quotes 1-2 KB a job on its provider link: at most 2 KB.
    "bytes_per_job": Goal(2048.0),
}


# -- set-up ---------------------------------------------------------------------------


@attrs.define
class Setup:
    directory: str
    config: str
    database: str
    web: int
    providers: int
    ipp: int
    bench_keys: list[str]
    users: list[str]
    provider_config: str


def set_up(options: argparse.Namespace, directory: str) -> Setup:
    """The primary's config, TLS files, users, printers and providers (by sitesrv-admin)."""
    tls = os.path.join(directory, "tls")
    data = os.path.join(directory, "hq")
    os.makedirs(data)
    web, prov, repl, ipp_port = free_ports(4)
    key, cert = os.path.join(tls, "server.key"), os.path.join(tls, "server.crt")
    config = os.path.join(directory, "hq.toml")
    with open(config, "w", encoding="utf-8") as f:
        f.write(
            toml_document(
                {"role": "primary", "name": SITE, "data_dir": data},
                {
                    "listen": {
                        "web": f"tcp:{web}:interface=127.0.0.1",
                        "providers": f"tcp:{prov}:interface=127.0.0.1",
                        "replication": f"ssl:{repl}:interface=127.0.0.1"
                        f":privateKey={key}:certKey={cert}",
                    },
                    "tls": {"key": key, "cert": cert, "ca": os.path.join(tls, "ca.crt")},
                },
            )
        )
    admin(config, "tls", "init", "--hostname", "localhost", "--ip", "127.0.0.1", "--out", tls)
    users = [f"user{n:03d}" for n in range(max(1, options.connections))]
    for name in users:
        admin(config, "user", "add", name, "--balance", "10000.00")
    prices = ("--price-mono", "0.10", "--price-colour", "0.50")
    # Nothing listens at the URI: nothing is delivered in this benchmark.
    uri = ("--uri", f"ipp://127.0.0.1:{repl}/ipp/print")
    admin(config, "printer", "add", HOLD_QUEUE, "--site", SITE, *prices, "--hold", *uri)
    admin(config, "printer", "add", DIRECT_QUEUE, "--site", SITE, *prices, *uri)
    # A second connection of one provider replaces its first: a provider per connection.
    bench_keys = [
        admin(config, "provider", "add", f"bench{n:03d}", "--site", SITE).strip().splitlines()[-1]
        for n in range(max(1, options.connections))
    ]
    spool_key = admin(config, "provider", "add", "spool", "--site", SITE).strip().splitlines()[-1]
    provider_dir = os.path.join(directory, "provider")
    os.makedirs(provider_dir)
    with open(os.path.join(provider_dir, "key"), "w", encoding="utf-8") as f:
        f.write(spool_key.strip() + "\n")
    provider_config = os.path.join(provider_dir, "provider.toml")
    with open(provider_config, "w", encoding="utf-8") as f:
        f.write(
            f'name = "spool"\ndata_dir = {json.dumps(provider_dir)}\n\n[server]\n'
            f'endpoint = "tcp:127.0.0.1:{prov}"\nkey_file = "key"\ninsecure = true\n\n'
            f'[ipp]\nlisten = "tcp:{ipp_port}:interface=127.0.0.1"\n\n'
            f"[queues.{HOLD_QUEUE}]\n"
        )
    return Setup(
        directory=directory,
        config=config,
        database=os.path.join(data, "sitesrv.db"),
        web=web,
        providers=prov,
        ipp=ipp_port,
        bench_keys=[k.strip() for k in bench_keys],
        users=users,
        provider_config=provider_config,
    )


# -- latency through sitesrv-provider ----------------------------------------------------


def make_pdf(path: str, size: int) -> bytes:
    """A 3-page PDF padded to about ``size`` bytes with an (incompressible) attachment."""
    writer = PdfWriter()
    for _ in range(3):
        writer.add_blank_page(595, 842)
    writer.add_attachment("padding.bin", os.urandom(size))
    with open(path, "wb") as f:
        writer.write(f)
    with open(path, "rb") as f:
        return f.read()


def print_job(port: int, queue: str, user: str, name: str, document: bytes) -> ipp.Message:
    """One IPP Print-Job over HTTP POST, as ``ipptool`` sends it; the decoded answer."""
    uri = f"ipp://127.0.0.1:{port}/ipp/print/{queue}"
    request = ipp.Message(
        version=(2, 0),
        code=ipp.OP_PRINT_JOB,
        request_id=1,
        groups=(
            ipp.operation_attributes(
                ipp.attribute("printer-uri", ipp.TAG_URI, uri),
                ipp.attribute("requesting-user-name", ipp.TAG_NAME, user),
                ipp.attribute("job-name", ipp.TAG_NAME, name),
                ipp.attribute("document-format", ipp.TAG_MIME_TYPE, "application/pdf"),
            ),
        ),
        data=document,
    )
    body = ipp.encode(request)
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request(
            "POST", f"/ipp/print/{queue}", body, {"Content-Type": "application/ipp"}
        )
        response = connection.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"Print-Job: HTTP {response.status}")
    finally:
        connection.close()
    return ipp.decode(data)


def job_state(database: str, job: str) -> str | None:
    """The server's state of a job (its SQLite file, read-only)."""
    connection = sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=5)
    try:
        row = connection.execute(
            "SELECT state FROM provider_jobs WHERE uuid = ?", (job,)
        ).fetchone()
    finally:
        connection.close()
    return None if row is None else str(row[0])


def latency(options: argparse.Namespace, setup: Setup) -> dict[str, Any]:
    """Submit→held latency of a ~1 MB PDF through ``sitesrv-provider``."""
    document = make_pdf(os.path.join(setup.directory, "doc.pdf"), options.pdf_bytes)
    held: list[float] = []
    answered: list[float] = []
    user = setup.users[0]
    for n in range(2 + options.latency_jobs):
        started = time.perf_counter()
        answer = print_job(setup.ipp, HOLD_QUEUE, user, f"latency{n}.pdf", document)
        answer_at = time.perf_counter()
        if answer.code != ipp.STATUS_OK:
            raise RuntimeError(f"Print-Job answered {ipp.status_name(answer.code)}")
        attr = answer.get(ipp.TAG_JOB, "job-uuid")
        if attr is None:
            raise RuntimeError("Print-Job's answer has no job-uuid")
        job = str(attr.value).removeprefix("urn:uuid:")
        end = time.monotonic() + 10
        while (state := job_state(setup.database, job)) != "held":
            if time.monotonic() > end:
                raise RuntimeError(f"job {job} not held within 10 s (state {state})")
            time.sleep(0.001)
        held_at = time.perf_counter()
        if n >= 2:
            answered.append(answer_at - started)
            held.append(held_at - started)
    return {
        "document_bytes": len(document),
        "jobs": len(held),
        "submit_to_held": summary(held),
        "submit_to_ipp_answer": summary(answered),
    }


# -- AMP clients ----------------------------------------------------------------------


class CountingProvider(Provider):
    """The benchmark's provider client, counting the bytes it sends and receives."""

    def __init__(self, reactor: Any) -> None:
        super().__init__(reactor)
        self.sent = 0
        self.received = 0

    def makeConnection(self, transport: Any) -> None:
        write, write_sequence = transport.write, transport.writeSequence

        def counted_write(data: bytes) -> None:
            self.sent += len(data)
            write(data)

        def counted_sequence(data: Any) -> None:
            data = list(data)
            self.sent += sum(len(d) for d in data)
            write_sequence(data)

        transport.write = counted_write
        transport.writeSequence = counted_sequence
        super().makeConnection(transport)

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        super().dataReceived(data)


async def connect(reactor: Any, setup: Setup, n: int) -> CountingProvider:
    """A provider connection, said hello and announced its queues."""
    provider: CountingProvider = await connectProtocol(
        TCP4ClientEndpoint(reactor, "127.0.0.1", setup.providers), CountingProvider(reactor)
    )
    hello = await provider.callRemote(
        ProviderHello,
        provider=f"bench{n:03d}",
        key=setup.bench_keys[n],
        software_version=f"bench {sitesrv.__version__}",
        protocol_version=PROVIDER_PROTOCOL_VERSION,
        provider_time=time.time(),
    )
    provider.startHeartbeat(hello["heartbeat"])
    await provider.callRemote(AnnounceQueues, queues=[HOLD_QUEUE, DIRECT_QUEUE])
    return provider


def job_fields(queue: str, user: str, n: int) -> dict[str, Any]:
    return {
        "job": str(uuid.uuid4()),
        "queue": queue,
        "user": user,
        "document": f"Report {n} - Microsoft Word.docx",
        "pages": 2,
        "copies": 1,
        "colour": False,
        "duplex": False,
        "size": 180_000,
        "submitted_at": time.time(),
    }


@attrs.define
class Window:
    measuring: bool = False
    stop: bool = False
    decisions: int = 0
    latencies: list[float] = attrs.Factory(list)
    wrong: list[str] = attrs.Factory(list)


async def submitter(provider: CountingProvider, user: str, window: Window) -> None:
    """Submit hold jobs back to back until told to stop."""
    n = 0
    while not window.stop:
        n += 1
        started = time.perf_counter()
        answer = await provider.callRemote(SubmitJob, **job_fields(HOLD_QUEUE, user, n))
        if not window.measuring:
            continue
        window.decisions += 1
        window.latencies.append(time.perf_counter() - started)
        if answer["decision"] != "hold":
            window.wrong.append(f"{answer['decision']}: {answer['reason']}")


async def decisions(
    reactor: Any,
    options: argparse.Namespace,
    providers: list[CountingProvider],
    outstanding: int,
    users: list[str],
) -> dict[str, Any]:
    """``outstanding`` submitters on each of ``providers`` for ``--seconds``."""
    window = Window()
    loops = [
        Deferred.fromCoroutine(submitter(p, users[(i * outstanding + k) % len(users)], window))
        for i, p in enumerate(providers)
        for k in range(outstanding)
    ]
    running = DeferredList(loops, fireOnOneErrback=True, consumeErrors=True)
    await task.deferLater(reactor, options.warmup, lambda: None)
    sent = sum(p.sent for p in providers)
    received = sum(p.received for p in providers)
    cpu = cpu_seconds(options.server_pid)
    window.measuring = True
    started = time.perf_counter()
    await task.deferLater(reactor, options.seconds, lambda: None)
    window.measuring = False
    elapsed = time.perf_counter() - started
    sent = sum(p.sent for p in providers) - sent
    received = sum(p.received for p in providers) - received
    cpu = cpu_seconds(options.server_pid) - cpu
    window.stop = True
    await running
    count = max(1, window.decisions)
    result = {
        "connections": len(providers),
        "outstanding_per_connection": outstanding,
        "seconds": round(elapsed, 2),
        "decisions": window.decisions,
        "decisions_per_second": round(window.decisions / elapsed, 1),
        "decision_latency": summary(window.latencies),
        "not_held": len(window.wrong),
        "bytes_to_server_per_job": round(sent / count, 1),
        "bytes_from_server_per_job": round(received / count, 1),
        "bytes_per_job": round((sent + received) / count, 1),
        "server_cpu_percent": round(100 * cpu / elapsed, 1),
    }
    if window.wrong:
        result["first_not_held"] = window.wrong[0]
    return result


async def lifecycle(provider: CountingProvider, user: str, jobs: int) -> dict[str, Any]:
    """Submit to the direct queue, then report printed: bytes of a whole printed job."""
    sent, received = provider.sent, provider.received
    started = time.perf_counter()
    charged = 0
    for n in range(jobs):
        fields = job_fields(DIRECT_QUEUE, user, n)
        answer = await provider.callRemote(SubmitJob, **fields)
        if answer["decision"] != "print":
            raise RuntimeError(f"direct job not printed: {answer}")
        report = await provider.callRemote(
            JobPrinted,
            **fields,
            release_id=answer["release_id"],
            printer=answer["printer"],
            printed_at=time.time(),
        )
        charged += report["charged"]
    elapsed = time.perf_counter() - started
    sent, received = provider.sent - sent, provider.received - received
    return {
        "jobs": jobs,
        "seconds": round(elapsed, 2),
        "jobs_per_second": round(jobs / elapsed, 1),
        "charged_minor": charged,
        "bytes_to_server_per_job": round(sent / jobs, 1),
        "bytes_from_server_per_job": round(received / jobs, 1),
        "bytes_per_job": round((sent + received) / jobs, 1),
    }


async def drive(reactor: Any, options: argparse.Namespace, setup: Setup) -> dict[str, Any]:
    say = options.say
    results: dict[str, Any] = {}
    connections = [await connect(reactor, setup, n) for n in range(options.connections)]
    say(f"decisions: 1 connection, 1 job outstanding, {options.seconds:g} s")
    results["one"] = await decisions(reactor, options, connections[:1], 1, setup.users)
    say(f"  {results['one']}")
    n = options.connections
    say(f"decisions: 1 connection, {n} jobs outstanding, {options.seconds:g} s")
    results["one_pipelined"] = await decisions(reactor, options, connections[:1], n, setup.users)
    say(f"  {results['one_pipelined']}")
    say(f"decisions: {n} connections, 1 job outstanding each, {options.seconds:g} s")
    results["many"] = await decisions(reactor, options, connections, 1, setup.users)
    say(f"  {results['many']}")
    say(f"lifecycle: {options.lifecycle_jobs} jobs submitted, printed and reported")
    results["lifecycle"] = await lifecycle(connections[0], setup.users[0], options.lifecycle_jobs)
    say(f"  {results['lifecycle']}")
    for p in connections:
        p.stopHeartbeat()
        assert p.transport is not None
        p.transport.loseConnection()
    await task.deferLater(reactor, 0.2, lambda: None)
    return results


# -- running and reporting ----------------------------------------------------------------


def run(options: argparse.Namespace, directory: str) -> dict[str, Any]:
    """Set up, start the server and the reference provider, measure; the results."""
    results: dict[str, Any] = {
        "machine": machine(),
        "options": {k: v for k, v in vars(options).items() if k not in ("say", "server_pid")},
    }
    say = options.say
    say(f"setting up in {directory}")
    setup = set_up(options, directory)
    servers = Servers()
    provider: subprocess.Popen[bytes] | None = None
    provider_log = os.path.join(directory, "provider.log")
    try:
        server = servers.start("hq", setup.config, directory)
        options.server_pid = server.pid
        wait(lambda: (health(setup.web) or {}).get("mode") == "online", "server up")
        with open(provider_log, "ab") as log:
            provider = subprocess.Popen(
                [*PROVIDER, "--config", setup.provider_config],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=directory,
            )

        def provider_ready() -> bool:
            assert provider is not None
            if provider.poll() is not None:
                raise RuntimeError(f"sitesrv-provider exited {provider.returncode}")
            with open(provider_log, encoding="utf-8", errors="replace") as f:
                return "connected to server" in f.read()

        wait(provider_ready, "sitesrv-provider connected")
        say(f"latency: {options.latency_jobs} Print-Jobs of a {options.pdf_bytes:,}-byte PDF")
        results["latency"] = latency(options, setup)
        say(f"  {results['latency']}")
        outcome: dict[str, Any] = {}

        def main(reactor: Any) -> Deferred[None]:
            d = Deferred.fromCoroutine(drive(reactor, options, setup))
            d.addCallback(outcome.update)
            return d.addCallback(lambda _: None)

        _react(main)
        results.update(outcome)
        results["server_problems"] = (health(setup.web) or {}).get("problems", [])
    finally:
        if provider is not None and provider.poll() is None:
            provider.terminate()
            try:
                provider.wait(15)
            except subprocess.TimeoutExpired:
                provider.kill()
                provider.wait()
        servers.close()
    total = results["many"]["decisions_per_second"]
    per_job = results["one"]["bytes_per_job"]
    results["goals"] = {
        name: {"goal": str(GOALS[name]), "value": value, "met": GOALS[name].met(value)}
        for name, value in (("decisions_per_second", total), ("bytes_per_job", per_job))
    }
    return results


def report(results: dict[str, Any]) -> str:
    """The results as text."""
    m = results["machine"]
    lines = [
        f"machine: {m['cpus']} x {m['cpu']}, {m['ram']}, {m['os']}, Python {m['python']}, "
        f"SQLite {m['sqlite']}; load average {m['load_average']}",
    ]
    lt = results["latency"]
    h, a = lt["submit_to_held"], lt["submit_to_ipp_answer"]
    lines.append(
        f"submit->held, {lt['document_bytes']:,}-byte PDF through sitesrv-provider "
        f"({lt['jobs']} jobs): p50 {h.get('p50_ms')} ms, p90 {h.get('p90_ms')} ms, "
        f"max {h.get('max_ms')} ms (IPP answer p50 {a.get('p50_ms')} ms)"
    )
    for key in ("one", "one_pipelined", "many"):
        d = results[key]
        lat = d["decision_latency"]
        lines.append(
            f"{d['connections']} connection(s) x {d['outstanding_per_connection']} "
            f"outstanding: {d['decisions']:,} decisions in {d['seconds']} s = "
            f"{d['decisions_per_second']:,}/s, latency p50 {lat.get('p50_ms')} ms p99 "
            f"{lat.get('p99_ms')} ms; {d['bytes_per_job']} bytes/job "
            f"({d['bytes_to_server_per_job']} up, {d['bytes_from_server_per_job']} down); "
            f"server CPU {d['server_cpu_percent']}%; {d['not_held']} not held"
        )
    lc = results["lifecycle"]
    lines.append(
        f"printed job (SubmitJob + JobPrinted), {lc['jobs']} jobs: {lc['bytes_per_job']} "
        f"bytes/job ({lc['bytes_to_server_per_job']} up, {lc['bytes_from_server_per_job']} "
        f"down), {lc['jobs_per_second']} jobs/s"
    )
    lines += goal_lines(results["goals"])
    if results.get("server_problems"):
        lines.append(f"server problems: {results['server_problems']}")
    return "\n".join(lines)


def parse(argv: list[str]) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(
        prog="python -m bench.providers", description=(__doc__ or "").split("\n\n")[0]
    )
    p.add_argument("--seconds", type=float, default=5.0, help="each measured phase (default 5)")
    p.add_argument("--connections", type=int, default=20, help="concurrent providers (default 20)")
    p.add_argument("--warmup", type=float, default=1.0, help="unmeasured start of each phase")
    p.add_argument(
        "--latency-jobs", type=int, default=20, help="measured 1 MB Print-Jobs (default 20)"
    )
    p.add_argument(
        "--pdf-bytes", type=int, default=1 << 20, help="padding of the PDF (default 1 MiB)"
    )
    p.add_argument(
        "--lifecycle-jobs", type=int, default=200, help="printed jobs for bytes (default 200)"
    )
    p.add_argument("--tmpdir", default=None, help="where to make the temporary directory")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    p.add_argument("--json", action="store_true", help="results as JSON on stdout")
    options = p.parse_args(argv)
    if options.connections < 1 or options.seconds <= 0:
        p.error("--connections must be at least 1 and --seconds positive")
    options.say = lambda text: print(text, file=sys.stderr, flush=True)
    options.server_pid = 0
    return options


def main(argv: list[str] | None = None) -> int:
    return run_benchmark("providers", parse(sys.argv[1:] if argv is None else argv), run, report)


if __name__ == "__main__":
    sys.exit(main())
