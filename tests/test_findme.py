"""Tests of the Find-Me queue (``sitesrv.core.findme``) through its core API.

A primary with printers, users and providers; a site ("north") whose replica is loaded
from it as replication loads one, with a gate in a chosen failover mode. Everything runs
inline on a ``Clock`` (``InlineStore``): no threads, sockets or sleeps. The provider
protocol on top is tested in ``tests/test_providers.py`` with the same fixture.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import select
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from sitesrv.core.auth import Authenticator, FailureThrottle, Identity
from sitesrv.core.findme import (
    NO_SUCH_JOB,
    NOT_SENT,
    PUSHED,
    CannotRecord,
    Credit,
    FindMe,
    JobDetails,
    PrintedReport,
    charge_uuid,
)
from sitesrv.core.gate import Gate, Refused
from sitesrv.failover import Failover
from sitesrv.interfaces import IFindMe
from sitesrv.store import Store, jobqueue, outbox
from sitesrv.store.bootstrap import thdInitPrimary
from sitesrv.store.devices import thdAddProvider
from sitesrv.store.jobs import thdListJobs
from sitesrv.store.ledger import SUSPENSE_ACCOUNT, thdAccount, thdTransactionByUUID
from sitesrv.store.policies import thdSetPolicy
from sitesrv.store.printers import thdAddPrinter
from sitesrv.store.schema import provider_jobs
from sitesrv.store.sites import thdAddSite
from sitesrv.store.users import User, thdAddUser, thdSetDisabled, thdUser
from tests.support import NOW, open_inline_store, run_inline, sqlite_url
from tests.test_outbox import load_snapshot, sync

SITE = "north"
HOUR = 3600.0

#: Failover inputs that bring a fresh machine into each mode (as in test_gate).
PATHS: dict[str, tuple[str, ...]] = {
    "unsynced": (),
    "online": ("replicaFound", "connected", "outboxDrained", "caughtUp"),
    "offline": ("replicaFound",),
}


def feed(failover: Failover, *inputs: str) -> None:
    """Feed failover inputs, each with a reason naming it."""
    for name in inputs:
        getattr(failover.inputs, name)(f"test: {name}")


def uuid_of(n: int) -> str:
    """A recognisable, canonical job UUID."""
    return f"00000000-0000-4000-8000-{n:012d}"


def details(
    n: int, queue: str = "north-hold", user: str = "alice", pages: int = 1, **kw: Any
) -> JobDetails:
    """A job's details as a provider would send them."""
    return JobDetails(
        uuid=uuid_of(n),
        queue=queue,
        user=user,
        document=f"doc{n}.pdf",
        pages=pages,
        size=1000,
        submitted_at=NOW,
        **kw,
    )


class FakeLinks:
    """``ProviderLinks`` that records pushes; providers connect and disconnect at will."""

    def __init__(self, *connected: str) -> None:
        self.up: set[str] = set(connected)
        self.releases: list[tuple[str, str, str, str, str]] = []
        self.deletes: list[tuple[str, list[str], str]] = []
        #: Jobs the provider says it does not have.
        self.missing: set[str] = set()

    def connected(self) -> frozenset[str]:
        return frozenset(self.up)

    def pushRelease(
        self, provider: str, job: str, release_id: str, printer: str, uri: str
    ) -> Deferred[str]:
        if provider not in self.up:
            return Deferred.fromCoroutine(_value(NOT_SENT))
        self.releases.append((provider, job, release_id, printer, uri))
        return Deferred.fromCoroutine(_value(NO_SUCH_JOB if job in self.missing else PUSHED))

    def pushDelete(self, provider: str, jobs: Sequence[str], reason: str) -> Deferred[bool]:
        if provider not in self.up:
            return Deferred.fromCoroutine(_value(False))
        self.deletes.append((provider, list(jobs), reason))
        return Deferred.fromCoroutine(_value(True))


async def _value(value: Any) -> Any:
    return value


