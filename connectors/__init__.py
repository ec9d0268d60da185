"""Device connector plugins.

This package is a plugin package in the manner of ``twisted.plugins``: any distribution
may install a module into ``connectors/`` and sitesrv finds the ``IConnectorFactory``
providers in it with ``twisted.plugin.getPlugins``. ``__path__`` is extended so that
modules installed in other ``sys.path`` entries are found too.
"""

from twisted.plugin import pluginPackagePaths

__path__.extend(pluginPackagePaths(__name__))
__all__: list[str] = []
