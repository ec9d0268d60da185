"""Tests of the print-provider protocol (port 9191) over ``iosim``, socket-free.

A fake provider (``FakeProvider``: AMP with heartbeats, as ``sitesrv-provider`` is)
talks to north's ``ProviderService`` through ``tests.support.Wire``, whose directions can
be stalled and whose link can be cut. Stores run inline on a ``Clock``; the fixture is
the Find-Me queue's (``tests/test_findme.py``).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.protocol import connectionDone
from twisted.protocols import amp
from twisted.python.failure import Failure

from sitesrv.core.findme import charge_uuid
from sitesrv.providers.commands import (
    MAX_ANNOUNCE,
    MAX_QUEUES,
    PROVIDER_PROTOCOL_VERSION,
    AnnounceHeld,
    AnnounceQueues,
    BadKey,
    DeleteJobs,
    InvalidRequest,
    JobCancelled,
    JobFailed,
    JobPrinted,
    NotAuthenticated,
    NotServing,
    ProviderHello,
    Release,
    SubmitJob,
    UnknownJob,
    UnknownProvider,
    VersionRefused,
)
from sitesrv.providers.server import ProviderService
from sitesrv.replication.liveness import LivenessAMP
from sitesrv.store import jobqueue
from sitesrv.store.devices import thdRotateProviderKey
from sitesrv.store.schema import provider_jobs
from tests.support import NOW, Wire, settle
from tests.test_findme import HOUR, FindMeFixture, feed, uuid_of
from tests.test_outbox import sync


class FakeProvider(LivenessAMP):
    """The provider's end: records what the server pushes, as a provider stores it."""

    def __init__(self, clock: Any, monotonic: Any) -> None:
        super().__init__(clock=clock, monotonic=monotonic)
        self.releases: list[tuple[str, str, str, str]] = []
        self.deletes: list[tuple[list[str], str]] = []
        self.missing: set[str] = set()
        self.lost: list[Failure] = []

    @Release.responder
    def release(self, job: str, release_id: str, printer: str, uri: str) -> dict[str, Any]:
        if job in self.missing:
            raise UnknownJob(f"job {job} is not in the spool")
        self.releases.append((job, release_id, printer, uri))
        return {}

    @DeleteJobs.responder
    def deleteJobs(self, jobs: list[str], reason: str) -> dict[str, Any]:
        self.deletes.append((list(jobs), reason))
        return {}

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost.append(reason)
        super().connectionLost(reason)


def job_fields(
    n: int, queue: str = "north-hold", user: str = "alice", **kw: Any
) -> dict[str, Any]:
    """``JOB_FIELDS`` for job ``n``."""
    fields: dict[str, Any] = {
        "job": uuid_of(n),
        "queue": queue,
        "user": user,
        "document": f"doc{n}.pdf",
        "pages": 1,
        "copies": 1,
        "colour": False,
        "duplex": False,
        "size": 1000,
        "submitted_at": NOW,
    }
    fields.update(kw)
    return fields


