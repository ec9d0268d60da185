"""The ``card-reader`` connector: network card readers that send one card number a line.

"Generic" network card readers speak plain TCP: each swipe is the card's number as one
ASCII line, ended by CR, LF or CRLF. Some readers connect to the server (option
``listen``: a server endpoint string such as ``tcp:4000``); others listen and are
connected to (option ``connect``: a client endpoint string such as
``tcp:10.1.2.3:4000``), in which case the server reconnects with capped backoff.

A swipe is normalised (``regex``, ``convert``; see ``sitesrv.cardnumber``), the card
is authenticated, and all the user's held jobs are released to the device's printer.
With ``feedback = line`` the reader gets one line back: ``OK 2 jobs`` (how many were
released) or ``DENY reason``.

Plain TCP carries no credentials, so a listening port accepts only the peers in
``allow`` (addresses and CIDR ranges); by default only the address in ``reader``, or
127.0.0.1 when there is none. Other peers are refused and logged. Lines longer than
``max_line`` and lines that do not convert to a card number are counted and ignored; a
peer sending more than ``max_rate`` lines a second is disconnected.
"""

from __future__ import annotations

import ipaddress
import re
from collections import deque
from collections.abc import Mapping
from typing import Any

import attrs
from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import IService, MultiService
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IListeningPort,
    IStreamClientEndpoint,
    IStreamServerEndpoint,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.plugin import IPlugin
from twisted.python.failure import Failure
from zope.interface import implementer

from sitesrv.cardnumber import CardFormatError, CardNormaliser, CardNumberError
from sitesrv.core.devicecore import DeviceRefused, InvalidOptions
from sitesrv.interfaces import IConnectorFactory, IDeviceCore
from sitesrv.store.devices import Device

log = Logger()

#: The connector's name in device records.
NAME = "card-reader"
#: Default longest line (bytes, without the line end); longer lines are ignored.
MAX_LINE = 128
#: Default most lines a second from one peer; more and it is disconnected.
MAX_RATE = 10
#: Default longest wait between attempts to connect out (or to listen again), seconds.
MAX_BACKOFF = 30.0
#: Swipes waiting to be answered on one connection; further lines are dropped.
MAX_PENDING = 16
#: Longest reason in a feedback line.
MAX_FEEDBACK = 120
#: Peers allowed to connect to a listening reader port when neither ``allow`` nor
#: ``reader`` is set.
DEFAULT_ALLOW = "127.0.0.1"

OPTIONS: Mapping[str, str] = {
    "listen": "server endpoint string the reader connects to, e.g. tcp:4000",
    "connect": "client endpoint string of a reader that listens, e.g. tcp:10.1.2.3:4000",
    "reader": "the reader's IP address: the default allow list of a listening port",
    "allow": "addresses and CIDR ranges that may connect to a listening port "
    f"(default: the reader option, else {DEFAULT_ALLOW})",
    "regex": "regular expression picking the card number (its first group)",
    "convert": "conversion chain, e.g. hex2dec,strip-leading-zeros or "
    "ascii-to-hex;reverse-bytes;substring:-8",
    "feedback": "none (default) or line: answer each swipe with OK N jobs / DENY reason",
    "max_line": f"longest line in bytes; longer lines are ignored (default {MAX_LINE})",
    "max_rate": f"most lines a second; a reader sending more is disconnected (default {MAX_RATE})",
    "max_backoff": f"longest wait between connection attempts, seconds (default {MAX_BACKOFF:g})",
}

_LINE_END = re.compile(rb"[\r\n]")
_SEPARATORS = re.compile(r"[\s,;]+")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_allow(text: str) -> tuple[Network, ...]:
    """Addresses and CIDR ranges separated by commas or spaces; `InvalidOptions` if bad."""
    networks = []
    for item in _SEPARATORS.split(text.strip()):
        if not item:
            continue
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise InvalidOptions(
                f"allow: {item!r} is not an IP address or CIDR range (e.g. 10.0.0.0/24)"
            ) from None
    if not networks:
        raise InvalidOptions("allow: give at least one address or CIDR range")
    return tuple(networks)


