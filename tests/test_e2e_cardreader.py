"""End to end: a network card reader at a real site releases held jobs, online and offline.

A primary and a site run as ``twistd`` processes replicating over TLS on loopback, set
up with ``sitesrv-admin`` as an administrator would: a user with a card, a hold/release
printer at the site, a print provider, and a ``card-reader`` device listening on a
loopback port with line feedback (``device add ... --option listen=... --option
feedback=line``). The test plays both the print provider (an AMP client on the site's
provider port that submits jobs, which the site holds, and reports them printed when
released) and the card reader (a TCP client sending one card number a line and reading
the one-line answers). Online, a swipe releases the held jobs to the reader's printer and
the printed jobs are charged in the primary's ledger; with the primary stopped, the site
still releases on a swipe, keeps the charges in its outbox and submits each once when
the primary is back. A device naming a connector nobody provides shows on ``/health``
while the reader keeps working.
"""

from __future__ import annotations

import os
import uuid as uuidlib
from typing import Any

from twisted.internet.defer import Deferred, DeferredQueue
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectError
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, TestCase

import sitesrv
from sitesrv.core.findme import charge_uuid
from sitesrv.providers.commands import (
    PROVIDER_PROTOCOL_VERSION,
    AnnounceQueues,
    DeleteJobs,
    JobPrinted,
    ProviderHello,
    Release,
    SubmitJob,
)
from sitesrv.replication.liveness import LivenessAMP
from tests.processes import (
    CLEAN_EXITS,
    ServerProcess,
    admin,
    admin_sync,
    enrol,
    free_port,
    reactor,
    scalar,
    tls_init,
    twistd_unavailable,
    wait_for,
    wait_for_health,
    wait_for_mode,
    write_primary_config,
    write_site_config,
)

CARD = "0012345678"
#: How long one answer (a swipe's feedback, a pushed release) may take.
ANSWER_DEADLINE = 5.0
#: How long a printed job's charge may take to reach the primary's ledger.
SUBMIT_DEADLINE = 10.0

_unavailable: list[str | None] = []


def _skip_without_twistd() -> None:
    if not _unavailable:
        _unavailable.append(twistd_unavailable())
    if _unavailable[0] is not None:
        raise SkipTest(_unavailable[0])


class CardReader(LineOnlyReceiver):
    """The card reader's end: sends card numbers, queues the feedback lines."""

    delimiter = b"\r\n"

    def __init__(self) -> None:
        self.answers: DeferredQueue[str] = DeferredQueue()
        self.closed: Deferred[None] = Deferred()

    def lineReceived(self, line: bytes) -> None:
        self.answers.put(line.decode("ascii"))

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:
        self.closed.callback(None)

    async def swipe(self, card: str, end: bytes = b"\r\n") -> str:
        """Send ``card`` as a reader does; the feedback line."""
        assert self.transport is not None
        self.transport.write(card.encode("ascii") + end)
        answer = self.answers.get()
        answer.addTimeout(ANSWER_DEADLINE, reactor)
        return str(await answer)


class Provider(LivenessAMP):
    """A print provider's end: queues the releases the site pushes."""

    def __init__(self) -> None:
        super().__init__(clock=reactor)
        self.releases: DeferredQueue[tuple[str, str, str]] = DeferredQueue()
        self.closed: Deferred[None] = Deferred()

    @Release.responder
    def release(self, job: str, release_id: str, printer: str, uri: str) -> dict[str, Any]:
        self.releases.put((job, release_id, printer))
        return {}

    @DeleteJobs.responder
    def deleteJobs(self, jobs: list[str], reason: str) -> dict[str, Any]:
        return {}

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:
        super().connectionLost(reason)
        self.closed.callback(None)

    async def released(self) -> tuple[str, str, str]:
        """The next release pushed: (job, release id, printer)."""
        release = self.releases.get()
        release.addTimeout(ANSWER_DEADLINE, reactor)
        return await release

    def job(self, job: str, pages: int = 2) -> dict[str, Any]:
        """A job's fields as the provider sends them."""
        return {
            "job": job,
            "queue": "p1",
            "user": "alice",
            "document": f"{job[:8]}.pdf",
            "pages": pages,
            "copies": 1,
            "colour": False,
            "duplex": False,
            "size": 1000,
            "submitted_at": reactor.seconds(),
        }

    async def submit(self, pages: int = 2) -> str:
        """Submit a job to queue p1 (a hold printer); its UUID once the site holds it."""
        job = str(uuidlib.uuid4())
        answer = await self.callRemote(SubmitJob, **self.job(job, pages))
        assert answer["decision"] == "hold", answer
        return job

    async def printed(self, job: str, release_id: str, pages: int = 2) -> int:
        """Report a released job printed on p1; the amount charged."""
        answer = await self.callRemote(
            JobPrinted,
            **self.job(job, pages),
            release_id=release_id,
            printer="p1",
            printed_at=reactor.seconds(),
        )
        return int(answer["charged"])