class ProtocolFixture(FindMeFixture):
    """North's provider listener with the Find-Me queue behind it."""

    def setUp(self) -> None:
        super().setUp()
        #: The monotonic clock heartbeats measure silence with; moved only on purpose.
        self.mono = 0.0
        self.service = ProviderService(
            self.findme,
            self.gate,
            self.store.runRead,
            "north-server",
            self.clock,
            heartbeat=5.0,
            monotonic=lambda: self.mono,
        )
        self.findme.links = self.service
        self.service.startService()
        self.addCleanup(self.service.stopService)
        self.wires: list[Wire] = []

    def connect(self) -> tuple[FakeProvider, Wire]:
        client = FakeProvider(self.clock, lambda: self.mono)
        server = self.service.factory().buildProtocol(IPv4Address("TCP", "192.0.2.7", 40000))
        wire = Wire(client, server, self.clock)
        self.wires.append(wire)
        return client, wire

    def settle(self) -> None:
        settle(self.clock, self.wires)

    def call(self, client: FakeProvider, command: type[amp.Command], **kw: Any) -> Deferred[Any]:
        # AMP hands an error nobody has handled by the time it arrives to its own
        # unhandledError: take the result before the answer can arrive.
        result: Deferred[Any] = Deferred()
        client.callRemote(command, **kw).chainDeferred(result)
        self.settle()
        return result

    def answer(self, client: FakeProvider, command: type[amp.Command], **kw: Any) -> Any:
        return self.successResultOf(self.call(client, command, **kw))

    def refused(
        self, client: FakeProvider, command: type[amp.Command], kind: type[Exception], **kw: Any
    ) -> str:
        return str(self.failureResultOf(self.call(client, command, **kw), kind).value)

    def hello(
        self, provider: str = "north-spool", key: str | None = None, **kw: Any
    ) -> Deferred[Any]:
        client, _wire = self.connect()
        self.client = client
        arguments = {
            "provider": provider,
            "key": self.keys.get(provider, "x" * 43) if key is None else key,
            "software_version": "test-provider 1",
            "protocol_version": PROVIDER_PROTOCOL_VERSION,
            "provider_time": NOW,
        }
        arguments.update(kw)
        return self.call(client, ProviderHello, **arguments)

    def online(self, provider: str = "north-spool") -> FakeProvider:
        """A provider that said hello successfully."""
        answer = self.successResultOf(self.hello(provider))
        # As a real provider does: heartbeats at the interval the server asked for.
        self.client.startHeartbeat(answer["heartbeat"])
        return self.client

    def submit(self, client: FakeProvider, n: int, **kw: Any) -> dict[str, Any]:
        return self.answer(client, SubmitJob, **job_fields(n, **kw))

    def printed(
        self, client: FakeProvider, n: int, release_id: str, printer: str = "north-hold", **kw: Any
    ) -> Deferred[Any]:
        return self.call(
            client,
            JobPrinted,
            **job_fields(n, **kw),
            release_id=release_id,
            printer=printer,
            printed_at=NOW,
        )

    def rows(self) -> int:
        return int(
            self.store.read(
                lambda c: c.execute(select(func.count()).select_from(provider_jobs)).scalar_one()
            )
        )


class HelloTests(ProtocolFixture):
    """Only known providers of this site, with their current key, get in."""

    def test_accepted(self) -> None:
        """The answer names the server, its site, heartbeat and currency."""
        answer = self.successResultOf(self.hello())
        self.assertEqual(answer["server"], "north-server")
        self.assertEqual(answer["site"], "north")
        self.assertEqual(answer["heartbeat"], 5.0)
        self.assertEqual((answer["currency"], answer["decimals"]), ("USD", 2))
        self.assertEqual(self.service.connected(), frozenset({"north-spool"}))

    def assertRefused(self, d: Deferred[Any], kind: type[Exception], text: str) -> None:
        self.assertIn(text, str(self.failureResultOf(d, kind).value))
        self.assertTrue(self.wires[-1].closed)
        self.assertEqual(self.service.connected(), frozenset())

    def test_wrong_key(self) -> None:
        """A mistyped or rotated key is refused and the link closed."""
        self.assertRefused(self.hello(key="not-the-key"), BadKey, "wrong key for print provider")
        self.assertRefused(self.hello(key="k" * 5000), BadKey, "wrong key")

    def test_unknown_provider(self) -> None:
        """A provider never added (or removed) is refused."""
        self.assertRefused(
            self.hello("nobody"), UnknownProvider, "no print provider named 'nobody'"
        )

    def test_other_sites_provider(self) -> None:
        """Another site's provider is unknown here (its record is not replicated here)."""
        self.assertRefused(
            self.hello("south-spool", key=self.keys["south-spool"]),
            UnknownProvider,
            "no print provider named 'south-spool'",
        )

    def test_version(self) -> None:
        """Another protocol version is refused, naming both."""
        self.assertRefused(self.hello(protocol_version=99), VersionRefused, "protocol 99")

    def test_commands_before_hello(self) -> None:
        """Nothing is answered before a hello."""
        client, _wire = self.connect()
        self.refused(client, SubmitJob, NotAuthenticated, **job_fields(1))

    def test_key_rotated_while_connected(self) -> None:
        """A rotated key closes the live link within the check interval; the old key is
        refused from then on."""
        client = self.online()
        self.primary.write(thdRotateProviderKey, "north-spool", NOW)
        sync(self.primary, self.store)
        self.clock.advance(5.0)
        self.settle()
        self.assertTrue(self.wires[0].closed)
        self.assertTrue(client.lost)
        self.assertRefused(self.hello(), BadKey, "wrong key")

    def test_no_hello_closes(self) -> None:
        """A connection that never says hello is closed after 30 s."""
        self.connect()
        self.clock.advance(29)
        self.settle()
        self.assertFalse(self.wires[0].closed)
        self.clock.advance(1)
        self.settle()
        self.assertTrue(self.wires[0].closed)

    def test_endless_box_dropped(self) -> None:
        """A box that never ends (valid keys, no terminator) is cut off at 1 MiB."""
        client = self.online()
        chunk = b"".join(
            len(k).to_bytes(2, "big") + k + (60_000).to_bytes(2, "big") + b"v" * 60_000
            for k in (b"k%d" % i for i in range(20))
        )
        self.wires[0].clientIO.write(chunk)
        self.settle()
        self.assertTrue(self.wires[0].closed)
        self.assertTrue(client.lost)

    def test_new_link_replaces_old(self) -> None:
        """A provider that reconnects before its old link timed out replaces it."""
        self.online()
        self.online()
        self.assertTrue(self.wires[0].closed)
        self.assertFalse(self.wires[1].closed)
        self.assertEqual(self.service.connected(), frozenset({"north-spool"}))

    def test_silent_provider_dropped(self) -> None:
        """A provider silent for three heartbeats is dropped; a live one is not."""
        self.online()
        for _ in range(4):
            self.mono += 5.0
            self.clock.advance(5.0)
            self.settle()
        self.assertFalse(self.wires[0].closed)
        self.wires[0].to_server = False
        for _ in range(4):
            self.mono += 5.0
            self.clock.advance(5.0)
            self.settle()
        self.assertEqual(self.service.connected(), frozenset())


