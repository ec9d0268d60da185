"""Tests for the JSON device API under ``/api/v1/``, route by route, without sockets.

Each request is a ``DummyRequest`` rendered by ``DeviceAPI`` over a real SQLite store,
with the store's functions run inline and a ``task.Clock``, so everything answers at
once. The primary's own gate is the simplest set-up (charges go straight to its ledger);
a site's gate runs over a replica copied from the primary as replication copies it, with
its failover machine fed into each mode.

Every answer is checked against ``openapi.json`` as it goes: the status must be one the
document lists for that operation, and the body must match the documented schema. No
answer may ever contain a traceback.
"""

from __future__ import annotations

import gc
import io
import json
import uuid as uuidlib
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import attrs
from twisted.internet.defer import Deferred, execute
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import getChildForRequest
from twisted.web.server import NOT_DONE_YET, Request
from twisted.web.test.requesthelper import DummyChannel, DummyRequest

from sitesrv.core.auth import Authenticator, FailureThrottle, run_inline
from sitesrv.core.findme import FindMe
from sitesrv.core.gate import Gate
from sitesrv.failover import Failover
from sitesrv.secrets import make_verifier
from sitesrv.store import Store, outbox, replica
from sitesrv.store.bootstrap import open_store, thdInitPrimary
from sitesrv.store.devices import thdAddDevice, thdAddProvider
from sitesrv.store.jobs import thdListJobs
from sitesrv.store.ledger import OFFLINE_ACCOUNT, thdListTransactions
from sitesrv.store.policies import thdSetPolicy
from sitesrv.store.printers import thdAddPrinter
from sitesrv.store.sites import thdAddSite
from sitesrv.store.snapshot import Snapshot
from sitesrv.store.users import thdAddCard, thdAddUser, thdSetPin, thdUser
from sitesrv.web import deviceapi
from sitesrv.web.deviceapi import (
    MAX_BODY,
    MAX_JOBS,
    MAX_PAGES,
    SESSION_IDLE,
    DeviceAPI,
    openapi,
)
from sitesrv.web.root import make_root
from tests.support import NOW, sqlite_url
from tests.test_findme import FakeLinks, details, uuid_of

#: Cheap scrypt cost for test verifiers (the real cost is 2**14).
CHEAP_N = 2**10
PIN = "4321"
PASSWORD = "alice's secret"

UNSYNCED = "site not yet synchronised with the primary"
REVOKED = "site revoked by the primary"

#: The failover inputs that bring a fresh machine into each mode.
PATHS: Mapping[str, tuple[str, ...]] = {
    "unsynced": (),
    "online": ("replicaFound", "connected", "outboxDrained", "caughtUp"),
    "offline": ("replicaFound",),
    "reconciling": ("replicaFound", "connected"),
    "revoked": ("replicaFound", "revoked"),
}

#: Every route the API implements, as (method, path template) of the OpenAPI document.
ROUTES = (
    ("get", "/openapi.json"),
    ("post", "/sessions"),
    ("get", "/sessions/{id}"),
    ("delete", "/sessions/{id}"),
    ("post", "/sessions/{id}/usage"),
    ("get", "/sessions/{id}/jobs"),
    ("post", "/sessions/{id}/release"),
    ("post", "/sessions/{id}/cancel"),
)
HTTP_METHODS = ("get", "put", "post", "delete", "patch", "head", "options")

#: Use the test's default device key (``key=`` None sends no Authorization header).
DEFAULT: Any = object()


# -- a tiny JSON-schema checker (the subset openapi.json uses) --------------------------

_TYPES: Mapping[str, Callable[[Any], bool]] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
}


def resolve(document: Mapping[str, Any], schema: Mapping[str, Any]) -> Mapping[str, Any]:
    """Follow a local ``$ref`` (``#/components/schemas/Name``)."""
    while "$ref" in schema:
        node: Any = document
        for part in schema["$ref"].removeprefix("#/").split("/"):
            node = node[part]
        schema = node
    return schema


def schema_problems(
    document: Mapping[str, Any],
    schema: Mapping[str, Any],
    value: Any,
    where: str = "$",
    complete: bool = False,
) -> list[str]:
    """What is wrong with ``value`` against ``schema``: [] when it conforms.

    ``type``, ``enum``, ``minimum``/``maximum``, ``required``, ``properties`` and
    ``additionalProperties: false``. With ``complete``, an object must also carry every
    documented property and nothing undocumented (the API documents all it sends).
    """
    schema = resolve(document, schema)
    kind = schema.get("type")
    if kind is not None and not _TYPES[kind](value):
        return [f"{where}: {value!r} is not of type {kind}"]
    problems = []
    if "enum" in schema and value not in schema["enum"]:
        problems.append(f"{where}: {value!r} is not one of {schema['enum']}")
    if "minimum" in schema and value < schema["minimum"]:
        problems.append(f"{where}: {value!r} is below {schema['minimum']}")
    if "maximum" in schema and value > schema["maximum"]:
        problems.append(f"{where}: {value!r} is above {schema['maximum']}")
    if kind == "object":
        properties = schema.get("properties", {})
        required = set(schema.get("required", ()))
        if complete:
            required |= set(properties)
        problems += [f"{where}: missing {name!r}" for name in sorted(required - set(value))]
        closed = complete or schema.get("additionalProperties") is False
        for name, item in sorted(value.items()):
            if name in properties:
                problems += schema_problems(
                    document, properties[name], item, f"{where}.{name}", complete
                )
            elif closed:
                problems.append(f"{where}: undocumented property {name!r}")
    return problems


SUBRESOURCES = ("usage", "jobs", "release", "cancel")


def template(path: str) -> str | None:
    """The OpenAPI path template a request path falls under, if any."""
    parts = path.strip("/").split("/")
    if parts in (["openapi.json"], ["sessions"]):
        return "/" + parts[0]
    if len(parts) == 2 and parts[0] == "sessions":
        return "/sessions/{id}"
    if len(parts) == 3 and parts[0] == "sessions" and parts[2] in SUBRESOURCES:
        return "/sessions/{id}/" + parts[2]
    return None


class SchemaCheckerTests(SynchronousTestCase):
    """The checker itself finds what it is meant to find."""

    def test_checker(self) -> None:
        """Types (bool is not an integer), enums, ranges, required, closed objects."""
        document = {"components": {"schemas": {"N": {"type": "integer", "maximum": 3}}}}
        schema = {
            "type": "object",
            "required": ["a"],
            "additionalProperties": False,
            "properties": {
                "a": {"$ref": "#/components/schemas/N"},
                "b": {"type": "string", "enum": ["x"]},
            },
        }
        self.assertEqual(schema_problems(document, schema, {"a": 1, "b": "x"}), [])
        self.assertEqual(
            schema_problems(document, schema, {"a": True, "b": "y", "c": 1}),
            [
                "$.a: True is not of type integer",
                "$.b: 'y' is not one of ['x']",
                "$: undocumented property 'c'",
            ],
        )
        self.assertEqual(
            schema_problems(document, schema, {"a": 4}, complete=True),
            ["$: missing 'b'", "$.a: 4 is above 3"],
        )
        self.assertEqual(schema_problems(document, schema, []), ["$: [] is not of type object"])


