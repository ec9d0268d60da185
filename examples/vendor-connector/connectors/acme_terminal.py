"""The ``acme-terminal`` connector: ACME copier terminals (an example vendor connector).

An ACME terminal sits next to a copier: the user swipes a card and types a PIN, the
terminal unlocks the copier, and when the user is done it reports the pages copied. It
connects to the server over TCP (option ``listen``) and speaks ASCII lines ending in
CRLF; every command gets exactly one answer (``JOBS`` a few lines ending in ``END``)::

    server   READY <device>                  on connecting
    terminal LOGIN <card> <pin>         ->   OK <username> <balance>   | ERR <reason>
    terminal JOBS                       ->   JOB <uuid> <pages> <cost> <document> ...
                                             END <count>
    terminal RELEASE [<uuid> ...]       ->   OK <released> <still held> | ERR <reason>
    terminal COPY <pages> [COLOUR] [DUPLEX] [COPIES=<n>] [ID=<uuid>]
                                        ->   OK <cost> <balance>      | ERR <reason>
    terminal LOGOUT                     ->   BYE
    server   BYE idle                        after ``idle`` seconds without a command

``ID`` makes a ``COPY`` safe to resend after a lost answer: the same id is charged once.
Amounts are written as the server's currency writes them (``1.50``).

This module uses only sitesrv's public connector API: ``IConnectorFactory`` (this
module's ``acmeTerminal``) and the ``IDeviceCore`` each device's service is given.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Any

from twisted.application.service import IService, Service
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IAddress, IDelayedCall, IListeningPort
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.plugin import IPlugin
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from sitesrv.core.devicecore import DeviceRefused, InvalidOptions
from sitesrv.interfaces import IConnectorFactory, IDeviceCore

log = Logger()

#: Seconds without a command after which a session ends.
IDLE = 60.0

OPTIONS: Mapping[str, str] = {
    "listen": "server endpoint string the terminal connects to, e.g. tcp:7000 (required)",
    "allow": "addresses and CIDR ranges that may connect (default 127.0.0.1)",
    "idle": f"seconds without a command before a session ends (default {IDLE:g})",
}


class TerminalProtocol(LineReceiver):
    """One terminal's connection: at most one logged-in user at a time."""

    delimiter = b"\r\n"
    MAX_LENGTH = 512

    def __init__(self, service: TerminalService) -> None:
        self.service = service
        self.core: IDeviceCore = service.core
        self.identity: Any = None
        self._idle: IDelayedCall | None = None

    # -- connection ---------------------------------------------------------------------

    def connectionMade(self) -> None:
        """Greet the terminal with the device's name."""
        self.service.opened(self)
        self.answer(f"READY {self.core.device.name}")

    def connectionLost(self, reason: Failure = Failure(Exception("closed"))) -> None:
        """End the session with the connection."""
        self._end()
        self.service.closed(self)

    def answer(self, line: str) -> None:
        """Send one line (printable ASCII only)."""
        clean = "".join(c if " " <= c <= "~" else "?" for c in line)[: self.MAX_LENGTH - 2]
        self.sendLine(clean.encode("ascii"))

    def _end(self) -> None:
        self.identity = None
        if self._idle is not None and self._idle.active():
            self._idle.cancel()
        self._idle = None

    def _touch(self) -> None:
        """Restart the idle timer of a session."""
        if self._idle is not None and self._idle.active():
            self._idle.cancel()
        self._idle = self.core.reactor.callLater(self.service.idle, self._timedOut)

    def _timedOut(self) -> None:
        self._idle = None
        if self.identity is not None:
            log.info(
                "acme terminal {device}: session of {user} ended (idle)",
                device=self.core.device.name,
                user=self.identity.user.username,
            )
            self.identity = None
            self.answer("BYE idle")

    # -- commands -----------------------------------------------------------------------

    def lineReceived(self, line: bytes) -> None:
        """Run one command; later lines wait until it is answered."""
        try:
            words = line.decode("ascii").split()
        except UnicodeDecodeError:
            self.answer("ERR commands are ASCII")
            return
        if not words:
            return
        self.pauseProducing()
        d = Deferred.fromCoroutine(self.command(words[0].upper(), words[1:]))
        d.addCallbacks(self.answer, self._failed)
        d.addBoth(lambda _: self.resumeProducing())

    def _failed(self, failure: Failure) -> None:
        error = failure.value
        if isinstance(error, DeviceRefused):
            self.answer(f"ERR {error.reason}")
            return
        log.failure(
            "acme terminal {device}: command failed", failure, device=self.core.device.name
        )
        self.answer("ERR internal error")

    async def command(self, name: str, arguments: list[str]) -> str:
        """The answer to one command (a refusal raises ``DeviceRefused``)."""
        if name == "LOGIN":
            return await self.login(arguments)
        if name == "LOGOUT":
            self._end()
            return "BYE"
        if name not in ("JOBS", "RELEASE", "COPY"):
            return f"ERR unknown command {name[:20]}"
        if self.identity is None:
            return "ERR log in first"
        self._touch()
        if name == "JOBS":
            return await self.jobs()
        if name == "RELEASE":
            return await self.release(arguments)
        return await self.copy(arguments)

    async def login(self, arguments: list[str]) -> str:
        """``LOGIN <card> <pin>``: card + PIN."""
        if len(arguments) != 2:
            return "ERR usage: LOGIN <card> <pin>"
        self._end()
        identity = await self.core.authenticateCard(arguments[0], arguments[1])
        balance = await self.core.balance(identity)
        self.identity = identity
        self._touch()
        log.info(
            "acme terminal {device}: {user} logged in",
            device=self.core.device.name,
            user=identity.user.username,
        )
        return f"OK {identity.user.username} {balance.text}"

    async def jobs(self) -> str:
        """``JOBS``: the held jobs, one line each, then ``END <count>``."""
        held = await self.core.heldJobs(self.identity)
        for job in held:
            self.answer(f"JOB {job.uuid} {job.pages} {job.cost} {job.document[:80]}")
        return f"END {len(held)}"

    async def release(self, arguments: list[str]) -> str:
        """``RELEASE [<uuid> ...]``: release all held jobs, or those named."""
        outcomes = await self.core.release(self.identity, arguments or None)
        released = sum(1 for outcome in outcomes if outcome.released)
        return f"OK {released} {len(outcomes) - released}"

    async def copy(self, arguments: list[str]) -> str:
        """``COPY <pages> [COLOUR] [DUPLEX] [COPIES=<n>] [ID=<uuid>]``: charge a copy job."""
        if not arguments or not arguments[0].isdigit():
            return "ERR usage: COPY <pages> [COLOUR] [DUPLEX] [COPIES=<n>] [ID=<uuid>]"
        pages, copies, colour, duplex, uuid = int(arguments[0]), 1, False, False, None
        for word in arguments[1:]:
            key, _, value = word.partition("=")
            key = key.upper()
            if key == "COLOUR" and not value:
                colour = True
            elif key == "DUPLEX" and not value:
                duplex = True
            elif key == "COPIES" and value.isdigit():
                copies = int(value)
            elif key == "ID" and value:
                uuid = value
            else:
                return f"ERR unknown COPY argument {word[:40]}"
        result = await self.core.recordUsage(
            self.identity, "copy", pages, copies=copies, colour=colour, duplex=duplex, uuid=uuid
        )
        return f"OK {result.cost.text} {result.balance.text}"


