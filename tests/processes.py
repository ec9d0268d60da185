"""Real sitesrv processes on loopback, for end-to-end and fault-injection tests.

Configs for a primary and its sites (`write_primary_config`, `write_site_config`), the
servers as ``twistd -n sitesrv`` child processes (`ServerProcess`: start, stop,
``kill -9``, their logs), ``sitesrv-admin`` as a child process (`admin`) or in this
process for set-up (`admin_sync`), ``/health``
(`get_health`), bounded polling (`wait_for` and friends) and a read-only comparison
of two SQLite databases (`table_differences`). `ProcessTestCase` is the base of tests that
start servers; `Provider` plays a print provider on a site's providers port
(`connect_provider`).

Everything listens on 127.0.0.1 only, on ports picked by binding port 0; every wait has
a deadline; every process a test starts is killed in its cleanup (`ServerProcess.start`
registers that), and its log's tail is printed when the test fails. Child processes run
with ``sys.executable``, so the suite works the same in a virtualenv and under tox.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
import uuid as uuidlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import attrs
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, DeferredQueue, ensureDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, quoteStringArgument
from twisted.internet.error import ConnectError, ConnectionRefusedError
from twisted.internet.task import deferLater
from twisted.internet.utils import getProcessOutputAndValue
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, TestCase
from twisted.web.client import Agent, HTTPConnectionPool, readBody

import sitesrv
from sitesrv.providers.commands import (
    PROVIDER_PROTOCOL_VERSION,
    AnnounceQueues,
    DeleteJobs,
    JobPrinted,
    ProviderHello,
    Release,
    SubmitJob,
)
from sitesrv.replication.liveness import LivenessAMP
from sitesrv.testing.local import free_port, toml_document

reactor: Any = _reactor

#: ``twistd`` run by this interpreter (no console script needed, works under tox).
TWISTD = (sys.executable, "-c", "from twisted.scripts.twistd import run; run()")
#: ``sitesrv-admin`` run by this interpreter.
ADMIN = (sys.executable, "-c", "from sitesrv.admin.cli import main; main()")

#: The default bound on any wait.
DEADLINE = 20.0
#: How often conditions are polled.
INTERVAL = 0.05
#: Lines of a server log shown when a test fails.
TAIL_LINES = 60
#: How long one answer a test waits for (a pushed release, a card reader's feedback)
#: may take.
ANSWER_DEADLINE = 5.0

#: Tables every site receives in full: equal at the primary and a caught-up site.
#: (``passwords`` too while the site's password-login policy allows it, the default.)
SHARED_TABLES = (
    "settings",
    "users",
    "passwords",
    "cards",
    "accounts",
    "groups",
    "group_members",
    "printers",
    "policies",
)

#: Exit statuses of a server stopped with SIGTERM: twistd shuts down cleanly, then
#: re-raises the signal so that its parent sees why it ended.
CLEAN_EXITS = frozenset({0, -signal.SIGTERM})

#: Modes in which a site answers requests (``/health`` 200).
SERVING_MODES = frozenset({"syncing", "online", "offline", "reconciling"})


class WaitTimeout(AssertionError):
    """A condition did not hold within its deadline (a test failure, not an error)."""


# -- ports and configs ------------------------------------------------------------------


def listen(port: int) -> str:
    """A plain TCP server endpoint on loopback."""
    return f"tcp:{port}:interface=127.0.0.1"


def listen_tls(port: int, key: str, cert: str) -> str:
    """A TLS server endpoint on loopback with the given PEM key and certificate."""
    return (
        f"ssl:{port}:interface=127.0.0.1"
        f":privateKey={quoteStringArgument(key)}:certKey={quoteStringArgument(cert)}"
    )


@attrs.define
class Node:
    """One server's files and ports: what a test needs to run it and look inside."""

    role: str
    name: str
    directory: str
    config: str
    data_dir: str
    web_port: int
    providers_port: int
    replication_port: int | None = None
    tls_dir: str | None = None
    token_file: str | None = None

    @property
    def database(self) -> str:
        """The SQLite file (the config's default, in data_dir)."""
        return os.path.join(self.data_dir, "sitesrv.db")

    @property
    def log(self) -> str:
        """Where `ServerProcess` writes the server's output."""
        return os.path.join(self.directory, f"{self.name}.log")

    def write_token(self, token: str) -> None:
        """Put an enrolment token in this site's token_file (mode 0600)."""
        assert self.token_file is not None, "only sites have a token file"
        fd = os.open(self.token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(token.strip() + "\n")


def write_primary_config(
    directory: str,
    name: str = "hq",
    *,
    heartbeat: float = 0.5,
    tls_dir: str | None = None,
    **top: Any,
) -> Node:
    """Write ``<directory>/<name>.toml`` for a primary; its TLS files go in ``tls_dir``.

    The replication port is TLS with ``tls_dir/server.{key,crt}`` (default
    ``<directory>/<name>/tls``, where `tls_init` puts them); nothing is created but the
    config and the data directory.
    """
    directory = os.path.abspath(directory)
    data_dir = os.path.join(directory, name)
    os.makedirs(data_dir, exist_ok=True)
    tls_dir = os.path.abspath(tls_dir) if tls_dir else os.path.join(data_dir, "tls")
    node = Node(
        role="primary",
        name=name,
        directory=directory,
        config=os.path.join(directory, f"{name}.toml"),
        data_dir=data_dir,
        web_port=free_port(),
        providers_port=free_port(),
        replication_port=free_port(),
        tls_dir=tls_dir,
    )
    assert node.replication_port is not None
    document = toml_document(
        {"role": "primary", "name": name, "data_dir": data_dir, **top},
        {
            "listen": {
                "web": listen(node.web_port),
                "providers": listen(node.providers_port),
                "replication": listen_tls(
                    node.replication_port,
                    os.path.join(tls_dir, "server.key"),
                    os.path.join(tls_dir, "server.crt"),
                ),
            },
            "tls": {
                "cert": os.path.join(tls_dir, "server.crt"),
                "key": os.path.join(tls_dir, "server.key"),
                "ca": os.path.join(tls_dir, "ca.crt"),
            },
            "replication": {"heartbeat": heartbeat},
        },
    )
    with open(node.config, "w", encoding="utf-8") as f:
        f.write(document)
    return node


def write_site_config(
    directory: str,
    name: str,
    primary: Node,
    *,
    ca: str | None = None,
    fingerprint: str | None = None,
    hostname: str | None = "localhost",
    insecure: bool = False,
    heartbeat: float = 0.5,
    max_backoff: float = 1.0,
    **top: Any,
) -> Node:
    """Write ``<directory>/<name>.toml`` for a site of ``primary``.

    It trusts ``ca`` (default: the primary's ``tls_dir/ca.crt``) unless a
    ``fingerprint`` is pinned or ``insecure`` is set; its token file is
    ``<directory>/<name>/token`` (write it with `Node.write_token`).
    """
    directory = os.path.abspath(directory)
    data_dir = os.path.join(directory, name)
    os.makedirs(data_dir, exist_ok=True)
    assert primary.replication_port is not None and primary.tls_dir is not None
    if ca is None and fingerprint is None and not insecure:
        ca = os.path.join(primary.tls_dir, "ca.crt")
    node = Node(
        role="site",
        name=name,
        directory=directory,
        config=os.path.join(directory, f"{name}.toml"),
        data_dir=data_dir,
        web_port=free_port(),
        providers_port=free_port(),
        token_file=os.path.join(data_dir, "token"),
    )
    document = toml_document(
        {"role": "site", "name": name, "data_dir": data_dir, **top},
        {
            "listen": {"web": listen(node.web_port), "providers": listen(node.providers_port)},
            "primary": {
                "endpoint": f"tcp:127.0.0.1:{primary.replication_port}",
                "ca": os.path.abspath(ca) if ca else None,
                "fingerprint": fingerprint,
                "hostname": hostname,
                "insecure": insecure or None,
                "token_file": node.token_file,
            },
            "replication": {"heartbeat": heartbeat, "max_backoff": max_backoff},
        },
    )
    with open(node.config, "w", encoding="utf-8") as f:
        f.write(document)
    return node


# -- sitesrv-admin ----------------------------------------------------------------------


@attrs.frozen
class AdminResult:
    """What one ``sitesrv-admin`` run printed, and its exit status."""

    args: tuple[str, ...]
    code: int
    out: str
    err: str

    def check(self) -> AdminResult:
        """Self, or an AssertionError naming the command and its output if it failed."""
        if self.code != 0:
            raise AssertionError(
                f"sitesrv-admin {' '.join(self.args)} exited {self.code}:\n{self.err}{self.out}"
            )
        return self

    def json(self) -> Any:
        """The output parsed as JSON (for commands run with ``--json``)."""
        return json.loads(self.out)


def admin_sync(node: Node | None, *args: str, stdin: str = "", check: bool = True) -> AdminResult:
    """Run ``sitesrv-admin --config <node's config> ARGS`` in this process, now.

    The same code as the command (``sitesrv.admin.cli.run``) without a new interpreter's
    start-up, for set-up; use `admin` for the changes a test is about.
    """
    from sitesrv.admin.cli import run

    argv = ["--config", node.config, *args] if node is not None else list(args)
    out, err = io.StringIO(), io.StringIO()
    code = run(argv, stdin=io.StringIO(stdin), stdout=out, stderr=err)
    result = AdminResult(tuple(args), code, out.getvalue(), err.getvalue())
    return result.check() if check else result


def admin(node: Node | None, *args: str, check: bool = True) -> Deferred[AdminResult]:
    """Run ``sitesrv-admin --config <node's config> ARGS`` as a reactor child process."""
    config = ["--config", node.config] if node is not None else []
    argv = [*ADMIN, *config, *args]
    d = getProcessOutputAndValue(argv[0], argv[1:], env=os.environ.copy(), reactor=reactor)
    d.addTimeout(DEADLINE, reactor)

    def done(result: tuple[bytes, bytes, int]) -> AdminResult:
        out, err, code = result
        r = AdminResult(tuple(args), code, out.decode("utf-8"), err.decode("utf-8"))
        return r.check() if check else r

    return d.addCallback(done)


def tls_init(node: Node, *more: str) -> dict[str, Any]:
    """``tls init`` for localhost and 127.0.0.1 into the primary's tls_dir; return its JSON."""
    assert node.tls_dir is not None
    argv = ["--json", "tls", "init", "--hostname", "localhost", "--ip", "127.0.0.1"]
    data: dict[str, Any] = admin_sync(node, *argv, "--out", node.tls_dir, *more).json()
    return data


def enrol(primary: Node, site: Node) -> str:
    """``site add`` the site at the primary, write its token file, and return the token."""
    token = admin_sync(primary, "site", "add", site.name).out.splitlines()[0].strip()
    site.write_token(token)
    return token


# -- servers ----------------------------------------------------------------------------


class ServerProcess:
    """``twistd -n sitesrv --config <node's config>`` as a child process.

    Output (stdout and stderr) is appended to ``node.log``, one section per start, so a
    restarted server's history stays in one file.
    """

    def __init__(self, node: Node) -> None:
        self.node = node
        self.process: subprocess.Popen[bytes] | None = None
        self._log_start = 0
        self.starts = 0

    @property
    def argv(self) -> list[str]:
        """The command line."""
        return [*TWISTD, "-n", "--pidfile=", "sitesrv", "--config", self.node.config]

    def start(self, testcase: Any = None) -> ServerProcess:
        """Start the server; with ``testcase``, kill it and show its log on failure."""
        assert not self.running, f"{self.node.name} is already running"
        self.starts += 1
        with open(self.node.log, "ab") as log:
            self._log_start = log.tell()
            log.write(f"==== start {self.starts}: {' '.join(self.argv)}\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.node.directory,
                env=os.environ.copy(),
            )
        if testcase is not None and self.starts == 1:
            testcase.addCleanup(self.cleanup, testcase)
        return self

    @property
    def pid(self) -> int:
        """The running process's id."""
        assert self.process is not None
        return self.process.pid

    @property
    def running(self) -> bool:
        """Whether the process is alive."""
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM (a clean twistd shutdown), wait up to ``timeout``, else SIGKILL."""
        return self._end(signal.SIGTERM, timeout)

    def kill(self) -> int | None:
        """``kill -9``: no shutdown code runs at all."""
        return self._end(signal.SIGKILL, DEADLINE)

    def _end(self, sig: int, timeout: float) -> int | None:
        process = self.process
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(sig)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(DEADLINE)
        return process.returncode

    def cleanup(self, testcase: Any) -> None:
        """Kill the process; when the test failed, print the tail of its log."""
        self.kill()
        # trial sets _passed before tearDown and cleanups run; show the log unless it did.
        if not getattr(testcase, "_passed", False):
            print(f"\n---- {self.node.name}: last lines of {self.node.log}", file=sys.stderr)
            print(self.tail(), file=sys.stderr)

    def log_text(self, whole: bool = False) -> str:
        """The log of the latest start (or of every start)."""
        try:
            with open(self.node.log, "rb") as f:
                f.seek(0 if whole else self._log_start)
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def tail(self, lines: int = TAIL_LINES) -> str:
        """The last lines of the whole log."""
        return "\n".join(self.log_text(whole=True).splitlines()[-lines:])

    def count(self, pattern: str, whole: bool = False) -> int:
        """How many times the regular expression occurs in the log."""
        return len(re.findall(pattern, self.log_text(whole)))

    def health(self) -> Deferred[Health]:
        """``GET /health`` on this server's web port."""
        return get_health(self.node.web_port)


# -- /health ----------------------------------------------------------------------------


@attrs.frozen
class Health:
    """One ``/health`` answer: the status code (None: nothing listening) and the JSON."""

    code: int | None
    body: dict[str, Any] = attrs.field(factory=dict)

    @property
    def mode(self) -> str | None:
        """The mode reported, if any."""
        return self.body.get("mode")


_pool = HTTPConnectionPool(reactor, persistent=False)
_agent = Agent(reactor, pool=_pool, connectTimeout=2)


async def _get_health(port: int) -> Health:
    try:
        response = await _agent.request(b"GET", f"http://127.0.0.1:{port}/health".encode())
    except (ConnectionRefusedError, ConnectError):
        return Health(None)
    body = await readBody(response)
    try:
        data = json.loads(body)
    except ValueError:
        data = {"unparsed": body.decode("utf-8", "replace")}
    return Health(response.code, data if isinstance(data, dict) else {"json": data})


def get_health(port: int) -> Deferred[Health]:
    """``GET /health`` on 127.0.0.1:port; Health(None) when nothing accepts connections."""
    d = ensureDeferred(_get_health(port))
    d.addTimeout(5, reactor)
    return d


# -- waiting ----------------------------------------------------------------------------


def sleep(seconds: float) -> Deferred[None]:
    """A Deferred that fires after ``seconds`` (the reactor keeps running)."""
    return deferLater(reactor, seconds, lambda: None)


async def wait_for(
    condition: Callable[[], Any],
    what: str,
    deadline: float = DEADLINE,
    interval: float = INTERVAL,
) -> Any:
    """Poll ``condition()`` (a value or a Deferred) until truthy; return that value.

    Fails with `WaitTimeout` naming ``what`` and the last value seen once ``deadline``
    seconds have passed.
    """
    end = time.monotonic() + deadline
    last: Any = None
    while True:
        last = condition()
        if isinstance(last, Deferred):
            last = await last
        if last:
            return last
        if time.monotonic() >= end:
            raise WaitTimeout(f"{what}: not within {deadline:g} s (last: {last!r})")
        await sleep(interval)


async def wait_for_health(
    server: ServerProcess,
    test: Callable[[Health], bool],
    what: str,
    deadline: float = DEADLINE,
) -> Health:
    """Poll ``/health`` until ``test(health)`` holds; return that answer."""
    last: list[Health] = []

    async def check() -> bool:
        if not server.running:
            raise AssertionError(
                f"{server.node.name} exited ({server.process and server.process.returncode})"
                f" while waiting for {what}"
            )
        health = await server.health()
        last[:] = [health]
        return test(health)

    try:
        await wait_for(lambda: ensureDeferred(check()), what, deadline)
    except WaitTimeout:
        seen = last[0] if last else None
        raise WaitTimeout(
            f"{server.node.name}: {what}: not within {deadline:g} s; last /health: "
            f"{seen and seen.code} {json.dumps(seen and seen.body)[:2000]}"
        ) from None
    return last[0]


def wait_for_mode(
    server: ServerProcess, *modes: str, deadline: float = DEADLINE
) -> Deferred[Health]:
    """Poll ``/health`` until the site reports one of ``modes``."""
    what = f"mode {' or '.join(modes)}"
    return ensureDeferred(wait_for_health(server, lambda h: h.mode in modes, what, deadline))


def wait_for_log(
    server: ServerProcess,
    pattern: str,
    count: int = 1,
    deadline: float = DEADLINE,
    interval: float = INTERVAL,
) -> Deferred[Any]:
    """Poll the server's log (latest start) until ``pattern`` occurs ``count`` times."""

    def check() -> bool:
        return server.count(pattern) >= count

    async def run() -> None:
        try:
            what = f"{server.node.name} log: {pattern!r} x{count}"
            await wait_for(check, what, deadline, interval)
        except WaitTimeout as e:
            raise WaitTimeout(f"{e}\n---- log tail:\n{server.tail(25)}") from None

    return ensureDeferred(run())


# -- databases --------------------------------------------------------------------------


def connect_readonly(path: str) -> sqlite3.Connection:
    """A read-only connection to a SQLite file (never creates or changes it)."""
    return sqlite3.connect(f"file:{os.path.abspath(path)}?mode=ro", uri=True, timeout=5)


def read_rows(
    path: str,
    table: str,
    where: tuple[str, Sequence[Any]] | None = None,
    exclude: Iterable[str] = (),
) -> tuple[list[str], list[tuple[Any, ...]]]:
    """``(columns, rows ordered by id)`` of a table; ``where`` is ``(sql, params)``."""
    conn = connect_readonly(path)
    try:
        names = [r[1] for r in conn.execute(f'PRAGMA table_info("{table}")')]
        if not names:
            raise AssertionError(f"{path} has no table {table!r}")
        columns = [c for c in names if c not in set(exclude)]
        sql = f'SELECT {", ".join(columns)} FROM "{table}"'
        params: Sequence[Any] = ()
        if where is not None:
            sql += f" WHERE {where[0]}"
            params = where[1]
        rows = conn.execute(sql + " ORDER BY id", params).fetchall()
        return columns, rows
    finally:
        conn.close()


def table_differences(
    primary_db: str,
    site_db: str,
    tables: Iterable[str] = SHARED_TABLES,
    where: Mapping[str, tuple[str, Sequence[Any]]] | None = None,
    exclude: Mapping[str, Iterable[str]] | None = None,
) -> list[str]:
    """How the site's tables differ from the primary's: one line per table; [] if equal.

    ``where`` filters the primary's rows of a table to those the site should get;
    ``exclude`` leaves columns out of the comparison (say, secrets never replicated).
    """
    problems = []
    for table in tables:
        ex = (exclude or {}).get(table, ())
        columns, expected = read_rows(primary_db, table, (where or {}).get(table), ex)
        _, got = read_rows(site_db, table, exclude=ex)
        if expected == got:
            continue
        missing = sorted(set(expected) - set(got))
        extra = sorted(set(got) - set(expected))
        problems.append(
            f"{table}: primary {len(expected)} rows, site {len(got)}; "
            f"{len(missing)} missing or different at the site (first: {missing[:1]}), "
            f"{len(extra)} only at the site (first: {extra[:1]}); columns {columns}"
        )
    return problems


def scalar(path: str, sql: str, *params: Any) -> Any:
    """The first column of the first row of a query (None if no row)."""
    conn = connect_readonly(path)
    try:
        row = conn.execute(sql, params).fetchone()
        return None if row is None else row[0]
    finally:
        conn.close()


def twistd_unavailable() -> str | None:
    """Why ``twistd`` cannot run with this interpreter, or None when it can."""
    try:
        done = subprocess.run(
            [*TWISTD, "--version"], capture_output=True, text=True, timeout=DEADLINE
        )
    except (OSError, subprocess.SubprocessError) as e:
        return f"cannot run twistd with {sys.executable}: {e}"
    if done.returncode != 0:
        return f"twistd --version exited {done.returncode}: {done.stderr.strip()[-500:]}"
    return None


_twistd_unavailable: list[str | None] = []


def skip_without_twistd() -> None:
    """Raise SkipTest, saying why, unless ``twistd`` runs with this interpreter (asked
    once per test run)."""
    if not _twistd_unavailable:
        _twistd_unavailable.append(twistd_unavailable())
    if _twistd_unavailable[0] is not None:
        raise SkipTest(_twistd_unavailable[0])


# -- test cases -------------------------------------------------------------------------


class ProcessTestCase(TestCase):
    """A test that starts real servers: skipped where ``twistd`` cannot run, with a new
    directory of its own (``self.directory``) for their configs, data and logs."""

    def setUp(self) -> None:
        skip_without_twistd()
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)

    def start(self, node: Node) -> ServerProcess:
        """Start a server; it is killed (and its log shown on failure) in cleanup."""
        return ServerProcess(node).start(self)

    async def start_primary(self, node: Node) -> ServerProcess:
        """Start a primary and wait until it answers ``/health``."""
        server = self.start(node)
        await wait_for_health(server, lambda h: h.code == 200, "primary answers /health")
        return server

    async def start_primary_and_site(
        self, primary: Node, site: Node
    ) -> tuple[ServerProcess, ServerProcess]:
        """Start the primary, then the site; return them once the site is online."""
        primary_server = await self.start_primary(primary)
        site_server = self.start(site)
        await wait_for_mode(site_server, "online")
        return primary_server, site_server


