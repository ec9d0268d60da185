"""Tests for the gate: what a request may do in each failover mode, under each offline
policy, and how charges are recorded at a site and at the primary.

A site is a SQLite database built from a primary exactly as replication builds it (see
``tests/test_outbox.py``); the gate runs its ``thd`` functions inline and its failover
machine is driven into each mode with the inputs the replication client sends.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, TypeVar

from sqlalchemy import Connection
from twisted.internet.defer import Deferred, execute
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from sitesrv.core.auth import Authenticator, AuthFailed, FailureThrottle, Identity
from sitesrv.core.gate import ChargeResult, Gate, JobInfo, Refused, thdCharge, thdViewBalance
from sitesrv.errors import InsufficientFunds
from sitesrv.failover import Failover
from sitesrv.secrets import make_verifier
from sitesrv.store import Store, ledger, outbox
from sitesrv.store.bootstrap import open_store, thdInitPrimary
from sitesrv.store.jobs import thdListJobs
from sitesrv.store.ledger import OFFLINE_ACCOUNT, thdAccount, thdListTransactions
from sitesrv.store.policies import thdSetPolicy
from sitesrv.store.sites import thdAddSite
from sitesrv.store.users import thdAddCard, thdAddUser, thdRemoveUser, thdSetCredit
from tests.support import NOW, StoreMixin, run_inline, sqlite_url
from tests.test_outbox import (
    SITE,
    apply,
    balance,
    ledger_uuids,
    load_snapshot,
    open_site_store,
    pending,
    submit,
    sync,
)

T = TypeVar("T")

#: Cheap scrypt cost for test verifiers (the real cost is 2**14).
CHEAP_N = 2**10

UNSYNCED = "site not yet synchronised with the primary"
REVOKED = "site revoked by the primary"
OFFLINE_CHARGING = "charging is not available while the site is offline"
OFFLINE_PASSWORD = "password login is not available while the site is offline"
OFFLINE_RELEASE = "release is not available while the site is offline"

#: The inputs the replication client sends to bring a fresh machine into each mode.
PATHS: dict[str, tuple[str, ...]] = {
    "unsynced": (),
    "syncing": ("connected", "outboxDrained", "snapshotLoaded"),
    "online": ("replicaFound", "connected", "outboxDrained", "caughtUp"),
    "offline": ("replicaFound",),
    "reconciling": ("replicaFound", "connected"),
    "revoked": ("replicaFound", "revoked"),
}
SERVING = ("syncing", "online", "offline", "reconciling")
#: Modes in which the offline policies decide, and in which normal rules apply.
BOTH = ("online", "offline")


def feed(failover: Failover, *inputs: str) -> None:
    """Feed machine inputs, each with a reason naming it."""
    for name in inputs:
        getattr(failover.inputs, name)(f"test: {name}")


class GateTestCase(SynchronousTestCase):
    """A primary with users and two sites; ``site_gate`` builds north's replica (with
    the policies set so far) and a gate over it in a given mode."""

    def setUp(self) -> None:
        self.primary = open_store(sqlite_url(self, "primary.db"))
        self.addCleanup(self.primary.stop)
        self.primary.write(thdInitPrimary, "hq", "USD", 2, NOW)
        self.primary.write(thdAddSite, SITE, NOW)
        self.primary.write(thdAddSite, "south", NOW)
        # alice: restricted, 1.00, no credit; card 1001, a password.
        verifier = make_verifier("alice's secret", n=CHEAP_N)
        self.primary.write(thdAddUser, "alice", NOW, balance=1_00, password_verifier=verifier)
        self.primary.write(thdAddCard, "alice", "1001", NOW)
        # bob: unrestricted, 5.00; card 2002.
        self.primary.write(thdAddUser, "bob", NOW, balance=5_00, restricted=False)
        self.primary.write(thdAddCard, "bob", "2002", NOW)
        self.clock = Clock()
        self.clock.advance(NOW)
        self.site: Store | None = None

    def policy(self, key: str, value: str, site: str = "") -> None:
        """Set an offline policy at the primary (before ``site_gate``)."""
        self.primary.write(thdSetPolicy, key, value, NOW, site=site)

    def gate_over(self, store: Store, role: str, name: str, failover: Failover | None) -> Gate:
        def read(fn: Any, *args: Any, **kwargs: Any) -> Deferred[Any]:
            return execute(store.read, fn, *args, **kwargs)

        def write(fn: Any, *args: Any, **kwargs: Any) -> Deferred[Any]:
            return execute(store.write, fn, *args, **kwargs)

        authenticator = Authenticator(
            read=read, throttle=FailureThrottle(self.clock), verify=run_inline
        )
        return Gate(role, name, authenticator, read, write, self.clock, failover)

    def site_gate(self, mode: str, passwords: bool | None = True) -> Gate:
        """North's gate in ``mode``, over a fresh replica of the primary.

        Password verifiers are replicated unless ``passwords`` is None (then the
        primary's rule decides, as in a real deployment). An unsynced site has no
        replica at all.
        """
        self.site = open_site_store(self)
        if mode != "unsynced":
            load_snapshot(self.primary, self.site, passwords=passwords)
        failover = Failover(self.clock)
        feed(failover, *PATHS[mode])
        self.assertEqual(failover.mode, mode)
        return self.gate_over(self.site, "site", SITE, failover)

    def primary_gate(self) -> Gate:
        """The primary's own gate (no failover machine)."""
        return self.gate_over(self.primary, "primary", "hq", None)

    # -- calling the gate -----------------------------------------------------------

    def ok(self, call: Coroutine[Any, Any, T]) -> T:
        return self.successResultOf(Deferred.fromCoroutine(call))

    def fails(self, call: Coroutine[Any, Any, Any], kind: type[Exception]) -> str:
        return str(self.failureResultOf(Deferred.fromCoroutine(call), kind).value)

    def login(self, gate: Gate, card: str = "1001") -> Identity:
        return self.ok(gate.card(card, "mfd-1"))

    def charge(self, gate: Gate, identity: Identity, cost: int, **kw: Any) -> ChargeResult:
        return self.ok(gate.charge(identity, cost, "print", **kw))

    def balance_of(self, gate: Gate, identity: Identity) -> int:
        return self.ok(gate.balance(identity))

    def shared_view(self, name: str) -> int:
        """A shared account's balance as the site shows it."""
        account = self.primary.read(thdAccount, name)
        assert self.site is not None
        return int(self.site.read(thdViewBalance, "site", account.id))


class ModeTests(GateTestCase):
    """Unsynced and revoked sites refuse everything; serving modes serve."""

    def test_refusing_modes(self) -> None:
        """Card login, password login, release and charging are refused with the
        mode's reason (the identity was obtained while the site still served)."""
        for mode, reason in (("unsynced", UNSYNCED), ("revoked", REVOKED)):
            identity = self.login(self.site_gate("online"))
            gate = self.site_gate(mode)
            self.assertEqual(self.fails(gate.card("1001", "mfd-1"), Refused), reason)
            self.assertEqual(self.fails(gate.card("1001", "mfd-1", pin="1"), Refused), reason)
            self.assertEqual(self.fails(gate.card("9999", "mfd-1"), Refused), reason)
            self.assertEqual(self.fails(gate.password("alice", "alice's secret"), Refused), reason)
            self.assertEqual(self.fails(gate.may_release(), Refused), reason)
            self.assertEqual(self.fails(gate.charge(identity, 10, "print"), Refused), reason)
            self.assertEqual(pending(self.site), [])

    def test_serving_modes(self) -> None:
        """Every serving mode logs in, releases and charges; offline policies govern
        credit only in offline and reconciling."""
        for mode in SERVING:
            gate = self.site_gate(mode)
            identity = self.login(gate)
            self.assertEqual(identity.user.username, "alice")
            self.assertEqual(self.ok(gate.password("alice", "alice's secret")).method, "password")
            self.ok(gate.may_release())
            result = self.charge(gate, identity, 10)
            self.assertEqual(
                (result.account_name, result.amount, result.balance), ("alice", -10, 90)
            )
            self.assertEqual(result.offline, mode in ("offline", "reconciling"))
            self.assertEqual(self.balance_of(gate, identity), 90)
            self.assertEqual(len(pending(self.site)), 1)

    def test_revoked_while_serving(self) -> None:
        """A site revoked mid-session refuses the next request at once."""
        gate = self.site_gate("online")
        identity = self.login(gate)
        feed(gate.failover, "revoked")
        self.assertEqual(self.fails(gate.charge(identity, 10, "print"), Refused), REVOKED)


class AccountPolicyTests(GateTestCase):
    """``offline.account``: whom an offline charge is booked to."""

    def test_personal(self) -> None:
        """personal: online and offline, the user pays and their view balance drops."""
        self.policy("offline.account", "personal")
        for mode in BOTH:
            gate = self.site_gate(mode)
            alice = self.login(gate)
            result = self.charge(gate, alice, 30)
            self.assertEqual((result.account_name, result.balance), ("alice", 70))
            self.assertEqual(self.balance_of(gate, alice), 70)

    def test_offline_account(self) -> None:
        """offline-account: offline, the Offline Account pays and the user's view
        balance is unchanged; online, the user pays."""
        self.policy("offline.account", "offline-account")
        gate = self.site_gate("offline")
        alice = self.login(gate)
        result = self.charge(gate, alice, 30)
        self.assertEqual((result.account_name, result.offline), (OFFLINE_ACCOUNT, True))
        self.assertEqual(self.balance_of(gate, alice), 1_00)
        self.assertEqual(self.shared_view(OFFLINE_ACCOUNT), -30)
        # Back online, alice pays again.
        feed(gate.failover, "connected", "outboxDrained", "caughtUp")
        online = self.charge(gate, alice, 20)
        self.assertEqual((online.account_name, online.offline), ("alice", False))
        self.assertEqual(self.balance_of(gate, alice), 80)
        self.assertEqual(self.shared_view(OFFLINE_ACCOUNT), -30)
        # The primary books each where the site did.
        submit(self.primary, self.site)
        txn = self.primary.read(thdListTransactions, result.account_id)[0]
        self.assertEqual((txn.uuid, txn.amount), (result.txn_uuid, -30))
        self.assertEqual(balance(self.primary, alice.user.account_id), 80)

    def test_refuse(self) -> None:
        """refuse: offline, charging is refused and nothing is recorded; online, fine."""
        self.policy("offline.account", "refuse")
        for mode in ("offline", "reconciling"):
            gate = self.site_gate(mode)
            alice = self.login(gate)
            self.assertEqual(
                self.fails(gate.charge(alice, 30, "print"), Refused), OFFLINE_CHARGING
            )
            self.assertEqual(pending(self.site), [])
            self.assertEqual(self.balance_of(gate, alice), 1_00)
        gate = self.site_gate("online")
        self.assertEqual(self.charge(gate, self.login(gate), 30).balance, 70)


class AllowancePolicyTests(GateTestCase):
    """``offline.allowance``: how far below zero a restricted balance may go offline."""

    def test_floor(self) -> None:
        """alice (1.00, no credit) with an allowance of 2.00 can be charged down to
        -2.00 offline, and not a cent further."""
        self.policy("offline.allowance", "2.00")
        gate = self.site_gate("offline")
        alice = self.login(gate)
        self.assertEqual(
            self.fails(gate.charge(alice, 3_01, "print"), InsufficientFunds),
            "insufficient offline allowance: 3.00 available, print costs 3.01",
        )
        self.assertEqual(self.charge(gate, alice, 1_50).balance, -50)
        self.assertEqual(self.charge(gate, alice, 1_50).balance, -2_00)
        self.assertEqual(
            self.fails(gate.charge(alice, 1, "print"), InsufficientFunds),
            "insufficient offline allowance: 0.00 available, print costs 0.01",
        )
        self.assertEqual(self.balance_of(gate, alice), -2_00)
        self.assertEqual(len(pending(self.site)), 2)

    def test_unlimited(self) -> None:
        """unlimited: an offline charge is never refused for the balance."""
        self.policy("offline.allowance", "unlimited")
        gate = self.site_gate("offline")
        alice = self.login(gate)
        self.assertEqual(self.charge(gate, alice, 100_00).balance, -99_00)
        self.assertEqual(self.charge(gate, alice, 1_000_00).balance, -1_099_00)

    def test_online_uses_the_credit_limit(self) -> None:
        """Online, the allowance does not matter: alice (1.00, no credit) cannot be
        charged 1.20."""
        for allowance in ("2.00", "unlimited"):
            self.policy("offline.allowance", allowance)
            for mode in ("online", "syncing"):
                gate = self.site_gate(mode)
                alice = self.login(gate)
                self.assertEqual(
                    self.fails(gate.charge(alice, 1_20, "print"), InsufficientFunds),
                    "insufficient balance: 1.00 available, print costs 1.20",
                )
                self.assertEqual(pending(self.site), [])
                self.assertEqual(self.charge(gate, alice, 1_00).balance, 0)

    def test_online_counts_unapplied_charges(self) -> None:
        """Online, unapplied charges count against the credit limit too."""
        gate = self.site_gate("online")
        alice = self.login(gate)
        self.charge(gate, alice, 60)
        self.assertEqual(
            self.fails(gate.charge(alice, 60, "print"), InsufficientFunds),
            "insufficient balance: 0.40 available, print costs 0.60",
        )

    def test_allowance_below_the_credit_limit(self) -> None:
        """The allowance is a floor of its own: a user with credit is held to it
        offline."""
        self.policy("offline.allowance", "0.50")
        self.primary.write(thdSetCredit, "alice", True, 5_00, NOW)
        gate = self.site_gate("offline")
        alice = self.login(gate)
        self.assertEqual(
            self.fails(gate.charge(alice, 2_00, "print"), InsufficientFunds),
            "insufficient offline allowance: 1.50 available, print costs 2.00",
        )

    def test_does_not_reset_when_the_link_flaps(self) -> None:
        """Charges not yet applied still count after the link comes back and goes
        again; so do charges applied in the meantime."""
        self.policy("offline.allowance", "2.00")
        gate = self.site_gate("offline")
        alice = self.login(gate)
        self.charge(gate, alice, 2_50)  # -1.50
        feed(gate.failover, "connected", "outboxDrained", "caughtUp")
        self.assertEqual(gate.failover.mode, "online")
        feed(gate.failover, "lost")
        self.assertEqual(gate.failover.mode, "offline")
        self.assertEqual(
            self.fails(gate.charge(alice, 60, "print"), InsufficientFunds),
            "insufficient offline allowance: 0.50 available, print costs 0.60",
        )
        self.assertEqual(self.charge(gate, alice, 25).balance, -1_75)
        # Applied at the primary and streamed back; then offline again.
        feed(gate.failover, "connected")
        submit(self.primary, self.site)
        sync(self.primary, self.site)
        feed(gate.failover, "outboxDrained", "caughtUp", "heartbeatMissed")
        self.assertEqual(gate.failover.mode, "offline")
        self.assertEqual(self.site.read(outbox.thdPendingCount), 0)
        self.assertEqual(self.balance_of(gate, alice), -1_75)
        self.assertEqual(
            self.fails(gate.charge(alice, 26, "print"), InsufficientFunds),
            "insufficient offline allowance: 0.25 available, print costs 0.26",
        )
        self.assertEqual(self.charge(gate, alice, 25).balance, -2_00)

    def test_unrestricted_users(self) -> None:
        """Unrestricted accounts are never held to the allowance."""
        gate = self.site_gate("offline")
        bob = self.login(gate, "2002")
        self.assertEqual(self.charge(gate, bob, 50_00).balance, -45_00)


class UnknownCardPolicyTests(GateTestCase):
    """``offline.unknown_card``: refuse, or let the Offline Account pay."""

    def test_refuse(self) -> None:
        self.policy("offline.unknown_card", "refuse")
        for mode in BOTH:
            gate = self.site_gate(mode)
            self.assertEqual(self.fails(gate.card("9999", "mfd-1"), AuthFailed), "unknown card")

    def test_offline_account(self) -> None:
        """Offline, an unknown card gets an identity that charges the Offline Account;
        online it is refused all the same."""
        self.policy("offline.unknown_card", "offline-account")
        gate = self.site_gate("online")
        self.assertEqual(self.fails(gate.card("9999", "mfd-1"), AuthFailed), "unknown card")

        gate = self.site_gate("offline")
        stranger = self.login(gate, "9999")
        self.assertEqual(stranger.user.username, "card:9999")
        result = self.charge(gate, stranger, 40)
        self.assertEqual((result.account_name, result.offline), (OFFLINE_ACCOUNT, True))
        self.assertEqual(self.balance_of(gate, stranger), -40)
        record = pending(self.site)[0].payload
        self.assertEqual((record["user_id"], record["username"]), (None, "card:9999"))
        # The primary books it to the Offline Account.
        self.assertEqual(submit(self.primary, self.site), 1)
        offline = self.primary.read(thdAccount, OFFLINE_ACCOUNT)
        self.assertEqual(offline.balance, -40)

    def test_known_cards_still_work(self) -> None:
        """The policy changes nothing for known cards, and wrong PINs are still wrong."""
        self.policy("offline.unknown_card", "offline-account")
        gate = self.site_gate("offline")
        self.assertEqual(self.login(gate).user.username, "alice")
        self.assertEqual(
            self.fails(gate.card("1001", "mfd-1", pin="0000"), AuthFailed), "no PIN set"
        )


class PasswordPolicyTests(GateTestCase):
    """``offline.password_login``."""

    def test_refuse(self) -> None:
        """refuse: refused offline; allowed when connected (reconciling is connected:
        only credit follows the offline policies there)."""
        self.policy("offline.password_login", "refuse")
        gate = self.site_gate("offline")
        self.assertEqual(
            self.fails(gate.password("alice", "alice's secret"), AuthFailed), OFFLINE_PASSWORD
        )
        for mode in ("reconciling", "online"):
            gate = self.site_gate(mode)
            self.assertEqual(
                self.ok(gate.password("alice", "alice's secret")).user.username, "alice"
            )

    def test_allow(self) -> None:
        """allow: works online and offline; a wrong password is still wrong."""
        self.policy("offline.password_login", "allow")
        for mode in BOTH:
            gate = self.site_gate(mode, passwords=None)
            self.assertEqual(self.ok(gate.password("alice", "alice's secret")).method, "password")
            self.assertEqual(
                self.fails(gate.password("alice", "guess"), AuthFailed),
                "wrong username or password",
            )

    def test_refuse_online_with_the_replica_the_primary_sends(self) -> None:
        """With ``refuse`` the primary leaves password verifiers out of the site's
        replica; online, the site asks the primary (``CheckPassword``) instead."""
        self.policy("offline.password_login", "refuse")
        gate = self.site_gate("online", passwords=None)
        primary = self.primary_gate().authenticator

        def remote(username: str, password: str) -> Deferred[bool]:
            async def check() -> bool:
                try:
                    await primary.password(username, password, "site:north")
                except AuthFailed:
                    return False
                return True

            return Deferred.fromCoroutine(check())

        gate.authenticator.remote_password = remote
        self.assertEqual(self.ok(gate.password("alice", "alice's secret")).user.username, "alice")
        self.assertEqual(
            self.fails(gate.password("alice", "guess"), AuthFailed), "wrong username or password"
        )


class ReleasePolicyTests(GateTestCase):
    """``offline.release``."""

    def test_refuse(self) -> None:
        """refuse: refused offline; fine whenever connected (reconciling too)."""
        self.policy("offline.release", "refuse")
        gate = self.site_gate("offline")
        self.assertEqual(self.fails(gate.may_release(), Refused), OFFLINE_RELEASE)
        for mode in ("reconciling", "online", "syncing"):
            self.ok(self.site_gate(mode).may_release())

    def test_allow(self) -> None:
        self.policy("offline.release", "allow")
        for mode in BOTH:
            self.ok(self.site_gate(mode).may_release())


class SiteOverrideTests(GateTestCase):
    """A site's own policy beats the global one; another site's is ignored."""

    def test_own_override_wins(self) -> None:
        self.policy("offline.account", "refuse")
        self.policy("offline.account", "personal", site=SITE)
        self.policy("offline.release", "allow")
        self.policy("offline.release", "refuse", site=SITE)
        gate = self.site_gate("offline")
        self.assertEqual(self.charge(gate, self.login(gate), 30).account_name, "alice")
        self.assertEqual(self.fails(gate.may_release(), Refused), OFFLINE_RELEASE)

    def test_other_sites_override_ignored(self) -> None:
        self.policy("offline.account", "personal")
        self.policy("offline.account", "refuse", site="south")
        self.policy("offline.allowance", "unlimited", site="south")
        gate = self.site_gate("offline")
        alice = self.login(gate)
        self.assertEqual(self.charge(gate, alice, 30).account_name, "alice")
        self.assertEqual(
            self.fails(gate.charge(alice, 1_00, "print"), InsufficientFunds),
            "insufficient offline allowance: 0.70 available, print costs 1.00",
        )

    def test_override_follows_the_stream(self) -> None:
        """A policy changed at the primary applies at the site once streamed."""
        gate = self.site_gate("offline")
        alice = self.login(gate)
        self.policy("offline.account", "refuse", site=SITE)
        self.assertEqual(self.charge(gate, alice, 10).account_name, "alice")
        sync(self.primary, self.site)
        self.assertEqual(self.fails(gate.charge(alice, 10, "print"), Refused), OFFLINE_CHARGING)


class PrimaryRoleTests(GateTestCase):
    """At the primary the gate charges the ledger directly, under normal rules."""

    def test_charge_goes_to_the_ledger(self) -> None:
        """The transaction and the job log are written at once; no outbox."""
        self.policy("offline.account", "refuse")  # never applies at the primary
        gate = self.primary_gate()
        alice = self.login(gate)
        job = JobInfo("print", None, "hq-laser", pages=4, document="minutes.pdf")
        result = self.charge(gate, alice, 40, job=job)
        self.assertEqual((result.amount, result.balance, result.offline), (-40, 60, False))
        self.assertTrue(result.recorded)
        txn = self.primary.read(thdListTransactions, alice.user.account_id)[0]
        self.assertEqual(
            (txn.uuid, txn.amount, txn.balance_after, txn.job_uuid, txn.site),
            (result.txn_uuid, -40, 60, job.uuid, "hq"),
        )
        jobs = self.primary.read(thdListJobs, "alice")
        self.assertEqual(
            [(j.uuid, j.cost, j.pages, j.site) for j in jobs], [(job.uuid, 40, 4, "hq")]
        )
        self.assertEqual(self.balance_of(gate, alice), 60)
        self.assertEqual(balance(self.primary, alice.user.account_id), 60)

    def test_credit_limit(self) -> None:
        """A restricted user cannot go below their credit limit; nothing is written."""
        gate = self.primary_gate()
        alice = self.login(gate)
        job = JobInfo("print", None, "hq-laser", pages=12)
        self.assertEqual(
            self.fails(gate.charge(alice, 1_20, "print", job=job), InsufficientFunds),
            "insufficient balance: 1.00 available, print costs 1.20",
        )
        self.assertEqual(balance(self.primary, alice.user.account_id), 1_00)
        self.assertEqual(self.primary.read(thdListJobs, "alice"), [])
        self.primary.write(thdSetCredit, "alice", True, 50, NOW)
        self.assertEqual(self.charge(gate, alice, 1_20).balance, -20)
        self.assertEqual(
            self.fails(gate.charge(alice, 31, "print"), InsufficientFunds),
            "insufficient balance: 0.30 available, print costs 0.31",
        )

    def test_offline_policies_never_apply(self) -> None:
        """The primary never goes offline from itself: unknown cards are refused,
        passwords and release allowed, whatever the policies say."""
        for key, value in (
            ("offline.unknown_card", "offline-account"),
            ("offline.password_login", "refuse"),
            ("offline.release", "refuse"),
        ):
            self.policy(key, value)
        gate = self.primary_gate()
        self.assertEqual(self.fails(gate.card("9999", "mfd-1"), AuthFailed), "unknown card")
        self.ok(gate.password("alice", "alice's secret"))
        self.ok(gate.may_release())

    def test_same_uuid_twice(self) -> None:
        """A charge sent twice with the same UUID is applied once."""
        gate = self.primary_gate()
        alice = self.login(gate)
        job = JobInfo("print", None, "hq-laser", pages=3)
        first = self.charge(gate, alice, 30, job=job, txn_uuid="t-1")
        again = self.charge(gate, alice, 30, job=job, txn_uuid="t-1")
        self.assertEqual((first.recorded, again.recorded), (True, False))
        self.assertEqual(again.txn_uuid, "t-1")
        self.assertEqual(ledger_uuids(self.primary).count("t-1"), 1)
        self.assertEqual(len(self.primary.read(thdListJobs, "alice")), 1)
        self.assertEqual(balance(self.primary, alice.user.account_id), 70)

    def test_same_uuid_twice_when_the_balance_is_spent(self) -> None:
        """A resend of a charge that used up the balance is answered as recorded, not
        refused for the balance it already took."""
        gate = self.primary_gate()
        alice = self.login(gate)
        self.charge(gate, alice, 80, txn_uuid="t-2")
        again = self.charge(gate, alice, 80, txn_uuid="t-2")
        self.assertFalse(again.recorded)
        self.assertEqual(again.balance, 20)
        self.assertEqual(balance(self.primary, alice.user.account_id), 20)


class SiteChargeTests(GateTestCase):
    """Charging at a site: one outbox record, the caller is told the view balance."""

    def test_recorded_hook(self) -> None:
        """The gate tells the replication client after each recorded charge."""
        gate = self.site_gate("online")
        calls: list[None] = []
        gate.recorded = lambda: calls.append(None)
        alice = self.login(gate)
        self.charge(gate, alice, 10)
        self.fails(gate.charge(alice, 5_00, "print"), InsufficientFunds)
        self.assertEqual(len(calls), 1)

    def test_negative_cost(self) -> None:
        gate = self.site_gate("online")
        self.fails(gate.charge(self.login(gate), -1, "print"), ValueError)

    def test_user_removed_from_the_replica(self) -> None:
        """A user removed at the primary (and streamed) can no longer be charged."""
        gate = self.site_gate("offline")
        alice = self.login(gate)
        self.primary.write(thdRemoveUser, "alice", NOW)
        sync(self.primary, self.site)
        self.assertEqual(
            self.fails(gate.charge(alice, 10, "print"), Refused), "user 'alice' no longer exists"
        )

    def test_same_uuid_twice(self) -> None:
        """A charge resent with the same UUID at a site is recorded once."""
        gate = self.site_gate("offline")
        alice = self.login(gate)
        first = self.charge(gate, alice, 30, txn_uuid="s-1")
        again = self.charge(gate, alice, 30, txn_uuid="s-1")
        self.assertEqual((first.recorded, again.recorded), (True, False))
        self.assertEqual(len(pending(self.site)), 1)
        self.assertEqual(self.balance_of(gate, alice), 70)
        self.assertEqual(apply(self.primary, [r.payload for r in pending(self.site)]), 1)
        self.assertEqual(balance(self.primary, alice.user.account_id), 70)


class PrimaryConcurrencyPostgresTests(StoreMixin, SynchronousTestCase):
    """Two charges for one user at a PostgreSQL primary, from two writer threads."""

    backend = "postgres"

    def test_concurrent_charges_keep_the_credit_limit(self) -> None:
        """The second of two overlapping charges sees the first one's balance: alice
        (1.00, no credit) charged 0.60 twice at once pays once and is refused once."""
        primary = self.open_primary()
        alice = primary.write(thdAddUser, "alice", NOW, balance=1_00)

        def charge(conn: Connection, txn_uuid: str) -> ChargeResult:
            return thdCharge(
                conn,
                role="primary",
                site="hq",
                user=alice,
                amount=-60,
                reason="print",
                job=None,
                offline=False,
                now=NOW,
                txn_uuid=txn_uuid,
            )

        # The first charge runs to just before its commit; the second checks the
        # balance meanwhile, and reaches the ledger only after the first committed (as
        # thdPost's row lock makes it wait on PostgreSQL).
        first = primary.writer.connect()
        self.addCleanup(first.close)
        first.begin()
        charge(first, "first")
        post = ledger.thdPost

        def post_after_first_commits(*args: Any, **kwargs: Any) -> Any:
            if first.in_transaction():
                first.commit()
            return post(*args, **kwargs)

        self.patch(ledger, "thdPost", post_after_first_commits)
        error = self.assertRaises(InsufficientFunds, primary.write, charge, "second")
        self.assertEqual(str(error), "insufficient balance: 0.40 available, print costs 0.60")
        self.assertEqual(balance(primary, alice.account_id), 40)
        self.assertEqual(ledger_uuids(primary).count("second"), 0)
