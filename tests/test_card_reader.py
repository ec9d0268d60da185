"""Tests of the ``card-reader`` connector, without sockets, threads or sleeps.

Both directions run on a ``MemoryReactorClock``: a listening port (the reader connects
in) whose factory is given ``StringTransport`` / ``iosim`` connections from chosen
addresses, and a connection out (``ClientService``) whose attempts the test fails or
completes, advancing the clock through the backoff. Swipes go through the real
``DeviceCore`` over the site's real gate and Find-Me queue (``tests/test_devicecore``'s
fixture), so a swipe really releases held jobs to the device's printer; properties of
line splitting and card-number conversion use a small recording core instead.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.application.service import IService
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import CannotListenError, ConnectionDone, ConnectionRefusedError
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from connectors.card_reader import (
    MAX_LINE,
    CardReaderService,
    ReaderConfig,
    cardReader,
    parse_allow,
)
from sitesrv.cardnumber import CardNormaliser, CardNumberError
from sitesrv.core.auth import Identity
from sitesrv.core.devicecore import DeviceRefused, InvalidOptions
from sitesrv.interfaces import IDeviceCore
from sitesrv.store.devices import Device
from sitesrv.store.users import User
from tests.support import NOW
from tests.test_devicecore import ALICE_CARD, BOB_CARD, DeviceFixture, device

LOCAL = IPv4Address("TCP", "127.0.0.1", 50000)
READER = IPv4Address("TCP", "10.1.2.3", 4000)


def _user(username: str) -> User:
    return User(
        id=7,
        username=username,
        full_name="",
        email="",
        disabled=False,
        has_pin=False,
        account_id=7,
        balance=0,
        restricted=False,
        credit_limit=0,
    )


@implementer(IDeviceCore)
class RecordingCore:
    """An ``IDeviceCore`` that records the card numbers it is given.

    Cards listed in ``known`` log in (and have no held jobs); any other is refused as an
    unknown card, as the real core refuses it.
    """

    def __init__(self, reactor: Any, known: Sequence[str] = ()) -> None:
        self.device = device()
        self.reactor = reactor
        self.known = set(known)
        self.cards: list[str] = []
        self.connections = 0
        self.problem: str | None = None

    def authenticateCard(self, number: str, pin: str | None = None) -> Deferred[Identity]:
        self.cards.append(number)
        if number not in self.known:
            return Deferred.fromCoroutine(_raise(DeviceRefused("unknown card", "auth")))
        return succeed(Identity(_user(f"user-{number}"), "card"))

    def authenticatePassword(self, username: str, password: str) -> Deferred[Identity]:
        return Deferred.fromCoroutine(_raise(DeviceRefused("wrong username or password", "auth")))

    def heldJobs(self, identity: Identity) -> Deferred[list[Any]]:
        return succeed([])

    def release(self, identity: Identity, job_uuids: Any = None) -> Deferred[list[Any]]:
        return succeed([])

    def cancel(self, identity: Identity, job_uuids: Any = None) -> Deferred[int]:
        return succeed(0)

    def recordUsage(
        self,
        identity: Identity,
        kind: str,
        pages: int,
        copies: int = 1,
        colour: bool = False,
        duplex: bool = False,
        uuid: str | None = None,
    ) -> Any:
        return Deferred.fromCoroutine(_raise(DeviceRefused("no usage here", "invalid")))

    def balance(self, identity: Identity) -> Any:
        return Deferred.fromCoroutine(_raise(DeviceRefused("no balance here", "invalid")))

    def offline(self) -> bool:
        return False

    def setConnections(self, count: int) -> None:
        self.connections = count

    def reportProblem(self, problem: str | None) -> None:
        self.problem = problem


async def _raise(error: Exception) -> Any:
    raise error


def start(record: Device, core: Any) -> CardReaderService:
    """The connector's service for ``record``, started."""
    service = IService(cardReader.makeService(record, core))
    assert isinstance(service, CardReaderService)
    service.startService()
    return service


def connect(
    reactor: MemoryReactorClock, address: Any = LOCAL
) -> tuple[Protocol | None, StringTransport]:
    """A reader connecting from ``address`` to the newest listening port."""
    factory = reactor.tcpServers[-1][1]
    transport = StringTransport(peerAddress=address)
    protocol = factory.buildProtocol(address)
    if protocol is not None:
        protocol.makeConnection(transport)
    return protocol, transport