# -- a print provider -------------------------------------------------------------------


class Provider(LivenessAMP):
    """A print provider's end: queues the releases the site pushes."""

    def __init__(self) -> None:
        super().__init__(clock=reactor)
        self.releases: DeferredQueue[tuple[str, str, str]] = DeferredQueue()
        self.closed: Deferred[None] = Deferred()

    @Release.responder
    def release(self, job: str, release_id: str, printer: str, uri: str) -> dict[str, Any]:
        self.releases.put((job, release_id, printer))
        return {}

    @DeleteJobs.responder
    def deleteJobs(self, jobs: list[str], reason: str) -> dict[str, Any]:
        return {}

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:
        super().connectionLost(reason)
        self.closed.callback(None)

    async def released(self) -> tuple[str, str, str]:
        """The next release pushed: (job, release id, printer)."""
        release = self.releases.get()
        release.addTimeout(ANSWER_DEADLINE, reactor)
        return await release

    def job(self, job: str, pages: int = 2) -> dict[str, Any]:
        """A job's fields as the provider sends them."""
        return {
            "job": job,
            "queue": "p1",
            "user": "alice",
            "document": f"{job[:8]}.pdf",
            "pages": pages,
            "copies": 1,
            "colour": False,
            "duplex": False,
            "size": 1000,
            "submitted_at": reactor.seconds(),
        }

    async def submit(self, pages: int = 2) -> str:
        """Submit a job to queue p1 (a hold printer); its UUID once the site holds it."""
        job = str(uuidlib.uuid4())
        answer = await self.callRemote(SubmitJob, **self.job(job, pages))
        assert answer["decision"] == "hold", answer
        return job

    async def printed(self, job: str, release_id: str, pages: int = 2) -> int:
        """Report a released job printed on p1; the amount charged."""
        answer = await self.callRemote(
            JobPrinted,
            **self.job(job, pages),
            release_id=release_id,
            printer="p1",
            printed_at=reactor.seconds(),
        )
        return int(answer["charged"])


def close_client(client: Any, closed: Deferred[None]) -> Deferred[None]:
    """Close a client connection and wait until it is closed (a clean reactor)."""
    if client.transport is not None and not closed.called:
        client.transport.abortConnection()
    return closed


async def connect_provider(
    testcase: Any,
    port: int,
    key: str,
    name: str = "spool",
    queues: Sequence[str] = ("p1",),
) -> Provider:
    """The print provider ``name`` on a site's providers port, after its hello and its
    announcement of ``queues`` (all of which the site must know); closed in cleanup."""
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=2)
    client: Provider = await connectProtocol(endpoint, Provider())
    testcase.addCleanup(close_client, client, client.closed)
    hello = await client.callRemote(
        ProviderHello,
        provider=name,
        key=key,
        software_version=f"test-provider {sitesrv.__version__}",
        protocol_version=PROVIDER_PROTOCOL_VERSION,
        provider_time=reactor.seconds(),
    )
    client.startHeartbeat(hello["heartbeat"])
    announced = await client.callRemote(AnnounceQueues, queues=list(queues))
    testcase.assertEqual([q["name"] for q in announced["known"]], list(queues))
    return client