# -- fixtures ---------------------------------------------------------------------------


@attrs.frozen
class Answer:
    """One response: status, parsed JSON body (None when empty), raw body and headers."""

    code: int
    body: Any
    raw: bytes
    content_type: str | None

    @property
    def error(self) -> str:
        """The ``error`` sentence of an error answer."""
        assert isinstance(self.body, dict) and "error" in self.body, self.body
        return str(self.body["error"])


def inline(store: Store, writer: bool = False) -> Callable[..., Deferred[Any]]:
    """``Store.runRead`` / ``runWrite`` run at once on this thread."""
    run = store.write if writer else store.read

    def call(fn: Any, *args: Any, **kwargs: Any) -> Deferred[Any]:
        return execute(run, fn, *args, **kwargs)

    return call


def load_replica(primary: Store, site: Store, name: str) -> None:
    """Copy the primary's data for site ``name`` into ``site``'s replica, as a snapshot."""
    snapshot = Snapshot(primary.reader, name)
    snapshot.open()
    try:
        site.write(replica.thdClearShadow)
        while (page := snapshot.next_rows()) is not None:
            site.write(replica.thdLoadShadow, *page)
        site.write(replica.thdSwapShadow, snapshot.epoch, snapshot.position, NOW)
    finally:
        snapshot.close()


class APITestCase(SynchronousTestCase):
    """A primary "hq" with a site "north", printers, users and devices, and the
    primary's device API (``self.api``).

    Printers p1 (hq) and north-p1 (north): 0.10 mono, 0.50 colour, 10% off duplex.
    alice: 5.00, restricted, card 1001 with PIN 4321, a password. bob: 0.20, card 2002.
    Devices: mfd and mfd-2 (hq, p1), scanner (hq, no printer), north-mfd (north).
    Hold/release printers hold1 (hq) and north-hold (north), same prices, fed by the
    providers hq-spool and north-spool (``self.links``, both connected); the API has the
    real Find-Me queue of its server (``self.findme``), and ``hold`` holds jobs in it.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.store = open_store(sqlite_url(self, "primary.db"))
        self.addCleanup(self.store.stop)
        write = self.store.write
        write(thdInitPrimary, "hq", "USD", 2, NOW)
        write(thdAddSite, "north", NOW)
        for printer, site in (("p1", "hq"), ("north-p1", "north")):
            write(thdAddPrinter, printer, site, 10, 50, NOW, duplex_discount=10)
        for printer, site in (("hold1", "hq"), ("north-hold", "north")):
            write(thdAddPrinter, printer, site, 10, 50, NOW, hold=True, uri=f"ipp://{printer}/")
        self.provider = {"hq": "hq-spool", "north": "north-spool"}
        for site, provider in self.provider.items():
            write(thdAddProvider, provider, site, NOW)
        self.hold_queue = "hold1"
        verifier = make_verifier(PASSWORD, n=CHEAP_N)
        write(
            thdAddUser, "alice", NOW, full_name="Alice A", balance=5_00, password_verifier=verifier
        )
        write(thdAddCard, "alice", "1001", NOW)
        write(thdSetPin, "alice", make_verifier(PIN, n=CHEAP_N), NOW)
        write(thdAddUser, "bob", NOW, balance=20)
        write(thdAddCard, "bob", "2002", NOW)
        self.keys = {
            "mfd": write(thdAddDevice, "mfd", "hq", "http", NOW, printer="p1"),
            "mfd-2": write(thdAddDevice, "mfd-2", "hq", "http", NOW, printer="p1"),
            "scanner": write(thdAddDevice, "scanner", "hq", "http", NOW),
            "north-mfd": write(
                thdAddDevice, "north-mfd", "north", "http", NOW, printer="north-p1"
            ),
            "reader": write(
                thdAddDevice,
                "reader",
                "hq",
                "card-reader",
                NOW,
                printer="p1",
                options={"listen": "tcp:4000"},
            ),
        }
        self.gate = self.gate_over(self.store, "primary", "hq", None)
        self.api = self.api_over(self.store, "hq")
        self.key = self.keys["mfd"]
        self.document = openapi()

    def gate_over(self, store: Store, role: str, name: str, failover: Failover | None) -> Gate:
        """A gate over ``store`` with inline reads, writes and verifier checks."""
        read = inline(store)
        authenticator = Authenticator(
            read=read, throttle=FailureThrottle(self.clock), verify=run_inline
        )
        return Gate(role, name, authenticator, read, inline(store, True), self.clock, failover)

    def use_site(self, mode: str, replica_loaded: bool = True) -> Store:
        """Switch ``self.api`` to north's device API in ``mode``, over a fresh replica
        (with the primary's data and policies as they are now); return its store."""
        site = open_store(sqlite_url(self, f"site-{mode}.db"))
        self.addCleanup(site.stop)
        if replica_loaded:
            load_replica(self.store, site, "north")
        failover = Failover(self.clock)
        for name in PATHS[mode]:
            getattr(failover.inputs, name)(f"test: {name}")
        self.assertEqual(failover.mode, mode)
        self.gate = self.gate_over(site, "site", "north", failover)
        self.api = self.api_over(site, "north")
        self.key = self.keys["north-mfd"]
        self.hold_queue = "north-hold"
        return site

    def api_over(self, store: Store, name: str) -> DeviceAPI:
        """``self.gate``'s device API, with a real Find-Me queue over ``store``."""
        self.findme = FindMe(self.gate, inline(store), inline(store, True), self.clock)
        self.links = FakeLinks(*self.provider.values())
        self.findme.links = self.links
        self.site_name = name
        return DeviceAPI(self.gate, inline(store), self.clock, self.findme)

    def hold(self, *numbers: int, user: str = "alice", pages: int = 1) -> list[str]:
        """Jobs held for ``user`` on this server's hold printer, as its provider asks."""
        for n in numbers:
            job = details(n, queue=self.hold_queue, user=user, pages=pages)
            d = Deferred.fromCoroutine(self.findme.decide(self.provider[self.site_name], job))
            decision = self.successResultOf(d)
            self.assertEqual(decision.decision, "hold", decision.reason)
        return [uuid_of(n) for n in numbers]

    # -- requests -------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        key: Any = DEFAULT,
        raw: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        api: DeviceAPI | None = None,
        documented: bool = True,
    ) -> Answer:
        """``METHOD /api/v1/<path>`` with a JSON ``body`` (or ``raw`` bytes); the answer.

        The answer must be complete, JSON, free of tracebacks and, unless
        ``documented`` is False, as ``openapi.json`` describes it.
        """
        request = DummyRequest([p.encode() for p in path.split("/")])
        request.method = method.encode()
        if key is DEFAULT:
            key = self.key
        if key is not None:
            request.requestHeaders.setRawHeaders(b"authorization", [f"Bearer {key}".encode()])
        data = raw if raw is not None else b"" if body is None else json.dumps(body).encode()
        request.content = io.BytesIO(data)
        if data and raw is None:
            request.requestHeaders.setRawHeaders(b"content-length", [str(len(data)).encode()])
        for name, value in (headers or {}).items():
            request.requestHeaders.setRawHeaders(name.encode(), [value.encode()])
        self.assertIs((api or self.api).render(request), NOT_DONE_YET)
        self.assertTrue(request.finished, f"{method} {path} was not answered")
        written = b"".join(request.written)
        self.assertNotIn(b"Traceback", written)
        content_type = request.responseHeaders.getRawHeaders(b"content-type", [None])[0]
        answer = Answer(
            request.responseCode,
            json.loads(written) if written else None,
            written,
            content_type and content_type.decode(),
        )
        if answer.code != 204:
            self.assertEqual(answer.content_type, "application/json; charset=utf-8")
        if documented:
            self.assertDocumented(method, path, answer)
        return answer

    def assertDocumented(self, method: str, path: str, answer: Answer) -> None:
        """The answer's status is listed for the operation and its body matches."""
        self.assertNotEqual(answer.code, 500, answer.body)
        route = template(path)
        operation = self.document["paths"].get(route or "", {}).get(method.lower())
        if operation is None:
            # Not an operation of the API: it must be refused without revealing anything.
            self.assertIn(answer.code, (401, 404), answer.body)
            self.assertEqual(schema_problems(self.document, self.error_schema, answer.body), [])
            return
        responses = operation["responses"]
        self.assertIn(
            str(answer.code),
            responses,
            f"{method} {route} answered {answer.code} {answer.body}, but openapi.json "
            f"documents only {sorted(responses)}",
        )
        content = responses[str(answer.code)].get("content")
        if content is None:
            if route != "/openapi.json":
                self.assertIsNone(answer.body, f"{method} {route} {answer.code}: no body")
            return
        schema = content["application/json"]["schema"]
        problems = schema_problems(self.document, schema, answer.body, complete=answer.code < 300)
        self.assertEqual(problems, [], f"{method} {route} {answer.code}: {answer.body}")

    @property
    def error_schema(self) -> Mapping[str, Any]:
        return dict(self.document["components"]["schemas"]["Error"])

    def fails(self, code: int, method: str, path: str, body: Any = None, **kw: Any) -> str:
        """Request, expect the error ``code``; return the error sentence."""
        answer = self.request(method, path, body, **kw)
        self.assertEqual(answer.code, code, answer.body)
        return answer.error

    def login(self, body: Any = None, **kw: Any) -> dict[str, Any]:
        """Start a session (card 1001 + PIN by default); return the answer's JSON."""
        answer = self.request("POST", "sessions", body or {"card": "1001", "pin": PIN}, **kw)
        self.assertEqual(answer.code, 201, answer.body)
        return dict(answer.body)

    def usage(self, session: str, body: Any = None, code: int = 201, **kw: Any) -> Any:
        """Record usage (one mono copy page by default); return the answer's JSON."""
        answer = self.request(
            "POST", f"sessions/{session}/usage", body or {"kind": "copy", "pages": 1}, **kw
        )
        self.assertEqual(answer.code, code, answer.body)
        return answer.body

    def describe(self, session: str, **kw: Any) -> Answer:
        return self.request("GET", f"sessions/{session}", **kw)

    def balance(self, username: str = "alice") -> int:
        """The user's balance in the store of the primary."""
        return int(self.store.read(thdUser, username).balance)


