"""The resource tree of the web port."""

from __future__ import annotations

from twisted.web.resource import Resource

from sitesrv.interfaces import IStatusSource
from sitesrv.web.health import HealthResource


def make_root(status: IStatusSource) -> Resource:
    """Build the web root for a server."""
    root = Resource()
    root.putChild(b"health", HealthResource(status))
    return root
