"""End to end: a card registered at the primary during an outage works at the site as
soon as the link returns (DESIGN.md "Failover machine"; the failover issue, item 6)."""

from __future__ import annotations

import os
import time
from typing import Any

from twisted.internet.defer import ensureDeferred
from twisted.logger import Logger
from twisted.trial.unittest import TestCase

from tests.processes import (
    CLEAN_EXITS,
    ServerProcess,
    admin_sync,
    enrol,
    reactor,
    skip_without_twistd,
    tls_init,
    wait_for,
    wait_for_health,
    wait_for_mode,
    write_primary_config,
    write_site_config,
)
from tests.test_e2e_device import HTTP_TIMEOUT, _call

OLD_CARD = "0011110000"
NEW_CARD = "0022220000"


class CardRegisteredOfflineTests(TestCase):
    """alice gets a new card at the primary while site "north" cannot reach it."""

    timeout = 60

    def setUp(self) -> None:
        skip_without_twistd()
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        self.primary = write_primary_config(directory, "hq")
        tls_init(self.primary)
        self.site = write_site_config(directory, "north", self.primary)
        enrol(self.primary, self.site)
        admin_sync(self.primary, "user", "add", "alice", "--balance", "5")
        admin_sync(self.primary, "card", "add", "alice", OLD_CARD)
        admin_sync(
            self.primary,
            *("printer", "add", "p1", "--site", "north"),
            *("--price-mono", "0.10", "--price-colour", "0.50"),
        )
        added = admin_sync(
            self.primary,
            *("device", "add", "mfd", "--site", "north", "--connector", "http", "--printer", "p1"),
        )
        self.key = added.out.strip()

    def login(self, card: str) -> Any:
        d = ensureDeferred(_call(self.site.web_port, "POST", "sessions", self.key, {"card": card}))
        d.addTimeout(HTTP_TIMEOUT, reactor)
        return d

    async def _scenario(self) -> None:
        primary = ServerProcess(self.primary).start(self)
        await wait_for_health(primary, lambda h: h.code == 200, "primary answers /health")
        site = ServerProcess(self.site).start(self)
        await wait_for_mode(site, "online")
        self.assertIn(primary.stop(), CLEAN_EXITS)
        await wait_for_mode(site, "offline")

        # The administrator registers the new card at the primary during the outage
        # (sitesrv-admin writes the primary's database; the server is down).
        admin_sync(self.primary, "card", "add", "alice", NEW_CARD)
        refused = await self.login(NEW_CARD)
        self.assertEqual((refused.code, refused.body), (401, {"error": "unknown card"}))
        self.assertEqual((await self.login(OLD_CARD)).code, 201)

        primary.start()
        reconnected = await wait_for_mode(site, "reconciling", "syncing", "online")
        started = time.monotonic()

        async def new_card_works() -> bool:
            return bool((await self.login(NEW_CARD)).code == 201)

        await wait_for(
            lambda: ensureDeferred(new_card_works()), "the new card works at the site", 10
        )
        # Logged, not asserted: timing belongs to the benchmarks (DESIGN.md: "within a
        # second of reconnection").
        Logger().info(
            "e2e: new card usable {seconds:.3f} s after the site reconnected",
            seconds=time.monotonic() - started,
        )
        reply = await self.login(NEW_CARD)
        self.assertEqual(reply.body["user"]["username"], "alice")
        self.assertIsNotNone(reconnected)

    def test_new_card_works_after_reconnection(self) -> None:
        """Unknown at the site while offline; works once the site has reconnected."""
        return ensureDeferred(self._scenario())  # type: ignore[return-value]
