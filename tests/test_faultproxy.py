"""The fault proxy over real loopback: bytes pass, and each fault does what it says.

An echo server sits behind the proxy, and test clients connect through it. Delay and
rate tests give the proxy a ``task.Clock`` while bytes still travel over real sockets,
so they assert exact timings without sleeping. Everything a test opens is closed in its
cleanup, and every wait has a deadline.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock, deferLater
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from sitesrv.testing.faultproxy import (
    BURST_SECONDS,
    FaultProxy,
    ProxyCommandError,
    ProxyProcess,
    _Bucket,
    control,
    parse_stats,
)

reactor: Any = _reactor

#: The bound on every wait in these tests.
DEADLINE = 5.0


def sleep(seconds: float) -> Deferred[None]:
    """Fires after ``seconds`` of real time."""
    return deferLater(reactor, seconds, lambda: None)


async def until(condition: Callable[[], Any], what: str, deadline: float = DEADLINE) -> None:
    """Poll ``condition()`` every 5 ms until true; fail naming ``what`` after the deadline."""
    end = time.monotonic() + deadline
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"not within {deadline:g} s: {what}")
        await sleep(0.005)


class Peer(Protocol):
    """One end of a test connection: records what arrives and when it closes."""

    def __init__(self, echo: bool = False) -> None:
        self.echo = echo
        self.received = bytearray()
        self.lost: Deferred[None] = Deferred()
        self.reason: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self.echo and self.transport is not None:
            self.transport.write(data)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self.reason = reason
        self.lost.callback(None)


class PeerFactory(Factory):
    """Makes `Peer`s and remembers them, so a test can inspect and close them."""

    def __init__(self, echo: bool = False) -> None:
        self.echo = echo
        self.peers: list[Peer] = []

    def buildProtocol(self, addr: Any) -> Peer:
        peer = Peer(self.echo)
        self.peers.append(peer)
        return peer


class ProxyTestCase(TestCase):
    """An echo server on loopback and a proxy in front of it."""

    timeout = 10

    def setUp(self) -> None:
        self.servers = PeerFactory(echo=True)
        self.echoPort = reactor.listenTCP(0, self.servers, interface="127.0.0.1")
        self.clients: list[Peer] = []
        self.addCleanup(self.cleanUp)

    def makeProxy(self, **kwargs: Any) -> FaultProxy:
        address = self.echoPort.getHost()
        assert isinstance(address, IPv4Address)
        self.proxy = FaultProxy("127.0.0.1", address.port, reactor=reactor, **kwargs)
        self.proxy.listen(0)
        return self.proxy

    async def cleanUp(self) -> None:
        if hasattr(self, "proxy"):
            await self.proxy.stop()
        for client in self.clients:
            if client.transport is not None and client.reason is None:
                client.transport.abortConnection()  # type: ignore[attr-defined]
        everyone = [p.lost for p in self.clients + self.servers.peers if p.reason is None]
        await gatherResults(everyone).addTimeout(DEADLINE, reactor)
        await self.echoPort.stopListening()

    async def connect(self, port: int | None = None) -> Peer:
        """A client connected through the proxy (or to ``port``)."""
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port or self.proxy.port, timeout=2)
        peer: Peer = await endpoint.connect(Factory.forProtocol(Peer))
        self.clients.append(peer)
        return peer

    async def received(self, peer: Peer, expected: bytes) -> None:
        """Wait until ``peer`` has received exactly ``expected``."""
        await until(lambda: len(peer.received) >= len(expected), f"{len(expected)} bytes")
        self.assertEqual(bytes(peer.received), expected)

    def server(self, index: int = -1) -> Peer:
        """The echo server's side of a connection."""
        return self.servers.peers[index]