# -- device keys ------------------------------------------------------------------------


class DeviceKeyTests(APITestCase):
    """Every request but the OpenAPI document needs the key of a device of this server."""

    def test_missing_or_malformed(self) -> None:
        """No header, another scheme, an empty or absurdly long key: 401, saying how."""
        required = "a device API key is required (Authorization: Bearer KEY)"
        self.assertEqual(self.fails(401, "POST", "sessions", {}, key=None), required)
        for header in (f"Basic {self.key}", self.key, "Bearer ", "Bearer " + "k" * 201):
            self.assertEqual(
                self.fails(
                    401, "POST", "sessions", {}, key=None, headers={"authorization": header}
                ),
                required,
            )
        # The scheme is case-insensitive, as HTTP says.
        answer = self.request(
            "POST",
            "sessions",
            {"card": "1001"},
            key=None,
            headers={"authorization": f"bearer {self.key}"},
        )
        self.assertEqual(answer.code, 201)

    def test_unknown_key(self) -> None:
        """A key no device has, a removed-looking key, or another site's device: 401."""
        for key in ("not-a-key", self.key[:-1], self.keys["north-mfd"]):
            self.assertEqual(
                self.fails(401, "POST", "sessions", {"card": "1001"}, key=key),
                "unknown device API key",
            )
            self.assertEqual(
                self.fails(401, "GET", "sessions/whatever", key=key), "unknown device API key"
            )

    def test_other_connectors_key(self) -> None:
        """A card reader's key is not a key to this API: 403 naming the device."""
        self.assertEqual(
            self.fails(403, "POST", "sessions", {"card": "1001"}, key=self.keys["reader"]),
            "device 'reader' does not use the http connector",
        )

    def test_openapi_needs_no_key(self) -> None:
        """The document is public; it is the same document ``openapi()`` returns."""
        answer = self.request("GET", "openapi.json", key=None)
        self.assertEqual((answer.code, answer.body), (200, openapi()))

    def test_through_the_web_root(self) -> None:
        """The web root serves the API at /api/v1/."""
        root = make_root(object(), self.gate, inline(self.store), self.clock)  # type: ignore[arg-type]
        request = DummyRequest([b"api", b"v1", b"sessions"])
        resource = getChildForRequest(root, request)
        self.assertIsInstance(resource, DeviceAPI)
        self.assertEqual(request.postpath, [b"sessions"])
        self.assertEqual(self.login(api=resource)["user"]["username"], "alice")


# -- logins -----------------------------------------------------------------------------