class TerminalFactory(Factory):
    """Builds terminal connections, refusing peers outside ``allow``."""

    # The service logs what matters; "Starting factory" on each reconnect is noise.
    noisy = False

    def __init__(self, service: TerminalService) -> None:
        self.service = service

    def buildProtocol(self, addr: IAddress) -> TerminalProtocol | None:  # type: ignore[override]
        """A protocol for an allowed peer; None (the connection is closed) for others."""
        host = getattr(addr, "host", "")
        try:
            allowed = any(ipaddress.ip_address(host) in net for net in self.service.allow)
        except ValueError:
            allowed = False
        if not allowed:
            log.warn(
                "acme terminal {device}: refused a connection from {peer}",
                device=self.service.core.device.name,
                peer=host,
            )
            return None
        return TerminalProtocol(self.service)


class TerminalService(Service):
    """Listens for one device's terminal while the device record exists."""

    def __init__(self, core: IDeviceCore, listen: str, allow: list[Any], idle: float) -> None:
        self.core = core
        self.listen = listen
        self.allow = allow
        self.idle = idle
        self.endpoint = serverFromString(core.reactor, listen)
        self.port: IListeningPort | None = None
        self.connections: set[TerminalProtocol] = set()

    def startService(self) -> None:
        """Start listening; a port that cannot be opened is shown on /health."""
        super().startService()

        def listening(port: IListeningPort) -> None:
            self.port = port
            self.core.reportProblem(None)

        def failed(failure: Failure) -> None:
            self.core.reportProblem(f"cannot listen on {self.listen}: {failure.getErrorMessage()}")

        self.endpoint.listen(TerminalFactory(self)).addCallbacks(listening, failed)

    def stopService(self) -> Deferred[None] | None:
        """Stop listening and hang up on the terminals."""
        super().stopService()
        for connection in list(self.connections):
            connection.transport.loseConnection()  # type: ignore[union-attr]
        port, self.port = self.port, None
        return None if port is None else port.stopListening()

    def opened(self, connection: TerminalProtocol) -> None:
        """Count a terminal connection (the metrics gauge)."""
        self.connections.add(connection)
        self.core.setConnections(len(self.connections))

    def closed(self, connection: TerminalProtocol) -> None:
        """Forget a terminal connection."""
        self.connections.discard(connection)
        self.core.setConnections(len(self.connections))


@implementer(IPlugin, IConnectorFactory)
class AcmeTerminalConnector:
    """The ``acme-terminal`` connector plugin."""

    name = "acme-terminal"
    description = "ACME copier terminals: card + PIN login, copy charging, Find-Me release"
    options = OPTIONS

    def makeService(self, device: Any, core: IDeviceCore) -> IService:
        """A `TerminalService` for ``device``; `InvalidOptions` if its options are wrong."""
        options = device.options
        listen = options.get("listen", "").strip()
        if not listen:
            raise InvalidOptions("listen: required, e.g. tcp:7000")
        if device.printer is None:
            raise InvalidOptions("the device needs a printer (its copy prices are used)")
        try:
            allow = [
                ipaddress.ip_network(item, strict=False)
                for item in options.get("allow", "127.0.0.1").replace(",", " ").split()
            ]
        except ValueError as e:
            raise InvalidOptions(f"allow: {e}") from None
        try:
            idle = float(options.get("idle", IDLE))
        except ValueError:
            raise InvalidOptions(f"idle: {options['idle']!r} is not a number") from None
        if idle <= 0:
            raise InvalidOptions("idle: must be more than 0 seconds")
        try:
            return TerminalService(core, listen, allow, idle)
        except ValueError as e:
            raise InvalidOptions(f"listen: {listen!r} is not an endpoint string ({e})") from None


#: The object sitesrv finds with ``getPlugins(IConnectorFactory, connectors)``.
acmeTerminal = AcmeTerminalConnector()
