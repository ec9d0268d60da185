"""``/metrics`` (Prometheus exposition) and the timing of every web request.

``MetricsResource`` sets the state gauges from the server's status (read off the reactor
thread), then renders the server's own registry. ``MeasuredSite`` is the web port's
``Site``: it times each request from its arrival until its last byte and counts its
status code, labelled by the first path segment (``/health``, ``/api``...) among those
the root serves, so a scanner's made-up paths cannot add series.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import ErrorPage, Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from sitesrv.interfaces import IStatusSource
from sitesrv.metrics import Metrics

log = Logger()


class MetricsResource(Resource):
    """``/metrics``: this server's registry, state gauges fresh from ``status()``."""

    isLeaf = True

    def __init__(self, source: IStatusSource, metrics: Metrics) -> None:
        super().__init__()
        self.source = source
        self.metrics = metrics

    def render_GET(self, request: Request) -> int:
        """The exposition text (500 and a line of text if the status cannot be read)."""
        gone: list[Failure] = []
        request.notifyFinish().addErrback(gone.append)
        d = self.source.status()

        def render(status: dict[str, Any]) -> tuple[int, bytes, bytes]:
            self.metrics.observeStatus(status)
            return 200, CONTENT_TYPE_LATEST.encode("ascii"), generate_latest(self.metrics.registry)

        def failed(failure: Failure) -> tuple[int, bytes, bytes]:
            log.failure("reading the status for /metrics failed", failure)
            return 500, b"text/plain; charset=utf-8", b"metrics unavailable\n"

        def answer(result: tuple[int, bytes, bytes]) -> None:
            if gone:
                return
            code, content_type, body = result
            request.setResponseCode(code)
            request.setHeader(b"content-type", content_type)
            request.setHeader(b"cache-control", b"no-store")
            request.write(body)
            request.finish()

        d.addCallbacks(render, failed)
        d.addCallback(answer)
        return NOT_DONE_YET


#: The largest request body the web port keeps (forms, device API, XML-RPC); each
#: resource applies its own, smaller limit too.
MAX_REQUEST_BODY = 262_144


class BoundedRequest(Request):
    """A request whose body is discarded past its site's ``max_body`` (then answered 413)."""

    too_large = False
    received = 0

    def _limit(self) -> int:
        return int(getattr(self.channel, "site", None).max_body)  # type: ignore[union-attr]

    def gotLength(self, length: int | None) -> None:
        """Refuse at once (by discarding it) a body announced as too large."""
        if length is not None and length > self._limit():
            self.too_large = True
            self.content = io.BytesIO()
        else:
            super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        """Keep the chunk unless the body has grown past the limit."""
        self.received += len(data)
        if not self.too_large and self.received > self._limit():
            self.too_large = True
            if self.content is not None:
                self.content.close()
            self.content = io.BytesIO()
        if not self.too_large:
            super().handleContentChunk(data)


class MeasuredSite(Site):
    """A ``Site`` that times and counts every request in ``metrics``, bounds request
    bodies (``max_body``) and never shows a traceback to a client."""

    requestFactory = BoundedRequest
    displayTracebacks = False

    def __init__(
        self,
        resource: Resource,
        metrics: Metrics,
        monotonic: Callable[[], float] = time.monotonic,
        **kwargs: Any,
    ) -> None:
        super().__init__(resource, **kwargs)
        self.metrics = metrics
        self.monotonic = monotonic
        self.max_body = MAX_REQUEST_BODY

    def route(self, request: Request) -> str:
        """The label of a request: ``/`` plus its first path segment if the root has it."""
        path = request.postpath or []
        first = path[0] if path else b""
        if first == b"":
            return "/"
        if self.resource.getStaticEntity(first) is None:
            return "other"
        return "/" + first.decode("ascii", "replace")

    def getResourceFor(self, request: Request) -> Resource:
        """Start timing the request, then find its resource as ``Site`` does."""
        start = self.monotonic()
        route = self.route(request)

        def done(result: object) -> None:
            elapsed = max(0.0, self.monotonic() - start)
            self.metrics.http_seconds.labels(route).observe(elapsed)
            if isinstance(result, Failure):
                code = "aborted"  # the client went away before the answer was complete
            else:
                # (``responseCode`` is where twisted.web's DummyRequest keeps it.)
                status = getattr(request, "code", None) or getattr(request, "responseCode", None)
                code = str(status or 200)
            self.metrics.http_responses.labels(route, code).inc()

        request.notifyFinish().addBoth(done)
        if getattr(request, "too_large", False):
            return ErrorPage(
                413, "Request too large", f"Request bodies are limited to {self.max_body} bytes."
            )
        return super().getResourceFor(request)