class LoginTests(APITestCase):
    """Card, card + PIN, and username + password."""

    def test_methods(self) -> None:
        """Each method starts a session that shows the user, balance and method."""
        for body, method in (
            ({"card": "1001"}, "card"),
            ({"card": "1001", "pin": PIN}, "card+pin"),
            ({"username": "alice", "password": PASSWORD}, "password"),
        ):
            started = self.login(body)
            self.assertEqual(
                {k: v for k, v in started.items() if k != "session"},
                {
                    "user": {"username": "alice", "full_name": "Alice A"},
                    "method": method,
                    "balance": "5.00",
                    "balance_minor": 5_00,
                    "expires_in": int(SESSION_IDLE),
                    "offline": False,
                },
            )
            self.assertGreaterEqual(len(started["session"]), 32)
        self.assertEqual(len(self.api.sessions), 3)

    def test_refused(self) -> None:
        """Wrong PIN, unknown card, wrong password or unknown user: 401 with the reason,
        and no session."""
        for body, reason in (
            ({"card": "1001", "pin": "0000"}, "wrong PIN"),
            ({"card": "9999"}, "unknown card"),
            ({"card": "9999", "pin": PIN}, "unknown card"),
            ({"username": "alice", "password": "guess"}, "wrong username or password"),
            ({"username": "nobody", "password": PASSWORD}, "wrong username or password"),
            ({"card": "2002", "pin": PIN}, "no PIN set"),
        ):
            self.assertEqual(self.fails(401, "POST", "sessions", body), reason)
            self.clock.advance(61)  # past any throttling
        self.assertEqual(self.api.sessions, {})

    def test_repeated_failures_slow_down(self) -> None:
        """After three wrong PINs, the next tries are refused for a while, even with the
        right PIN; the device may try again once the wait is over."""
        for _ in range(4):
            self.assertEqual(
                self.fails(401, "POST", "sessions", {"card": "1001", "pin": "0000"}), "wrong PIN"
            )
        self.assertEqual(
            self.fails(401, "POST", "sessions", {"card": "1001", "pin": PIN}),
            "too many failed attempts; try again in 1 s",
        )
        self.clock.advance(1)
        self.assertEqual(self.login()["method"], "card+pin")

    def test_bad_combinations(self) -> None:
        """Card and username together, a PIN alone, a username alone, nothing: 400."""
        sentence = "give either card (and pin) or username and password"
        for body in (
            {"card": "1001", "username": "alice", "password": PASSWORD},
            {"card": "1001", "password": PASSWORD},
            {"username": "alice", "password": PASSWORD, "pin": PIN},
            {"pin": PIN},
            {"username": "alice"},
            {},
        ):
            self.assertEqual(self.fails(400, "POST", "sessions", body), sentence)


# -- usage ------------------------------------------------------------------------------


class UsageTests(APITestCase):
    """Copy, scan and fax usage, priced with the device's printer, on the ledger."""

    def test_copy_charged_and_logged(self) -> None:
        """3 mono pages at 0.10: 0.30 charged; the balance, ledger and job log show it."""
        session = self.login()["session"]
        txn = str(uuidlib.uuid4())
        charged = self.usage(session, {"kind": "copy", "pages": 3, "uuid": txn})
        self.assertEqual(
            charged,
            {
                "uuid": txn,
                "charged": "0.30",
                "charged_minor": 30,
                "account": "alice",
                "balance": "4.70",
                "balance_minor": 4_70,
                "offline": False,
            },
        )
        self.assertEqual(self.balance(), 4_70)
        self.assertEqual(self.describe(session).body["balance"], "4.70")
        alice = self.store.read(thdUser, "alice")
        latest = self.store.read(thdListTransactions, alice.account_id)[0]
        self.assertEqual(
            (latest.uuid, latest.amount, latest.balance_after, latest.reason, latest.site),
            (txn, -30, 4_70, "copy", "hq"),
        )
        [job] = self.store.read(thdListJobs, "alice")
        self.assertEqual(
            (job.uuid, job.kind, job.pages, job.copies, job.colour, job.duplex, job.cost),
            (txn, "copy", 3, 1, False, False, 30),
        )
        self.assertEqual((job.printer_name, job.site, job.document), ("p1", "hq", "copy at mfd"))
        self.assertEqual(latest.job_uuid, job.uuid)

    def test_prices(self) -> None:
        """Colour, copies and the duplex discount follow the printer's prices."""
        session = self.login()["session"]
        for body, cost in (
            ({"kind": "copy", "pages": 2, "colour": True}, 1_00),
            ({"kind": "copy", "pages": 3, "copies": 2, "colour": True, "duplex": True}, 2_70),
            ({"kind": "copy", "pages": 3, "duplex": True}, 27),
            ({"kind": "fax", "pages": 4}, 40),
            ({"kind": "scan", "pages": 0}, 0),
        ):
            before = self.balance()
            charged = self.usage(session, body)
            self.assertEqual(charged["charged_minor"], cost, body)
            self.assertEqual(self.balance(), before - cost)
        reasons = [t.reason for t in self.store.read(thdListTransactions, None, 5)]
        self.assertEqual(reasons, ["scan", "fax", "copy", "copy", "copy"])

    def test_same_uuid_charged_once(self) -> None:
        """A device that resends a usage record (same uuid) is charged once and gets the
        same answer."""
        session = self.login()["session"]
        body = {"kind": "copy", "pages": 3, "uuid": str(uuidlib.uuid4())}
        first = self.usage(session, body)
        again = self.usage(session, body)
        self.assertEqual(again, first)
        self.assertEqual(self.balance(), 4_70)
        self.assertEqual(
            [t.uuid for t in self.store.read(thdListTransactions, None)].count(body["uuid"]), 1
        )
        self.assertEqual(len(self.store.read(thdListJobs, "alice")), 1)

    def test_resend_after_the_balance_ran_out(self) -> None:
        """A resend of a charge that used up the balance is acknowledged, not refused as
        if it had not been recorded."""
        session = self.login({"card": "2002"})["session"]
        body = {"kind": "copy", "pages": 2, "uuid": str(uuidlib.uuid4())}
        first = self.usage(session, body)
        self.assertEqual(first["balance"], "0.00")
        self.assertEqual(self.usage(session, body), first)
        self.assertEqual(self.balance("bob"), 0)

    def test_uuid_spellings(self) -> None:
        """A UUID in any spelling Python accepts is recorded in its canonical form, so
        upper case, braces or a URN resend the same charge."""
        session = self.login()["session"]
        txn = uuidlib.uuid4()
        for spelling in (str(txn).upper(), f"{{{txn}}}", f"urn:uuid:{txn}", txn.hex):
            self.assertEqual(
                self.usage(session, {"kind": "copy", "pages": 1, "uuid": spelling})["uuid"],
                str(txn),
            )
        self.assertEqual(self.balance(), 4_90)

    def test_insufficient_balance(self) -> None:
        """A copy costing more than the balance is refused with 402 and what is left;
        nothing is charged."""
        session = self.login({"card": "2002"})["session"]
        answer = self.usage(session, {"kind": "copy", "pages": 3}, code=402)
        self.assertEqual(answer["error"], "insufficient balance: 0.20 available, copy costs 0.30")
        self.assertEqual(self.balance("bob"), 20)
        self.assertEqual(self.usage(session, {"kind": "copy", "pages": 2})["balance"], "0.00")

    def test_device_without_printer(self) -> None:
        """A device with no printer cannot price usage: 409, nothing charged."""
        key = self.keys["scanner"]
        session = self.login(key=key)["session"]
        answer = self.usage(session, {"kind": "scan", "pages": 1}, code=409, key=key)
        self.assertEqual(answer["error"], "device 'scanner' has no printer to price usage")
        self.assertEqual(self.balance(), 5_00)


# -- validation -------------------------------------------------------------------------


