"""Tests of ``DeviceCore``: the core API a device connector gets (``IDeviceCore``).

The fixture is the Find-Me queue's (``tests/test_findme.py``): a primary and site
"north" replicating inline on a ``Clock``, the site's real gate in a chosen failover
mode and its real Find-Me queue, with cards and a PIN added at the primary and
replicated. Every refusal a connector can meet must reach it as ``DeviceRefused`` with
the right ``kind`` and a sentence a device can show.
"""

from __future__ import annotations

import uuid as uuidlib
from typing import Any

from twisted.internet.defer import Deferred
from zope.interface.verify import verifyObject

from sitesrv.core.auth import Identity
from sitesrv.core.devicecore import (
    AUTH,
    FUNDS,
    INVALID,
    POLICY,
    UNAVAILABLE,
    Amount,
    DeviceCore,
    DeviceRefused,
)
from sitesrv.interfaces import IDeviceCore
from sitesrv.secrets import make_verifier
from sitesrv.store import outbox
from sitesrv.store.devices import Device
from sitesrv.store.users import thdAddCard, thdSetPassword, thdSetPin
from tests.support import NOW
from tests.test_findme import SITE, FindMeFixture, details, feed, sync, uuid_of

#: Cheap scrypt cost for test verifiers (the real cost is 2**14).
CHEAP_N = 2**10
PIN = "4321"
PASSWORD = "alice's secret"
#: Card numbers (as stored, normalised).
ALICE_CARD = "1234567890"
BOB_CARD = "5551234"
CAROL_CARD = "999"


def device(
    name: str = "reader1",
    printer: str | None = "north-hold",
    connector: str = "card-reader",
    **options: str,
) -> Device:
    """A device record of site north, as the store returns it."""
    return Device(
        id=1,
        name=name,
        site=SITE,
        connector=connector,
        options=dict(options),
        printer=printer,
        api_key_hash="",
    )


class DeviceFixture(FindMeFixture):
    """The Find-Me fixture, plus cards (alice, bob, disabled carol), alice's PIN and
    password, and ``self.core``: a ``DeviceCore`` for a device printing to north-hold."""

    def setUp(self) -> None:
        super().setUp()
        w = self.primary.write
        w(thdAddCard, "alice", ALICE_CARD, NOW)
        w(thdAddCard, "bob", BOB_CARD, NOW)
        w(thdAddCard, "carol", CAROL_CARD, NOW)
        w(thdSetPin, "alice", make_verifier(PIN, n=CHEAP_N), NOW)
        w(thdSetPassword, "alice", make_verifier(PASSWORD, n=CHEAP_N), NOW)
        if self.store is not self.primary and self.mode != "unsynced":
            sync(self.primary, self.store)
        self.changes: list[DeviceCore] = []
        self.core = self.make_core(device())

    def make_core(self, record: Device) -> DeviceCore:
        """A core for ``record`` over this fixture's gate and queue."""
        return DeviceCore(
            record, self.gate, self.findme, self.store.runRead, self.clock, self.changes.append
        )

    def hold(self, *numbers: int, user: str = "alice", pages: int = 1) -> None:
        """Jobs held for ``user`` on north-hold, decided as a provider would ask."""
        for n in numbers:
            decision = self.ok(
                self.findme.decide("north-spool", details(n, user=user, pages=pages))
            )
            self.assertEqual(decision.decision, "hold", decision.reason)

    def refused(self, d: Deferred[Any], kind: str) -> str:
        """The reason of the ``DeviceRefused`` ``d`` failed with; its kind must be ``kind``."""
        error = self.failureResultOf(d, DeviceRefused).value
        self.assertEqual(error.kind, kind, error.reason)
        self.assertEqual(str(error), error.reason)
        return error.reason

    def alice(self) -> Identity:
        """alice, logged in by card at this device."""
        identity: Identity = self.ok(self.core.authenticateCard(ALICE_CARD))
        return identity


class InterfaceTests(DeviceFixture):
    """What a connector holds."""

    def test_provides_ideviceCore(self) -> None:
        """DeviceCore implements every method and attribute IDeviceCore declares."""
        self.assertTrue(verifyObject(IDeviceCore, self.core))

    def test_device_and_reactor(self) -> None:
        """The connector sees its device record and the injected reactor (a Clock here)."""
        self.assertEqual(self.core.device.name, "reader1")
        self.assertIs(self.core.reactor, self.clock)


