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
    """Reports ``IStatusSource.status()``."""

    isLeaf = True

    def __init__(self, source: IStatusSource) -> None:
        super().__init__()
        self.source = source

    def render_GET(self, request: Request) -> int:
        """The status as JSON; 503 when the server is not serving."""
        d = self.source.status()

        def respond(status: dict[str, Any]) -> None:
            code = 200 if self.source.serving() else 503
            request.write(json_response(request, code, status))
            request.finish()

        def failed(failure: Failure) -> None:
            log.failure("health check failed", failure)
            request.write(json_response(request, 500, {"error": "status unavailable"}))
            request.finish()

        d.addCallbacks(respond, failed)
        return NOT_DONE_YET