class CardReaderEndToEndTests(TestCase):
    """A card reader and a print provider at site "north" of primary "hq"."""

    timeout = 90

    def setUp(self) -> None:
        _skip_without_twistd()
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        self.primary = write_primary_config(directory, "hq")
        tls_init(self.primary)
        self.site = write_site_config(directory, "north", self.primary)
        enrol(self.primary, self.site)
        admin_sync(self.primary, "user", "add", "alice", "--balance", "5")
        admin_sync(self.primary, "card", "add", "alice", CARD)
        admin_sync(
            self.primary,
            *("printer", "add", "p1", "--site", "north", "--hold"),
            *("--price-mono", "0.10", "--price-colour", "0.50"),
        )
        self.provider_key = admin_sync(
            self.primary, "provider", "add", "spool", "--site", "north"
        ).out.strip()
        self.reader_port = free_port()

    async def add_reader(self) -> None:
        """The card-reader device, added with the command line as an administrator would."""
        await admin(
            self.primary,
            *("device", "add", "reader", "--site", "north", "--connector", "card-reader"),
            *("--printer", "p1"),
            *("--option", f"listen=tcp:{self.reader_port}:interface=127.0.0.1"),
            *("--option", "feedback=line"),
        )

    async def start(self) -> tuple[ServerProcess, ServerProcess]:
        """Start the primary, then the site; return them once the site is online."""
        primary = ServerProcess(self.primary).start(self)
        await wait_for_health(primary, lambda h: h.code == 200, "primary answers /health")
        site = ServerProcess(self.site).start(self)
        await wait_for_mode(site, "online")
        return primary, site

    async def reader(self) -> CardReader:
        """Connect as the card reader once the site listens for it (within a poll)."""
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.reader_port, timeout=2)

        async def attempt() -> CardReader | None:
            try:
                return await connectProtocol(endpoint, CardReader())
            except ConnectError:
                return None

        client: CardReader = await wait_for(
            lambda: Deferred.fromCoroutine(attempt()), "the card-reader port listening"
        )
        self.addCleanup(self.close, client, client.closed)
        return client

    async def provider(self) -> Provider:
        """The print provider, after its hello and queue announcement."""
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.site.providers_port, timeout=2)
        client: Provider = await connectProtocol(endpoint, Provider())
        self.addCleanup(self.close, client, client.closed)
        hello = await client.callRemote(
            ProviderHello,
            provider="spool",
            key=self.provider_key,
            software_version=f"test-provider {sitesrv.__version__}",
            protocol_version=PROVIDER_PROTOCOL_VERSION,
            provider_time=reactor.seconds(),
        )
        client.startHeartbeat(hello["heartbeat"])
        queues = await client.callRemote(AnnounceQueues, queues=["p1"])
        self.assertEqual([q["name"] for q in queues["known"]], ["p1"])
        return client

    def close(self, client: Any, closed: Deferred[None]) -> Deferred[None]:
        """Close a client connection and wait until it is closed (a clean reactor)."""
        if client.transport is not None and not closed.called:
            client.transport.abortConnection()
        return closed

    async def release_and_print(self, provider: Provider, count: int) -> list[str]:
        """Take ``count`` pushed releases to p1, report each printed; the charges' UUIDs."""
        charges = []
        for _ in range(count):
            job, release_id, printer = await provider.released()
            self.assertEqual(printer, "p1")
            self.assertEqual(await provider.printed(job, release_id), 20)
            charges.append(charge_uuid(job, release_id))
        return charges

    def in_ledger(self, txn: str) -> int:
        """How many times a transaction UUID is in the primary's ledger."""
        return int(
            scalar(self.primary.database, "SELECT count(*) FROM transactions WHERE uuid = ?", txn)
        )

    async def test_swipe_releases_held_jobs_online(self) -> None:
        """Two held jobs: a swipe answers OK 2 jobs, both are pushed to the provider for
        p1 and, once printed, charged in the primary's ledger; the next swipe has none."""
        await self.add_reader()
        await self.start()
        reader = await self.reader()
        provider = await self.provider()
        jobs = {await provider.submit(), await provider.submit()}

        self.assertEqual(await reader.swipe(CARD), "OK 2 jobs")
        charges = await self.release_and_print(provider, 2)
        await wait_for(
            lambda: all(self.in_ledger(txn) == 1 for txn in charges),
            "both print charges in the primary's ledger",
            deadline=SUBMIT_DEADLINE,
        )
        shown = (await admin(self.primary, "--json", "user", "show", "alice")).json()
        self.assertEqual(shown["balance"], "4.60")
        self.assertEqual(len(jobs), 2)

        # LF alone ends a line too; nothing is held now; an unknown card is denied.
        self.assertEqual(await reader.swipe(CARD, end=b"\n"), "OK 0 jobs")
        self.assertEqual(await reader.swipe("999"), "DENY unknown card")

    async def test_unknown_connector_shown_on_health(self) -> None:
        """A device naming a connector nobody provides is listed on /health with the
        known names, and the card reader keeps working."""
        await self.add_reader()
        _primary, site = await self.start()
        await admin(
            self.primary,
            *("device", "add", "terminal", "--site", "north", "--connector", "acme-terminal"),
        )
        site_health = await wait_for_health(
            site,
            lambda h: any("acme-terminal" in p for p in h.body.get("problems", [])),
            "the unknown connector on /health",
        )
        [problem] = [p for p in site_health.body["problems"] if "acme-terminal" in p]
        self.assertRegex(
            problem,
            r"^device 'terminal': unknown connector 'acme-terminal' \(known connectors: "
            r"card-reader, http\)$",
        )
        reader = await self.reader()
        self.assertEqual(await reader.swipe(CARD), "OK 0 jobs")

    async def test_swipe_releases_offline_and_charges_once(self) -> None:
        """Primary stopped: a job held before and one held during the outage are both
        released by a swipe; their charges wait in the outbox and reach the primary's
        ledger once each when it is back."""
        await self.add_reader()
        primary, site = await self.start()
        reader = await self.reader()
        provider = await self.provider()
        await provider.submit()

        self.assertIn(primary.stop(), CLEAN_EXITS)
        health = await wait_for_mode(site, "offline")
        self.assertEqual(health.code, 200)
        await provider.submit()
        self.assertEqual(await reader.swipe(CARD), "OK 2 jobs")
        charges = await self.release_and_print(provider, 2)
        self.assertEqual([self.in_ledger(txn) for txn in charges], [0, 0])
        pending = {
            row["uuid"]: row for row in (await admin(self.site, "--json", "outbox", "show")).json()
        }
        self.assertEqual(
            [(pending[t]["state"], pending[t]["offline"]) for t in charges],
            [("pending", True)] * 2,
        )

        primary.start()
        await wait_for_mode(site, "online", deadline=30)
        await wait_for(
            lambda: all(self.in_ledger(txn) == 1 for txn in charges),
            "both offline charges in the primary's ledger",
            deadline=SUBMIT_DEADLINE,
        )
        shown = (await admin(self.primary, "--json", "user", "show", "alice")).json()
        self.assertEqual(shown["balance"], "4.60")
        self.assertEqual(await reader.swipe(CARD), "OK 0 jobs")
