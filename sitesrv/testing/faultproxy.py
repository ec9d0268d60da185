"""A fault-injecting TCP proxy: cut, stall, delay, throttle and reset a site's link.

A site connects through the proxy to reach its primary. The proxy forwards bytes and
never looks inside them (it sits under TLS), and it can be told at any moment to:

``cut``      close every connection and refuse new ones (nothing listens) until ``heal``;
``stall``    black-hole: keep connections open, forward nothing either way, until
             ``unstall``; new connections are accepted and stalled too;
``delay``    add one-way latency to every chunk in both directions, keeping their order;
``rate``     cap the throughput of each direction (a token bucket; 0 = unlimited);
``reset``    abort every connection (an RST, not a FIN); new ones are accepted.

It counts the bytes it forwarded each way and the connections it accepted.

Drive it from the same process with `FaultProxy`, or from another one through its
control port: one command a line (``cut``, ``heal``, ``stall``, ``unstall``,
``delay MS``, ``rate BYTES_PER_S``, ``reset``, ``stats``), each answered with one line,
``ok ...`` or ``error ...`` (`control` sends one). Run it as a process with::

    python -m sitesrv.testing.faultproxy --listen 0 --target 127.0.0.1:9192 --control 0

which prints ``proxy PORT control PORT`` as its first line (`ProxyProcess` does this for
you). The control port has no authentication: it listens on loopback only, for tests.

What a proxy holds is bounded: each direction of a connection queues at most
``max_buffer`` bytes (the data delayed, throttled or stalled); past that it stops reading
from the sender, so TCP pushes back on it as a slow or dead link would.
"""

from __future__ import annotations

import argparse
import os
import select
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import IO, Any, cast
from typing import Protocol as TypingProtocol