class QueueTests(ProtocolFixture):
    """Queue announcement: known queues with their details, unknown ones with reasons."""

    def test_announce(self) -> None:
        client = self.online()
        answer = self.answer(
            client, AnnounceQueues, queues=["north-hold", "north-direct", "lobby", "south-hold"]
        )
        self.assertEqual(
            [(q["name"], q["hold"], q["uri"], q["price_mono"]) for q in answer["known"]],
            [
                ("north-hold", True, "ipp://nh/ipp/print", 10),
                ("north-direct", False, "socket://nd:9100", 10),
            ],
        )
        self.assertEqual(
            answer["unknown"],
            [
                {"name": "lobby", "reason": "no printer named 'lobby' (add it at the primary)"},
                {
                    "name": "south-hold",
                    "reason": "no printer named 'south-hold' (add it at the primary)",
                },
            ],
        )

    def test_limits(self) -> None:
        """Too many queues, or a queue name that is too long, is an invalid request."""
        client = self.online()
        self.refused(
            client, AnnounceQueues, InvalidRequest, queues=[f"q{i}" for i in range(MAX_QUEUES + 1)]
        )
        text = self.refused(client, AnnounceQueues, InvalidRequest, queues=["q" * 201])
        self.assertEqual(text, "queue is longer than 200 characters")
        self.assertFalse(self.wires[0].closed)