class ForwardingTests(ProxyTestCase):
    """With no fault set, the proxy is a transparent pipe that counts what it carries."""

    async def test_bytes_pass_both_ways(self) -> None:
        """What a client sends reaches the target, the answer comes back, and is counted."""
        proxy = self.makeProxy()
        client = await self.connect()
        client.transport.write(b"hello")  # type: ignore[union-attr]
        await self.received(client, b"hello")
        self.assertEqual(bytes(self.server().received), b"hello")
        stats = proxy.stats()
        self.assertEqual(
            (stats.bytes_up, stats.bytes_down, stats.connections, stats.active, stats.queued),
            (5, 5, 1, 1, 0),
        )

    async def test_large_transfer_through_a_small_buffer(self) -> None:
        """A megabyte passes intact and in order while the proxy holds at most 4 KiB."""
        self.makeProxy(max_buffer=4096)
        client = await self.connect()
        data = bytes(range(256)) * 4096
        client.transport.write(data)  # type: ignore[union-attr]
        await self.received(client, data)

    async def test_closing_one_side_closes_the_other(self) -> None:
        """A client that hangs up is hung up on at the target too, after its last bytes."""
        self.makeProxy()
        client = await self.connect()
        client.transport.write(b"bye")  # type: ignore[union-attr]
        await self.received(client, b"bye")
        client.transport.loseConnection()  # type: ignore[union-attr]
        await self.server().lost.addTimeout(DEADLINE, reactor)
        await until(lambda: self.proxy.stats().active == 0, "the link forgotten")

    async def test_unreachable_target(self) -> None:
        """When the target refuses, the client's connection is closed."""
        address = self.echoPort.getHost()
        assert isinstance(address, IPv4Address)
        await self.echoPort.stopListening()
        self.echoPort = reactor.listenTCP(0, self.servers, interface="127.0.0.1")
        self.proxy = FaultProxy("127.0.0.1", address.port, reactor=reactor)
        self.proxy.listen(0)
        client = await self.connect()
        await client.lost.addTimeout(DEADLINE, reactor)
        self.assertEqual(self.proxy.stats().active, 0)


class CutTests(ProxyTestCase):
    """``cut`` closes every connection and refuses new ones until ``heal``."""

    async def test_cut_closes_and_refuses_heal_restores(self) -> None:
        proxy = self.makeProxy()
        port = proxy.port
        client = await self.connect()
        client.transport.write(b"before")  # type: ignore[union-attr]
        await self.received(client, b"before")

        await proxy.cut()
        await client.lost.addTimeout(DEADLINE, reactor)
        await self.server().lost.addTimeout(DEADLINE, reactor)
        with self.assertRaises(ConnectionRefusedError):
            await self.connect()
        self.assertTrue(proxy.stats().cut)

        await proxy.heal()
        self.assertEqual(proxy.port, port)
        again = await self.connect()
        again.transport.write(b"after")  # type: ignore[union-attr]
        await self.received(again, b"after")
        self.assertEqual(proxy.stats().connections, 2)

    async def test_cut_twice_then_heal(self) -> None:
        """Quick cut, cut, heal happen in order and leave the proxy serving."""
        proxy = self.makeProxy()
        cuts = [proxy.cut(), proxy.cut()]
        await proxy.heal()
        await gatherResults(cuts)
        client = await self.connect()
        client.transport.write(b"x")  # type: ignore[union-attr]
        await self.received(client, b"x")

    async def test_reset_aborts_but_accepts_new_connections(self) -> None:
        proxy = self.makeProxy()
        client = await self.connect()
        client.transport.write(b"x")  # type: ignore[union-attr]
        await self.received(client, b"x")
        self.assertEqual(proxy.reset(), 1)
        await client.lost.addTimeout(DEADLINE, reactor)
        assert client.reason is not None
        self.assertFalse(client.reason.check(ConnectionDone), "an RST, not a FIN")
        again = await self.connect()
        again.transport.write(b"y")  # type: ignore[union-attr]
        await self.received(again, b"y")


