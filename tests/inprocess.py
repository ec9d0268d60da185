"""A real ``Server`` in the test process, without sockets, threads or sleeps.

`make_server` builds a primary or a site from a config, over a migrated SQLite file
whose ``thd`` functions run inline (``InlineStore``), with a ``MemoryReactorClock`` as its
reactor: nothing listens and nothing runs until the test says so. `get` sends a request
through the server's web ``Site`` (so request metrics are taken as in production) with
``twisted.web``'s ``DummyRequest`` and returns the answer.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any, cast
from urllib.parse import parse_qs

import attrs
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock
from twisted.web import http
from twisted.web.error import UnsupportedMethod
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest

from sitesrv.config import from_dict
from sitesrv.core.auth import run_inline
from sitesrv.server import Server
from sitesrv.store import Store, replica
from sitesrv.store.bootstrap import thdInitPrimary
from sitesrv.store.snapshot import Snapshot
from tests.support import NOW, open_inline_store

#: Tracebacks start with this; no answer may contain it.
TRACEBACK = "Traceback (most recent call last)"


def make_server(
    testcase: Any,
    role: str = "primary",
    name: str | None = None,
    web: Mapping[str, Any] | None = None,
    store: Store | None = None,
    start: float = NOW,
) -> Server:
    """A primary ("hq") or a site ("north", insecure link) built but not started.

    The reactor is a ``MemoryReactorClock`` at ``start`` (``server.reactor``); the store
    runs inline, and so does checking passwords and PINs.
    """
    directory = os.path.abspath(testcase.mktemp())
    os.makedirs(directory)
    name = name or ("hq" if role == "primary" else "north")
    data: dict[str, Any] = {"role": role, "name": name, "data_dir": directory}
    if role == "primary":
        data["listen"] = {"replication": "tcp:0:interface=127.0.0.1"}
    else:
        data["primary"] = {
            "endpoint": "tcp:127.0.0.1:9",
            "token_file": os.path.join(directory, "token"),
            "insecure": True,
        }
    if web is not None:
        data["web"] = dict(web)
    config = from_dict(data, os.path.join(directory, f"{name}.toml"))
    if store is None:
        store = open_inline_store(f"sqlite:///{directory}/sitesrv.db")
        testcase.addCleanup(store.stop)
        if role == "primary":
            store.write(thdInitPrimary, name, "USD", 2, NOW)
    reactor = MemoryReactorClock()
    reactor.advance(start)
    server = Server(config, store, reactor)
    server.authenticator.verify = run_inline
    return server


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


@attrs.frozen
class Answer:
    """A finished response."""

    code: int
    body: bytes
    content_type: str | None

    @property
    def json(self) -> Any:
        """The body parsed as JSON."""
        return json.loads(self.body)

    @property
    def text(self) -> str:
        """The body as text."""
        return self.body.decode("utf-8")


def render(server: Server, request: DummyRequest, what: str) -> bytes:
    """Send ``request`` through ``server``'s web site; return the whole body, which must
    be complete and hold no traceback."""
    resource = server.site.getResourceFor(cast(Any, request))
    try:
        result = resource.render(request)
    except UnsupportedMethod:
        # What twisted.web's Request.render answers for it.
        request.setResponseCode(405)
        result = b""
    if result is not NOT_DONE_YET:
        request.write(result)
        request.finish()
    assert request.finished, f"{what} did not finish"
    body = b"".join(request.written)
    assert TRACEBACK.encode() not in body, body
    return body


def get(server: Server, path: str, method: bytes = b"GET") -> Answer:
    """Send ``method path`` through ``server``'s web site; the answer must be complete."""
    segments = path.lstrip("/").split("/")
    request = DummyRequest([s.encode("utf-8") for s in segments])
    request.method = method
    body = render(server, request, f"{method!r} {path}")
    types = request.responseHeaders.getRawHeaders(b"content-type")
    content_type = types[0].decode("ascii") if types else None
    return Answer(request.responseCode or 200, body, content_type)


class WebRequest(DummyRequest):
    """A ``DummyRequest`` with cookies, a client address and (optionally) TLS."""

    def __init__(
        self, postpath: list[bytes], cookies: dict[bytes, bytes], secure: bool, client: str
    ) -> None:
        super().__init__(postpath, client=IPv4Address("TCP", client, 40000))
        self.received_cookies = dict(cookies)
        self.cookies: list[bytes] = []
        self._secure = secure

    def getCookie(self, key: bytes) -> bytes | None:
        """The cookie the browser sent."""
        return self.received_cookies.get(key)

    def addCookie(self, k: Any, v: Any, **kwargs: Any) -> None:
        """Set a cookie as twisted.web does (so its attributes are the real ones)."""
        http.Request.addCookie(cast(Any, self), k, v, **kwargs)

    def isSecure(self) -> bool:
        """Whether the request came over TLS."""
        return self._secure


@attrs.frozen
class Page:
    """A finished page and the cookies it set (raw ``Set-Cookie`` values)."""

    code: int
    body: bytes
    location: str | None
    set_cookies: list[bytes]
    headers: dict[bytes, bytes]

    @property
    def text(self) -> str:
        """The body as text."""
        return self.body.decode("utf-8")


class Browser:
    """Requests through a ``Server``'s web site with a cookie jar, as a browser would."""

    def __init__(self, server: Server, secure: bool = False, client: str = "127.0.0.1") -> None:
        self.server = server
        self.secure = secure
        self.client = client
        self.cookies: dict[bytes, bytes] = {}
        self.last_csrf: str | None = None

    def request(self, method: bytes, path: str, fields: Mapping[str, Any] | None = None) -> Page:
        """Send one request; ``fields`` are posted as an urlencoded form."""
        target, _, query = path.partition("?")
        segments = target.lstrip("/").split("/")
        request = WebRequest(
            [s.encode("utf-8") for s in segments], self.cookies, self.secure, self.client
        )
        request.method = method
        request.uri = path.encode("utf-8")
        request.path = target.encode("utf-8")
        request.args = {k.encode(): [v.encode() for v in vs] for k, vs in parse_qs(query).items()}
        if fields is not None:
            request.requestHeaders.setRawHeaders(
                b"content-type", [b"application/x-www-form-urlencoded"]
            )
            for key, value in fields.items():
                values = value if isinstance(value, list) else [value]
                request.args[key.encode()] = [str(v).encode() for v in values]
        body = render(self.server, request, f"{method!r} {path}")
        found = re.search(rb'<input[^>]*name="csrf"[^>]*value="([^"]*)"', body)
        if found:
            self.last_csrf = found.group(1).decode()
        for cookie in request.cookies:
            name, _, rest = cookie.partition(b"=")
            self.cookies[name] = rest.split(b";")[0]
        locations = request.responseHeaders.getRawHeaders(b"location")
        return Page(
            request.responseCode or 200,
            body,
            locations[0].decode() if locations else None,
            list(request.cookies),
            {k.lower(): v[-1] for k, v in request.responseHeaders.getAllRawHeaders()},
        )

    def get(self, path: str) -> Page:
        """GET ``path``."""
        return self.request(b"GET", path)

    def post(self, path: str, fields: Mapping[str, Any], csrf: bool = True) -> Page:
        """POST a form, with the CSRF token of the page last read unless ``csrf`` is False."""
        if csrf:
            fields = {"csrf": self.csrf, **fields}
        return self.request(b"POST", path, fields)

    @property
    def csrf(self) -> str:
        """The CSRF token in the last page read that had a form."""
        assert self.last_csrf is not None, "no page with a form read yet"
        return self.last_csrf