class RecordingCoreTests(SynchronousTestCase):
    """The recording core keeps the contract the connector relies on."""

    def test_provides_ideviceCore(self) -> None:
        self.assertTrue(verifyObject(IDeviceCore, RecordingCore(MemoryReactorClock())))


class OptionTests(SynchronousTestCase):
    """Options are checked when the service is made; each error names the option."""

    def make(self, printer: str | None = "north-hold", **options: str) -> str:
        core = RecordingCore(MemoryReactorClock())
        error = self.assertRaises(
            InvalidOptions, cardReader.makeService, device(printer=printer, **options), core
        )
        return str(error)

    def test_listen_or_connect(self) -> None:
        """Exactly one of listen and connect."""
        self.assertIn("give exactly one of listen", self.make())
        self.assertIn(
            "give exactly one of listen", self.make(listen="tcp:4000", connect="tcp:h:4000")
        )

    def test_bad_values(self) -> None:
        """Bad endpoint strings, allow entries, conversions, feedback and numbers."""
        self.assertIn(
            "listen: 'nonsense:4000' is not an endpoint string", self.make(listen="nonsense:4000")
        )
        self.assertEqual(
            self.make(listen="tcp:4000", allow="10.0.0.0/33"),
            "allow: '10.0.0.0/33' is not an IP address or CIDR range (e.g. 10.0.0.0/24)",
        )
        self.assertEqual(
            self.make(listen="tcp:4000", reader="reader.example.org"),
            "reader: 'reader.example.org' is not an IP address",
        )
        self.assertIn(
            "unknown card number conversion 'hex2oct'",
            self.make(listen="tcp:4000", convert="hex2oct"),
        )
        self.assertIn(
            "the card number regex '(' is invalid", self.make(listen="tcp:4000", regex="(")
        )
        self.assertEqual(
            self.make(listen="tcp:4000", feedback="beep"),
            "feedback: must be none or line, not 'beep'",
        )
        self.assertEqual(
            self.make(listen="tcp:4000", max_rate="0"), "max_rate: must be at least 1, not 0"
        )
        self.assertEqual(
            self.make(listen="tcp:4000", max_line="many"), "max_line: 'many' is not a number"
        )
        self.assertEqual(self.make(listen="tcp:4000", colour="blue"), "unknown option(s): colour")

    def test_needs_a_printer(self) -> None:
        """A swipe releases to the device's printer, so a reader without one is refused."""
        self.assertEqual(
            self.make(printer=None, listen="tcp:4000"),
            "a card reader releases jobs to its device's printer: give the device one",
        )

    def test_defaults(self) -> None:
        """Documented defaults: no feedback, 128-byte lines, 10 lines/s, 30 s backoff,
        and only 127.0.0.1 may connect unless ``reader`` or ``allow`` says otherwise."""
        config = ReaderConfig.parse({"listen": "tcp:4000"})
        self.assertEqual(
            (config.feedback, config.max_line, config.max_rate, config.max_backoff),
            (False, MAX_LINE, 10, 30.0),
        )
        self.assertEqual([str(n) for n in config.allow], ["127.0.0.1/32"])
        config = ReaderConfig.parse({"listen": "tcp:4000", "reader": "10.1.2.3"})
        self.assertEqual([str(n) for n in config.allow], ["10.1.2.3/32"])
        self.assertEqual(
            [str(n) for n in parse_allow("10.0.0.0/24, 192.168.1.7 ::1")],
            ["10.0.0.0/24", "192.168.1.7/32", "::1/128"],
        )