class StallTests(ProxyTestCase):
    """``stall`` keeps connections open but forwards nothing until ``unstall``."""

    async def test_stall_holds_and_unstall_delivers(self) -> None:
        proxy = self.makeProxy()
        client = await self.connect()
        client.transport.write(b"a")  # type: ignore[union-attr]
        await self.received(client, b"a")

        proxy.stall()
        client.transport.write(b"held")  # type: ignore[union-attr]
        await until(lambda: proxy.stats().queued == 4, "the proxy holding 4 bytes")
        # A new connection is accepted, and stalled too.
        late = await self.connect()
        late.transport.write(b"late")  # type: ignore[union-attr]
        await until(lambda: proxy.stats().queued == 8, "the proxy holding 8 bytes")
        self.assertEqual(bytes(self.server(0).received), b"a")
        self.assertEqual(proxy.stats().bytes_up, 1)
        self.assertIsNone(client.reason)
        self.assertTrue(proxy.stats().stalled)

        proxy.unstall()
        await self.received(client, b"aheld")
        await self.received(late, b"late")

    async def test_stall_holds_a_bounded_amount(self) -> None:
        """Stalled, the proxy stops reading past its bound; unstalled, everything arrives."""
        proxy = self.makeProxy(max_buffer=4096)
        client = await self.connect()
        proxy.stall()
        data = bytes(range(256)) * 4096
        client.transport.write(data)  # type: ignore[union-attr]
        await until(lambda: proxy.stats().queued > 4096, "the proxy's buffer full")
        await sleep(0.1)
        # One socket read (64 KiB at most) may land after the bound is reached.
        self.assertLessEqual(proxy.stats().queued, 4096 + 65536)
        self.assertEqual(len(self.server().received), 0)
        proxy.unstall()
        await self.received(client, data)


class DelayTests(ProxyTestCase):
    """``delay`` holds each chunk for the delay, in each direction, in order."""

    async def test_delay_each_way(self) -> None:
        clock = Clock()
        proxy = self.makeProxy(clock=clock)
        client = await self.connect()
        proxy.delay(0.1)
        client.transport.write(b"ping")  # type: ignore[union-attr]
        await until(lambda: proxy.stats().queued == 4, "the chunk at the proxy")
        clock.advance(0.099)
        self.assertEqual(proxy.stats().bytes_up, 0)
        clock.advance(0.001)
        self.assertEqual(proxy.stats().bytes_up, 4)
        # The echo comes back, and waits its 100 ms on the way down too.
        await until(lambda: proxy.stats().queued == 4, "the echo at the proxy")
        self.assertEqual(len(client.received), 0)
        clock.advance(0.1)
        await self.received(client, b"ping")

    async def test_order_is_kept_when_the_delay_shrinks(self) -> None:
        clock = Clock()
        proxy = self.makeProxy(clock=clock)
        client = await self.connect()
        proxy.delay(0.2)
        client.transport.write(b"1")  # type: ignore[union-attr]
        await until(lambda: proxy.stats().queued == 1, "chunk 1 at the proxy")
        proxy.delay(0)
        client.transport.write(b"2")  # type: ignore[union-attr]
        await until(lambda: proxy.stats().queued == 2, "chunk 2 at the proxy")
        # Chunk 2 is due now, but may not overtake chunk 1.
        self.assertEqual(proxy.stats().bytes_up, 0)
        clock.advance(0.2)
        await self.received(client, b"12")
        self.assertEqual(bytes(self.server().received), b"12")


class RateTests(ProxyTestCase):
    """``rate`` caps each direction with a token bucket."""

    async def test_rate_caps_throughput(self) -> None:
        clock = Clock()
        proxy = self.makeProxy(clock=clock)
        client = await self.connect()
        proxy.rate(1000)
        burst = int(1000 * BURST_SECONDS)
        client.transport.write(b"x" * 500)  # type: ignore[union-attr]
        await until(lambda: proxy.stats().queued + proxy.stats().bytes_up == 500, "500 bytes in")
        self.assertEqual(proxy.stats().bytes_up, burst)
        elapsed = 0.0
        for _ in range(40):
            clock.advance(0.025)
            elapsed += 0.025
            self.assertLessEqual(proxy.stats().bytes_up, burst + 1000 * elapsed + 1)
            if proxy.stats().bytes_up == 500:
                break
        # 450 bytes after the burst, at 1000 bytes a second (to a step of the clock).
        self.assertEqual(proxy.stats().bytes_up, 500)
        self.assertTrue(0.45 - 1e-9 <= elapsed <= 0.475 + 1e-9, elapsed)
        # The echo is throttled on its way back as well: the first burst may have gone
        # back while the clock stood at 0, one more since; the rest waits for the clock.
        await until(lambda: proxy.stats().queued > 0, "the echo at the proxy")
        self.assertLessEqual(proxy.stats().bytes_down, 2 * burst)
        proxy.rate(0)
        await self.received(client, b"x" * 500)