class DecisionTests(ProtocolFixture):
    """SubmitJob: print, hold or deny, with the reason in words and the estimate."""

    def test_decisions(self) -> None:
        client = self.online()
        held = self.submit(client, 1, pages=3)
        self.assertEqual((held["decision"], held["cost"], held["release_id"]), ("hold", 30, ""))
        self.assertEqual(held["expires_at"], NOW + 8 * HOUR)
        printing = self.submit(client, 2, queue="north-direct", pages=2)
        self.assertEqual(
            (printing["decision"], printing["printer"], printing["uri"], printing["cost"]),
            ("print", "north-direct", "socket://nd:9100", 20),
        )
        self.assertTrue(printing["release_id"])
        denied = self.submit(client, 3, queue="north-direct", pages=9)
        self.assertEqual(denied["decision"], "deny")
        self.assertEqual(denied["reason"], "insufficient balance: 0.80 available, job costs 0.90")
        unknown = self.submit(client, 4, user="mallory")
        self.assertEqual(
            (unknown["decision"], unknown["reason"]), ("deny", "unknown user 'mallory'")
        )

    def test_resubmission_is_one_job(self) -> None:
        """A SubmitJob whose answer was lost is asked again: same answer, one record."""
        client = self.online()
        first = self.submit(client, 1, queue="north-direct")
        self.assertEqual(self.submit(client, 1, queue="north-direct"), first)
        self.assertEqual(self.rows(), 1)

    def test_field_limits(self) -> None:
        """Malformed fields are refused by name; the link stays up."""
        client = self.online()
        cases = {
            "job is not a UUID": job_fields(1, job="not-a-uuid"),
            "lower-case": job_fields(1, job="00000000-0000-4000-8000-00000000000A"),
            "pages must be from 0 to 100000": job_fields(1, pages=100_001),
            "copies must be from 1 to 9999": job_fields(1, copies=0),
            "user is empty": job_fields(1, user=""),
            "user contains control characters": job_fields(1, user="al\nice"),
            "submitted_at": job_fields(1, submitted_at=float("nan")),
        }
        for text, fields in cases.items():
            d = self.call(client, SubmitJob, **fields)
            self.assertIn(text, str(self.failureResultOf(d, InvalidRequest).value), fields)
        self.assertEqual(self.rows(), 0)
        # Long document names are cut, not refused.
        self.submit(client, 2, document="d" * 5000)
        self.assertEqual(len(self.job(2).document), 500)
        self.assertFalse(self.wires[0].closed)

    def test_malformed_frame_closes_only_that_link(self) -> None:
        """Garbage on one link closes it; another provider link keeps working."""
        client = self.online()
        _other, wire = self.connect()
        wire.clientIO.write(b"\xff" * 70_000)
        self.settle()
        self.assertTrue(wire.closed)
        self.assertFalse(self.wires[0].closed)
        self.assertEqual(self.submit(client, 1)["decision"], "hold")
        self.flushLoggedErrors()

    def test_not_serving(self) -> None:
        """A site that has lost its replica's validity (revoked) turns providers away."""
        feed(self.failover, "revoked")  # type: ignore[arg-type]
        self.assertIn(
            "site revoked by the primary",
            str(self.failureResultOf(self.hello(), NotServing).value),
        )