class AllowTests(SynchronousTestCase):
    """Plain TCP carries no credentials: only allowed peers may connect in."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.core = RecordingCore(self.reactor, known=["42"])

    def test_default_allows_loopback_only(self) -> None:
        """With neither reader nor allow, 127.0.0.1 connects and 10.1.2.3 is refused."""
        service = start(device(listen="tcp:4000"), self.core)
        self.assertIsNotNone(connect(self.reactor, LOCAL)[0])
        self.assertIsNone(connect(self.reactor, READER)[0])
        self.assertEqual(service.stats.refused_peers, 1)
        self.assertEqual(self.core.connections, 1)

    def test_refusals_are_logged(self) -> None:
        """A refused peer is logged with its address, the device and the allow list."""
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        start(device(listen="tcp:4000", allow="10.0.0.0/24"), self.core)
        connect(self.reactor, IPv4Address("TCP", "192.0.2.9", 1))
        [event] = [e for e in events if "refused a connection" in e.get("log_format", "")]
        self.assertEqual(
            formatEvent(event),
            "card reader reader1: refused a connection from 192.0.2.9: not in the allow "
            "list (10.0.0.0/24)",
        )

    def test_reader_option(self) -> None:
        """With reader = 10.1.2.3, only the reader may connect (not even loopback)."""
        service = start(device(listen="tcp:4000", reader="10.1.2.3"), self.core)
        self.assertIsNotNone(connect(self.reactor, READER)[0])
        self.assertIsNone(connect(self.reactor, LOCAL)[0])
        self.assertEqual(service.stats.refused_peers, 1)

    def test_allow_ranges(self) -> None:
        """CIDR ranges, IPv6 and IPv4-mapped IPv6 peers."""
        start(device(listen="tcp:4000", allow="10.0.0.0/24 2001:db8::/32"), self.core)
        allowed = [
            IPv4Address("TCP", "10.0.0.200", 1),
            IPv6Address("TCP", "2001:db8::5", 1),
            IPv6Address("TCP", "::ffff:10.0.0.9", 1),
        ]
        refused = [
            IPv4Address("TCP", "10.0.1.1", 1),
            IPv6Address("TCP", "2001:db9::5", 1),
            IPv4Address("TCP", "127.0.0.1", 1),
        ]
        self.assertEqual([connect(self.reactor, a)[0] is not None for a in allowed], [True] * 3)
        self.assertEqual([connect(self.reactor, a)[0] is not None for a in refused], [False] * 3)


class LineTests(SynchronousTestCase):
    """Splitting lines, garbage, long lines and floods (with a recording core)."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.reactor.advance(NOW)
        self.core = RecordingCore(self.reactor, known=["42"])

    def reader(self, **options: str) -> tuple[CardReaderService, Protocol, StringTransport]:
        service = start(device(listen="tcp:4000", feedback="line", **options), self.core)
        protocol, transport = connect(self.reactor)
        assert protocol is not None
        return service, protocol, transport

    def test_line_ends(self) -> None:
        """CR, LF and CRLF end a line, also split across reads; blank lines are skipped."""
        _service, protocol, transport = self.reader()
        for chunk in (b"1\r", b"\n2\n", b"3\r4", b"\r\n\r\n", b"\n5\r\n"):
            protocol.dataReceived(chunk)
        self.assertEqual(self.core.cards, ["1", "2", "3", "4", "5"])
        self.assertEqual(transport.value(), b"DENY unknown card\r\n" * 5)

    def test_garbage_counted_and_ignored(self) -> None:
        """Non-ASCII, regex mismatches and over-long lines get no answer; the next swipe
        works."""
        service, protocol, transport = self.reader(regex=r"^\s*(\d+)\s*$")
        protocol.dataReceived(b"\xff\xfe\r\nabc\r\n" + b"9" * 100)
        protocol.dataReceived(b"9" * 100 + b"\r\n42\r\n")
        self.assertEqual(service.stats.garbage, 3)
        self.assertEqual(self.core.cards, ["42"])
        self.assertEqual(transport.value(), b"OK 0 jobs\r\n")
        self.assertFalse(transport.disconnecting)

    def test_max_line(self) -> None:
        """A line of exactly max_line bytes is read; one byte more is garbage."""
        service, protocol, _t = self.reader(max_line="16")
        protocol.dataReceived(b"1" * 16 + b"\n" + b"2" * 17 + b"\n")
        self.assertEqual((self.core.cards, service.stats.garbage), (["1" * 16], 1))

    def test_flood_disconnects(self) -> None:
        """Ten lines in a second are fine; the eleventh disconnects the peer."""
        service, protocol, transport = self.reader(regex=r"^(\d+)$")
        for _ in range(3):
            protocol.dataReceived(b"x\n" * 10)
            self.reactor.advance(1.0)
        self.assertFalse(transport.disconnecting)
        protocol.dataReceived(b"x\n" * 11)
        self.assertTrue(transport.disconnecting)
        self.assertEqual((service.stats.floods, service.stats.garbage), (1, 40))

    def test_no_feedback(self) -> None:
        """With feedback none (the default) the reader is never written to."""
        start(device(listen="tcp:4000"), self.core)
        protocol, transport = connect(self.reactor)
        assert protocol is not None
        protocol.dataReceived(b"42\r\n41\r\n")
        self.assertEqual((self.core.cards, transport.value()), (["42", "41"], b""))

    @given(
        st.lists(st.text(string.digits + "ABCDEF", min_size=1, max_size=20), max_size=8),
        st.lists(st.sampled_from([b"\r", b"\n", b"\r\n"]), min_size=8, max_size=8),
        st.lists(st.integers(min_value=1, max_value=7), min_size=1, max_size=40),
    )
    @settings(max_examples=60, deadline=None)
    def test_any_chunking(self, lines: list[str], ends: list[bytes], cuts: list[int]) -> None:
        """However the bytes are split into reads, the same cards arrive in order."""
        reactor = MemoryReactorClock()
        core = RecordingCore(reactor)
        start(device(listen="tcp:4000", max_rate="1000"), core)
        protocol, _t = connect(reactor)
        assert protocol is not None
        stream = b"".join(line.encode() + end for line, end in zip(lines, ends, strict=False))
        position = 0
        for cut in cuts * (len(stream) // max(sum(cuts), 1) + 1):
            if position >= len(stream):
                break
            protocol.dataReceived(stream[position : position + cut])
            position += cut
        self.assertEqual(core.cards, lines)


#: Conversion steps with arguments, as administrators write them.
STEPS = st.sampled_from(
    [
        "hex2dec",
        "dec2hex",
        "ascii-to-hex",
        "reverse-bytes",
        "strip-leading-zeros",
        "upper",
        "lower",
        "substring:-8",
        "substring:2:6",
        "substring:0:4",
        "pad:10",
    ]
)


class ConversionTests(SynchronousTestCase):
    """The convert and regex options normalise each swipe as ``CardNormaliser`` does."""

    def swipe(self, line: bytes, **options: str) -> tuple[list[str], int]:
        reactor = MemoryReactorClock()
        core = RecordingCore(reactor)
        service = start(device(listen="tcp:4000", **options), core)
        protocol, _t = connect(reactor)
        assert protocol is not None
        protocol.dataReceived(line + b"\r\n")
        return core.cards, service.stats.garbage

    @given(
        st.lists(STEPS, max_size=5),
        st.text(string.ascii_letters + string.digits + ";=?", min_size=1, max_size=30),
    )
    @settings(max_examples=200, deadline=None)
    def test_chains(self, steps: list[str], raw: str) -> None:
        """Any chain: the card the core sees is the normaliser's, or the line is garbage."""
        chain = ";".join(steps)
        cards, garbage = self.swipe(raw.encode(), convert=chain)
        try:
            expected = CardNormaliser.parse(None, chain).normalise(raw)
        except CardNumberError:
            self.assertEqual((cards, garbage), ([], 1))
        else:
            self.assertEqual((cards, garbage), ([expected], 0))

    @given(st.integers(min_value=0, max_value=2**64))
    @settings(max_examples=100, deadline=None)
    def test_hex_reader_to_decimal_cards(self, number: int) -> None:
        """A reader sending hex, cards stored in decimal: hex2dec recovers the number."""
        cards, _g = self.swipe(format(number, "X").encode(), convert="hex2dec")
        self.assertEqual(cards, [str(number)])

    def test_regex_and_chain_example(self) -> None:
        """A reader framing the UID as ``UID:0A1B2C3D;`` in LSB order, cards in decimal."""
        cards, _g = self.swipe(
            b"UID:3D2C1B0A;", regex=r"UID:([0-9A-F]+);", convert="reverse-bytes,hex2dec"
        )
        self.assertEqual(cards, [str(0x0A1B2C3D)])


class SwipeTests(DeviceFixture):
    """A swipe logs in and releases all the user's held jobs to the device's printer."""

    def setUp(self) -> None:
        super().setUp()
        self.reactor = MemoryReactorClock()
        self.reactor.advance(NOW)
        self.core = self.make_core(device())
        self.core.reactor = self.reactor
        self.service = start(device(listen="tcp:4000", feedback="line"), self.core)
        self.addCleanup(self.service.stopService)

    def swipe(self, card: str) -> bytes:
        protocol, transport = connect(self.reactor)
        assert protocol is not None
        protocol.dataReceived(card.encode() + b"\r\n")
        return transport.value()

    def test_swipe_releases_held_jobs(self) -> None:
        """Two held jobs: OK 2 jobs, and both are pushed to north-hold's provider."""
        self.hold(1, 2)
        self.assertEqual(self.swipe(ALICE_CARD), b"OK 2 jobs\r\n")
        self.assertEqual([r[3] for r in self.links.releases], ["north-hold", "north-hold"])
        self.assertEqual(self.ok(self.findme.held(self.identity())), [])
        self.assertEqual((self.service.stats.swipes, self.service.stats.released), (1, 2))

    def test_one_and_none(self) -> None:
        """One job: OK 1 job; nothing held: OK 0 jobs (the login worked)."""
        self.hold(1, user="bob")
        self.assertEqual(self.swipe(BOB_CARD), b"OK 1 job\r\n")
        self.assertEqual(self.swipe(BOB_CARD), b"OK 0 jobs\r\n")

    def test_partly_affordable(self) -> None:
        """alice (1.00) with four 0.30 jobs: three go, one stays held."""
        self.hold(1, 2, 3, 4, pages=3)
        self.assertEqual(self.swipe(ALICE_CARD), b"OK 3 jobs\r\n")
        self.assertEqual(len(self.ok(self.findme.held(self.identity()))), 1)

    def test_denials(self) -> None:
        """Unknown cards, and held jobs none of which can go, are denied with the reason."""
        self.assertEqual(self.swipe("77777"), b"DENY unknown card\r\n")
        self.hold(1)
        self.links.up.clear()
        self.assertEqual(
            self.swipe(ALICE_CARD),
            b"DENY print provider 'north-spool' is not connected; the job stays held\r\n",
        )

    def test_over_iosim(self) -> None:
        """A line-based reader client over an iosim connection gets its answers in order."""
        self.hold(1, 2)
        answers: list[bytes] = []

        class Reader(LineOnlyReceiver):
            delimiter = b"\r\n"

            def lineReceived(self, line: bytes) -> None:
                answers.append(line)

        factory = self.reactor.tcpServers[-1][1]
        server = factory.buildProtocol(LOCAL)
        client = Reader()
        pump = iosim.connect(
            server,
            iosim.FakeTransport(server, isServer=True, peerAddress=LOCAL),
            client,
            iosim.FakeTransport(client, isServer=False),
        )
        client.sendLine(ALICE_CARD.encode())
        client.sendLine(b"0")
        client.sendLine(ALICE_CARD.encode())
        pump.flush()
        self.assertEqual(answers, [b"OK 2 jobs", b"DENY unknown card", b"OK 0 jobs"])

    def test_stop_closes_everything(self) -> None:
        """Stopping the service stops listening and closes the readers' connections."""
        protocol, transport = connect(self.reactor)
        assert protocol is not None
        self.assertEqual(self.core.connections, 1)
        d = self.service.stopService()
        self.assertTrue(transport.disconnecting)
        protocol.connectionLost(Failure(ConnectionDone()))
        self.successResultOf(d)
        self.assertEqual(self.core.connections, 0)


class OfflineSwipeTests(SwipeTests):
    """The same swipes with the site offline: offline policies apply."""

    mode = "offline"

    def test_release_refused_offline(self) -> None:
        """With release refused offline, the swipe is denied with the policy's reason."""
        self.hold(1)
        self.policy("offline.release", "refuse")
        self.assertEqual(
            self.swipe(ALICE_CARD), b"DENY release is not available while the site is offline\r\n"
        )

    def test_unknown_card_offline_account(self) -> None:
        """Unknown cards accepted offline (policy) log in to the Offline Account: OK 0 jobs."""
        self.policy("offline.unknown_card", "offline-account")
        self.assertEqual(self.swipe("77777"), b"OK 0 jobs\r\n")


class UnsyncedSwipeTests(DeviceFixture):
    """An unsynced site answers every swipe with its reason."""

    mode = "unsynced"

    def test_denied(self) -> None:
        reactor = MemoryReactorClock()
        core = self.make_core(device())
        core.reactor = reactor
        start(device(listen="tcp:4000", feedback="line"), core)
        protocol, transport = connect(reactor)
        assert protocol is not None
        protocol.dataReceived(ALICE_CARD.encode() + b"\n")
        self.assertEqual(transport.value(), b"DENY site not yet synchronised with the primary\r\n")


class _FlakyListenReactor(MemoryReactorClock):
    """Refuses the first ``failures`` listenTCP calls, as a port in use does."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any:
        if self.failures:
            self.failures -= 1
            raise CannotListenError(interface, port, OSError(98, "Address already in use"))
        return super().listenTCP(port, factory, backlog, interface)


class ListenRetryTests(SynchronousTestCase):
    """A port that cannot be opened is reported and tried again with backoff."""

    def test_retry_until_listening(self) -> None:
        reactor = _FlakyListenReactor(failures=3)
        core = RecordingCore(reactor)
        start(device(listen="tcp:4000", max_backoff="4"), core)
        assert core.problem is not None
        self.assertIn("cannot listen on tcp:4000", core.problem)
        self.assertIn("Address already in use", core.problem)
        for _ in range(3):
            self.assertEqual(reactor.tcpServers, [])
            reactor.advance(5.1)  # the capped delay (4 s) plus the most jitter (1 s)
        self.assertEqual(len(reactor.tcpServers), 1)
        self.assertIsNone(core.problem)


class ConnectTests(SynchronousTestCase):
    """The server connects out to a listening reader and keeps the connection up."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.reactor.advance(NOW)
        self.core = RecordingCore(self.reactor, known=["42"])
        self.service = start(
            device(connect="tcp:10.1.2.3:4000", feedback="line", max_backoff="8"), self.core
        )

    def attempt(self) -> tuple[Any, Any]:
        """The newest connection attempt: its factory and connector."""
        host, port, factory, _timeout, _bind = self.reactor.tcpClients[-1]
        self.assertEqual((host, port), ("10.1.2.3", 4000))
        return factory, self.reactor.connectors[-1]

    def succeed(self) -> tuple[Protocol, StringTransport]:
        factory, _connector = self.attempt()
        protocol = factory.buildProtocol(READER)
        transport = StringTransport(peerAddress=READER)
        protocol.makeConnection(transport)
        return protocol, transport

    def test_swipe_over_an_outgoing_connection(self) -> None:
        """Once connected, the reader's lines are swipes and get their feedback."""
        protocol, transport = self.succeed()
        protocol.dataReceived(b"42\r\n")
        self.assertEqual(transport.value(), b"OK 0 jobs\r\n")
        self.assertEqual((self.core.connections, self.core.problem), (1, None))

    def test_reconnects_with_capped_backoff(self) -> None:
        """Refused attempts are reported and retried, never waiting more than the cap
        (8 s plus jitter); a connection clears the problem."""
        delays = []
        for _ in range(8):
            factory, connector = self.attempt()
            factory.clientConnectionFailed(connector, Failure(ConnectionRefusedError()))
            attempts = len(self.reactor.tcpClients)
            waited = 0.0
            while len(self.reactor.tcpClients) == attempts:
                self.reactor.advance(0.25)
                waited += 0.25
            delays.append(waited)
        assert self.core.problem is not None
        self.assertIn("cannot connect to the reader at tcp:10.1.2.3:4000", self.core.problem)
        self.assertLessEqual(max(delays), 9.25)
        self.assertGreaterEqual(delays[-1], 8.0)
        self.assertLess(delays[0], delays[-1])
        self.succeed()
        self.assertIsNone(self.core.problem)

    def test_reconnects_after_the_reader_closes(self) -> None:
        """A connection the reader closes is made again."""
        protocol, _transport = self.succeed()
        attempts = len(self.reactor.tcpClients)
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.core.connections, 0)
        self.reactor.advance(10)
        self.assertEqual(len(self.reactor.tcpClients), attempts + 1)
        self.succeed()
        self.assertEqual(self.core.connections, 1)

    def test_stop(self) -> None:
        """Stopping closes the connection and makes no further attempts."""
        protocol, transport = self.succeed()
        d = self.service.stopService()
        self.assertTrue(transport.disconnecting)
        protocol.connectionLost(Failure(ConnectionDone()))
        self.successResultOf(d)
        attempts = len(self.reactor.tcpClients)
        self.reactor.advance(100)
        self.assertEqual(len(self.reactor.tcpClients), attempts)
