"""``/health/sites`` and ``/health/sites/NAME``: what monitoring polls on the primary.

500 when a site (or the named site) is down: enrolled, not revoked, connected before,
and disconnected past the grace period; 200 otherwise, with every site's state as JSON.
A site server has no sites: there these answer 404.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from sitesrv.sitehealth import SiteMonitor, SitesReport
from sitesrv.web.health import json_response

log = Logger()


class SitesHealthResource(Resource):
    """Reports a ``SiteMonitor``'s view; ``monitor`` None on a site server (404)."""

    isLeaf = True

    def __init__(self, monitor: SiteMonitor | None) -> None:
        super().__init__()
        self.monitor = monitor

    def render_GET(self, request: Request) -> bytes | int:
        """All sites, or the one named in the path."""
        path = [p.decode("utf-8", "replace") for p in request.postpath or []]
        if path and path[-1] == "":
            path.pop()  # /health/sites/ and /health/sites/NAME/
        if self.monitor is None:
            return json_response(
                request, 404, {"error": "site health is served by the primary only"}
            )
        if len(path) > 1:
            return json_response(request, 404, {"error": "no such page"})
        name = path[0] if path else None
        # A monitoring client that hung up gets no answer (finishing would raise).
        gone: list[Failure] = []
        request.notifyFinish().addErrback(gone.append)
        d = Deferred.fromCoroutine(self._render(self.monitor, name))
        d.addCallback(lambda answer: None if gone else _finish(request, *answer))
        return NOT_DONE_YET

    async def _render(self, monitor: SiteMonitor, name: str | None) -> tuple[int, dict[str, Any]]:
        try:
            report = await monitor.report()
        except Exception:
            log.failure("site health check failed")
            return 500, {"error": "site health unavailable"}
        return self._answer(report, name)

    def _answer(self, report: SitesReport, name: str | None) -> tuple[int, dict[str, Any]]:
        body: dict[str, Any] = {"grace": report.grace, "head": report.head}
        if name is None:
            healthy = report.healthy
            body.update(sites=[s.asdict() for s in report.sites], problems=report.problems())
        else:
            site = report.site(name)
            if site is None:
                return 404, {"error": f"no site named {name!r} is enrolled"}
            healthy = site.healthy
            body.update(site=site.asdict(), problems=site.problems(report.grace))
        body["healthy"] = healthy
        return (200 if healthy else 500), body


def _finish(request: Request, code: int, body: object) -> None:
    request.write(json_response(request, code, body))
    request.finish()