class ReleaseTests(ProtocolFixture):
    """Held → Release pushed → JobPrinted: charged once, whatever is lost on the way."""

    def hold(self, client: FakeProvider, *numbers: int, pages: int = 1) -> None:
        for n in numbers:
            self.assertEqual(self.submit(client, n, pages=pages)["decision"], "hold")

    def release(self, *uuids: str, printer: str = "north-hold") -> list[Any]:
        d = self.findme.release(self.identity(), printer, list(uuids) or None)
        self.settle()
        return self.successResultOf(d)

    def test_release_printed_charged_once(self) -> None:
        """The push names the printer and a release id; the report charges once."""
        client = self.online()
        self.hold(client, 1, pages=2)
        [outcome] = self.release(printer="north-colour")
        self.assertTrue(outcome.released)
        [(job, release_id, printer, uri)] = client.releases
        self.assertEqual((job, printer, uri), (uuid_of(1), "north-colour", "ipp://nc/ipp/print"))
        first = self.successResultOf(self.printed(client, 1, release_id, "north-colour", pages=2))
        self.assertEqual(first, {"charged": 40, "recorded": True})
        # The answer was lost; the provider resends from its disk.
        again = self.successResultOf(self.printed(client, 1, release_id, "north-colour", pages=2))
        self.assertEqual(again, {"charged": 40, "recorded": False})
        self.assertEqual(self.charges(), [(charge_uuid(uuid_of(1), release_id), -40, False)])

    def test_release_lost_as_the_link_drops(self) -> None:
        """A Release pushed as the link drops is delivered again after the reconnect:
        printed once, charged once, and the job is never released twice."""
        client = self.online()
        self.hold(client, 1)
        self.wires[0].to_client = False
        [outcome] = self.release()
        self.assertTrue(outcome.released)
        self.wires[0].clientIO.loseConnection()
        self.settle()
        self.assertEqual(client.releases, [])
        self.assertEqual(self.job(1).state, "releasing")
        release_id = self.job(1).release_id
        # A second release attempt while it is on its way does not release it again.
        self.assertEqual(self.release(), [])
        # The provider reconnects and re-announces what it still holds.
        client = self.online()
        answer = self.answer(
            client,
            AnnounceHeld,
            jobs=[{**job_fields(1), "expires_at": NOW + 8 * HOUR, "release_id": ""}],
        )
        [item] = answer["jobs"]
        self.assertEqual(
            (item["action"], item["release_id"], item["printer"]),
            ("print", release_id, "north-hold"),
        )
        self.assertEqual(
            self.successResultOf(self.printed(client, 1, item["release_id"]))["recorded"], True
        )
        self.assertEqual(len(self.charges()), 1)

    def test_reports_with_different_release_ids_charge_once(self) -> None:
        """Whatever release id a (buggy) provider quotes, one job is charged once."""
        client = self.online()
        self.hold(client, 1)
        self.release()
        [(_job, release_id, _p, _u)] = client.releases
        first = self.printed(client, 1, "")
        second = self.printed(client, 1, release_id)
        self.assertTrue(self.successResultOf(first)["recorded"])
        self.assertFalse(self.successResultOf(second)["recorded"])
        self.assertEqual(self.charges(), [(charge_uuid(uuid_of(1), release_id), -10, False)])
        self.assertEqual(self.job(1).release_id, release_id)

    def test_release_answer_lost(self) -> None:
        """The provider got the Release but its answer was lost: it announces the release
        id it holds, is told to print it (which it already does), and reports once."""
        client = self.online()
        self.hold(client, 1)
        self.wires[0].to_server = False
        self.release()
        [(_job, release_id, _printer, _uri)] = client.releases
        self.wires[0].serverIO.loseConnection()
        self.settle()
        client = self.online()
        answer = self.answer(
            client,
            AnnounceHeld,
            jobs=[{**job_fields(1), "expires_at": NOW + 8 * HOUR, "release_id": release_id}],
        )
        self.assertEqual(answer["jobs"][0]["release_id"], release_id)
        self.successResultOf(self.printed(client, 1, release_id))
        self.successResultOf(self.printed(client, 1, release_id))
        self.assertEqual(len(self.charges()), 1)

    def test_recheck_at_release(self) -> None:
        """1.00 and ten held 1.00 jobs: one Release is pushed."""
        client = self.online()
        self.hold(client, *range(1, 11), pages=10)
        outcomes = self.release()
        self.assertEqual(sum(o.released for o in outcomes), 1)
        self.assertEqual(len(client.releases), 1)

    def test_provider_without_the_job(self) -> None:
        """UNKNOWN_JOB in answer to a Release fails the job; it is not charged."""
        client = self.online()
        self.hold(client, 1)
        client.missing.add(uuid_of(1))
        self.release()
        self.assertEqual(self.job(1).state, "failed")
        self.assertEqual(self.charges(), [])

    def test_failed_and_cancelled_reports(self) -> None:
        """Delivery that failed after retries, and cancellations, are recorded uncharged."""
        client = self.online()
        self.hold(client, 1, 2)
        self.release(uuid_of(1))
        [(_job, release_id, _p, _u)] = client.releases
        self.answer(
            client,
            JobFailed,
            job=uuid_of(1),
            release_id=release_id,
            reason="printer offline after 5 tries",
        )
        self.answer(
            client, JobCancelled, job=uuid_of(2), release_id="", reason="cancelled by alice"
        )
        # Reports for jobs the server does not know are acknowledged (nothing to do).
        self.answer(client, JobFailed, job=uuid_of(9), release_id="", reason="?")
        self.assertEqual(
            [(self.job(n).state, self.job(n).reason) for n in (1, 2)],
            [("failed", "printer offline after 5 tries"), ("cancelled", "cancelled by alice")],
        )
        self.assertEqual(self.charges(), [])

    def test_printed_while_unreachable(self) -> None:
        """'Print and report later': a report with no release id is recorded and charged once."""
        client = self.online()
        self.assertTrue(
            self.successResultOf(
                self.printed(client, 5, "", "north-direct", queue="north-direct", pages=2)
            )["recorded"]
        )
        self.assertFalse(
            self.successResultOf(
                self.printed(client, 5, "", "north-direct", queue="north-direct", pages=2)
            )["recorded"]
        )
        self.assertEqual([a for _u, a, _o in self.charges()], [-20])

    def test_cancel_pushes_delete(self) -> None:
        """The owner cancels at a release station: the provider deletes the job."""
        client = self.online()
        self.hold(client, 1)
        self.successResultOf(self.findme.cancel(self.identity()))
        self.settle()
        self.assertEqual(client.deletes, [([uuid_of(1)], "cancelled by its owner")])