import attrs
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectingCancelledError, ConnectionDone
from twisted.internet.interfaces import (
    IDelayedCall,
    IListeningPort,
    IPushProducer,
    IReactorTime,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

log = Logger()

#: The two directions: from the connecting client to the target, and back.
UP = "up"
DOWN = "down"

#: Bytes each direction of one connection may hold before the proxy stops reading.
DEFAULT_MAX_BUFFER = 1 << 20
#: A token bucket holds this many seconds of its rate (the largest burst it lets by).
BURST_SECONDS = 0.05
#: A connection closed by ``cut`` that has not gone within this many seconds is aborted.
CUT_GRACE = 1.0
#: How long a connection to the target may take.
CONNECT_TIMEOUT = 10.0
#: The longest control command accepted.
MAX_CONTROL_LINE = 1024
#: The commands of the control port, with what each takes.
COMMANDS = ("cut", "heal", "stall", "unstall", "delay MS", "rate BYTES_PER_S", "reset", "stats")


class ProxyCommandError(Exception):
    """A control command was not understood, or a control port answered ``error ...``."""


class _Transport(TypingProtocol):
    """What the proxy uses of a TCP transport."""

    def write(self, data: bytes) -> None: ...
    def loseConnection(self) -> None: ...
    def abortConnection(self) -> None: ...
    def pauseProducing(self) -> None: ...
    def resumeProducing(self) -> None: ...
    def registerProducer(self, producer: Any, streaming: bool) -> None: ...
    def unregisterProducer(self) -> None: ...


@attrs.frozen
class ProxyStats:
    """The proxy's counters and settings at one moment."""

    #: Bytes forwarded from clients to the target.
    bytes_up: int
    #: Bytes forwarded from the target to clients.
    bytes_down: int
    #: Connections accepted since the proxy started.
    connections: int
    #: Connections open now.
    active: int
    #: Bytes held in the proxy now (delayed, throttled or stalled), both directions.
    queued: int
    cut: bool
    stalled: bool
    #: One-way delay in seconds.
    delay: float
    #: Cap per direction in bytes per second; 0 = unlimited.
    rate: int

    def line(self) -> str:
        """The ``stats`` answer of the control port (after ``ok ``): ``key=value`` pairs."""
        return (
            f"up={self.bytes_up} down={self.bytes_down} connections={self.connections}"
            f" active={self.active} queued={self.queued} cut={int(self.cut)}"
            f" stalled={int(self.stalled)} delay_ms={round(self.delay * 1000)} rate={self.rate}"
        )


def parse_stats(text: str) -> dict[str, int]:
    """The ``key=value`` pairs of a ``stats`` answer (with or without its ``ok``)."""
    values = {}
    for item in text.split():
        key, sep, value = item.partition("=")
        if sep:
            values[key] = int(value)
    return values


# -- the token bucket -------------------------------------------------------------------


class _Bucket:
    """A token bucket for one direction: ``rate`` bytes a second, bursts of 50 ms."""

    def __init__(self) -> None:
        self.rate = 0
        self.tokens = 0.0
        self.stamp = 0.0

    @property
    def capacity(self) -> float:
        return max(1.0, self.rate * BURST_SECONDS)

    def setRate(self, rate: int, now: float) -> None:
        self.rate = rate
        self.tokens = self.capacity
        self.stamp = now

    def allowance(self, wanted: int, now: float) -> tuple[int, float]:
        """``(n, 0)``: send n of ``wanted`` bytes now; ``(0, s)``: wait s seconds first."""
        if not self.rate:
            return wanted, 0.0
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        # Wait for a worthwhile amount (a whole small chunk, or a full bucket), so a slow
        # rate means a few writes a second, not a write per byte.
        need = min(float(wanted), self.capacity)
        slack = 1e-6  # float rounding of elapsed times
        if self.tokens + slack >= need:
            n = max(1, min(wanted, int(self.tokens + slack)))
            self.tokens = max(0.0, self.tokens - n)
            return n, 0.0
        return 0, (need - self.tokens) / self.rate


# -- one proxied connection -------------------------------------------------------------


class _Reader:
    """A transport's reading side, paused while any reason to pause holds."""

    def __init__(self, transport: _Transport) -> None:
        self.transport = transport
        self.reasons: set[str] = set()

    def pause(self, reason: str) -> None:
        if not self.reasons:
            self.transport.pauseProducing()
        self.reasons.add(reason)

    def resume(self, reason: str) -> None:
        if reason in self.reasons:
            self.reasons.discard(reason)
            if not self.reasons:
                self.transport.resumeProducing()


_CLOSE = None  # queued after the last chunk when the sender closed


@implementer(IPushProducer)
class _OneWay:
    """One direction of one connection: a queue of chunks between a reader and a sink.

    Each chunk is due ``delay`` after it arrived; the head is written when it is due, the
    proxy is not stalled, the sink is not pushing back and the direction's bucket allows.
    It is the sink's streaming producer, so a slow receiver pauses it.
    """

    def __init__(self, proxy: FaultProxy, direction: str) -> None:
        self.proxy = proxy
        self.direction = direction
        self.source: _Reader | None = None
        self.sink: _Transport | None = None
        self.queue: deque[tuple[float, bytes | None]] = deque()
        self.queued = 0
        self.timer: IDelayedCall | None = None
        self.sinkPaused = False
        self.done = False

    def attach(self, sink: _Transport) -> None:
        """Start writing to ``sink``."""
        self.sink = sink
        sink.registerProducer(self, True)
        self.pump()

    def receive(self, data: bytes) -> None:
        """A chunk from the source."""
        if self.done:
            return
        self.queue.append((self.proxy.clock.seconds() + self.proxy.delaySeconds, data))
        self.queued += len(data)
        if self.queued > self.proxy.maxBuffer and self.source is not None:
            self.source.pause("full")
        if self.timer is None:
            self.pump()

    def sourceLost(self) -> None:
        """The source closed: close the sink once everything before has been written."""
        if not self.done:
            self.queue.append((self.proxy.clock.seconds() + self.proxy.delaySeconds, _CLOSE))
            if self.timer is None:
                self.pump()

    def drop(self) -> None:
        """Forget everything queued and write nothing more (the sink is gone or cut)."""
        self.done = True
        self.queue.clear()
        self.queued = 0
        self._cancelTimer()

    def pump(self) -> None:
        """Write what may be written now; set a timer for when more may be."""
        self._cancelTimer()
        if self.done or self.sink is None or self.sinkPaused or self.proxy.stalled:
            return
        clock = self.proxy.clock
        bucket = self.proxy.buckets[self.direction]
        now = clock.seconds()
        while self.queue and not self.sinkPaused:
            due, chunk = self.queue[0]
            if due > now:
                self._schedule(due - now)
                break
            if chunk is _CLOSE:
                self.queue.popleft()
                self.done = True
                self.sink.unregisterProducer()
                self.sink.loseConnection()
                return
            n, wait = bucket.allowance(len(chunk), now)
            if not n:
                self._schedule(wait)
                break
            if n < len(chunk):
                self.queue[0] = (due, chunk[n:])
                chunk = chunk[:n]
            else:
                self.queue.popleft()
            self.queued -= n
            self.proxy.forwarded[self.direction] += n
            self.sink.write(chunk)
        if self.source is not None and self.queued <= self.proxy.maxBuffer // 2:
            self.source.resume("full")

    def _schedule(self, seconds: float) -> None:
        self.timer = self.proxy.clock.callLater(max(seconds, 0.0), self._fire)

    def _fire(self) -> None:
        self.timer = None
        self.pump()

    def _cancelTimer(self) -> None:
        if self.timer is not None:
            if self.timer.active():
                self.timer.cancel()
            self.timer = None

    # IPushProducer, for the sink's flow control.

    def pauseProducing(self) -> None:
        self.sinkPaused = True
        self._cancelTimer()

    def resumeProducing(self) -> None:
        self.sinkPaused = False
        self.pump()

    def stopProducing(self) -> None:
        self.drop()


class _Link:
    """One accepted connection (the server side) and its connection to the target."""

    def __init__(self, proxy: FaultProxy, server: _ServerSide) -> None:
        self.proxy = proxy
        self.server = server
        self.serverTransport = cast(_Transport, server.transport)
        self.client: _ClientSide | None = None
        self.connecting: Deferred[Any] | None = None
        self.serverLost = False
        self.clientLost = False
        self.up = _OneWay(proxy, UP)
        self.down = _OneWay(proxy, DOWN)
        self.up.source = _Reader(self.serverTransport)
        self.graceTimer: IDelayedCall | None = None
        self._closed: list[Deferred[None]] = []

    def start(self) -> None:
        """Hold the client's bytes and connect to the target."""
        assert self.up.source is not None
        self.up.source.pause("connecting")
        self.down.attach(self.serverTransport)
        endpoint = TCP4ClientEndpoint(
            self.proxy.reactor, self.proxy.targetHost, self.proxy.targetPort, CONNECT_TIMEOUT
        )
        d = self.connecting = endpoint.connect(_ClientFactory(self))
        d.addCallbacks(self._connected, self._connectFailed)

    def _connected(self, client: _ClientSide) -> None:
        self.connecting = None
        self.client = client
        transport = cast(_Transport, client.transport)
        self.down.source = _Reader(transport)
        self.up.attach(transport)
        assert self.up.source is not None
        self.up.source.resume("connecting")

    def _connectFailed(self, reason: Failure) -> None:
        self.connecting = None
        if reason.check(CancelledError, ConnectingCancelledError):
            self._maybeClosed()
            return
        log.warn(
            "fault proxy: cannot reach {host}:{port}: {why}",
            host=self.proxy.targetHost,
            port=self.proxy.targetPort,
            why=reason.getErrorMessage(),
        )
        self.up.drop()
        self.down.drop()
        self.serverTransport.loseConnection()
        self._maybeClosed()

    def transports(self) -> Iterator[_Transport]:
        if not self.serverLost:
            yield self.serverTransport
        if self.client is not None and not self.clientLost:
            yield cast(_Transport, self.client.transport)

    def close(self, graceful: bool) -> None:
        """Drop what is queued and close both sides: a FIN (aborted if slow) or an RST."""
        self.up.drop()
        self.down.drop()
        if self.connecting is not None:
            self.connecting.cancel()
        for transport in self.transports():
            transport.unregisterProducer()
            if graceful:
                transport.loseConnection()
            else:
                transport.abortConnection()
        if graceful and self.graceTimer is None and not self.isClosed():
            self.graceTimer = self.proxy.clock.callLater(CUT_GRACE, self.close, False)

    def onServerLost(self) -> None:
        self.serverLost = True
        self.up.sourceLost()
        self.down.drop()
        if self.connecting is not None:
            self.connecting.cancel()
        self._maybeClosed()

    def onClientLost(self) -> None:
        self.clientLost = True
        self.down.sourceLost()
        self.up.drop()
        self._maybeClosed()

    def isClosed(self) -> bool:
        return self.serverLost and (self.clientLost or self.client is None) and not self.connecting

    def whenClosed(self) -> Deferred[None]:
        """Fires once both sides are gone."""
        if self.isClosed():
            return defer.succeed(None)
        d: Deferred[None] = Deferred()
        self._closed.append(d)
        return d

    def _maybeClosed(self) -> None:
        if not self.isClosed():
            return
        if self.graceTimer is not None and self.graceTimer.active():
            self.graceTimer.cancel()
        self.graceTimer = None
        self.up.drop()
        self.down.drop()
        self.proxy.links.discard(self)
        waiting, self._closed = self._closed, []
        for d in waiting:
            d.callback(None)


class _ServerSide(Protocol):
    """A connection accepted from a client of the proxy."""

    def __init__(self, proxy: FaultProxy) -> None:
        self.proxy = proxy
        self.link: _Link | None = None

    def connectionMade(self) -> None:
        transport = cast(_Transport, self.transport)
        if self.proxy.isCut or self.proxy.stopping:
            transport.abortConnection()
            return
        self.proxy.connections += 1
        self.link = _Link(self.proxy, self)
        self.proxy.links.add(self.link)
        self.link.start()

    def dataReceived(self, data: bytes) -> None:
        if self.link is not None:
            self.link.up.receive(data)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        if self.link is not None:
            self.link.onServerLost()


class _ClientSide(Protocol):
    """The proxy's connection to the target for one accepted connection."""

    def __init__(self, link: _Link) -> None:
        self.link = link

    def dataReceived(self, data: bytes) -> None:
        self.link.down.receive(data)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self.link.onClientLost()


class _ServerFactory(Factory):
    def __init__(self, proxy: FaultProxy) -> None:
        self.proxy = proxy

    def buildProtocol(self, addr: Any) -> _ServerSide:
        return _ServerSide(self.proxy)


class _ClientFactory(Factory):
    def __init__(self, link: _Link) -> None:
        self.link = link

    def buildProtocol(self, addr: Any) -> _ClientSide:
        return _ClientSide(self.link)


# -- the proxy --------------------------------------------------------------------------


class FaultProxy:
    """A TCP proxy to ``target_host:target_port`` whose faults are set at run time.

    ``reactor`` listens and connects; ``clock`` (default: the reactor) times delays,
    throttling and the cut grace period, so tests can drive those with a ``task.Clock``
    while bytes travel over real loopback sockets. Call `listen` (and `listenControl`
    for other processes), and `stop` when done.
    """

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        reactor: Any = None,
        clock: IReactorTime | None = None,
        interface: str = "127.0.0.1",
        max_buffer: int = DEFAULT_MAX_BUFFER,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.reactor: Any = reactor
        self.clock: IReactorTime = clock if clock is not None else reactor
        self.targetHost = target_host
        self.targetPort = target_port
        self.interface = interface
        self.maxBuffer = max_buffer
        self.links: set[_Link] = set()
        self.forwarded = {UP: 0, DOWN: 0}
        self.connections = 0
        self.buckets = {UP: _Bucket(), DOWN: _Bucket()}
        self.delaySeconds = 0.0
        self.isCut = False
        self.stalled = False
        self.stopping = False
        self.port = 0
        self._listener: IListeningPort | None = None
        self._placeholder: socket.socket | None = None
        self._control: IListeningPort | None = None
        # cut/heal change the listening socket asynchronously, one after the other.
        self._listening: Deferred[None] = defer.succeed(None)

    # -- listening ----------------------------------------------------------------------

    def listen(self, port: int = 0) -> int:
        """Start accepting connections on ``interface:port``; return the port number."""
        assert self._listener is None and not self.port, "already listening"
        self._listener = self.reactor.listenTCP(
            port, _ServerFactory(self), interface=self.interface
        )
        self.port = _portOf(self._listener)
        return self.port

    def listenControl(self, port: int = 0) -> int:
        """Start the line-based control port on ``interface:port``; return its number."""
        assert self._control is None, "the control port is already open"
        self._control = self.reactor.listenTCP(
            port, _ControlFactory(self), interface=self.interface
        )
        return _portOf(self._control)

    def _then(self, step: Callable[[], Any]) -> Deferred[None]:
        # Chain listener changes so a quick cut-heal-cut happens in order.
        # The returned Deferred gets the step's result (a failure too); the chain goes on.
        d: Deferred[None] = Deferred()

        def run(_: object) -> Deferred[None]:
            return maybeDeferred(step).addBoth(d.callback)

        self._listening.addCallback(run)
        return d

    def _closeListener(self) -> Deferred[None]:
        listener, self._listener = self._listener, None
        if listener is None:
            return defer.succeed(None)
        return _stopListening(listener).addCallback(lambda _: self._holdPort())

    def _holdPort(self) -> None:
        # Keep the port bound, but not listening, while cut: connection attempts are
        # refused (RST) and no other socket can take the port before heal.
        if self.stopping or not self.isCut:
            return
        holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            holder.bind((self.interface, self.port))
        except OSError as e:
            holder.close()
            log.warn("fault proxy: cannot hold port {port} while cut: {e}", port=self.port, e=e)
            return
        self._placeholder = holder

    def _releasePort(self) -> None:
        if self._placeholder is not None:
            self._placeholder.close()
            self._placeholder = None

    def _reopenListener(self) -> None:
        if self.stopping or self.isCut or self._listener is not None:
            return
        self._releasePort()
        self._listener = self.reactor.listenTCP(
            self.port, _ServerFactory(self), interface=self.interface
        )

    # -- faults -------------------------------------------------------------------------

    def cut(self) -> Deferred[None]:
        """Close every connection and refuse new ones until `heal`.

        Connections get a FIN at once (an RST if still open after a second); the returned
        Deferred fires when nothing listens on the port any more.
        """
        if not self.isCut:
            log.info("fault proxy: cut ({n} connections)", n=len(self.links))
        self.isCut = True
        for link in list(self.links):
            link.close(graceful=True)
        return self._then(self._closeListener)

    def heal(self) -> Deferred[None]:
        """Accept connections again; fires when the port listens again."""
        if self.isCut:
            log.info("fault proxy: healed")
        self.isCut = False
        return self._then(self._reopenListener)

    def stall(self) -> None:
        """Stop forwarding in both directions (connections stay open) until `unstall`."""
        self.stalled = True
        for link in self.links:
            for way in (link.up, link.down):
                way.pump()  # cancels its timer

    def unstall(self) -> None:
        """Deliver what was held and forward again."""
        self.stalled = False
        self._pumpAll()

    def delay(self, seconds: float) -> None:
        """Hold every chunk ``seconds`` before forwarding it (applies to new chunks)."""
        if not seconds >= 0:
            raise ValueError(f"the delay must be 0 or more seconds, not {seconds!r}")
        self.delaySeconds = float(seconds)

    def rate(self, bytes_per_second: int) -> None:
        """Cap each direction at ``bytes_per_second`` (0: no cap)."""
        if bytes_per_second < 0:
            raise ValueError(f"the rate must be 0 or more bytes a second, not {bytes_per_second}")
        now = self.clock.seconds()
        for bucket in self.buckets.values():
            bucket.setRate(int(bytes_per_second), now)
        self._pumpAll()

    def reset(self) -> int:
        """Abort every connection (RST); return how many. New connections are accepted."""
        links = list(self.links)
        for link in links:
            link.close(graceful=False)
        return len(links)

    def _pumpAll(self) -> None:
        for link in list(self.links):
            link.up.pump()
            link.down.pump()

    # -- counters -----------------------------------------------------------------------

    def stats(self) -> ProxyStats:
        """The counters and settings now."""
        return ProxyStats(
            bytes_up=self.forwarded[UP],
            bytes_down=self.forwarded[DOWN],
            connections=self.connections,
            active=len(self.links),
            queued=sum(link.up.queued + link.down.queued for link in self.links),
            cut=self.isCut,
            stalled=self.stalled,
            delay=self.delaySeconds,
            rate=self.buckets[UP].rate,
        )

    # -- control ------------------------------------------------------------------------

    def command(self, line: str) -> Deferred[str]:
        """Carry out one control command; fires with its answer (without ``ok``).

        Fails with `ProxyCommandError` for an unknown command or a bad argument.
        """
        try:
            answer = self._command(line)
        except Exception:
            return defer.fail()
        return answer if isinstance(answer, Deferred) else defer.succeed(answer)

    def _command(self, line: str) -> str | Deferred[str]:
        words = line.split()
        if not words:
            raise ProxyCommandError(f"empty command; commands: {', '.join(COMMANDS)}")
        name, args = words[0].lower(), words[1:]
        takes = {"delay": 1, "rate": 1}.get(name, 0)
        if name not in {c.split()[0] for c in COMMANDS}:
            raise ProxyCommandError(f"unknown command {name!r}; commands: {', '.join(COMMANDS)}")
        if len(args) != takes:
            usage = next(c for c in COMMANDS if c.split()[0] == name)
            raise ProxyCommandError(f"usage: {usage}")
        if name == "cut":
            return self.cut().addCallback(lambda _: "cut")
        if name == "heal":
            return self.heal().addCallback(lambda _: f"healed, listening on {self.port}")
        if name == "stall":
            self.stall()
            return "stalled"
        if name == "unstall":
            self.unstall()
            return "unstalled"
        if name == "delay":
            ms = _number(args[0], "delay MS: MS")
            self.delay(ms / 1000)
            return f"delay {ms:g} ms"
        if name == "rate":
            value = _number(args[0], "rate BYTES_PER_S: BYTES_PER_S")
            if value != int(value):
                raise ProxyCommandError("rate BYTES_PER_S: BYTES_PER_S must be a whole number")
            self.rate(int(value))
            return f"rate {int(value)} B/s" if value else "rate unlimited"
        if name == "reset":
            return f"reset {self.reset()} connections"
        return self.stats().line()

    # -- shutting down ------------------------------------------------------------------

    def stop(self) -> Deferred[None]:
        """Stop listening (both ports), abort every connection; fires when all are gone."""
        self.stopping = True
        waits: list[Deferred[Any]] = []

        def closeListeners() -> Deferred[Any]:
            ports = [p for p in (self._listener, self._control) if p is not None]
            self._listener = self._control = None
            self._releasePort()
            return defer.gatherResults([_stopListening(p) for p in ports])

        waits.append(self._then(closeListeners))
        for link in list(self.links):
            waits.append(link.whenClosed())
            link.close(graceful=False)
        return defer.gatherResults(waits).addCallback(lambda _: None)


def _stopListening(listener: IListeningPort) -> Deferred[None]:
    stopped = listener.stopListening()
    return stopped if stopped is not None else defer.succeed(None)


def _portOf(listener: IListeningPort) -> int:
    address = listener.getHost()
    assert isinstance(address, IPv4Address)
    return address.port


def _number(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ProxyCommandError(f"{what} must be a number, not {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise ProxyCommandError(f"{what} must be 0 or more, not {text!r}")
    return value


# -- the control port -------------------------------------------------------------------


class _ControlProtocol(LineOnlyReceiver):
    """One control connection: a command a line, an answer a line, in order."""

    delimiter = b"\n"
    MAX_LENGTH = MAX_CONTROL_LINE

    def __init__(self, proxy: FaultProxy) -> None:
        self.proxy = proxy
        self._previous: Deferred[None] = defer.succeed(None)

    def lineReceived(self, line: bytes) -> None:
        text = line.decode("utf-8", "replace").strip()
        self._previous.addCallback(lambda _: self._answer(text))

    def _answer(self, text: str) -> Deferred[None]:
        def ok(answer: str) -> None:
            self.sendLine(f"ok {answer}".encode())

        def error(reason: Failure) -> None:
            if not reason.check(ProxyCommandError, ValueError):
                log.failure("fault proxy: control command {text!r} failed", reason, text=text)
            self.sendLine(f"error {reason.getErrorMessage()}".encode())

        return self.proxy.command(text).addCallbacks(ok, error)

    def lineLengthExceeded(self, line: bytes) -> None:
        self.sendLine(f"error command longer than {MAX_CONTROL_LINE} bytes".encode())
        if self.transport is not None:
            self.transport.loseConnection()


class _ControlFactory(Factory):
    def __init__(self, proxy: FaultProxy) -> None:
        self.proxy = proxy

    def buildProtocol(self, addr: Any) -> _ControlProtocol:
        return _ControlProtocol(self.proxy)


# -- use from another process -----------------------------------------------------------


def control(port: int, command: str, *, host: str = "127.0.0.1", timeout: float = 10.0) -> str:
    """Send one command to a proxy's control port and return its answer after ``ok``.

    Blocking (plain sockets): for a process that does not run a reactor, or whose proxy
    runs in another process. Raises `ProxyCommandError` when the answer is ``error ...``.
    """
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(command.encode("utf-8") + b"\n")
        answer = b""
        deadline = time.monotonic() + timeout
        while not answer.endswith(b"\n"):
            if len(answer) > 4 * MAX_CONTROL_LINE or time.monotonic() > deadline:
                raise ProxyCommandError(f"no complete answer to {command!r}: {answer!r}")
            chunk = s.recv(4096)
            if not chunk:
                raise ProxyCommandError(f"the proxy closed without answering {command!r}")
            answer += chunk
    text = answer.decode("utf-8", "replace").strip()
    if text == "ok" or text.startswith("ok "):
        return text[3:]
    raise ProxyCommandError(text.removeprefix("error ").strip() or text)


@attrs.define
class ProxyProcess:
    """``python -m sitesrv.testing.faultproxy`` as a child process, driven by `control`."""

    process: subprocess.Popen[bytes]
    port: int
    control_port: int

    @classmethod
    def start(
        cls,
        target_host: str,
        target_port: int,
        *,
        listen: int = 0,
        control_port: int = 0,
        log_file: IO[Any] | None = None,
        timeout: float = 20.0,
    ) -> ProxyProcess:
        """Start it and wait (at most ``timeout`` seconds) for its ports."""
        argv = [
            sys.executable,
            "-m",
            "sitesrv.testing.faultproxy",
            *("--listen", str(listen)),
            *("--target", f"{target_host}:{target_port}"),
            *("--control", str(control_port)),
        ]
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log_file if log_file is not None else subprocess.DEVNULL,
        )
        try:
            line = _first_line(process, timeout)
            words = line.split()
            if len(words) != 4 or words[0] != "proxy" or words[2] != "control":
                raise RuntimeError(f"fault proxy: unexpected first line {line!r}")
            return cls(process, int(words[1]), int(words[3]))
        except BaseException:
            process.kill()
            process.wait(timeout)
            raise

    def command(self, command: str) -> str:
        """Send a control command; return the answer after ``ok``."""
        return control(self.control_port, command)

    def stats(self) -> dict[str, int]:
        """The ``stats`` counters."""
        return parse_stats(self.command("stats"))

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        if self.process.stdout is not None:
            self.process.stdout.close()


def _first_line(process: subprocess.Popen[bytes], timeout: float) -> str:
    assert process.stdout is not None
    fd = process.stdout.fileno()
    data = b""
    deadline = time.monotonic() + timeout
    while b"\n" not in data:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise RuntimeError(f"fault proxy: no ports announced within {timeout:g} s")
        ready, _, _ = select.select([fd], [], [], remaining)
        if not ready:
            continue
        chunk = os.read(fd, 4096)
        if not chunk:
            raise RuntimeError(f"fault proxy exited ({process.wait(timeout)}) before its ports")
        data += chunk
    return data.split(b"\n", 1)[0].decode("utf-8", "replace").strip()


# -- the command line -------------------------------------------------------------------


def _target(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """The command line of ``python -m sitesrv.testing.faultproxy``."""
    parser = argparse.ArgumentParser(
        prog="python -m sitesrv.testing.faultproxy",
        description="A TCP proxy that cuts, stalls, delays and throttles traffic on command.",
    )
    parser.add_argument("--listen", type=int, default=0, help="proxy port (0: any free one)")
    parser.add_argument("--target", type=_target, required=True, help="HOST:PORT to forward to")
    parser.add_argument("--control", type=int, default=0, help="control port (0: any free one)")
    parser.add_argument("--interface", default="127.0.0.1", help="address of both ports")
    parser.add_argument("--delay", type=float, default=0.0, help="initial one-way delay, ms")
    parser.add_argument("--rate", type=int, default=0, help="initial cap, bytes/s each way")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """Run a proxy until SIGTERM or SIGINT; print ``proxy PORT control PORT`` first."""
    from twisted.internet import task
    from twisted.logger import globalLogBeginner, textFileLogObserver

    options = parse_args(sys.argv[1:] if argv is None else argv)
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)], redirectStandardIO=False)

    def run(reactor: Any) -> Deferred[None]:
        host, port = options.target
        proxy = FaultProxy(host, port, reactor=reactor, interface=options.interface)
        proxy.delay(options.delay / 1000)
        proxy.rate(options.rate)
        listening = proxy.listen(options.listen)
        controlling = proxy.listenControl(options.control)
        print(f"proxy {listening} control {controlling}", flush=True)
        log.info(
            "fault proxy: 127.0.0.1:{p} -> {host}:{port}, control on {c}",
            p=listening,
            host=host,
            port=port,
            c=controlling,
        )
        done: Deferred[None] = Deferred()
        reactor.addSystemEventTrigger("before", "shutdown", proxy.stop)
        return done  # never fires: the reactor stops on SIGTERM or SIGINT

    task.react(run)


if __name__ == "__main__":
    main()