class ControlPortTests(ProxyTestCase):
    """Another process drives the proxy with one-line commands and one-line answers."""

    async def test_commands(self) -> None:
        proxy = self.makeProxy()
        port = proxy.listenControl(0)
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=2)
        answers: list[str] = []
        lost: Deferred[None] = Deferred()

        class Client(LineOnlyReceiver):
            delimiter = b"\n"

            def lineReceived(self, line: bytes) -> None:
                answers.append(line.decode())

            def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
                lost.callback(None)

        client = await endpoint.connect(Factory.forProtocol(Client))
        commands = [
            "stats",
            "delay 100",
            "rate 1250000",
            "stall",
            "unstall",
            "cut",
            "heal",
            "reset",
            "rate -5",
            "delay soon",
            "frobnicate",
            "delay",
            "STATS",
        ]
        client.transport.write(b"".join(c.encode() + b"\r\n" for c in commands))
        await until(lambda: len(answers) == len(commands), "an answer per command")
        self.assertEqual(
            answers[:9],
            [
                "ok up=0 down=0 connections=0 active=0 queued=0 cut=0 stalled=0 delay_ms=0 rate=0",
                "ok delay 100 ms",
                "ok rate 1250000 B/s",
                "ok stalled",
                "ok unstalled",
                "ok cut",
                f"ok healed, listening on {proxy.port}",
                "ok reset 0 connections",
                "error rate BYTES_PER_S: BYTES_PER_S must be 0 or more, not '-5'",
            ],
        )
        self.assertEqual(answers[9], "error delay MS: MS must be a number, not 'soon'")
        self.assertTrue(answers[10].startswith("error unknown command 'frobnicate'"))
        self.assertEqual(answers[11], "error usage: delay MS")
        self.assertEqual(
            parse_stats(answers[12]),
            {
                "up": 0,
                "down": 0,
                "connections": 0,
                "active": 0,
                "queued": 0,
                "cut": 0,
                "stalled": 0,
                "delay_ms": 100,
                "rate": 1250000,
            },
        )
        self.assertEqual((proxy.delaySeconds, proxy.stats().rate), (0.1, 1250000))

        client.transport.write(b"x" * 2000 + b"\n")
        await lost.addTimeout(DEADLINE, reactor)
        self.assertEqual(answers[-1], "error command longer than 1024 bytes")

    async def test_proxy_as_a_process(self) -> None:
        """``python -m sitesrv.testing.faultproxy`` announces its ports and obeys commands."""
        address = self.echoPort.getHost()
        assert isinstance(address, IPv4Address)
        with open(self.mktemp(), "wb") as log_file:
            process = ProxyProcess.start("127.0.0.1", address.port, log_file=log_file)
        self.addCleanup(process.stop)
        client = await self.connect(process.port)
        client.transport.write(b"through")  # type: ignore[union-attr]
        await self.received(client, b"through")
        stats = process.stats()
        self.assertEqual((stats["up"], stats["down"], stats["connections"]), (7, 7, 1))
        self.assertEqual(process.command("cut"), "cut")
        await client.lost.addTimeout(DEADLINE, reactor)
        with self.assertRaises(ConnectionRefusedError):
            await self.connect(process.port)
        with self.assertRaises(ProxyCommandError) as caught:
            process.command("delay -1")
        self.assertEqual(str(caught.exception), "delay MS: MS must be 0 or more, not '-1'")
        self.assertEqual(control(process.control_port, "heal").split(",")[0], "healed")


class BucketTests(SynchronousTestCase):
    """The token bucket's arithmetic."""

    def test_unlimited(self) -> None:
        bucket = _Bucket()
        self.assertEqual(bucket.allowance(10**9, 0.0), (10**9, 0.0))

    def test_waits_for_a_worthwhile_amount(self) -> None:
        bucket = _Bucket()
        bucket.setRate(10_000, 0.0)  # a 500-byte bucket
        self.assertEqual(bucket.allowance(2000, 0.0), (500, 0.0))
        n, wait = bucket.allowance(2000, 0.0)
        self.assertEqual(n, 0)
        self.assertAlmostEqual(wait, 0.05)
        self.assertEqual(bucket.allowance(2000, 0.05), (500, 0.0))
        # A small chunk waits only for its own size.
        n, wait = bucket.allowance(10, 0.05)
        self.assertAlmostEqual(wait, 0.001)
        self.assertEqual(bucket.allowance(10, 0.051), (10, 0.0))
