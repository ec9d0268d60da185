"""twistd integration: ``twistd -n sitesrv --config FILE`` or ``--demo``."""

from __future__ import annotations

import sys
from typing import Any

from twisted.application.service import IService
from twisted.python import usage

from sitesrv.config import Config, ConfigError, load
from sitesrv.server import StartupError, make_server


class Options(usage.Options):
    """Command-line options of the sitesrv twistd plugin."""

    synopsis = "[--config FILE | --demo]"
    longdesc = (
        "Run a sitesrv primary or site server from a TOML config file, or a "
        "self-contained demo under ./var/demo."
    )
    optParameters = [
        ["config", "c", None, "Path of the TOML config file (see docs/configuration.rst)."],
    ]
    optFlags = [
        ["demo", None, "Run the demo: a primary and a site with demo data under ./var/demo."],
    ]

    config: Config | None = None

    def postOptions(self) -> None:
        """Check the option combination and load the config."""
        if self["demo"] and self["config"]:
            raise usage.UsageError("give either --config or --demo, not both")
        if not self["demo"] and not self["config"]:
            raise usage.UsageError("give --config FILE (or --demo to try sitesrv)")
        if self["config"]:
            try:
                self.config = load(self["config"])
            except ConfigError as e:
                _fail(str(e))


def _fail(message: str) -> None:
    # One line and a non-zero exit, no traceback: twistd lets SystemExit through.
    sys.stderr.write(f"sitesrv: {message}\n")
    raise SystemExit(1)


def makeService(options: Options) -> IService:
    """Build the service tree (called by twistd)."""
    from twisted.internet import reactor

    r: Any = reactor
    try:
        if options["demo"]:
            from sitesrv.demo import make_demo

            return make_demo(r)
        assert options.config is not None
        return make_server(options.config, r)
    except (StartupError, ConfigError) as e:
        _fail(str(e))
        raise  # unreachable: _fail exits
