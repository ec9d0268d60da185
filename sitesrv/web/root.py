"""The resource tree of the web port."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.web.resource import Resource

from sitesrv.core.gate import Gate
from sitesrv.interfaces import IFindMe, IStatusSource
from sitesrv.web.deviceapi import DeviceAPI
from sitesrv.web.health import HealthResource


def make_root(
    status: IStatusSource,
    gate: Gate,
    read: Callable[..., Deferred[Any]],
    clock: IReactorTime,
    findme: IFindMe | None = None,
) -> Resource:
    """Build the web root for a server."""
    root = Resource()
    root.putChild(b"health", HealthResource(status))
    api = Resource()
    api.putChild(b"v1", DeviceAPI(gate, read, clock, findme))
    root.putChild(b"api", api)
    return root
