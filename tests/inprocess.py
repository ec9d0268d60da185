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
from collections.abc import Mapping
from typing import Any, cast

import attrs
from twisted.internet.testing import MemoryReactorClock
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


def get(server: Server, path: str, method: bytes = b"GET") -> Answer:
    """Send ``method path`` through ``server``'s web site; the answer must be complete."""
    segments = path.lstrip("/").split("/")
    request = DummyRequest([s.encode("utf-8") for s in segments])
    request.method = method
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
    assert request.finished, f"{method!r} {path} did not finish"
    body = b"".join(request.written)
    assert TRACEBACK.encode() not in body, body
    types = request.responseHeaders.getRawHeaders(b"content-type")
    content_type = types[0].decode("ascii") if types else None
    return Answer(request.responseCode or 200, body, content_type)