class ValidationTests(APITestCase):
    """Malformed requests get 400 (or 413) with a sentence, and change nothing."""

    def setUp(self) -> None:
        super().setUp()
        self.session = self.login()["session"]
        self.path = f"sessions/{self.session}/usage"

    def test_not_json(self) -> None:
        """Not JSON, not UTF-8, or not an object."""
        for raw in (b"{", b"kind=copy", b"\xff\xfe{}", b"[]", b'"copy"', b"3", b"null"):
            for path in ("sessions", self.path):
                error = self.fails(400, "POST", path, raw=raw)
                self.assertIn(
                    error,
                    (
                        "the request body is not valid JSON",
                        "the request body must be a JSON object",
                    ),
                    raw,
                )

    def test_fields(self) -> None:
        """Unknown fields, missing fields, wrong types (a bool is not an integer)."""
        for body, error in (
            ({"kind": "copy", "pages": 1, "colour_mode": "mono"}, "unknown field(s): colour_mode"),
            ({"pages": 1}, "missing field 'kind'"),
            ({"kind": "copy"}, "missing field 'pages'"),
            ({"kind": "copy", "pages": "3"}, "field 'pages' must be an integer"),
            ({"kind": "copy", "pages": 3.0}, "field 'pages' must be an integer"),
            ({"kind": "copy", "pages": True}, "field 'pages' must be an integer"),
            ({"kind": "copy", "pages": 1, "copies": False}, "field 'copies' must be an integer"),
            (
                {"kind": "copy", "pages": 1, "colour": "yes"},
                "field 'colour' must be true or false",
            ),
            ({"kind": "copy", "pages": 1, "duplex": 1}, "field 'duplex' must be true or false"),
            ({"kind": 1, "pages": 1}, "field 'kind' must be a string"),
            ({"kind": "print", "pages": 1}, "kind must be one of copy, scan, fax"),
            ({"kind": "copy", "pages": 1, "uuid": 7}, "field 'uuid' must be a string"),
            ({"kind": "copy", "pages": 1, "uuid": "not-a-uuid"}, "uuid must be a UUID"),
        ):
            self.assertEqual(self.fails(400, "POST", self.path, body), error, body)
        for body, error in (
            ({"card": 1001}, "field 'card' must be a string"),
            ({"card": "1001", "pin": 4321}, "field 'pin' must be a string"),
            ({"card": "1001", "badge": "x"}, "unknown field(s): badge"),
        ):
            self.assertEqual(self.fails(400, "POST", "sessions", body), error, body)
        self.assertEqual(self.balance(), 5_00)

    def test_ranges(self) -> None:
        """Pages 0 to MAX_PAGES and copies 1 to MAX_PAGES, as the document says."""
        sentence = f"pages must be 0-{MAX_PAGES} and copies 1-{MAX_PAGES}"
        for pages, copies in (
            (-1, 1),
            (MAX_PAGES + 1, 1),
            (1, 0),
            (1, MAX_PAGES + 1),
            (10**40, 1),
        ):
            body = {"kind": "scan", "pages": pages, "copies": copies}
            self.assertEqual(self.fails(400, "POST", self.path, body), sentence)
        usage = self.document["components"]["schemas"]["Usage"]["properties"]
        self.assertEqual((usage["pages"]["minimum"], usage["pages"]["maximum"]), (0, MAX_PAGES))
        self.assertEqual((usage["copies"]["minimum"], usage["copies"]["maximum"]), (1, MAX_PAGES))
        self.assertEqual(self.usage(self.session, {"kind": "scan", "pages": 0})["charged"], "0.00")

    def test_body_too_large(self) -> None:
        """More than 16 KiB, announced by Content-Length or just sent: 413."""
        sentence = f"request body larger than {MAX_BODY} bytes"
        big = json.dumps({"kind": "copy", "pages": 1, "uuid": "x" * MAX_BODY}).encode()
        for path in ("sessions", self.path):
            # Announced: refused before reading.
            self.assertEqual(
                self.fails(413, "POST", path, raw=b"{}", headers={"content-length": "20000"}),
                sentence,
            )
            # Sent without a (truthful) length.
            self.assertEqual(self.fails(413, "POST", path, raw=big), sentence)
        # Exactly the limit is read (and judged on its content).
        exact = b"{" + b" " * (MAX_BODY - 2) + b"}"
        self.assertEqual(
            self.fails(
                400, "POST", self.path, raw=exact, headers={"content-length": str(MAX_BODY)}
            ),
            "missing field 'kind'",
        )

    def test_unknown_endpoint(self) -> None:
        """Unknown paths and methods: 404 naming them (never 405 or a crash)."""
        for method, path in (
            ("GET", "sessions"),
            ("PUT", "sessions"),
            ("GET", "jobs"),
            ("GET", ""),
            ("PATCH", f"sessions/{self.session}"),
            ("GET", f"sessions/{self.session}/usage"),
            ("GET", f"sessions/{self.session}/release"),
            ("GET", f"sessions/{self.session}/cancel"),
            ("POST", f"sessions/{self.session}/jobs"),
            ("POST", "openapi.json"),
        ):
            error = self.fails(404, method, path, {})
            self.assertEqual(error, f"no such endpoint: {method} /api/v1/{path}")


# -- sessions ---------------------------------------------------------------------------


class SessionTests(APITestCase):
    """Sessions belong to one device, end on DELETE and after 300 s without a request."""

    def test_end(self) -> None:
        """DELETE answers 204 with no body; the session is gone afterwards."""
        session = self.login()["session"]
        self.assertEqual(self.describe(session).body["balance"], "5.00")
        answer = self.request("DELETE", f"sessions/{session}")
        self.assertEqual((answer.code, answer.raw), (204, b""))
        for method, path in (("GET", ""), ("DELETE", ""), ("POST", "/usage")):
            self.assertEqual(
                self.fails(404, method, f"sessions/{session}{path}", {"kind": "copy", "pages": 1}),
                "no such session (it may have expired)",
            )
        self.assertEqual(self.balance(), 5_00)

    def test_other_device(self) -> None:
        """Another device cannot see, use or end a session; it stays usable."""
        session = self.login()["session"]
        other = self.keys["mfd-2"]
        for method, path in (("GET", ""), ("POST", "/usage"), ("DELETE", "")):
            self.fails(
                404, method, f"sessions/{session}{path}", {"kind": "copy", "pages": 1}, key=other
            )
        self.assertEqual(self.balance(), 5_00)
        self.assertEqual(self.describe(session).code, 200)

    def test_idle_expiry(self) -> None:
        """300 s without a request ends a session; each request starts the 300 s again."""
        session = self.login()["session"]
        for _ in range(3):
            self.clock.advance(SESSION_IDLE - 1)
            answer = self.describe(session)
            self.assertEqual((answer.code, answer.body["expires_in"]), (200, SESSION_IDLE))
        self.clock.advance(SESSION_IDLE - 1)
        self.usage(session)
        self.clock.advance(SESSION_IDLE)
        self.assertEqual(self.describe(session).code, 404)
        self.assertEqual(self.api.sessions, {})
        self.assertEqual(self.balance(), 4_90)

    def test_oldest_dropped_at_the_limit(self) -> None:
        """At the most sessions held, a new session drops the oldest one."""
        self.patch(deviceapi, "MAX_SESSIONS", 2)
        first, second, third = (self.login()["session"] for _ in range(3))
        self.assertEqual(self.describe(first).code, 404)
        self.assertEqual(self.describe(second).code, 200)
        self.assertEqual(self.describe(third).code, 200)


