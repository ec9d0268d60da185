"""End to end: an MFD on the JSON device API of a real site, online and offline.

A primary and a site run as ``twistd`` processes replicating over TLS on loopback, set
up with ``sitesrv-admin`` as an administrator would: a user with a card and a PIN, a
hold/release printer at the site, and an ``http`` device for it whose key ``device add``
prints. The test plays the MFD with ``twisted.web.client.Agent`` against the site's web
port: online charges reach the primary's ledger; with the primary down the site charges
under the offline policies, keeps the charges in its outbox and submits each exactly once
when the primary is back. Held jobs come from a print provider the test also plays
(`tests.processes.Provider`) and are listed and released through the API.
"""

from __future__ import annotations

import io
import json
import uuid as uuidlib
from typing import Any

import attrs
from twisted.internet.defer import ensureDeferred
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers

from sitesrv.core.findme import charge_uuid
from tests.processes import (
    CLEAN_EXITS,
    Node,
    ProcessTestCase,
    ServerProcess,
    admin,
    admin_sync,
    connect_provider,
    enrol,
    reactor,
    scalar,
    tls_init,
    wait_for,
    wait_for_mode,
    write_primary_config,
    write_site_config,
)

CARD = "0012345678"
PIN = "4321"
#: How long an online charge may take to reach the primary's ledger.
SUBMIT_DEADLINE = 5.0
#: Bound on one HTTP exchange with the site.
HTTP_TIMEOUT = 5.0

_pool = HTTPConnectionPool(reactor, persistent=False)
_agent = Agent(reactor, pool=_pool, connectTimeout=2)


@attrs.frozen
class Reply:
    """One answer of the device API."""

    code: int
    body: Any


async def _call(port: int, method: str, path: str, key: str, body: Any = None) -> Reply:
    headers = Headers({b"authorization": [f"Bearer {key}".encode()]})
    producer = None
    if body is not None:
        headers.addRawHeader(b"content-type", b"application/json")
        producer = FileBodyProducer(io.BytesIO(json.dumps(body).encode()))
    url = f"http://127.0.0.1:{port}/api/v1/{path}".encode()
    response = await _agent.request(method.encode(), url, headers, producer)
    data = await readBody(response)
    assert b"Traceback" not in data, data
    return Reply(response.code, json.loads(data) if data else None)


