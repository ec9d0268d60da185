"""``/health``: JSON for monitoring; 200 while the server answers requests, 503 when not."""

from __future__ import annotations

import json
from typing import Any

from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from sitesrv.interfaces import IStatusSource

log = Logger()


def json_response(request: Request, code: int, body: object) -> bytes:
    """Set the code and headers of a JSON response and return its body."""
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json; charset=utf-8")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(body, indent=2, sort_keys=True).encode("utf-8") + b"\n"


class HealthResource(Resource):
    """Reports ``IStatusSource.status()``; its children (``sites``) are put by the server."""

    def __init__(self, source: IStatusSource) -> None:
        super().__init__()
        self.source = source

    def getChild(self, path: bytes, request: Request) -> Resource:
        """``/health/`` is ``/health``; anything else not put here is not found."""
        return self if path == b"" else super().getChild(path, request)

    def render_GET(self, request: Request) -> int:
        """The status as JSON; 503 when the server is not serving."""
        # A monitoring client that hung up gets no answer (finishing would raise).
        gone: list[Failure] = []
        request.notifyFinish().addErrback(gone.append)
        d = self.source.status()

        def respond(status: dict[str, Any]) -> tuple[int, Any]:
            return (200 if self.source.serving() else 503), status

        def failed(failure: Failure) -> tuple[int, Any]:
            log.failure("health check failed", failure)
            return 500, {"error": "status unavailable"}

        def answer(result: tuple[int, Any]) -> None:
            if not gone:
                request.write(json_response(request, *result))
                request.finish()

        d.addCallbacks(respond, failed)
        d.addCallback(answer)
        return NOT_DONE_YET