class AuthenticationTests(DeviceFixture):
    """Card, card + PIN and password logins go through the gate."""

    def test_card(self) -> None:
        """A known card is its user; the method says how they proved it."""
        identity = self.alice()
        self.assertEqual((identity.user.username, identity.method), ("alice", "card"))

    def test_card_and_pin(self) -> None:
        """The right PIN logs in with card+pin; a wrong one is an auth refusal."""
        identity = self.ok(self.core.authenticateCard(ALICE_CARD, PIN))
        self.assertEqual(identity.method, "card+pin")
        reason = self.refused(self.core.authenticateCard(ALICE_CARD, "0000"), AUTH)
        self.assertEqual(reason, "wrong PIN")

    def test_unknown_and_disabled(self) -> None:
        """Unknown cards and disabled users are refused with a reason."""
        self.assertEqual(self.refused(self.core.authenticateCard("42"), AUTH), "unknown card")
        self.assertEqual(
            self.refused(self.core.authenticateCard(CAROL_CARD), AUTH), "user disabled"
        )

    def test_password(self) -> None:
        """Username and password log in; a wrong password does not say which was wrong."""
        identity = self.ok(self.core.authenticatePassword("alice", PASSWORD))
        self.assertEqual((identity.user.username, identity.method), ("alice", "password"))
        reason = self.refused(self.core.authenticatePassword("alice", "nope"), AUTH)
        self.assertEqual(reason, "wrong username or password")

    def test_failures_are_throttled_per_device(self) -> None:
        """After repeated failures at one device it must wait; another device need not."""
        for _ in range(4):
            self.refused(self.core.authenticateCard("42"), AUTH)
        reason = self.refused(self.core.authenticateCard(ALICE_CARD), AUTH)
        self.assertIn("too many failed attempts", reason)
        other = self.make_core(device(name="reader2"))
        self.assertEqual(self.ok(other.authenticateCard(ALICE_CARD)).user.username, "alice")
        self.clock.advance(2)
        self.alice()


class HeldJobTests(DeviceFixture):
    """Held jobs: listed, released to the device's printer, cancelled."""

    def test_list_release_cancel(self) -> None:
        """Three held jobs: two released by name to north-hold, the third cancelled."""
        self.hold(1, 2, 3, pages=2)
        alice = self.alice()
        held = self.ok(self.core.heldJobs(alice))
        self.assertEqual(
            [(j.uuid, j.pages, j.cost) for j in held],
            [
                (uuid_of(1), 2, 20),
                (uuid_of(2), 2, 20),
                (uuid_of(3), 2, 20),
            ],
        )
        outcomes = self.ok(self.core.release(alice, [uuid_of(1), uuid_of(2)]))
        self.assertEqual(
            [(o.job, o.released) for o in outcomes],
            [
                (uuid_of(1), True),
                (uuid_of(2), True),
            ],
        )
        self.assertEqual(
            [(r[1], r[3]) for r in self.links.releases],
            [(uuid_of(1), "north-hold"), (uuid_of(2), "north-hold")],
        )
        self.assertEqual(self.ok(self.core.cancel(alice)), 1)
        self.assertEqual(self.ok(self.core.heldJobs(alice)), [])

    def test_release_all_checks_the_balance(self) -> None:
        """alice (1.00) releases all of four 0.30 jobs: three go, the fourth stays held."""
        self.hold(1, 2, 3, 4, pages=3)
        outcomes = self.ok(self.core.release(self.alice()))
        self.assertEqual([o.released for o in outcomes], [True, True, True, False])
        self.assertIn("insufficient balance", outcomes[3].reason)

    def test_nothing_held_needs_no_write(self) -> None:
        """Releasing all with nothing held answers from a read: no write transaction."""
        writes: list[Any] = []
        real = self.findme.write

        def counting(fn: Any, *args: Any, **kwargs: Any) -> Any:
            writes.append(fn)
            return real(fn, *args, **kwargs)

        self.findme.write = counting
        alice = self.alice()
        self.assertEqual(self.ok(self.core.release(alice)), [])
        self.assertEqual(writes, [])
        self.hold(1)
        self.assertEqual([o.released for o in self.ok(self.core.release(alice))], [True])
        self.assertEqual(len(writes), 2)  # the decision, then the release

    def test_release_without_a_printer(self) -> None:
        """A device with no printer cannot release: an invalid request, said plainly."""
        core = self.make_core(device(printer=None))
        identity = self.ok(core.authenticateCard(ALICE_CARD))
        reason = self.refused(core.release(identity), INVALID)
        self.assertEqual(reason, "device 'reader1' has no printer (set one at the primary)")

    def test_release_to_another_sites_printer(self) -> None:
        """A record naming a printer this site does not have is refused, not crashed on."""
        self.hold(1)
        core = self.make_core(device(printer="south-hold"))
        identity = self.ok(core.authenticateCard(ALICE_CARD))
        reason = self.refused(core.release(identity), INVALID)
        self.assertEqual(reason, "no printer named 'south-hold'")