def _number(options: Mapping[str, str], key: str, default: float, least: float) -> float:
    text = options.get(key, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        raise InvalidOptions(f"{key}: {text!r} is not a number") from None
    if not least <= value < 1e9:
        raise InvalidOptions(f"{key}: must be at least {least:g}, not {text}")
    return value


@attrs.frozen
class ReaderConfig:
    """A card-reader device's options, checked."""

    listen: str | None
    connect: str | None
    allow: tuple[Network, ...]
    normaliser: CardNormaliser
    feedback: bool
    max_line: int
    max_rate: int
    max_backoff: float

    @classmethod
    def parse(cls, options: Mapping[str, str]) -> ReaderConfig:
        """Check a device record's options; raises `InvalidOptions` naming the option."""
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise InvalidOptions(f"unknown option(s): {', '.join(unknown)}")
        listen = options.get("listen", "").strip() or None
        connect = options.get("connect", "").strip() or None
        if (listen is None) == (connect is None):
            raise InvalidOptions(
                "give exactly one of listen (the reader connects in, e.g. tcp:4000) and "
                "connect (the server connects to the reader, e.g. tcp:10.1.2.3:4000)"
            )
        reader = options.get("reader", "").strip()
        if reader:
            try:
                ipaddress.ip_address(reader)
            except ValueError:
                raise InvalidOptions(f"reader: {reader!r} is not an IP address") from None
        allow_text = options.get("allow", "").strip() or reader or DEFAULT_ALLOW
        try:
            normaliser = CardNormaliser.parse(options.get("regex"), options.get("convert"))
        except CardFormatError as e:
            raise InvalidOptions(str(e)) from None
        feedback = options.get("feedback", "none").strip() or "none"
        if feedback not in ("none", "line"):
            raise InvalidOptions(f"feedback: must be none or line, not {feedback!r}")
        return cls(
            listen=listen,
            connect=connect,
            allow=parse_allow(allow_text),
            normaliser=normaliser,
            feedback=feedback == "line",
            max_line=int(_number(options, "max_line", MAX_LINE, 8)),
            max_rate=int(_number(options, "max_rate", MAX_RATE, 1)),
            max_backoff=_number(options, "max_backoff", MAX_BACKOFF, 1),
        )

    def allows(self, address: IAddress) -> bool:
        """Whether a peer at ``address`` may use a listening port."""
        host = getattr(address, "host", None)
        if host is None:
            # A UNIX socket: only local processes reach it, and file modes guard it.
            return True
        try:
            ip = ipaddress.ip_address(str(host).split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in network for network in self.allow)


def _feedback(text: str) -> bytes:
    """One feedback line: printable ASCII, bounded, CRLF-terminated."""
    clean = "".join(c if " " <= c <= "~" else " " for c in text)
    clean = " ".join(clean.split())
    if len(clean) > MAX_FEEDBACK:
        clean = clean[: MAX_FEEDBACK - 3] + "..."
    return clean.encode("ascii") + b"\r\n"


def _masked(number: str) -> str:
    """A card number for the log: the last four characters only."""
    return "*" * min(max(len(number) - 4, 0), 8) + number[-4:]


def _peer(transport: Any) -> str:
    address = transport.getPeer()
    host = getattr(address, "host", None)
    return f"{host}:{getattr(address, 'port', '')}" if host is not None else str(address)


@attrs.define
class ReaderStats:
    """What one card-reader device has seen since it started."""

    swipes: int = 0
    released: int = 0
    denied: int = 0
    garbage: int = 0
    dropped: int = 0
    floods: int = 0
    refused_peers: int = 0


class ReaderProtocol(Protocol):
    """One connection to a card reader: lines in, optional feedback lines out."""

    def __init__(self, service: CardReaderService) -> None:
        self.service = service
        self.config = service.config
        self._buffer = b""
        self._discarding = False
        self._recent: deque[float] = deque(maxlen=self.config.max_rate + 1)
        self._pending: deque[bytes] = deque()
        self._busy = False
        self._closed = False
        self.garbage = 0
        self.peer = ""

    def connectionMade(self) -> None:
        """Count the connection and say who it is."""
        self.peer = _peer(self.transport)
        self.service.opened(self)

    def connectionLost(self, reason: Failure = Failure(Exception("closed"))) -> None:
        """Forget the connection (swipes being answered still finish)."""
        self._closed = True
        self._pending.clear()
        self.service.closed(self, self.garbage)

    def dataReceived(self, data: bytes) -> None:
        """Split into lines at CR, LF or CRLF; long lines and empty ones are skipped."""
        self._buffer += data
        while not self._closed:
            end = _LINE_END.search(self._buffer)
            if end is None:
                if len(self._buffer) > self.config.max_line:
                    # Keep no more than the limit: the rest of this line is skipped.
                    if not self._discarding:
                        self.ignore(self._buffer, "longer than max_line")
                    self._discarding = True
                    self._buffer = b""
                return
            line, self._buffer = self._buffer[: end.start()], self._buffer[end.end() :]
            if self._discarding:
                self._discarding = False
                continue
            if not line.strip():
                continue  # the LF of a CRLF split across reads, or a blank line
            if not self._rate():
                return
            if len(line) > self.config.max_line:
                self.ignore(line, "longer than max_line")
                continue
            self._queue(line)

    def _rate(self) -> bool:
        """Count a line; disconnect a peer sending more than ``max_rate`` lines a second."""
        now = self.service.clock.seconds()
        self._recent.append(now)
        if len(self._recent) > self.config.max_rate and now - self._recent[0] < 1.0:
            self.service.flooded(self)
            self.close()
            return False
        return True

    def ignore(self, line: bytes, why: str) -> None:
        """Count ``line`` as garbage (no card number in it) and ignore it."""
        self.garbage += 1
        self.service.garbage(self, line, why)

    def _queue(self, line: bytes) -> None:
        if len(self._pending) >= MAX_PENDING:
            self.service.stats.dropped += 1
            log.warn(
                "card reader {device} ({peer}): {pending} swipes waiting; line dropped",
                device=self.service.device.name,
                peer=self.peer,
                pending=len(self._pending),
            )
            return
        self._pending.append(line)
        if not self._busy:
            self._next()

    def _next(self) -> None:
        """Answer the waiting swipes one at a time, so feedback lines keep their order."""
        if self._closed or not self._pending:
            self._busy = False
            return
        self._busy = True
        line = self._pending.popleft()
        d = Deferred.fromCoroutine(self.service.swipe(self, line))
        d.addCallback(self._answer)
        d.addErrback(
            lambda f: log.failure(
                "card reader {device}: answering a swipe", f, device=self.service.device.name
            )
        )
        d.addBoth(lambda _: self._next())

    def _answer(self, feedback: str | None) -> None:
        if feedback is not None and self.config.feedback and not self._closed:
            assert self.transport is not None
            self.transport.write(_feedback(feedback))

    def close(self) -> None:
        """Close the connection; lines still buffered are not answered."""
        self._closed = True
        if self.transport is not None:
            self.transport.loseConnection()


class _ListenFactory(Factory):
    """Builds reader connections for a listening port, refusing peers not allowed."""

    # The service logs what matters; "Starting factory" on each reconnect is noise.
    noisy = False

    def __init__(self, service: CardReaderService) -> None:
        self.service = service

    def buildProtocol(self, addr: IAddress) -> Protocol | None:  # type: ignore[override]
        """A protocol for an allowed peer; None (the connection is closed) for others."""
        if not self.service.config.allows(addr):
            self.service.refused(addr)
            return None
        return ReaderProtocol(self.service)


class _ConnectFactory(Factory):
    """Builds the connection to a reader that listens."""

    # The service logs what matters; "Starting factory" on each reconnect is noise.
    noisy = False

    def __init__(self, service: CardReaderService) -> None:
        self.service = service

    def buildProtocol(self, addr: IAddress) -> Protocol:  # type: ignore[override]
        """The reader connection."""
        return ReaderProtocol(self.service)


@implementer(IStreamClientEndpoint)
class _WatchedEndpoint:
    """A client endpoint that tells the service whether each attempt worked."""

    def __init__(self, endpoint: IStreamClientEndpoint, service: CardReaderService) -> None:
        self.endpoint = endpoint
        self.service = service

    def connect(self, protocolFactory: Any) -> Deferred[Any]:
        """Connect, reporting failures (the problem shows on /health) and success."""
        d = self.endpoint.connect(protocolFactory)

        def failed(failure: Failure) -> Failure:
            self.service.connectFailed(failure)
            return failure

        d.addErrback(failed)
        return d


class CardReaderService(MultiService):
    """Drives one card-reader device: a listening port, or a connection out to the reader."""

    def __init__(
        self,
        device: Device,
        core: IDeviceCore,
        config: ReaderConfig,
        endpoint: IStreamServerEndpoint | IStreamClientEndpoint,
    ) -> None:
        super().__init__()
        self.device = device
        self.core = core
        self.config = config
        self.clock = core.reactor
        self.stats = ReaderStats()
        self.connections: set[ReaderProtocol] = set()
        self._policy = backoffPolicy(maxDelay=config.max_backoff)
        self._server: IStreamServerEndpoint | None = None
        self._port: IListeningPort | None = None
        self._listening: Deferred[Any] | None = None
        self._retry: IDelayedCall | None = None
        self._attempts = 0
        self._client: ClientService | None = None
        self._connect_failures = 0
        if config.listen is not None:
            self._server = endpoint  # type: ignore[assignment]
        else:
            self._client = ClientService(
                _WatchedEndpoint(endpoint, self),  # type: ignore[arg-type]
                _ConnectFactory(self),
                retryPolicy=self._policy,
                clock=self.clock,
            )
            self._client.setServiceParent(self)

    @property
    def where(self) -> str:
        """The endpoint string the service listens on or connects to."""
        return self.config.listen or self.config.connect or ""

    # -- lifecycle -------------------------------------------------------------------

    def startService(self) -> None:
        """Listen (retrying with backoff if the port cannot be opened) or connect out."""
        super().startService()
        if self._server is not None:
            self._listen()
        else:
            log.info(
                "card reader {device}: connecting to the reader at {where}",
                device=self.device.name,
                where=self.where,
            )

    def _listen(self) -> None:
        self._retry = None
        assert self._server is not None
        d = self._server.listen(_ListenFactory(self))
        self._listening = d

        def listening(port: IListeningPort) -> None:
            self._listening = None
            if not self.running:
                port.stopListening()
                return
            self._port = port
            self._attempts = 0
            self.core.reportProblem(None)
            log.info(
                "card reader {device}: listening on {where} for {allow}",
                device=self.device.name,
                where=self.where,
                allow=", ".join(str(n) for n in self.config.allow),
            )

        def failed(failure: Failure) -> None:
            self._listening = None
            if not self.running:
                return
            delay = self._policy(self._attempts)
            self._attempts += 1
            problem = f"cannot listen on {self.where}: {failure.getErrorMessage()}"
            self.core.reportProblem(problem)
            log.error(
                "card reader {device}: {problem}; trying again in {delay:.0f} s",
                device=self.device.name,
                problem=problem,
                delay=delay,
            )
            self._retry = self.clock.callLater(delay, self._listen)

        d.addCallbacks(listening, failed)

    def stopService(self) -> Deferred[None]:
        """Stop listening (or connecting) and close the reader connections."""
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        if self._listening is not None:
            self._listening.cancel()
        result = super().stopService()
        port, self._port = self._port, None
        if port is not None:
            await _maybe(port.stopListening())
        for connection in list(self.connections):
            connection.close()
        await _maybe(result)
        self.core.setConnections(0)

    # -- events from the connections ---------------------------------------------------

    def opened(self, connection: ReaderProtocol) -> None:
        """A reader connected (or the server reached the reader)."""
        self.connections.add(connection)
        self.core.setConnections(len(self.connections))
        if self._client is not None:
            self._connect_failures = 0
            self.core.reportProblem(None)
        log.info(
            "card reader {device}: {peer} connected",
            device=self.device.name,
            peer=connection.peer,
        )

    def closed(self, connection: ReaderProtocol, garbage: int) -> None:
        """A reader connection closed."""
        self.connections.discard(connection)
        self.core.setConnections(len(self.connections))
        log.info(
            "card reader {device}: {peer} disconnected ({garbage} garbage line(s))",
            device=self.device.name,
            peer=connection.peer,
            garbage=garbage,
        )

    def connectFailed(self, failure: Failure) -> None:
        """An attempt to reach a listening reader failed; ClientService retries."""
        self._connect_failures += 1
        problem = f"cannot connect to the reader at {self.where}: {failure.getErrorMessage()}"
        self.core.reportProblem(problem)
        if self._connect_failures == 1 or self._connect_failures % 20 == 0:
            log.warn(
                "card reader {device}: {problem} ({failures} attempt(s)); retrying",
                device=self.device.name,
                problem=problem,
                failures=self._connect_failures,
            )

    def refused(self, address: IAddress) -> None:
        """A peer not in the allow list connected to the listening port."""
        self.stats.refused_peers += 1
        log.warn(
            "card reader {device}: refused a connection from {peer}: not in the allow list "
            "({allow})",
            device=self.device.name,
            peer=str(getattr(address, "host", address)),
            allow=", ".join(str(n) for n in self.config.allow),
        )

    def flooded(self, connection: ReaderProtocol) -> None:
        """A peer sent more than ``max_rate`` lines in a second: it is disconnected."""
        self.stats.floods += 1
        log.warn(
            "card reader {device}: {peer} sent more than {rate} lines a second; disconnected",
            device=self.device.name,
            peer=connection.peer,
            rate=self.config.max_rate,
        )

    def garbage(self, connection: ReaderProtocol, line: bytes, why: str) -> None:
        """A line that is no card number: counted and ignored (logged once a connection)."""
        self.stats.garbage += 1
        if connection.garbage == 1:
            log.info(
                "card reader {device}: {peer} sent a line that is no card number ({why}): "
                "{line!r}; further ones are only counted",
                device=self.device.name,
                peer=connection.peer,
                why=why,
                line=line[:40],
            )

    # -- swipes ----------------------------------------------------------------------

    async def swipe(self, connection: ReaderProtocol, line: bytes) -> str | None:
        """Authenticate the card in ``line`` and release the user's held jobs.

        Returns the feedback line, or None for a line that is no card number.
        """
        try:
            number = self.config.normaliser.normalise(line.decode("ascii"))
        except (UnicodeDecodeError, CardNumberError) as e:
            why = "not ASCII" if isinstance(e, UnicodeDecodeError) else str(e)
            connection.ignore(line, why)
            return None
        self.stats.swipes += 1
        try:
            identity = await self.core.authenticateCard(number)
            outcomes = await self.core.release(identity)
        except DeviceRefused as e:
            self.stats.denied += 1
            log.info(
                "card reader {device}: card {card} denied: {reason}",
                device=self.device.name,
                card=_masked(number),
                reason=e.reason,
                kind=e.kind,
            )
            return f"DENY {e.reason}"
        except Exception:
            self.stats.denied += 1
            log.failure("card reader {device}: swipe failed", device=self.device.name)
            return "DENY internal error"
        released = sum(1 for o in outcomes if o.released)
        self.stats.released += released
        log.info(
            "card reader {device}: card {card} is {user}: released {released} of {held} "
            "held job(s) to {printer}",
            device=self.device.name,
            card=_masked(number),
            user=identity.user.username,
            released=released,
            held=len(outcomes),
            printer=self.device.printer,
        )
        if outcomes and not released:
            # Jobs are waiting, none could go: say why (balance, provider away, ...).
            self.stats.denied += 1
            return f"DENY {outcomes[0].reason}"
        return f"OK {released} job{'' if released == 1 else 's'}"


async def _maybe(result: Any) -> Any:
    if isinstance(result, Deferred):
        return await result
    return result


@implementer(IPlugin, IConnectorFactory)
class CardReaderConnector:
    """The ``card-reader`` connector plugin."""

    name = NAME
    description = "network card readers: one card number a line over TCP; a swipe releases"
    options = OPTIONS

    def makeService(self, device: Device, core: IDeviceCore) -> IService:
        """A `CardReaderService` for ``device``; `InvalidOptions` when they are wrong."""
        config = ReaderConfig.parse(device.options)
        if device.printer is None:
            raise InvalidOptions(
                "a card reader releases jobs to its device's printer: give the device one"
            )
        endpoint: IStreamServerEndpoint | IStreamClientEndpoint
        try:
            if config.listen is not None:
                endpoint = serverFromString(core.reactor, config.listen)
            else:
                assert config.connect is not None
                endpoint = clientFromString(core.reactor, config.connect)
        except Exception as e:
            which = "listen" if config.listen is not None else "connect"
            raise InvalidOptions(
                f"{which}: {config.listen or config.connect!r} is not an endpoint string ({e})"
            ) from None
        return CardReaderService(device, core, config, endpoint)


#: The plugin object ``getPlugins(IConnectorFactory, connectors)`` finds.
cardReader = CardReaderConnector()

__all__ = ["CardReaderConnector", "CardReaderService", "ReaderConfig", "cardReader"]