# -- a site, in each mode ---------------------------------------------------------------


class SiteModeTests(APITestCase):
    """At a site, the failover mode and the offline policies decide."""

    def test_unsynced(self) -> None:
        """Unsynced (with or without rows from an earlier replica): 503 with the reason,
        for logins and for the device's known key alike."""
        for loaded in (True, False):
            self.use_site("unsynced", replica_loaded=loaded)
            self.assertEqual(self.fails(503, "POST", "sessions", {"card": "1001"}), UNSYNCED)
            self.assertEqual(self.fails(503, "GET", "sessions/x"), UNSYNCED)
            self.assertEqual(self.request("GET", "openapi.json").code, 200)

    def test_revoked(self) -> None:
        """Revoked mid-session: usage and new logins answer 503 with the reason."""
        site = self.use_site("online")
        session = self.login()["session"]
        assert self.gate.failover is not None
        self.gate.failover.inputs.revoked("test: revoked")
        self.assertEqual(self.usage(session, code=503)["error"], REVOKED)
        self.assertEqual(self.fails(503, "POST", "sessions", {"card": "1001"}), REVOKED)
        self.assertEqual(site.read(outbox.thdPendingCount), 0)

    def test_online_goes_to_the_outbox(self) -> None:
        """Online, a charge goes to the outbox (once per uuid) and the balance the site
        shows drops at once."""
        site = self.use_site("online")
        session = self.login()["session"]
        body = {"kind": "copy", "pages": 3, "uuid": str(uuidlib.uuid4())}
        first = self.usage(session, body)
        self.assertEqual(
            (first["charged"], first["balance"], first["offline"]), ("0.30", "4.70", False)
        )
        self.assertEqual(self.usage(session, body), first)
        [record] = site.read(outbox.thdPending, 0, 10)
        self.assertEqual(
            (record.uuid, record.payload["amount"], record.payload["offline"]),
            (body["uuid"], -30, False),
        )
        self.assertEqual(record.payload["job"]["printer_name"], "north-p1")
        self.assertEqual(self.describe(session).body["balance"], "4.70")
        self.assertEqual(self.balance(), 5_00)  # the primary has not seen it yet

    def test_offline_personal(self) -> None:
        """Offline (default policies), the user pays; the answers say offline; the
        allowance (0 by default) is the floor."""
        site = self.use_site("offline")
        started = self.login()
        self.assertTrue(started["offline"])
        charged = self.usage(started["session"], {"kind": "copy", "pages": 3})
        self.assertEqual(
            (charged["account"], charged["balance"], charged["offline"]), ("alice", "4.70", True)
        )
        refused = self.usage(started["session"], {"kind": "copy", "pages": 48}, code=402)
        self.assertEqual(
            refused["error"], "insufficient offline allowance: 4.70 available, copy costs 4.80"
        )
        self.assertEqual(site.read(outbox.thdPendingCount), 1)

    def test_offline_refuse(self) -> None:
        """offline.account = refuse: logins work, usage is refused with 403."""
        self.store.write(thdSetPolicy, "offline.account", "refuse", NOW, site="north")
        for mode in ("offline", "reconciling"):
            site = self.use_site(mode)
            session = self.login()["session"]
            answer = self.usage(session, code=403)
            self.assertEqual(
                answer["error"], "charging is not available while the site is offline"
            )
            self.assertEqual(site.read(outbox.thdPendingCount), 0)
        self.use_site("online")
        self.assertEqual(self.usage(self.login()["session"])["account"], "alice")

    def test_offline_unknown_card(self) -> None:
        """offline.unknown_card = offline-account: offline, an unknown card starts a
        session and its usage is charged to the Offline Account; online it is refused."""
        self.store.write(thdSetPolicy, "offline.unknown_card", "offline-account", NOW)
        site = self.use_site("offline")
        started = self.login({"card": "777777"})
        self.assertEqual(
            (started["user"]["username"], started["method"], started["offline"]),
            ("card:777777", "card", True),
        )
        charged = self.usage(started["session"], {"kind": "copy", "pages": 2})
        self.assertEqual((charged["account"], charged["charged"]), (OFFLINE_ACCOUNT, "0.20"))
        [record] = site.read(outbox.thdPending, 0, 10)
        self.assertEqual(
            (
                record.payload["account_name"],
                record.payload["username"],
                record.payload["user_id"],
            ),
            (OFFLINE_ACCOUNT, "card:777777", None),
        )
        self.use_site("online")
        self.assertEqual(self.fails(401, "POST", "sessions", {"card": "777777"}), "unknown card")

    def test_offline_password_login(self) -> None:
        """offline.password_login = refuse: offline, password logins get 401 saying so;
        cards still work."""
        self.store.write(thdSetPolicy, "offline.password_login", "refuse", NOW, site="north")
        self.use_site("offline")
        self.assertEqual(
            self.fails(401, "POST", "sessions", {"username": "alice", "password": PASSWORD}),
            "password login is not available while the site is offline",
        )
        self.assertEqual(self.login()["method"], "card+pin")


# -- held jobs --------------------------------------------------------------------------