class UsageTests(DeviceFixture):
    """Copy, scan and fax usage, priced at the device's printer and charged once."""

    def test_copy_priced_and_recorded(self) -> None:
        """4 colour duplex pages on north-colour (0.60, 10% off duplex): 2.16 for bob."""
        core = self.make_core(device(printer="north-colour"))
        bob = self.ok(core.authenticateCard(BOB_CARD))
        txn = str(uuidlib.uuid4())
        result = self.ok(core.recordUsage(bob, "copy", 4, colour=True, duplex=True, uuid=txn))
        self.assertEqual(
            (result.uuid, result.cost, result.balance, result.account, result.offline),
            (txn, Amount(216, "2.16"), Amount(284, "2.84"), "bob", False),
        )
        self.assertTrue(result.recorded)
        [pending] = self.store.read(outbox.thdPending, 0, 10)
        self.assertEqual(
            (pending.uuid, pending.payload["amount"], pending.payload["job"]["kind"]),
            (txn, -216, "copy"),
        )

    def test_resent_usage_charged_once(self) -> None:
        """The same uuid twice (in any spelling) is one charge; the second says so."""
        alice = self.alice()
        txn = uuidlib.uuid4()
        first = self.ok(self.core.recordUsage(alice, "scan", 2, uuid=str(txn)))
        again = self.ok(self.core.recordUsage(alice, "scan", 2, uuid=txn.urn))
        self.assertEqual((first.recorded, again.recorded), (True, False))
        self.assertEqual(again.cost, Amount(20, "0.20"))
        self.assertEqual(len(self.store.read(outbox.thdPending, 0, 10)), 1)
        self.assertEqual(self.ok(self.core.balance(alice)), Amount(80, "0.80"))

    def test_bad_usage(self) -> None:
        """Unknown kinds, bad counts and bad uuids are invalid, and nothing is charged."""
        alice = self.alice()
        cases: list[tuple[dict[str, Any], str]] = [
            ({"kind": "print", "pages": 1}, "usage kind must be one of copy, scan, fax"),
            ({"kind": "copy", "pages": -1}, "pages must be 0-100000"),
            ({"kind": "copy", "pages": 1, "copies": 0}, "copies must be 1-100000"),
            ({"kind": "copy", "pages": True}, "pages must be a whole number"),
            ({"kind": "fax", "pages": 1, "uuid": "nope"}, "the usage uuid must be a UUID"),
        ]
        for arguments, reason in cases:
            self.assertEqual(
                self.refused(self.core.recordUsage(alice, **arguments), INVALID), reason
            )
        self.assertEqual(self.store.read(outbox.thdPending, 0, 10), [])

    def test_insufficient_funds(self) -> None:
        """alice has 1.00: an 11-page copy (1.10) is refused as funds, with the amounts."""
        reason = self.refused(self.core.recordUsage(self.alice(), "copy", 11), FUNDS)
        self.assertEqual(reason, "insufficient balance: 1.00 available, copy costs 1.10")


class ReportingTests(DeviceFixture):
    """Connection counts and problems are passed on only when they change."""

    def test_connections_and_problems(self) -> None:
        self.core.setConnections(2)
        self.core.setConnections(2)
        self.core.reportProblem("cannot listen on tcp:4000: in use")
        self.core.reportProblem("cannot listen on tcp:4000: in use")
        self.core.setConnections(-1)
        self.core.reportProblem(None)
        self.assertEqual(len(self.changes), 4)
        self.assertEqual((self.core.connections, self.core.problem), (0, None))


class OfflineTests(DeviceFixture):
    """Offline policies apply to everything a connector does."""

    mode = "offline"

    def test_login_release_and_copy_offline(self) -> None:
        """By default a site offline logs in, releases and charges (to the outbox)."""
        self.hold(1)
        alice = self.alice()
        self.assertTrue(self.core.offline())
        self.assertEqual([o.released for o in self.ok(self.core.release(alice))], [True])
        result = self.ok(self.core.recordUsage(alice, "copy", 1))
        self.assertTrue(result.offline)

    def test_policies_refuse(self) -> None:
        """Release and charging refused by policy are "policy" refusals with the reason."""
        self.policy("offline.release", "refuse")
        self.policy("offline.account", "refuse")
        alice = self.alice()
        self.assertEqual(
            self.refused(self.core.release(alice), POLICY),
            "release is not available while the site is offline",
        )
        self.assertEqual(
            self.refused(self.core.recordUsage(alice, "copy", 1), POLICY),
            "charging is not available while the site is offline",
        )

    def test_password_login_refused_offline(self) -> None:
        """With password login refused offline, a password login is an auth refusal."""
        self.policy("offline.password_login", "refuse")
        reason = self.refused(self.core.authenticatePassword("alice", PASSWORD), AUTH)
        self.assertEqual(reason, "password login is not available while the site is offline")


class UnavailableTests(DeviceFixture):
    """A site that is not serving refuses with its mode's reason, as "unavailable"."""

    mode = "unsynced"

    def test_unsynced(self) -> None:
        reason = self.refused(self.core.authenticateCard(ALICE_CARD), UNAVAILABLE)
        self.assertEqual(reason, "site not yet synchronised with the primary")

    def test_revoked(self) -> None:
        assert self.failover is not None
        feed(self.failover, "replicaFound", "revoked")
        reason = self.refused(self.core.authenticateCard(ALICE_CARD), UNAVAILABLE)
        self.assertEqual(reason, "site revoked by the primary")
