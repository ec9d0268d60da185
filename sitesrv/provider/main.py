"""``sitesrv-provider --config FILE``: run the reference print provider.

A bad config, an unreadable TLS file or a port already in use is one line on stderr and
exit status 1, never a traceback. Logs go to stdout, filtered by ``log_level``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    textFileLogObserver,
)

import sitesrv
from sitesrv.config import ConfigError
from sitesrv.provider.config import load
from sitesrv.tls import TLSError


def _fail(message: str) -> None:
    sys.stderr.write(f"sitesrv-provider: {message}\n")
    raise SystemExit(1)


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="sitesrv-provider",
        description="The sitesrv reference print provider: an IPP printer that asks a "
        "sitesrv server whether to print, hold or deny each job.",
    )
    parser.add_argument("--config", "-c", required=True, help="the provider's TOML config")
    parser.add_argument("--version", action="version", version=f"sitesrv {sitesrv.__version__}")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None, reactor: Any = None) -> None:
    """Load the config, start the provider and run until stopped (SIGTERM, SIGINT)."""
    args = parse(argv)
    try:
        config = load(args.config)
    except ConfigError as e:
        _fail(str(e))
        return
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor

    from sitesrv.provider.service import make_provider

    try:
        provider = make_provider(config, reactor)
    except (TLSError, OSError) as e:
        _fail(str(e))
        return
    for child in provider:
        # A listener that cannot listen (port in use) fails startService, not just a log.
        if hasattr(child, "_raiseSynchronously"):
            child._raiseSynchronously = True

    predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.levelWithName(config.log_level))
    globalLogBeginner.beginLoggingTo(
        [FilteringLogObserver(textFileLogObserver(sys.stdout), [predicate])],
        redirectStandardIO=False,
    )
    failed: list[str] = []

    def start() -> None:
        try:
            provider.startService()
        except Exception as e:
            failed.append(f"cannot start: {e}")
            reactor.stop()

    reactor.callWhenRunning(start)
    reactor.addSystemEventTrigger(
        "before", "shutdown", lambda: provider.stopService() if provider.running else None
    )
    reactor.run()
    if failed:
        _fail(failed[0])


if __name__ == "__main__":
    main()