class HeldJobTests(APITestCase):
    """The session's held jobs: listed, released to the device's printer, cancelled."""

    def jobs(self, session: str, **kw: Any) -> list[dict[str, Any]]:
        answer = self.request("GET", f"sessions/{session}/jobs", **kw)
        self.assertEqual(answer.code, 200, answer.body)
        return list(answer.body["jobs"])

    def release(self, session: str, body: Any = None, code: int = 200, **kw: Any) -> Any:
        answer = self.request("POST", f"sessions/{session}/release", body, **kw)
        self.assertEqual(answer.code, code, answer.body)
        return answer.body

    def cancel(self, session: str, body: Any = None, code: int = 200) -> Any:
        answer = self.request("POST", f"sessions/{session}/cancel", body)
        self.assertEqual(answer.code, code, answer.body)
        return answer.body

    def test_list(self) -> None:
        """Each held job with its document, queue, pages, estimated cost and times;
        only the session's user's jobs."""
        session = self.login()["session"]
        self.assertEqual(self.jobs(session), [])
        self.hold(1, pages=3)
        self.clock.advance(60)
        self.hold(2, pages=2)
        self.hold(3, user="bob")
        jobs = self.jobs(session)
        self.assertEqual(
            [(j["uuid"], j["document"], j["queue"], j["pages"], j["copies"]) for j in jobs],
            [(uuid_of(1), "doc1.pdf", "hold1", 3, 1), (uuid_of(2), "doc2.pdf", "hold1", 2, 1)],
        )
        first = jobs[0]
        self.assertEqual((first["cost"], first["cost_minor"]), ("0.30", 30))
        self.assertEqual((first["colour"], first["duplex"]), (False, False))
        self.assertEqual(first["held_since"], datetime.fromtimestamp(NOW, UTC).isoformat())
        self.assertGreater(first["expires_in"], 0)
        self.assertGreater(first["expires_at"], first["held_since"])
        bob = self.login({"card": "2002"})["session"]
        self.assertEqual([j["uuid"] for j in self.jobs(bob)], [uuid_of(3)])

    def test_release_all(self) -> None:
        """No body: every held job goes to the device's printer (p1), priced there."""
        self.hold(1, 2, pages=2)
        session = self.login()["session"]
        answer = self.release(session)
        self.assertEqual((answer["printer"], answer["released"]), ("p1", 2))
        self.assertEqual(
            [(o["uuid"], o["released"], o["cost"], o["reason"]) for o in answer["jobs"]],
            [
                (uuid_of(1), True, "0.20", "released to p1"),
                (uuid_of(2), True, "0.20", "released to p1"),
            ],
        )
        self.assertEqual(
            [(r[1], r[3]) for r in self.links.releases],
            [
                (uuid_of(1), "p1"),
                (uuid_of(2), "p1"),
            ],
        )
        self.assertEqual(self.jobs(session), [])
        self.assertEqual(self.release(session)["jobs"], [])

    def test_release_some(self) -> None:
        """Named jobs only (any UUID spelling); unknown and not-held ones are answered
        per job; an empty list releases nothing."""
        self.hold(1, 2, 3)
        session = self.login()["session"]
        self.assertEqual(self.release(session, {"jobs": []})["jobs"], [])
        stranger = str(uuidlib.uuid4())
        answer = self.release(session, {"jobs": [uuid_of(2).upper(), stranger]})
        self.assertEqual(
            [(o["uuid"], o["released"], o["reason"]) for o in answer["jobs"]],
            [(stranger, False, "no such held job"), (uuid_of(2), True, "released to p1")],
        )
        again = self.release(session, {"jobs": [uuid_of(2)]})["jobs"]
        self.assertEqual(
            [(o["released"], o["reason"]) for o in again], [(False, "job is releasing, not held")]
        )
        self.assertEqual([j["uuid"] for j in self.jobs(session)], [uuid_of(1), uuid_of(3)])
        # bob cannot release alice's jobs.
        bob = self.login({"card": "2002"})["session"]
        [outcome] = self.release(bob, {"jobs": [uuid_of(1)]})["jobs"]
        self.assertEqual((outcome["released"], outcome["reason"]), (False, "no such held job"))

    def test_balance_checked_again_at_release(self) -> None:
        """alice (5.00) holds two 2.00 jobs, then copies 20 pages (2.00): releasing all,
        the first goes and the second, which she can no longer afford, stays held."""
        self.hold(1, 2, pages=20)
        session = self.login()["session"]
        self.usage(session, {"kind": "copy", "pages": 20})
        answer = self.release(session)
        self.assertEqual(answer["released"], 1)
        first, second = answer["jobs"]
        self.assertEqual((first["uuid"], first["released"]), (uuid_of(1), True))
        self.assertEqual((second["uuid"], second["released"]), (uuid_of(2), False))
        self.assertIn("insufficient balance", second["reason"])
        self.assertEqual(second["cost"], "2.00")
        self.assertEqual([j["uuid"] for j in self.jobs(session)], [uuid_of(2)])

    def test_provider_not_connected(self) -> None:
        """A job whose provider is not connected stays held, said per job."""
        self.hold(1)
        self.links.up.clear()
        [outcome] = self.release(self.login()["session"])["jobs"]
        self.assertFalse(outcome["released"])
        self.assertIn("not connected", outcome["reason"])

    def test_cancel(self) -> None:
        """Named jobs, then all: how many were cancelled; the provider is told."""
        self.hold(1, 2, 3)
        session = self.login()["session"]
        self.assertEqual(
            self.cancel(session, {"jobs": [uuid_of(2), str(uuidlib.uuid4())]}), {"cancelled": 1}
        )
        self.assertEqual([j["uuid"] for j in self.jobs(session)], [uuid_of(1), uuid_of(3)])
        self.assertEqual(self.cancel(session), {"cancelled": 2})
        self.assertEqual(self.jobs(session), [])
        self.assertEqual(self.cancel(session, {}), {"cancelled": 0})
        self.assertTrue(self.links.deletes)

    def test_validation(self) -> None:
        """Unknown fields, a non-list, non-strings, non-UUIDs and too many: 400."""
        self.hold(1)
        session = self.login()["session"]
        too_many = [str(uuidlib.uuid4()) for _ in range(MAX_JOBS + 1)]
        for what in ("release", "cancel"):
            path = f"sessions/{session}/{what}"
            for body, error in (
                ({"jobs": [], "all": True}, "unknown field(s): all"),
                ({"jobs": uuid_of(1)}, "field 'jobs' must be a list of job UUIDs"),
                ({"jobs": [1]}, "field 'jobs' must be a list of job UUIDs"),
                ({"jobs": ["not-a-uuid"]}, "each of 'jobs' must be a job UUID"),
                ({"jobs": too_many}, f"at most {MAX_JOBS} jobs at once"),
                ([uuid_of(1)], "the request body must be a JSON object"),
            ):
                self.assertEqual(self.fails(400, "POST", path, body), error, (what, body))
            self.assertEqual(
                self.fails(400, "POST", path, raw=b"{jobs"), "the request body is not valid JSON"
            )
        self.assertEqual(len(self.jobs(session)), 1)
        self.assertEqual(self.links.releases, [])

    def test_session_and_key(self) -> None:
        """Another device's session is not found; no key is 401."""
        session = self.login()["session"]
        for method, what in (("GET", "jobs"), ("POST", "release"), ("POST", "cancel")):
            path = f"sessions/{session}/{what}"
            self.fails(404, method, path, key=self.keys["mfd-2"])
            self.fails(401, method, path, key=None)

    def test_device_without_printer(self) -> None:
        """A device with no printer lists and cancels, but cannot release: 409."""
        self.hold(1)
        self.key = self.keys["scanner"]
        session = self.login()["session"]
        self.assertEqual(len(self.jobs(session)), 1)
        self.assertEqual(
            self.release(session, code=409)["error"],
            "device 'scanner' has no printer to release to",
        )
        self.assertEqual(self.cancel(session), {"cancelled": 1})

    def test_without_findme(self) -> None:
        """A server built without a Find-Me queue answers 503 saying so."""
        self.api = DeviceAPI(self.gate, inline(self.store), self.clock)
        session = self.login()["session"]
        self.assertEqual(
            self.fails(503, "GET", f"sessions/{session}/jobs"),
            "held jobs are not available on this server",
        )

    def test_offline_release(self) -> None:
        """At a site offline, by default held jobs are released to the device's printer
        (answers say offline); with offline.release = refuse, 403 with the reason and the
        jobs stay held, but can be listed and cancelled. Reconciling (the link is up),
        release follows the normal rules again."""
        self.use_site("offline")
        self.hold(1)
        session = self.login()["session"]
        answer = self.release(session)
        self.assertEqual(
            (answer["released"], answer["offline"], answer["printer"]), (1, True, "north-p1")
        )
        self.store.write(thdSetPolicy, "offline.release", "refuse", NOW, site="north")
        self.use_site("offline")
        self.hold(2, 3)
        session = self.login()["session"]
        self.assertEqual(
            self.release(session, {"jobs": [uuid_of(2)]}, code=403)["error"],
            "release is not available while the site is offline",
        )
        self.assertEqual([j["uuid"] for j in self.jobs(session)], [uuid_of(2), uuid_of(3)])
        self.assertEqual(self.links.releases, [])
        self.assertEqual(self.cancel(session, {"jobs": [uuid_of(3)]}), {"cancelled": 1})
        self.use_site("reconciling")
        self.hold(4)
        self.assertEqual(self.release(self.login()["session"])["released"], 1)

    def test_unsynced_and_revoked(self) -> None:
        """Unsynced or revoked: 503 with the reason."""
        self.use_site("unsynced")
        self.assertEqual(self.fails(503, "GET", "sessions/x/jobs"), UNSYNCED)
        self.use_site("online")
        session = self.login()["session"]
        assert self.gate.failover is not None
        self.gate.failover.inputs.revoked("test: revoked")
        self.assertEqual(self.release(session, code=503)["error"], REVOKED)


