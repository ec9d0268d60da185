"""The JSON device API under ``/api/v1/`` that embedded MFD software calls.

A device authenticates every request with its API key as a bearer token. It starts a
session for a user (card, card + PIN, or username + password), lists the user's held
jobs and releases (to the device's printer) or cancels some or all of them, records copy,
scan and fax usage in that session (priced with the device's printer's prices), and ends
it.
Everything goes through the gate, so offline policies apply at a site and an unsynced
or revoked site answers 503 with the reason. See ``openapi.json`` for the exact shapes.
"""

from __future__ import annotations

import json
import secrets
import uuid as uuidlib
from collections import OrderedDict
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, cast

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

import sitesrv
from sitesrv.core.auth import AuthFailed, Identity
from sitesrv.core.devicecore import FUNDS, POLICY, UNAVAILABLE, DeviceCore, DeviceRefused
from sitesrv.core.gate import Gate, Refused
from sitesrv.errors import InsufficientFunds, SitesrvError
from sitesrv.interfaces import IFindMe
from sitesrv.money import format_amount
from sitesrv.store.devices import Device, thdDeviceByKey
from sitesrv.store.policies import thdDecimals

log = Logger()

#: Largest request body accepted.
MAX_BODY = 16_384
#: Sessions end after this long without a request.
SESSION_IDLE = 300.0
#: Most sessions held at once (oldest dropped first).
MAX_SESSIONS = 10_000
#: Largest page count or copy count in one usage record.
MAX_PAGES = 100_000
#: Most job UUIDs named in one release or cancel.
MAX_JOBS = 100

USAGE_KINDS = ("copy", "scan", "fax")


class HTTPError(Exception):
    """An error answer: status code and a sentence for the device's screen."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@attrs.define
class Session:
    """A user's session at one device."""

    id: str
    device: str
    identity: Identity
    expires: float


def _send(request: Request, code: int, body: Any) -> None:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json; charset=utf-8")
    request.setHeader(b"cache-control", b"no-store")
    if body is not None:
        request.write(json.dumps(body, sort_keys=True).encode("utf-8"))
    request.finish()


