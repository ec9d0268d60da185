"""``/health``: JSON for monitoring; 200 while the server answers requests, 503 when not."""

from __future__ import annotations

import json

from twisted.web.resource import Resource
from twisted.web.server import Request

from sitesrv.interfaces import IStatusSource


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

    def render_GET(self, request: Request) -> bytes:
        """The status as JSON; 503 when the server is not serving."""
        return json_response(request, 200 if self.source.serving() else 503, self.source.status())
