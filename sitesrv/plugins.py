"""Discovery of device connector plugins."""

from __future__ import annotations

from types import ModuleType

from twisted.plugin import getPlugins

import connectors
from sitesrv.errors import SitesrvError
from sitesrv.interfaces import IConnectorFactory


class UnknownConnector(SitesrvError):
    """A device names a connector that no installed plugin provides."""

    def __init__(self, name: str, known: list[str]) -> None:
        listed = ", ".join(known) if known else "none installed"
        super().__init__(f"unknown connector {name!r} (known connectors: {listed})")
        self.name = name
        self.known = known


def find_connectors(package: ModuleType = connectors) -> dict[str, IConnectorFactory]:
    """All connector factories in ``package``, by name."""
    found: dict[str, IConnectorFactory] = {}
    for factory in getPlugins(IConnectorFactory, package):
        found[factory.name] = factory
    return found


def get_connector(name: str, package: ModuleType = connectors) -> IConnectorFactory:
    """The connector factory called ``name``; ``UnknownConnector`` lists the known names."""
    found = find_connectors(package)
    try:
        return found[name]
    except KeyError:
        raise UnknownConnector(name, sorted(found)) from None