# -- faults -----------------------------------------------------------------------------


class FaultTests(APITestCase):
    """An internal error answers 500 with a fixed sentence; the log has the details."""

    def test_failing_read(self) -> None:
        """A read that raises: 500 {"error": "internal error"}, no trace, no detail."""

        def broken(fn: Any, *args: Any, **kwargs: Any) -> Deferred[Any]:
            raise RuntimeError("database file is on fire at /var/secret")

        api = DeviceAPI(self.gate, broken, self.clock)
        answer = self.request("POST", "sessions", {"card": "1001"}, api=api, documented=False)
        self.assertEqual((answer.code, answer.body), (500, {"error": "internal error"}))
        self.assertNotIn(b"fire", answer.raw)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_failing_write(self) -> None:
        """A charge whose write fails: 500, and the session survives for a retry."""
        session = self.login()["session"]

        def broken(fn: Any, *args: Any, **kwargs: Any) -> Deferred[Any]:
            return execute(lambda: 1 / 0)

        working, self.gate.write = self.gate.write, broken
        answer = self.request(
            "POST", f"sessions/{session}/usage", {"kind": "copy", "pages": 1}, documented=False
        )
        self.assertEqual((answer.code, answer.body), (500, {"error": "internal error"}))
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.gate.write = working
        self.assertEqual(self.usage(session)["balance"], "4.90")

    def test_device_gone_before_the_answer(self) -> None:
        """A device that drops the connection while its charge is being written: the
        charge is recorded, nothing is logged as an error, and the device's retry (same
        uuid) is answered without a second charge."""
        session = self.login()["session"]
        held: list[tuple[Deferred[Any], Any, Any, Any]] = []

        def slow(fn: Any, *args: Any, **kwargs: Any) -> Deferred[Any]:
            d: Deferred[Any] = Deferred()
            held.append((d, fn, args, kwargs))
            return d

        working, self.gate.write = self.gate.write, slow
        body = {"kind": "copy", "pages": 1, "uuid": str(uuidlib.uuid4())}
        request = Request(DummyChannel())
        request.method = b"POST"
        request.postpath = [b"sessions", session.encode(), b"usage"]
        request.requestHeaders.setRawHeaders(b"authorization", [f"Bearer {self.key}".encode()])
        request.content = io.BytesIO(json.dumps(body).encode())
        self.assertIs(self.api.render(request), NOT_DONE_YET)
        request.connectionLost(Failure(ConnectionDone()))
        [(d, fn, args, kwargs)] = held
        d.callback(self.store.write(fn, *args, **kwargs))
        held.clear()
        del d
        gc.collect()
        self.assertEqual(self.flushLoggedErrors(), [])
        self.assertEqual(self.balance(), 4_90)
        self.gate.write = working
        self.assertEqual(self.usage(session, body)["balance"], "4.90")


# -- openapi.json against the routes ----------------------------------------------------


class OpenAPITests(APITestCase):
    """The document and the routes describe the same API."""

    #: A valid request body for each documented operation that takes one.
    EXAMPLES: Mapping[tuple[str, str], Any] = {
        ("post", "/sessions"): {"card": "1001", "pin": PIN},
        ("post", "/sessions/{id}/usage"): {"kind": "copy", "pages": 1},
        ("post", "/sessions/{id}/release"): {},
        ("post", "/sessions/{id}/cancel"): {"jobs": [str(uuidlib.uuid4())]},
    }

    def operations(self) -> list[tuple[str, str, Mapping[str, Any]]]:
        return [
            (method, path, operation)
            for path, item in self.document["paths"].items()
            for method, operation in item.items()
            if method in HTTP_METHODS
        ]

    def test_documented_operations_exist(self) -> None:
        """Each documented operation answers with a documented success (checked against
        its schema by ``request``), and the example bodies match the request schemas."""
        for method, path, operation in self.operations():
            session = self.login()["session"]
            body = self.EXAMPLES.get((method, path))
            if "requestBody" in operation:
                schema = operation["requestBody"]["content"]["application/json"]["schema"]
                self.assertEqual(schema_problems(self.document, schema, body), [])
            answer = self.request(method.upper(), path.lstrip("/").replace("{id}", session), body)
            self.assertLess(answer.code, 300, f"{method} {path}: {answer.body}")

    def test_routes_documented(self) -> None:
        """Every route the API implements is in the document, and nothing else is."""
        self.assertEqual(sorted((m, p) for m, p, _ in self.operations()), sorted(ROUTES))

    def test_undocumented_methods_absent(self) -> None:
        """A method the document does not list for a path is not served on it."""
        for path, item in self.document["paths"].items():
            for method in HTTP_METHODS:
                if method in item:
                    continue
                session = self.login()["session"]
                concrete = path.lstrip("/").replace("{id}", session)
                error = self.fails(404, method.upper(), concrete, {})
                self.assertTrue(error.startswith("no such endpoint"), (method, path, error))

    def test_security(self) -> None:
        """Operations documented with the device key refuse a request without one."""
        self.assertEqual(
            self.document["components"]["securitySchemes"]["deviceKey"],
            {"type": "http", "scheme": "bearer"},
        )
        for method, path, operation in self.operations():
            answer = self.request(
                method.upper(),
                path.lstrip("/").replace("{id}", "x"),
                self.EXAMPLES.get((method, path)),
                key=None,
            )
            if operation.get("security"):
                self.assertEqual(answer.code, 401, (method, path))
            else:
                self.assertEqual(answer.code, 200, (method, path))

    def test_kinds_and_login_fields(self) -> None:
        """The usage kinds and login fields documented are the ones accepted."""
        schemas = self.document["components"]["schemas"]
        self.assertEqual(
            schemas["Usage"]["properties"]["kind"]["enum"], list(deviceapi.USAGE_KINDS)
        )
        self.assertEqual(
            sorted(schemas["Login"]["properties"]), ["card", "password", "pin", "username"]
        )
        session = self.login()["session"]
        for kind in deviceapi.USAGE_KINDS:
            self.assertEqual(self.usage(session, {"kind": kind, "pages": 1})["charged"], "0.10")