class FindMeFixture(SynchronousTestCase):
    """A primary ("hq") with sites north and south, and north's Find-Me queue.

    Printers (minor units per page, mono/colour): north-hold 10/50 (hold/release),
    north-direct 10/50, north-colour 20/60 with 10% off duplex, south-hold and hq-hold.
    Users: alice (restricted, 1.00), bob (unrestricted, 5.00), carol (disabled).
    Providers: north-spool, south-spool, hq-spool. ``role`` picks whether the queue is
    the site's (``mode`` online or offline) or the primary's own.
    """

    role = "site"
    mode = "online"

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.primary = open_inline_store(sqlite_url(self, "primary.db"))
        self.addCleanup(self.primary.stop)
        w = self.primary.write
        w(thdInitPrimary, "hq", "USD", 2, NOW)
        w(thdAddSite, SITE, NOW)
        w(thdAddSite, "south", NOW)
        w(thdAddPrinter, "north-hold", SITE, 10, 50, NOW, hold=True, uri="ipp://nh/ipp/print")
        w(thdAddPrinter, "north-direct", SITE, 10, 50, NOW, uri="socket://nd:9100")
        w(
            thdAddPrinter,
            "north-colour",
            SITE,
            20,
            60,
            NOW,
            duplex_discount=10,
            uri="ipp://nc/ipp/print",
        )
        w(thdAddPrinter, "south-hold", "south", 10, 50, NOW, hold=True)
        w(thdAddPrinter, "hq-hold", "hq", 10, 50, NOW, hold=True, uri="ipp://hq/ipp/print")
        w(thdAddUser, "alice", NOW, balance=1_00)
        w(thdAddUser, "bob", NOW, balance=5_00, restricted=False)
        w(thdAddUser, "carol", NOW, balance=5_00)
        w(thdSetDisabled, "carol", True, NOW)
        self.keys = {
            name: w(thdAddProvider, name, site, NOW)
            for name, site in (("north-spool", SITE), ("south-spool", "south"), ("hq-spool", "hq"))
        }
        self.failover: Failover | None = None
        if self.role == "primary":
            self.store: Store = self.primary
            self.site_name = "hq"
        else:
            self.site_name = SITE
            self.store = open_inline_store(sqlite_url(self, "site.db"))
            self.addCleanup(self.store.stop)
            if self.mode != "unsynced":
                load_snapshot(self.primary, self.store)
            self.failover = Failover(self.clock)
            feed(self.failover, *PATHS[self.mode])
        self.gate = Gate(
            self.role,
            self.site_name,
            Authenticator(
                read=self.store.runRead, throttle=FailureThrottle(self.clock), verify=run_inline
            ),
            self.store.runRead,
            self.store.runWrite,
            self.clock,
            self.failover,
        )
        self.findme = FindMe(self.gate, self.store.runRead, self.store.runWrite, self.clock)
        self.links = FakeLinks("north-spool", "hq-spool")
        self.findme.links = self.links
        self.findme.startService()
        self.addCleanup(self.findme.stopService)

    # -- helpers ----------------------------------------------------------------------

    def policy(self, key: str, value: str) -> None:
        """Set an offline policy at the primary and replicate it to the site."""
        self.primary.write(thdSetPolicy, key, value, NOW)
        if self.store is not self.primary:
            sync(self.primary, self.store)

    def identity(self, username: str = "alice") -> Identity:
        user: User = self.store.read(thdUser, username)
        return Identity(user, "card")

    def ok(self, d: Any) -> Any:
        if not isinstance(d, Deferred):
            d = Deferred.fromCoroutine(d)
        return self.successResultOf(d)

    def fails(self, d: Any, kind: type[Exception]) -> str:
        if not isinstance(d, Deferred):
            d = Deferred.fromCoroutine(d)
        return str(self.failureResultOf(d, kind).value)

    def job(self, n: int) -> jobqueue.ProviderJob:
        job = self.store.read(jobqueue.thdJob, uuid_of(n))
        assert job is not None
        return job

    def charges(self) -> list[tuple[str, int, bool]]:
        """What was charged: (transaction UUID, amount, offline) from the outbox at a site,
        from the ledger at the primary."""
        if self.role == "primary":
            rows = self.primary.read(
                lambda conn: conn.execute(
                    select(provider_jobs.c.uuid).where(provider_jobs.c.state == "printed")
                ).all()
            )
            found = []
            for row in rows:
                job = self.store.read(jobqueue.thdJob, row.uuid)
                assert job is not None
                txn = self.primary.read(
                    thdTransactionByUUID, charge_uuid(job.uuid, job.release_id or "")
                )
                if txn is not None:
                    found.append((txn.uuid, txn.amount, False))
            return found
        return [
            (p.uuid, p.payload["amount"], p.payload["offline"])
            for p in self.store.read(outbox.thdPending, 0, 1000)
            if p.payload["kind"] == "charge"
        ]

    def report_printed(
        self, n: int, release_id: str, printer: str = "north-hold", pages: int = 1, **kw: Any
    ) -> Any:
        report = PrintedReport(details(n, pages=pages, **kw), release_id, printer, NOW)
        return self.ok(self.findme.printed("north-spool", report))