def _body(request: Request) -> dict[str, Any]:
    length = request.getHeader(b"content-length")
    if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
        raise HTTPError(413, f"request body larger than {MAX_BODY} bytes")
    assert request.content is not None
    data = request.content.read(MAX_BODY + 1)
    if len(data) > MAX_BODY:
        raise HTTPError(413, f"request body larger than {MAX_BODY} bytes")
    try:
        body = json.loads(data or b"{}")
    except (ValueError, UnicodeDecodeError):
        raise HTTPError(400, "the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise HTTPError(400, "the request body must be a JSON object")
    return body


def _fields(body: dict[str, Any], spec: dict[str, tuple[type, bool]]) -> dict[str, Any]:
    """Check ``body`` against ``{name: (type, required)}``: unknown, missing, wrong type."""
    unknown = set(body) - set(spec)
    if unknown:
        raise HTTPError(400, f"unknown field(s): {', '.join(sorted(unknown))}")
    for name, (kind, required) in spec.items():
        if name not in body:
            if required:
                raise HTTPError(400, f"missing field {name!r}")
            continue
        value = body[name]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise HTTPError(400, f"field {name!r} must be {_TYPE_NAMES[kind]}")
    return body


_TYPE_NAMES = {str: "a string", int: "an integer", bool: "true or false"}


class DeviceAPI(Resource):
    """``/api/v1/``: sessions, usage and the OpenAPI document."""

    isLeaf = True

    def __init__(
        self,
        gate: Gate,
        read: Callable[..., Deferred[Any]],
        clock: IReactorTime,
        findme: IFindMe | None = None,
    ):
        super().__init__()
        self.gate = gate
        self.read = read
        self.clock = clock
        #: The server's Find-Me queue; without one, the held-job endpoints answer 503.
        self.findme = findme
        self.sessions: OrderedDict[str, Session] = OrderedDict()

    # -- plumbing -------------------------------------------------------------------

    def render(self, request: Request) -> int:
        """Route the request and answer it asynchronously, unless the device has gone."""
        # Finishing a request whose connection was lost raises; such a device gets no
        # answer (what it asked for is done, and a retry with its uuid charges once).
        gone: list[Failure] = []
        request.notifyFinish().addErrback(gone.append)
        d = Deferred.fromCoroutine(self._route(request))
        d.addErrback(self._failed)
        d.addCallback(lambda answer: None if gone else _send(request, *answer))
        return NOT_DONE_YET

    def _failed(self, failure: Failure) -> tuple[int, Any]:
        error = failure.value
        if isinstance(error, HTTPError):
            code, message = error.code, error.message
        elif isinstance(error, AuthFailed):
            code, message = 401, error.reason
        elif isinstance(error, DeviceRefused):
            code = {POLICY: 403, FUNDS: 402, UNAVAILABLE: 503}.get(error.kind, 400)
            message = error.reason
        elif isinstance(error, Refused):
            serving = self.gate.failover is None or self.gate.failover.serving()
            code, message = (403 if serving else 503), str(error)
        elif isinstance(error, InsufficientFunds):
            code, message = 402, str(error)
        elif isinstance(error, SitesrvError):
            code, message = 400, str(error)
        else:
            # Never a stack trace in an answer; the log has it.
            log.failure("device API request failed", failure)
            code, message = 500, "internal error"
        return code, {"error": message}

    async def _route(self, request: Request) -> tuple[int, Any]:
        path = [p.decode("utf-8", "replace") for p in request.postpath or [] if p]
        method = request.method.decode("ascii", "replace")
        if path == ["openapi.json"] and method == "GET":
            return 200, openapi()
        # An unsynced site may hold no device rows yet, and a revoked one must not serve:
        # say so, rather than "unknown device API key" or "no such session".
        self.gate.check()
        device = await self._device(request)
        if path == ["sessions"] and method == "POST":
            return await self._start(device, _body(request))
        if len(path) >= 2 and path[0] == "sessions":
            session = self._session(path[1], device)
            rest = path[2:]
            if rest == [] and method == "GET":
                return 200, await self._describe(session)
            if rest == [] and method == "DELETE":
                self.sessions.pop(session.id, None)
                return 204, None
            if rest == ["usage"] and method == "POST":
                return await self._usage(device, session, _body(request))
            if rest == ["jobs"] and method == "GET":
                return await self._jobs(device, session)
            if rest == ["release"] and method == "POST":
                return await self._release(device, session, _body(request))
            if rest == ["cancel"] and method == "POST":
                return await self._cancel(device, session, _body(request))
        raise HTTPError(404, f"no such endpoint: {method} /api/v1/{'/'.join(path)}")

    async def _device(self, request: Request) -> Device:
        header = (request.getHeader(b"authorization") or b"").decode("latin-1")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key or len(key) > 200:
            raise HTTPError(401, "a device API key is required (Authorization: Bearer KEY)")
        device: Device | None = await self.read(thdDeviceByKey, key.strip())
        if device is None or device.site != self.gate.site:
            raise HTTPError(401, "unknown device API key")
        if device.connector != "http":
            # A card reader's (or a vendor connector's) key is not a licence to use this
            # API: only devices set up for it are.
            raise HTTPError(403, f"device {device.name!r} does not use the http connector")
        return device

    def _session(self, session_id: str, device: Device) -> Session:
        self._expire()
        session = self.sessions.get(session_id)
        if session is None or session.device != device.name:
            raise HTTPError(404, "no such session (it may have expired)")
        session.expires = self.clock.seconds() + SESSION_IDLE
        self.sessions.move_to_end(session_id)
        return session

    def _expire(self) -> None:
        now = self.clock.seconds()
        for sid in [sid for sid, s in self.sessions.items() if s.expires <= now]:
            del self.sessions[sid]

    # -- endpoints ------------------------------------------------------------------

    async def _start(self, device: Device, body: dict[str, Any]) -> tuple[int, Any]:
        _fields(
            body,
            {
                "card": (str, False),
                "pin": (str, False),
                "username": (str, False),
                "password": (str, False),
            },
        )
        if "card" in body and "username" not in body and "password" not in body:
            identity = await self.gate.card(body["card"], device.name, body.get("pin"))
        elif "username" in body and "password" in body and not {"card", "pin"} & set(body):
            identity = await self.gate.password(body["username"], body["password"], device.name)
        else:
            raise HTTPError(400, "give either card (and pin) or username and password")
        self._expire()
        while len(self.sessions) >= MAX_SESSIONS:
            self.sessions.popitem(last=False)
        session = Session(
            id=secrets.token_urlsafe(24),
            device=device.name,
            identity=identity,
            expires=self.clock.seconds() + SESSION_IDLE,
        )
        self.sessions[session.id] = session
        return 201, await self._describe(session)

    async def _describe(self, session: Session) -> dict[str, Any]:
        decimals = await self.read(thdDecimals)
        balance = await self.gate.balance(session.identity)
        user = session.identity.user
        return {
            "session": session.id,
            "user": {"username": user.username, "full_name": user.full_name},
            "method": session.identity.method,
            "balance": format_amount(balance, decimals),
            "balance_minor": balance,
            "expires_in": max(0, round(session.expires - self.clock.seconds())),
            "offline": self.gate.offline(),
        }

    async def _usage(
        self, device: Device, session: Session, body: dict[str, Any]
    ) -> tuple[int, Any]:
        _fields(
            body,
            {
                "kind": (str, True),
                "pages": (int, True),
                "copies": (int, False),
                "colour": (bool, False),
                "duplex": (bool, False),
                "uuid": (str, False),
            },
        )
        if body["kind"] not in USAGE_KINDS:
            raise HTTPError(400, f"kind must be one of {', '.join(USAGE_KINDS)}")
        pages, copies = body["pages"], body.get("copies", 1)
        if not 0 <= pages <= MAX_PAGES or not 1 <= copies <= MAX_PAGES:
            raise HTTPError(400, f"pages must be 0-{MAX_PAGES} and copies 1-{MAX_PAGES}")
        # Canonical form: "{...}", "urn:uuid:..." or upper case must resend the same
        # charge, and the primary stores (and accepts) only the 36-character form.
        try:
            txn_uuid = str(uuidlib.UUID(body["uuid"]) if body.get("uuid") else uuidlib.uuid4())
        except ValueError:
            raise HTTPError(400, "uuid must be a UUID") from None
        if device.printer is None:
            raise HTTPError(409, f"device {device.name!r} has no printer to price usage")
        # Priced and charged exactly as a connector's usage is: through the device core.
        result = await self._core(device, for_jobs=False).recordUsage(
            session.identity,
            body["kind"],
            pages,
            copies,
            body.get("colour", False),
            body.get("duplex", False),
            txn_uuid,
        )
        return 201, {
            "uuid": result.uuid,
            "charged": result.cost.text,
            "charged_minor": result.cost.minor,
            "account": result.account,
            "balance": result.balance.text,
            "balance_minor": result.balance.minor,
            "offline": result.offline,
        }

    # -- held jobs (the Find-Me queue, through the device core) ----------------------

    def _core(self, device: Device, for_jobs: bool = True) -> DeviceCore:
        """The core a connector would get for ``device``: the gate's offline policies
        apply to what it does (``offline.release``). Usage needs no Find-Me queue."""
        if self.findme is None and for_jobs:
            raise HTTPError(503, "held jobs are not available on this server")
        return DeviceCore(device, self.gate, cast(IFindMe, self.findme), self.read, self.clock)

    def _iso(self, when: float) -> str:
        return datetime.fromtimestamp(when, UTC).isoformat(timespec="seconds")

    async def _jobs(self, device: Device, session: Session) -> tuple[int, Any]:
        held = await self._core(device).heldJobs(session.identity)
        decimals = await self.read(thdDecimals)
        now = self.clock.seconds()
        jobs = []
        for job in held:
            jobs.append(
                {
                    "uuid": job.uuid,
                    "document": job.document,
                    "queue": getattr(job, "queue", ""),
                    "pages": job.pages,
                    "copies": job.copies,
                    "colour": job.colour,
                    "duplex": job.duplex,
                    "cost": format_amount(job.cost, decimals),
                    "cost_minor": job.cost,
                    "held_since": self._iso(getattr(job, "created_at", now)),
                    "expires_at": self._iso(getattr(job, "expires_at", now)),
                    "expires_in": max(0, round(getattr(job, "expires_at", now) - now)),
                }
            )
        return 200, {"jobs": jobs, "offline": self.gate.offline()}

    async def _release(
        self, device: Device, session: Session, body: dict[str, Any]
    ) -> tuple[int, Any]:
        jobs = _job_list(body)
        core = self._core(device)
        if device.printer is None:
            raise HTTPError(409, f"device {device.name!r} has no printer to release to")
        outcomes = await core.release(session.identity, jobs)
        decimals = await self.read(thdDecimals)
        return 200, {
            "printer": device.printer,
            "released": sum(1 for o in outcomes if o.released),
            "jobs": [
                {
                    "uuid": o.job,
                    "released": o.released,
                    "reason": o.reason,
                    "cost": format_amount(o.cost, decimals),
                    "cost_minor": o.cost,
                }
                for o in outcomes
            ],
            "offline": self.gate.offline(),
        }

    async def _cancel(
        self, device: Device, session: Session, body: dict[str, Any]
    ) -> tuple[int, Any]:
        jobs = _job_list(body)
        cancelled = await self._core(device).cancel(session.identity, jobs)
        return 200, {"cancelled": cancelled}


def _job_list(body: dict[str, Any]) -> list[str] | None:
    """The ``jobs`` of a release or cancel body (canonical UUIDs), or None for all."""
    unknown = set(body) - {"jobs"}
    if unknown:
        raise HTTPError(400, f"unknown field(s): {', '.join(sorted(unknown))}")
    if "jobs" not in body:
        return None
    jobs = body["jobs"]
    if not isinstance(jobs, list) or not all(isinstance(j, str) for j in jobs):
        raise HTTPError(400, "field 'jobs' must be a list of job UUIDs")
    if len(jobs) > MAX_JOBS:
        raise HTTPError(400, f"at most {MAX_JOBS} jobs at once")
    try:
        # Canonical form: the queue stores the 36-character lower-case spelling.
        return list(dict.fromkeys(str(uuidlib.UUID(j)) for j in jobs))
    except ValueError:
        raise HTTPError(400, "each of 'jobs' must be a job UUID") from None


def openapi() -> dict[str, Any]:
    """The OpenAPI 3 document of this API (checked against the routes by the tests)."""
    error = {"$ref": "#/components/schemas/Error"}
    bearer: list[dict[str, list[str]]] = [{"deviceKey": []}]

    def answer(description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"description": description}
        if schema is not None:
            out["content"] = {"application/json": {"schema": schema}}
        return out

    errors = {
        "400": answer("malformed request", error),
        "401": answer("bad device key or failed login", error),
        "403": answer("the device does not use the http connector, or a policy refuses", error),
        "404": answer("no such session", error),
        "503": answer("site not serving (unsynced or revoked)", error),
    }
    too_large = {"413": answer(f"request body larger than {MAX_BODY} bytes", error)}
    session = {"$ref": "#/components/schemas/Session"}
    job_list = {
        "required": False,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/JobList"}}},
    }
    session_id = [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}]
    return {
        "openapi": "3.0.3",
        "info": {"title": "sitesrv device API", "version": sitesrv.__version__},
        "servers": [{"url": "/api/v1"}],
        "components": {
            "securitySchemes": {"deviceKey": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {
                    "type": "object",
                    "properties": {"error": {"type": "string"}},
                    "required": ["error"],
                },
                "Session": {
                    "type": "object",
                    "properties": {
                        "session": {"type": "string"},
                        "user": {
                            "type": "object",
                            "properties": {
                                "username": {"type": "string"},
                                "full_name": {"type": "string"},
                            },
                        },
                        "method": {"type": "string", "enum": ["card", "card+pin", "password"]},
                        "balance": {"type": "string"},
                        "balance_minor": {"type": "integer"},
                        "expires_in": {"type": "integer"},
                        "offline": {"type": "boolean"},
                    },
                },
                "Login": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "card": {"type": "string"},
                        "pin": {"type": "string"},
                        "username": {"type": "string"},
                        "password": {"type": "string"},
                    },
                },
                "Usage": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["kind", "pages"],
                    "properties": {
                        "kind": {"type": "string", "enum": list(USAGE_KINDS)},
                        "pages": {"type": "integer", "minimum": 0, "maximum": MAX_PAGES},
                        "copies": {"type": "integer", "minimum": 1, "maximum": MAX_PAGES},
                        "colour": {"type": "boolean"},
                        "duplex": {"type": "boolean"},
                        "uuid": {"type": "string", "format": "uuid"},
                    },
                },
                "JobList": {
                    "type": "object",
                    "additionalProperties": False,
                    "description": "the jobs to act on (all the user's held jobs if absent)",
                    "properties": {
                        "jobs": {
                            "type": "array",
                            "maxItems": MAX_JOBS,
                            "items": {"type": "string", "format": "uuid"},
                        },
                    },
                },
                "HeldJobs": {
                    "type": "object",
                    "properties": {
                        "jobs": {
                            "type": "array",
                            "items": {"$ref": "#/components/schemas/HeldJob"},
                        },
                        "offline": {"type": "boolean"},
                    },
                },
                "HeldJob": {
                    "type": "object",
                    "properties": {
                        "uuid": {"type": "string"},
                        "document": {"type": "string"},
                        "queue": {"type": "string"},
                        "pages": {"type": "integer"},
                        "copies": {"type": "integer"},
                        "colour": {"type": "boolean"},
                        "duplex": {"type": "boolean"},
                        "cost": {"type": "string"},
                        "cost_minor": {"type": "integer"},
                        "held_since": {"type": "string", "format": "date-time"},
                        "expires_at": {"type": "string", "format": "date-time"},
                        "expires_in": {"type": "integer"},
                    },
                },
                "Released": {
                    "type": "object",
                    "properties": {
                        "printer": {"type": "string"},
                        "released": {"type": "integer"},
                        "jobs": {
                            "type": "array",
                            "items": {"$ref": "#/components/schemas/ReleaseOutcome"},
                        },
                        "offline": {"type": "boolean"},
                    },
                },
                "ReleaseOutcome": {
                    "type": "object",
                    "properties": {
                        "uuid": {"type": "string"},
                        "released": {"type": "boolean"},
                        "reason": {"type": "string"},
                        "cost": {"type": "string"},
                        "cost_minor": {"type": "integer"},
                    },
                },
                "Cancelled": {
                    "type": "object",
                    "properties": {"cancelled": {"type": "integer", "minimum": 0}},
                },
                "Charge": {
                    "type": "object",
                    "properties": {
                        "uuid": {"type": "string"},
                        "charged": {"type": "string"},
                        "charged_minor": {"type": "integer"},
                        "account": {"type": "string"},
                        "balance": {"type": "string"},
                        "balance_minor": {"type": "integer"},
                        "offline": {"type": "boolean"},
                    },
                },
            },
        },
        "paths": {
            "/openapi.json": {
                "get": {"summary": "this document", "responses": {"200": answer("OpenAPI")}}
            },
            "/sessions": {
                "post": {
                    "summary": "start a session by card, card + PIN, or username + password",
                    "security": bearer,
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {"schema": {"$ref": "#/components/schemas/Login"}}
                        },
                    },
                    "responses": {
                        "201": answer("session started", session),
                        **too_large,
                        **errors,
                    },
                }
            },
            "/sessions/{id}": {
                "parameters": session_id,
                "get": {
                    "summary": "the session and the user's balance",
                    "security": bearer,
                    "responses": {"200": answer("the session", session), **errors},
                },
                "delete": {
                    "summary": "end the session",
                    "security": bearer,
                    "responses": {"204": answer("ended"), **errors},
                },
            },
            "/sessions/{id}/usage": {
                "parameters": session_id,
                "post": {
                    "summary": "record copy, scan or fax usage and charge it",
                    "security": bearer,
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {"schema": {"$ref": "#/components/schemas/Usage"}}
                        },
                    },
                    "responses": {
                        "201": answer("charged", {"$ref": "#/components/schemas/Charge"}),
                        "402": answer("insufficient balance or offline allowance", error),
                        "403": answer("refused by an offline policy", error),
                        "409": answer("the device has no printer to price usage", error),
                        **too_large,
                        **errors,
                    },
                },
            },
            "/sessions/{id}/jobs": {
                "parameters": session_id,
                "get": {
                    "summary": "the user's held jobs at this server, oldest first",
                    "security": bearer,
                    "responses": {
                        "200": answer("held jobs", {"$ref": "#/components/schemas/HeldJobs"}),
                        **errors,
                    },
                },
            },
            "/sessions/{id}/release": {
                "parameters": session_id,
                "post": {
                    "summary": "release held jobs (all, or those named) to the device's printer",
                    "security": bearer,
                    "requestBody": job_list,
                    "responses": {
                        "200": answer(
                            "what happened to each job (a job the user cannot afford at "
                            "the device's printer stays held)",
                            {"$ref": "#/components/schemas/Released"},
                        ),
                        "403": answer("release refused by an offline policy", error),
                        "409": answer("the device has no printer to release to", error),
                        **too_large,
                        **errors,
                    },
                },
            },
            "/sessions/{id}/cancel": {
                "parameters": session_id,
                "post": {
                    "summary": "cancel held jobs (all, or those named)",
                    "security": bearer,
                    "requestBody": job_list,
                    "responses": {
                        "200": answer(
                            "how many were cancelled", {"$ref": "#/components/schemas/Cancelled"}
                        ),
                        **too_large,
                        **errors,
                    },
                },
            },
        },
    }
