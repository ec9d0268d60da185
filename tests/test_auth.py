"""Tests for the authentication core: card, card + PIN, password, and the back-off."""

from __future__ import annotations

import re
from collections.abc import Coroutine
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from sitesrv.core.auth import MAX_INPUT, Authenticator, AuthFailed, FailureThrottle, Identity
from sitesrv.secrets import make_verifier
from sitesrv.store.bootstrap import open_store, thdInitPrimary
from sitesrv.store.users import thdAddCard, thdAddUser, thdSetDisabled, thdSetPin
from tests.support import NOW, run_inline, sqlite_url

#: Cheap scrypt cost for test verifiers (the real cost is 2**14).
CHEAP_N = 2**10

WRONG = "wrong username or password"
THROTTLED = re.compile(r"too many failed attempts; try again in (\d+) s")


class AuthenticatorTests(SynchronousTestCase):
    """Logging in with a card, a card and PIN, or a username and password."""

    def setUp(self) -> None:
        self.store = open_store(sqlite_url(self))
        self.addCleanup(self.store.stop)
        self.store.write(thdInitPrimary, "hq", "USD", 2, NOW)
        pw = make_verifier("correct horse", n=CHEAP_N)
        self.store.write(thdAddUser, "alice", NOW, balance=500, password_verifier=pw)
        self.store.write(thdAddCard, "alice", "0004711", NOW)
        self.store.write(thdSetPin, "alice", make_verifier("1234", n=CHEAP_N), NOW)
        pw = make_verifier("bob's secret", n=CHEAP_N)
        self.store.write(thdAddUser, "bob", NOW, password_verifier=pw)
        self.store.write(thdAddCard, "bob", "0005000", NOW)
        pw = make_verifier("carol's secret", n=CHEAP_N)
        self.store.write(thdAddUser, "carol", NOW, password_verifier=pw)
        self.store.write(thdAddCard, "carol", "0006000", NOW)
        self.store.write(thdSetDisabled, "carol", True, NOW)
        self.store.write(thdAddUser, "dave", NOW)  # no password, no card
        self.clock = Clock()
        self.throttle = FailureThrottle(self.clock)
        self.auth = Authenticator(read=self.read, throttle=self.throttle, verify=run_inline)

    def read(self, fn: Any, *args: Any) -> Deferred[Any]:
        return run_inline(self.store.read, fn, *args)

    def ok(self, attempt: Coroutine[Any, Any, Identity]) -> Identity:
        return self.successResultOf(Deferred.fromCoroutine(attempt))

    def refused(self, attempt: Coroutine[Any, Any, Identity]) -> str:
        failure = self.failureResultOf(Deferred.fromCoroutine(attempt), AuthFailed)
        return failure.value.reason

    def throttled(self, attempt: Coroutine[Any, Any, Identity]) -> int:
        """Assert the attempt is refused for the back-off; return the seconds it names."""
        reason = self.refused(attempt)
        match = THROTTLED.fullmatch(reason)
        assert match is not None, reason
        return int(match.group(1))

    # -- card -----------------------------------------------------------------------------

    def test_card(self) -> None:
        """A known card logs its user in."""
        identity = self.ok(self.auth.card("0004711", "mfd-1"))
        self.assertEqual((identity.user.username, identity.method), ("alice", "card"))
        self.assertEqual(identity.user.balance, 500)

    def test_card_normalised(self) -> None:
        """The reader's raw line is normalised before the lookup."""
        self.assertEqual(self.ok(self.auth.card(" 0004711\r\n", "mfd-1")).user.username, "alice")

    def test_unknown_card(self) -> None:
        """A card nobody holds is refused."""
        self.assertEqual(self.refused(self.auth.card("9999", "mfd-1")), "unknown card")

    def test_disabled_user(self) -> None:
        """A disabled user is refused by card and by password."""
        self.assertEqual(self.refused(self.auth.card("0006000", "mfd-1")), "user disabled")
        self.assertEqual(
            self.refused(self.auth.password("carol", "carol's secret", "web")), "user disabled"
        )
        # A wrong password does not reveal that the account exists but is disabled.
        self.assertEqual(self.refused(self.auth.password("carol", "guess", "web")), WRONG)

    def test_card_and_pin(self) -> None:
        """Card + PIN: the right PIN logs in, a wrong one is refused."""
        identity = self.ok(self.auth.card("0004711", "mfd-1", pin="1234"))
        self.assertEqual((identity.user.username, identity.method), ("alice", "card+pin"))
        self.assertEqual(self.refused(self.auth.card("0004711", "mfd-1", pin="4321")), "wrong PIN")

    def test_card_and_pin_without_pin(self) -> None:
        """A user with no PIN cannot log in with card + PIN."""
        self.assertEqual(
            self.refused(self.auth.card("0005000", "mfd-1", pin="0000")), "no PIN set"
        )

    # -- password -------------------------------------------------------------------------

    def test_password(self) -> None:
        """The right password logs in."""
        identity = self.ok(self.auth.password("alice", "correct horse", "web"))
        self.assertEqual((identity.user.username, identity.method), ("alice", "password"))

    def test_wrong_password_and_unknown_user_look_alike(self) -> None:
        """Wrong password, unknown user and no password set all give the same message."""
        self.assertEqual(self.refused(self.auth.password("alice", "Correct horse", "web")), WRONG)
        self.assertEqual(self.refused(self.auth.password("mallory", "x", "web")), WRONG)
        self.assertEqual(self.refused(self.auth.password("dave", "x", "web")), WRONG)
        # A card's PIN is not a password.
        self.assertEqual(self.refused(self.auth.password("alice", "1234", "web")), WRONG)

    def test_over_long_inputs(self) -> None:
        """Empty and over-long inputs are refused before any lookup or hashing."""
        long = "x" * (MAX_INPUT + 1)
        cases = [
            (self.auth.password(long, "pw", "web"), "username missing or too long"),
            (self.auth.password("alice", long, "web"), "password missing or too long"),
            (self.auth.password("alice", "", "web"), "password missing or too long"),
            (self.auth.card(long, "mfd-1"), "card number missing or too long"),
            (self.auth.card("", "mfd-1"), "card number missing or too long"),
            (self.auth.card("0004711", "mfd-1", pin=long), "PIN missing or too long"),
        ]
        for attempt, reason in cases:
            self.assertEqual(self.refused(attempt), reason)
        # The longest allowed password is still checked (and is wrong here).
        self.assertEqual(self.refused(self.auth.password("alice", "x" * MAX_INPUT, "web")), WRONG)

    # -- back-off -------------------------------------------------------------------------

    def test_back_off_per_user(self) -> None:
        """Past the free failures a user is blocked, even with the right password.

        The block ends when the clock passes it; then the right password works and the
        count starts again.
        """
        for _ in range(self.throttle.free):
            self.assertEqual(self.refused(self.auth.password("alice", "guess", "web")), WRONG)
        # The free failures cost nothing: a correct attempt now still works...
        self.ok(self.auth.password("alice", "correct horse", "web"))
        # ...and resets the count.
        for _ in range(self.throttle.free):
            self.assertEqual(self.refused(self.auth.password("alice", "guess", "web")), WRONG)
        # One failure more blocks her.
        self.assertEqual(self.refused(self.auth.password("alice", "guess", "web")), WRONG)
        seconds = self.throttled(self.auth.password("alice", "correct horse", "web"))
        self.assertGreaterEqual(seconds, self.throttle.base)
        self.clock.advance(self.throttle.base / 2)
        self.throttled(self.auth.password("alice", "correct horse", "web"))
        self.clock.advance(seconds)
        self.ok(self.auth.password("alice", "correct horse", "web"))
        # The count was reset: the free failures are free again.
        for _ in range(self.throttle.free):
            self.assertEqual(self.refused(self.auth.password("alice", "guess", "web")), WRONG)
        self.ok(self.auth.password("alice", "correct horse", "web"))

    def test_blocks_double_up_to_the_cap(self) -> None:
        """Each further failure doubles the block, up to the cap."""
        for _ in range(self.throttle.free):
            self.refused(self.auth.password("alice", "guess", "web"))
        for block in (1, 2, 4, 8, 16, 32, 60, 60, 60):
            self.assertEqual(self.refused(self.auth.password("alice", "guess", "web")), WRONG)
            self.clock.advance(block - 0.5)
            self.assertEqual(
                self.refused(self.auth.password("alice", "correct horse", "web")),
                "too many failed attempts; try again in 1 s",
            )
            self.clock.advance(0.5)
        self.ok(self.auth.password("alice", "correct horse", "web"))

    def test_wrong_pin_backs_off(self) -> None:
        """Guessing a PIN is slowed down like guessing a password."""
        for _ in range(self.throttle.free + 1):
            self.assertEqual(
                self.refused(self.auth.card("0004711", "mfd-1", pin="0000")), "wrong PIN"
            )
        self.throttled(self.auth.card("0004711", "mfd-1", pin="1234"))
        # Her user key is blocked, so another device does not help.
        self.throttled(self.auth.card("0004711", "mfd-2", pin="1234"))
        self.clock.advance(self.throttle.cap)
        self.ok(self.auth.card("0004711", "mfd-2", pin="1234"))

    def test_device_guessing_cards_is_blocked(self) -> None:
        """A device swiping unknown cards is blocked; other devices are not."""
        for i in range(self.throttle.free + 1):
            self.assertEqual(self.refused(self.auth.card(f"99{i}", "mfd-1")), "unknown card")
        # Even a real card is refused at that device while it is blocked...
        seconds = self.throttled(self.auth.card("0004711", "mfd-1"))
        # ...but works elsewhere, and the card's owner is not blocked.
        self.ok(self.auth.card("0004711", "mfd-2"))
        self.ok(self.auth.password("alice", "correct horse", "web"))
        self.clock.advance(seconds)
        self.ok(self.auth.card("0004711", "mfd-1"))

    def test_other_users_and_devices_unaffected(self) -> None:
        """Blocking one user from one device leaves other users and devices alone."""
        for _ in range(self.throttle.free + 1):
            self.refused(self.auth.password("alice", "guess", "web-1"))
        self.ok(self.auth.password("bob", "bob's secret", "web-2"))
        self.ok(self.auth.card("0005000", "mfd-1"))
        # Alice is blocked wherever she tries; the device she failed from is blocked too.
        self.throttled(self.auth.password("alice", "correct horse", "web-2"))
        self.throttled(self.auth.password("bob", "bob's secret", "web-1"))

    def test_quiet_failures_are_forgotten(self) -> None:
        """Failures long ago (more than the cap) no longer count towards a block."""
        for _ in range(self.throttle.free):
            self.refused(self.auth.password("alice", "guess", "web"))
        self.clock.advance(self.throttle.cap + 1)
        self.assertEqual(self.refused(self.auth.password("alice", "guess", "web")), WRONG)
        self.ok(self.auth.password("alice", "correct horse", "web"))