class CoreTests(FindMeFixture):
    """The pieces: charge UUIDs, credit wording, the interface."""

    def test_provides_ifindme(self) -> None:
        """FindMe implements IFindMe completely."""
        self.assertTrue(verifyObject(IFindMe, self.findme))

    def test_charge_uuid_is_deterministic(self) -> None:
        """The same job and release give the same transaction UUID; another release not."""
        self.assertEqual(charge_uuid(uuid_of(1), "r"), charge_uuid(uuid_of(1), "r"))
        self.assertNotEqual(charge_uuid(uuid_of(1), "r"), charge_uuid(uuid_of(1), "s"))
        self.assertNotEqual(charge_uuid(uuid_of(1), "r"), charge_uuid(uuid_of(2), "r"))

    def test_shortfall_wording(self) -> None:
        """The denial reads as an administrator expects, counting released jobs."""
        credit = Credit(1, view=1_60, floor=0, what="balance", releasing=1_20, decimals=2)
        self.assertEqual(
            credit.shortfall(1_20), "insufficient balance: 0.40 available, job costs 1.20"
        )
        self.assertIsNone(credit.shortfall(40))
        unlimited = Credit(1, view=-5_00, floor=None, what="balance", releasing=0, decimals=2)
        self.assertIsNone(unlimited.shortfall(10_00))