class DeviceEndToEndTests(ProcessTestCase):
    """An MFD at site "north" of primary "hq"."""

    timeout = 60

    def setUp(self) -> None:
        super().setUp()
        self.primary = write_primary_config(self.directory, "hq")
        tls_init(self.primary)
        self.site = write_site_config(self.directory, "north", self.primary)
        enrol(self.primary, self.site)
        admin_sync(
            self.primary, "user", "add", "alice", "--full-name", "Alice A", "--balance", "5"
        )
        admin_sync(self.primary, "card", "add", "alice", CARD)
        admin_sync(self.primary, "user", "set-pin", "alice", stdin=f"{PIN}\n")
        admin_sync(
            self.primary,
            *("printer", "add", "p1", "--site", "north", "--hold"),
            *("--price-mono", "0.10", "--price-colour", "0.50"),
        )
        added = admin_sync(
            self.primary,
            *("device", "add", "mfd", "--site", "north", "--connector", "http", "--printer", "p1"),
        )
        # The key alone on stdout (the explanation goes to stderr).
        self.key = added.out.strip()
        self.assertRegex(self.key, r"^\S{20,}$")
        self.provider_key = admin_sync(
            self.primary, "provider", "add", "spool", "--site", "north"
        ).out.strip()

    def call(self, method: str, path: str, body: Any = None) -> Any:
        """One request of the MFD to the site's device API, bounded in time."""
        d = ensureDeferred(_call(self.site.web_port, method, path, self.key, body))
        d.addTimeout(HTTP_TIMEOUT, reactor)
        return d

    async def login(self) -> dict[str, Any]:
        """Card + PIN at the MFD: the session's JSON."""
        reply = await self.call("POST", "sessions", {"card": CARD, "pin": PIN})
        self.assertEqual(reply.code, 201, reply.body)
        self.assertEqual(
            (reply.body["user"]["username"], reply.body["method"]), ("alice", "card+pin")
        )
        return dict(reply.body)

    async def copy(self, session: str, pages: int, code: int = 201, **more: Any) -> Any:
        """A copy job of ``pages`` mono pages; the answer's JSON."""
        body = {"kind": "copy", "pages": pages, **more}
        reply = await self.call("POST", f"sessions/{session}/usage", body)
        self.assertEqual(reply.code, code, reply.body)
        return reply.body

    async def go_offline(self, primary: ServerProcess, site: ServerProcess) -> None:
        """Stop the primary; wait for the site to say it is offline (and still serving)."""
        self.assertIn(primary.stop(), CLEAN_EXITS)
        health = await wait_for_mode(site, "offline")
        self.assertEqual(health.code, 200)

    async def ledger(self, node: Node) -> list[dict[str, Any]]:
        """alice's transactions, as ``transactions list --user alice --json`` shows them."""
        listed = await admin(node, "--json", "transactions", "list", "--user", "alice")
        return list(listed.json())

    async def outbox(self) -> dict[str, dict[str, Any]]:
        """The site's outbox by uuid, as ``outbox show --json`` shows it."""
        shown = await admin(self.site, "--json", "outbox", "show")
        return {row["uuid"]: row for row in shown.json()}

    async def test_online_charge_reaches_the_primary(self) -> None:
        """Card + PIN, a copy: charged at once, in the primary's ledger within seconds."""
        await self.start_primary_and_site(self.primary, self.site)
        started = await self.login()
        self.assertEqual((started["balance"], started["offline"]), ("5.00", False))
        txn = str(uuidlib.uuid4())
        charged = await self.copy(started["session"], 3, uuid=txn)
        self.assertEqual(
            (charged["uuid"], charged["charged"], charged["balance"], charged["offline"]),
            (txn, "0.30", "4.70", False),
        )
        await wait_for(
            lambda: scalar(
                self.primary.database, "SELECT 1 FROM transactions WHERE uuid = ?", txn
            ),
            "the charge in the primary's ledger",
            deadline=SUBMIT_DEADLINE,
        )
        [entry] = [t for t in await self.ledger(self.primary) if t["uuid"] == txn]
        self.assertEqual(
            (entry["amount"], entry["balance_after"], entry["reason"], entry["site"]),
            ("-0.30", "4.70", "copy", "north"),
        )
        reply = await self.call("GET", f"sessions/{started['session']}")
        self.assertEqual((reply.code, reply.body["balance"]), (200, "4.70"))

    async def test_offline_charges_submitted_once(self) -> None:
        """Primary down: login and three copies succeed offline and wait in the outbox;
        primary back: the site goes online and the ledger holds each charge once."""
        primary, site = await self.start_primary_and_site(self.primary, self.site)
        await self.go_offline(primary, site)

        started = await self.login()
        self.assertTrue(started["offline"])
        uuids = [str(uuidlib.uuid4()) for _ in range(3)]
        balances = []
        for txn in uuids:
            charged = await self.copy(started["session"], 3, uuid=txn)
            self.assertEqual((charged["uuid"], charged["offline"]), (txn, True))
            balances.append(charged["balance"])
        self.assertEqual(balances, ["4.70", "4.40", "4.10"])
        pending = await self.outbox()
        self.assertEqual(
            [
                (pending[u]["state"], pending[u]["amount_minor"], pending[u]["offline"])
                for u in uuids
            ],
            [("pending", -30, True)] * 3,
        )

        primary.start()
        await wait_for_mode(site, "online")

        async def applied() -> bool:
            shown = await self.outbox()
            return all(shown[u]["state"] == "applied" for u in uuids)

        await wait_for(lambda: ensureDeferred(applied()), "the outbox shown applied")
        ledger = await self.ledger(self.primary)
        self.assertEqual([[t["uuid"] for t in ledger].count(u) for u in uuids], [1, 1, 1])
        self.assertEqual({t["site"] for t in ledger if t["uuid"] in uuids}, {"north"})
        shown = (await admin(self.primary, "--json", "user", "show", "alice")).json()
        self.assertEqual(shown["balance"], "4.10")
        # The site counts each charge once too, now that the primary's balance has them.
        reply = await self.call("GET", f"sessions/{started['session']}")
        self.assertEqual(
            (reply.code, reply.body["balance"], reply.body["offline"]), (200, "4.10", False)
        )

    async def test_offline_allowance(self) -> None:
        """With an offline allowance of 1.00 set for the site, an offline charge may take
        the balance to -1.00 and not a cent further: beyond it, 402."""
        primary, site = await self.start_primary_and_site(self.primary, self.site)
        await admin(self.primary, "policy", "set", "--site", "north", "offline.allowance", "1.00")
        query = "SELECT value FROM policies WHERE site = 'north' AND key = 'offline.allowance'"
        await wait_for(
            lambda: scalar(self.site.database, query) == "100",
            "the allowance replicated to the site",
            deadline=SUBMIT_DEADLINE,
        )
        await self.go_offline(primary, site)

        session = (await self.login())["session"]
        refused = await self.copy(session, 61, code=402)
        self.assertEqual(
            refused["error"], "insufficient offline allowance: 6.00 available, copy costs 6.10"
        )
        self.assertEqual((await self.copy(session, 60))["balance"], "-1.00")
        refused = await self.copy(session, 1, code=402)
        self.assertEqual(
            refused["error"], "insufficient offline allowance: 0.00 available, copy costs 0.10"
        )
        self.assertEqual([r["amount"] for r in (await self.outbox()).values()], ["-6.00"])

    async def test_offline_release_through_the_api(self) -> None:
        """Primary down: the MFD lists the two held jobs (one held before the outage, one
        during it), releases one by name and then the rest; the provider prints both; the
        charges wait in the outbox and reach the primary's ledger once each."""
        primary, site = await self.start_primary_and_site(self.primary, self.site)
        provider = await connect_provider(self, self.site.providers_port, self.provider_key)
        before = await provider.submit()
        await self.go_offline(primary, site)
        during = await provider.submit()

        session = (await self.login())["session"]
        listed = await self.call("GET", f"sessions/{session}/jobs")
        self.assertEqual(listed.code, 200, listed.body)
        self.assertTrue(listed.body["offline"])
        self.assertEqual(
            [(j["uuid"], j["queue"], j["pages"], j["cost"]) for j in listed.body["jobs"]],
            [(before, "p1", 2, "0.20"), (during, "p1", 2, "0.20")],
        )
        charges = []
        for body in ({"jobs": [during]}, None):
            reply = await self.call("POST", f"sessions/{session}/release", body)
            self.assertEqual(reply.code, 200, reply.body)
            [outcome] = reply.body["jobs"]
            self.assertEqual(
                (outcome["released"], outcome["cost"], reply.body["offline"]), (True, "0.20", True)
            )
            job, release_id, printer = await provider.released()
            self.assertEqual((job, printer), (outcome["uuid"], "p1"))
            self.assertEqual(await provider.printed(job, release_id), 20)
            charges.append(charge_uuid(job, release_id))
        reply = await self.call("GET", f"sessions/{session}/jobs")
        self.assertEqual(reply.body["jobs"], [])
        pending = await self.outbox()
        self.assertEqual(
            [(pending[t]["state"], pending[t]["offline"]) for t in charges],
            [("pending", True)] * 2,
        )

        primary.start()
        await wait_for_mode(site, "online", deadline=30)

        def in_ledger(txn: str) -> int:
            query = "SELECT count(*) FROM transactions WHERE uuid = ?"
            return int(scalar(self.primary.database, query, txn))

        await wait_for(
            lambda: all(in_ledger(txn) == 1 for txn in charges),
            "both offline release charges in the primary's ledger",
            deadline=10.0,
        )
        shown = (await admin(self.primary, "--json", "user", "show", "alice")).json()
        self.assertEqual(shown["balance"], "4.60")