class FailureThrottleTests(SynchronousTestCase):
    """The throttle's memory stays bounded."""

    def test_max_keys(self) -> None:
        """At most ``max_keys`` keys are kept; the oldest are forgotten first."""
        throttle = FailureThrottle(Clock(), free=0, max_keys=5)
        for i in range(20):
            throttle.failed(f"user:{i}")
            self.assertLessEqual(len(throttle._keys), 5)
        self.assertEqual(
            [i for i in range(20) if throttle.wait(f"user:{i}") > 0], [15, 16, 17, 18, 19]
        )

    def test_flood_of_made_up_usernames(self) -> None:
        """Failed logins for many made-up names do not grow the throttle past its bound."""
        store = open_store(sqlite_url(self))
        self.addCleanup(store.stop)
        store.write(thdInitPrimary, "hq", "USD", 2, NOW)
        throttle = FailureThrottle(Clock(), max_keys=50)
        auth = Authenticator(
            read=lambda fn, *args: run_inline(store.read, fn, *args),
            throttle=throttle,
            verify=run_inline,
        )
        for i in range(200):
            d = Deferred.fromCoroutine(auth.password(f"made-up-{i}", "pw", f"10.0.{i}.1"))
            self.assertEqual(self.failureResultOf(d, AuthFailed).value.reason, WRONG)
            self.assertLessEqual(len(throttle._keys), 50)

    def test_success_clears(self) -> None:
        """A success forgets a key's failures."""
        throttle = FailureThrottle(Clock(), free=0)
        throttle.failed("device:mfd-1")
        self.assertGreater(throttle.wait("device:mfd-1"), 0)
        throttle.succeeded("device:mfd-1")
        self.assertEqual(throttle.wait("device:mfd-1"), 0)


class ThrottleScopeTests(SynchronousTestCase):
    """Failures with one method do not lock a user out of another."""

    def test_wrong_passwords_do_not_block_cards(self) -> None:
        """Someone typing wrong passwords for alice cannot stop her card working."""
        store = open_store(sqlite_url(self))
        self.addCleanup(store.stop)
        store.write(thdInitPrimary, "hq", "USD", 2, NOW)
        store.write(thdAddUser, "alice", NOW, password_verifier=make_verifier("pw", n=2**10))
        store.write(thdAddCard, "alice", "1001", NOW)
        auth = Authenticator(
            read=lambda fn, *a: run_inline(store.read, fn, *a),
            throttle=FailureThrottle(Clock()),
            verify=run_inline,
        )
        for _ in range(6):
            self.failureResultOf(Deferred.fromCoroutine(auth.password("alice", "bad", "web")))
        # The password itself is now blocked for alice, from any device...
        self.failureResultOf(Deferred.fromCoroutine(auth.password("alice", "pw", "web2")))
        # ...but her card still works.
        identity = self.successResultOf(Deferred.fromCoroutine(auth.card("1001", "reader")))
        self.assertEqual(identity.user.username, "alice")