class DecisionTests(FindMeFixture):
    """Print, hold or deny, with the reason and the cost estimate."""

    def test_hold_queue_holds(self) -> None:
        """A job on a hold queue is held until an absolute expiry 8 h away."""
        decision = self.ok(self.findme.decide("north-spool", details(1, pages=3)))
        self.assertEqual(decision.decision, "hold")
        self.assertEqual(decision.cost, 30)
        self.assertEqual(decision.expires_at, NOW + 8 * HOUR)
        self.assertIn("held for release", decision.reason)
        self.assertEqual(self.job(1).state, "held")
        held = self.ok(self.findme.held(self.identity()))
        self.assertEqual([h.uuid for h in held], [uuid_of(1)])
        self.assertEqual(held[0].document, "doc1.pdf")

    def test_direct_queue_prints(self) -> None:
        """A job on a plain queue prints now, with a release id and the printer's URI."""
        decision = self.ok(
            self.findme.decide("north-spool", details(1, queue="north-direct", pages=2))
        )
        self.assertEqual(decision.decision, "print")
        self.assertEqual((decision.printer, decision.uri), ("north-direct", "socket://nd:9100"))
        self.assertEqual(decision.cost, 20)
        self.assertTrue(decision.release_id)
        self.assertEqual(self.job(1).state, "releasing")

    def test_insufficient_balance_denied(self) -> None:
        """A job over the user's balance is denied with the amounts in words."""
        decision = self.ok(
            self.findme.decide("north-spool", details(1, pages=12, queue="north-direct"))
        )
        self.assertEqual(decision.decision, "deny")
        self.assertEqual(decision.reason, "insufficient balance: 1.00 available, job costs 1.20")
        self.assertEqual(decision.cost, 1_20)
        held = self.ok(self.findme.decide("north-spool", details(2, pages=12)))
        self.assertEqual(held.decision, "deny")

    def test_released_jobs_count_against_the_balance(self) -> None:
        """Jobs printing now but not yet charged reduce what the next job may cost."""
        first = self.ok(
            self.findme.decide("north-spool", details(1, queue="north-direct", pages=6))
        )
        self.assertEqual(first.decision, "print")
        second = self.ok(
            self.findme.decide("north-spool", details(2, queue="north-direct", pages=6))
        )
        self.assertEqual(second.decision, "deny")
        self.assertEqual(second.reason, "insufficient balance: 0.40 available, job costs 0.60")

    def test_unrestricted_user_prints_anything(self) -> None:
        """An unrestricted account has no floor."""
        decision = self.ok(
            self.findme.decide(
                "north-spool", details(1, queue="north-direct", user="bob", pages=900)
            )
        )
        self.assertEqual(decision.decision, "print")

    def test_colour_duplex_priced_by_the_queue(self) -> None:
        """The estimate uses the queue's colour price and duplex discount."""
        decision = self.ok(
            self.findme.decide(
                "north-spool",
                details(1, queue="north-colour", user="bob", pages=3, colour=True, duplex=True),
            )
        )
        self.assertEqual(decision.cost, (180 * 90 + 50) // 100)

    def test_unknown_user_queue_and_disabled_user_denied(self) -> None:
        """Who and where are checked, each with its own reason."""
        cases = {
            2: (details(2, user="mallory"), "unknown user 'mallory'"),
            3: (details(3, user="carol"), "user 'carol' is disabled"),
            4: (details(4, queue="nowhere"), "unknown queue 'nowhere'"),
            # A site's replica knows only its own site's printers by site.
            5: (details(5, queue="south-hold"), "no printer of that name at site 'north'"),
        }
        for n, (job, reason) in cases.items():
            decision = self.ok(self.findme.decide("north-spool", job))
            self.assertEqual(decision.decision, "deny", n)
            self.assertIn(reason, decision.reason)
            self.assertEqual(self.job(n).state, "denied")

    def test_asking_again_gets_the_same_answer(self) -> None:
        """A resubmitted job is not a second job: same decision, same release id."""
        first = self.ok(self.findme.decide("north-spool", details(1, queue="north-direct")))
        again = self.ok(self.findme.decide("north-spool", details(1, queue="north-direct")))
        self.assertEqual(first, again)
        held = self.ok(self.findme.decide("north-spool", details(2)))
        self.assertEqual(self.ok(self.findme.decide("north-spool", details(2))), held)
        self.assertEqual(
            self.store.read(lambda c: c.execute(select(provider_jobs.c.id)).all()).__len__(), 2
        )

    def test_other_providers_uuid_is_a_conflict(self) -> None:
        """A job UUID already recorded for another provider is refused."""
        self.ok(self.findme.decide("north-spool", details(1)))
        self.fails(self.findme.decide("other-spool", details(1)), Exception)


class ReleaseTests(FindMeFixture):
    """Release to any printer of the site, checked again; charged once when printed."""

    def hold(self, *numbers: int, user: str = "alice", pages: int = 1) -> None:
        for n in numbers:
            decision = self.ok(
                self.findme.decide("north-spool", details(n, user=user, pages=pages))
            )
            self.assertEqual(decision.decision, "hold")

    def test_release_print_charge_once(self) -> None:
        """Held → released → printed: one charge, at the price of the printer used."""
        self.hold(1, pages=2)
        outcomes = self.ok(self.findme.release(self.identity(), "north-colour"))
        self.assertEqual([(o.job, o.released) for o in outcomes], [(uuid_of(1), True)])
        self.assertEqual(outcomes[0].cost, 40)
        [(provider, job, release_id, printer, uri)] = self.links.releases
        self.assertEqual(
            (provider, job, printer, uri),
            ("north-spool", uuid_of(1), "north-colour", "ipp://nc/ipp/print"),
        )
        self.assertEqual(self.job(1).state, "releasing")
        result = self.report_printed(1, release_id, printer="north-colour", pages=2)
        self.assertEqual((result.charged, result.recorded), (40, True))
        self.assertEqual(self.job(1).state, "printed")
        self.assertEqual(self.charges(), [(charge_uuid(uuid_of(1), release_id), -40, False)])
        self.assertEqual(self.ok(self.findme.held(self.identity())), [])

    def test_duplicate_printed_report_charges_once(self) -> None:
        """A report resent (its answer was lost) is answered without a second charge."""
        self.hold(1)
        self.ok(self.findme.release(self.identity(), "north-hold"))
        release_id = self.links.releases[0][2]
        self.assertTrue(self.report_printed(1, release_id).recorded)
        again = self.report_printed(1, release_id)
        self.assertEqual((again.charged, again.recorded), (10, False))
        self.assertEqual(len(self.charges()), 1)

    def test_job_events_for_metrics(self) -> None:
        """Each job event is reported once (the server counts them in /metrics)."""
        events: list[str] = []
        self.findme.on_event = events.append
        self.hold(1)
        self.ok(self.findme.release(self.identity(), "north-hold"))
        release_id = self.links.releases[0][2]
        self.report_printed(1, release_id)
        self.report_printed(1, release_id)  # a resent report is not a second print
        self.assertEqual(events, ["held", "released", "printed"])

    def test_recheck_at_release(self) -> None:
        """With 1.00, ten held 1.00 jobs: one releases, nine stay held with the reason."""
        self.hold(*range(1, 11), pages=10)
        outcomes = self.ok(self.findme.release(self.identity(), "north-hold"))
        self.assertEqual([o.released for o in outcomes], [True] + [False] * 9)
        self.assertEqual(
            outcomes[1].reason,
            "insufficient balance: 0.00 available, job costs 1.00; the job stays held",
        )
        self.assertEqual(len(self.links.releases), 1)
        self.assertEqual(len(self.ok(self.findme.held(self.identity()))), 9)
        # A second attempt while the first is still printing changes nothing.
        again = self.ok(self.findme.release(self.identity(), "north-hold"))
        self.assertFalse(any(o.released for o in again))

    def test_release_checks_target_price(self) -> None:
        """A job affordable at its queue's price may not be at the target's."""
        self.hold(1, pages=6)
        [outcome] = self.ok(self.findme.release(self.identity(), "north-colour"))
        self.assertFalse(outcome.released)
        self.assertIn("job costs 1.20", outcome.reason)
        [outcome] = self.ok(self.findme.release(self.identity(), "north-direct"))
        self.assertTrue(outcome.released)

    def test_release_only_at_this_site(self) -> None:
        """A printer of another site is refused; so is an unknown printer."""
        self.hold(1)
        reason = self.fails(self.findme.release(self.identity(), "south-hold"), Exception)
        self.assertEqual(reason, "no printer named 'south-hold'")
        self.fails(self.findme.release(self.identity(), "nowhere"), Exception)
        self.assertEqual(self.job(1).state, "held")

    def test_release_named_jobs(self) -> None:
        """Only the jobs named are released; others' and unknown jobs are reported."""
        self.hold(1, 2)
        self.hold(3, user="bob")
        outcomes = self.ok(
            self.findme.release(
                self.identity(), "north-hold", [uuid_of(2), uuid_of(3), uuid_of(9)]
            )
        )
        self.assertEqual(
            sorted((o.job, o.released) for o in outcomes),
            [(uuid_of(2), True), (uuid_of(3), False), (uuid_of(9), False)],
        )
        self.assertEqual(self.job(1).state, "held")
        self.assertEqual(self.job(3).state, "held")

    def test_provider_not_connected_keeps_job_held(self) -> None:
        """A job whose spool is at a provider that is not connected cannot be released."""
        self.hold(1)
        self.links.up.clear()
        [outcome] = self.ok(self.findme.release(self.identity(), "north-hold"))
        self.assertFalse(outcome.released)
        self.assertIn("not connected", outcome.reason)
        self.assertEqual(self.job(1).state, "held")

    def test_provider_without_the_job_fails_it(self) -> None:
        """A release the provider answers with 'no such job' leaves the job failed."""
        self.hold(1)
        self.links.missing.add(uuid_of(1))
        self.ok(self.findme.release(self.identity(), "north-hold"))
        self.assertEqual(self.job(1).state, "failed")
        self.assertEqual(self.charges(), [])

    def test_failed_and_cancelled_reports_are_not_charged(self) -> None:
        """Failed and cancelled jobs are recorded, not charged; late ones change nothing."""
        self.hold(1, 2)
        self.ok(self.findme.release(self.identity(), "north-hold", [uuid_of(1)]))
        release_id = self.links.releases[0][2]
        self.ok(self.findme.failed("north-spool", uuid_of(1), release_id, "printer on fire"))
        self.ok(self.findme.cancelledAtProvider("north-spool", uuid_of(2), "", "by admin"))
        self.assertEqual((self.job(1).state, self.job(1).reason), ("failed", "printer on fire"))
        self.assertEqual(self.job(2).state, "cancelled")
        self.ok(self.findme.failed("north-spool", uuid_of(2), "", "late"))
        self.assertEqual(self.job(2).state, "cancelled")
        self.assertEqual(self.charges(), [])

    def test_cancel_tells_the_provider(self) -> None:
        """The owner cancels held jobs; the provider is told to delete them."""
        self.hold(1, 2)
        self.assertEqual(self.ok(self.findme.cancel(self.identity(), [uuid_of(1)])), 1)
        self.assertEqual(
            self.links.deletes, [("north-spool", [uuid_of(1)], "cancelled by its owner")]
        )
        self.assertTrue(self.job(1).provider_told)
        self.assertEqual(self.ok(self.findme.cancel(self.identity())), 1)
        self.assertEqual(self.job(2).state, "cancelled")

    def test_printed_unasked_is_charged_once(self) -> None:
        """A job printed while the server was unreachable ("print and report later")."""
        result = self.report_printed(7, "", printer="north-direct", pages=3)
        self.assertEqual((result.charged, result.recorded), (30, True))
        self.assertEqual(self.job(7).state, "printed")
        self.assertFalse(self.report_printed(7, "", printer="north-direct", pages=3).recorded)
        self.assertEqual(len(self.charges()), 1)

    def test_printed_beyond_balance_goes_to_suspense(self) -> None:
        """A job that printed more pages than the user can pay for is still recorded."""
        self.hold(1)
        self.ok(self.findme.release(self.identity(), "north-hold"))
        release_id = self.links.releases[0][2]
        result = self.report_printed(1, release_id, pages=50)
        self.assertEqual(result.charged, 5_00)
        suspense = self.store.read(thdAccount, SUSPENSE_ACCOUNT)
        [record] = [p for p in self.store.read(outbox.thdPending, 0, 100)]
        self.assertEqual(
            (record.payload["account_id"], record.payload["amount"]), (suspense.id, -5_00)
        )
        self.assertEqual(record.payload["username"], "alice")


class ExpiryTests(FindMeFixture):
    """Held jobs expire at their stored absolute time, on the clock."""

    def test_expires_at_the_stored_time(self) -> None:
        """Not a second early; then the provider is told to delete it."""
        self.ok(self.findme.decide("north-spool", details(1)))
        self.clock.advance(8 * HOUR - 1)
        self.assertEqual(self.job(1).state, "held")
        self.clock.advance(1)
        self.assertEqual(self.job(1).state, "expired")
        self.assertEqual(
            self.links.deletes, [("north-spool", [uuid_of(1)], "not released before it expired")]
        )

    def test_clock_jump_does_not_mass_expire(self) -> None:
        """A jump expires only the jobs whose stored time has passed."""
        for n in (1, 2, 3):
            self.ok(self.findme.decide("north-spool", details(n)))
            self.clock.advance(HOUR)
        # Now NOW + 3 h; the jobs expire at NOW + 8, 9 and 10 h.
        self.clock.advance(5.5 * HOUR)
        self.assertEqual([self.job(n).state for n in (1, 2, 3)], ["expired", "held", "held"])

    def test_told_when_the_provider_next_connects(self) -> None:
        """Jobs that expired while their provider was away are deleted when it is back."""
        self.ok(self.findme.decide("north-spool", details(1)))
        self.links.up.clear()
        self.clock.advance(9 * HOUR)
        self.assertEqual(self.job(1).state, "expired")
        self.assertFalse(self.job(1).provider_told)
        self.links.up.add("north-spool")
        self.assertEqual(self.ok(self.findme.tellProvider("north-spool")), 1)
        self.assertTrue(self.job(1).provider_told)

    def test_configured_hold_time(self) -> None:
        """The hold time is a setting; the expiry is stored when the job is held."""
        self.findme.hold_seconds = HOUR
        decision = self.ok(self.findme.decide("north-spool", details(1)))
        self.assertEqual(decision.expires_at, NOW + HOUR)
        self.findme.hold_seconds = 8 * HOUR
        self.clock.advance(HOUR)
        self.assertEqual(self.job(1).state, "expired")

    def test_printed_after_expiry_is_still_charged(self) -> None:
        """A released job reported printed after it expired was printed: charged once."""
        self.ok(self.findme.decide("north-spool", details(1)))
        self.ok(self.findme.release(self.identity(), "north-hold"))
        release_id = self.links.releases[0][2]
        self.clock.advance(9 * HOUR)
        self.assertEqual(self.job(1).state, "expired")
        self.assertTrue(self.report_printed(1, release_id).recorded)
        self.assertEqual(len(self.charges()), 1)


class OfflineTests(FindMeFixture):
    """A site cut off from its primary: the offline policies decide."""

    mode = "offline"

    def test_release_allowed_by_default(self) -> None:
        """offline.release = allow: released, and the charge waits in the outbox."""
        self.ok(self.findme.decide("north-spool", details(1)))
        [outcome] = self.ok(self.findme.release(self.identity(), "north-hold"))
        self.assertTrue(outcome.released)
        release_id = self.links.releases[0][2]
        self.report_printed(1, release_id)
        self.assertEqual(self.charges(), [(charge_uuid(uuid_of(1), release_id), -10, True)])

    def test_release_refused_by_policy(self) -> None:
        """offline.release = refuse: the job stays held."""
        self.policy("offline.release", "refuse")
        self.ok(self.findme.decide("north-spool", details(1)))
        reason = self.fails(self.findme.release(self.identity(), "north-hold"), Refused)
        self.assertEqual(reason, "release is not available while the site is offline")
        self.assertEqual(self.job(1).state, "held")

    def test_allowance_replaces_credit(self) -> None:
        """Offline, the offline allowance is the floor."""
        self.policy("offline.allowance", "0.50")
        decision = self.ok(
            self.findme.decide("north-spool", details(1, queue="north-direct", pages=16))
        )
        self.assertEqual(
            decision.reason, "insufficient offline allowance: 1.50 available, job costs 1.60"
        )

    def test_charging_refused_offline(self) -> None:
        """offline.account = refuse: direct jobs are denied, held jobs wait, and a printed
        report is refused for now (the provider resends it once the site is back)."""
        self.policy("offline.account", "refuse")
        denied = self.ok(self.findme.decide("north-spool", details(1, queue="north-direct")))
        self.assertEqual(denied.decision, "deny")
        self.assertIn("offline", denied.reason)
        held = self.ok(self.findme.decide("north-spool", details(2)))
        self.assertEqual(held.decision, "hold")
        report = PrintedReport(details(3, queue="north-direct"), "", "north-direct", NOW)
        self.fails(self.findme.printed("north-spool", report), CannotRecord)
        self.assertIsNone(self.store.read(jobqueue.thdJob, uuid_of(3)))


class UnsyncedTests(FindMeFixture):
    """A site without a replica decides nothing."""

    mode = "unsynced"

    def test_not_serving(self) -> None:
        """Decisions are refused as 'cannot record now'."""
        reason = self.fails(self.findme.decide("north-spool", details(1)), CannotRecord)
        self.assertEqual(reason, "site not yet synchronised with the primary")


class PrimaryTests(FindMeFixture):
    """The primary's own providers: charges go straight to the ledger."""

    role = "primary"

    def test_other_sites_printers(self) -> None:
        """The primary knows every site's printers, and says where one is."""
        decision = self.ok(self.findme.decide("hq-spool", details(1, queue="south-hold")))
        self.assertEqual(
            decision.reason, "queue 'south-hold' is a printer at site 'south', not at 'hq'"
        )
        reason = self.fails(self.findme.release(self.identity(), "north-hold"), Exception)
        self.assertEqual(
            reason,
            "printer 'north-hold' is at site 'north'; jobs held here print only at site 'hq'",
        )

    def test_release_print_charge_once(self) -> None:
        """Charged once in the ledger with the derived transaction UUID and a job log."""
        decision = self.ok(self.findme.decide("hq-spool", details(1, queue="hq-hold", pages=4)))
        self.assertEqual(decision.decision, "hold")
        self.ok(self.findme.release(self.identity(), "hq-hold"))
        [(_p, _j, release_id, _printer, _uri)] = self.links.releases
        report = PrintedReport(details(1, queue="hq-hold", pages=4), release_id, "hq-hold", NOW)
        self.assertTrue(self.ok(self.findme.printed("hq-spool", report)).recorded)
        self.assertFalse(self.ok(self.findme.printed("hq-spool", report)).recorded)
        txn = self.primary.read(thdTransactionByUUID, charge_uuid(uuid_of(1), release_id))
        assert txn is not None
        self.assertEqual((txn.amount, txn.balance_after, txn.job_uuid), (-40, 60, uuid_of(1)))
        [logged] = self.primary.read(thdListJobs, "alice")
        self.assertEqual((logged.pages, logged.cost, logged.printer_name), (4, 40, "hq-hold"))
