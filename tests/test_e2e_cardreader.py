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

from twisted.internet.defer import Deferred, DeferredQueue
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectError
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.failure import Failure

from sitesrv.core.findme import charge_uuid
from tests.processes import (
    ANSWER_DEADLINE,
    CLEAN_EXITS,
    ProcessTestCase,
    Provider,
    admin,
    admin_sync,
    close_client,
    connect_provider,
    enrol,
    free_port,
    reactor,
    scalar,
    tls_init,
    wait_for,
    wait_for_health,
    wait_for_mode,
    write_primary_config,
    write_site_config,
)

CARD = "0012345678"
#: How long a printed job's charge may take to reach the primary's ledger.
SUBMIT_DEADLINE = 10.0


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


class CardReaderEndToEndTests(ProcessTestCase):
    """A card reader and a print provider at site "north" of primary "hq"."""

    timeout = 90

    def setUp(self) -> None:
        super().setUp()
        self.primary = write_primary_config(self.directory, "hq")
        tls_init(self.primary)
        self.site = write_site_config(self.directory, "north", self.primary)
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
        self.addCleanup(close_client, client, client.closed)
        return client

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
        await self.start_primary_and_site(self.primary, self.site)
        reader = await self.reader()
        provider = await connect_provider(self, self.site.providers_port, self.provider_key)
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
        _primary, site = await self.start_primary_and_site(self.primary, self.site)
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
        primary, site = await self.start_primary_and_site(self.primary, self.site)
        reader = await self.reader()
        provider = await connect_provider(self, self.site.providers_port, self.provider_key)
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