class ExpiryTests(ProtocolFixture):
    """Held jobs expire at their stored time; the provider is told, now or at its next hello."""

    def test_expiry_tells_connected_provider(self) -> None:
        client = self.online()
        self.submit(client, 1)
        self.clock.advance(8 * HOUR - 1)
        self.settle()
        self.assertEqual(client.deletes, [])
        self.clock.advance(1)
        self.settle()
        self.assertEqual(client.deletes, [([uuid_of(1)], "not released before it expired")])
        self.assertTrue(self.job(1).provider_told)

    def test_told_at_next_hello(self) -> None:
        client = self.online()
        self.submit(client, 1)
        self.submit(client, 2)
        self.wires[0].clientIO.loseConnection()
        self.settle()
        self.clock.advance(9 * HOUR)
        self.settle()
        self.assertEqual(self.job(1).state, "expired")
        client = self.online()
        self.assertEqual(
            client.deletes, [([uuid_of(1), uuid_of(2)], "not released before it expired")]
        )
        # Told once: a later hello has nothing more to say.
        self.assertEqual(self.online().deletes, [])


class ReconcileTests(ProtocolFixture):
    """A reconnecting provider re-announces its held jobs: no duplicates, none lost."""

    def test_reconcile(self) -> None:
        client = self.online()
        self.submit(client, 1)
        self.submit(client, 2)
        self.submit(client, 3)
        self.successResultOf(self.findme.cancel(self.identity(), [uuid_of(3)]))
        self.wires[0].clientIO.loseConnection()
        self.settle()
        client = self.online()
        client.deletes.clear()
        expires = NOW + 8 * HOUR

        def item(n: int, **kw: Any) -> dict[str, Any]:
            return {**job_fields(n, **kw), "expires_at": expires, "release_id": ""}

        jobs = [item(1), item(1), item(2), item(3), item(4, pages=2), item(5, user="mallory")]
        answer = self.answer(client, AnnounceHeld, jobs=jobs)
        actions = {a["job"]: (a["action"], a["expires_at"]) for a in answer["jobs"]}
        self.assertEqual(
            actions,
            {
                uuid_of(1): ("hold", expires),
                uuid_of(2): ("hold", expires),
                uuid_of(3): ("delete", 0.0),
                # Unknown to the server (its database was replaced): held again.
                uuid_of(4): ("hold", expires),
                uuid_of(5): ("delete", 0.0),
            },
        )
        self.assertEqual(self.rows(), 5)
        self.assertEqual(self.job(4).state, "held")
        self.assertEqual(self.job(4).cost, 20)
        # Announced again: still five records.
        self.answer(client, AnnounceHeld, jobs=jobs[:3])
        self.assertEqual(self.rows(), 5)
        held = self.successResultOf(self.findme.held(self.identity()))
        self.assertEqual([h.uuid for h in held], [uuid_of(1), uuid_of(2), uuid_of(4)])

    def test_batch_limit(self) -> None:
        client = self.online()
        jobs = [
            {**job_fields(n), "expires_at": NOW + HOUR, "release_id": ""}
            for n in range(MAX_ANNOUNCE + 1)
        ]
        self.refused(client, AnnounceHeld, InvalidRequest, jobs=jobs)


class OfflineProtocolTests(ProtocolFixture):
    """A site cut off from the primary keeps serving its providers under the policies."""

    mode = "offline"

    def test_release_refused_by_policy(self) -> None:
        self.policy("offline.release", "refuse")
        client = self.online()
        self.submit(client, 1)
        d = self.findme.release(self.identity(), "north-hold")
        self.settle()
        self.assertEqual(
            str(self.failureResultOf(d).value),
            "release is not available while the site is offline",
        )
        self.assertEqual(client.releases, [])

    def test_release_allowed_and_charge_to_outbox(self) -> None:
        client = self.online()
        self.submit(client, 1)
        d = self.findme.release(self.identity(), "north-hold")
        self.settle()
        self.assertTrue(self.successResultOf(d)[0].released)
        [(_job, release_id, _p, _u)] = client.releases
        self.successResultOf(self.printed(client, 1, release_id))
        self.assertEqual(self.charges(), [(charge_uuid(uuid_of(1), release_id), -10, True)])

    def test_printed_refused_offline_is_kept_for_later(self) -> None:
        """Charging refused offline: NOT_SERVING, so the provider keeps the report."""
        self.policy("offline.account", "refuse")
        client = self.online()
        text = str(
            self.failureResultOf(
                self.printed(client, 1, "", "north-direct", queue="north-direct"), NotServing
            ).value
        )
        self.assertIn("offline", text)
        self.assertIsNone(self.store.read(jobqueue.thdJob, uuid_of(1)))
