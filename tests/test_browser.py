"""The status page and the web release station in headless Chromium.

A primary and a site run as ``twistd`` processes on loopback, set up with
``sitesrv-admin``: a user with a password, a card and a PIN, a hold/release printer and
an MFD at the site, a print provider (played by the test, `tests.processes.Provider`)
that puts jobs on hold. A real browser (`tests.browser`) does what a person would: an
administrator logs in to each server's status page and out again; a user logs in to the
release station, sees a held job and releases it, online with a password and offline
with a card and PIN. Screenshots of both status pages are saved as test artifacts in the
directory ``$SITESRV_TEST_ARTIFACTS`` names, else in ``_trial_temp/artifacts`` (tox
passes only ``SITESRV_TEST_*`` variables into tests).

Selenium blocks, so each browser step runs in a thread while the reactor keeps the
provider's connection (which receives the release) going.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread

from sitesrv.core.findme import charge_uuid
from sitesrv.secrets import make_verifier
from tests.browser import (
    click_and_load,
    save_screenshot,
    skip_without_browser,
    start_browser,
    stop_browser,
    wait_for_element,
)
from tests.processes import (
    CLEAN_EXITS,
    ProcessTestCase,
    admin,
    admin_sync,
    connect_provider,
    enrol,
    scalar,
    tls_init,
    wait_for,
    wait_for_mode,
    write_primary_config,
    write_site_config,
)

T = TypeVar("T")

CARD = "0012345678"
PIN = "4321"
PASSWORD = "alice-pass-1"
#: The primary's administrator (in its database) and the site's (in its config).
PRIMARY_ADMIN = ("boss", "boss-pass-1")
SITE_ADMIN = ("keeper", "keeper-pass-1")

# -- what the person at the browser does (blocking: run in a thread) --------------------


def text(driver: Any, selector: str) -> str:
    """The visible text of the first element matching ``selector``, once it is there."""
    from selenium.common.exceptions import StaleElementReferenceException

    # The status page reloads itself every few seconds: an element found just before a
    # reload is gone after it, so look again.
    for _ in range(3):
        try:
            return str(wait_for_element(driver, selector).text)
        except StaleElementReferenceException:
            continue
    return str(wait_for_element(driver, selector).text)


def fill(driver: Any, fields: dict[str, str], submit: str) -> None:
    """Type into the inputs with these ids, then press the button ``submit``."""
    for field, value in fields.items():
        box = wait_for_element(driver, f"#{field}")
        box.clear()
        box.send_keys(value)
    click_and_load(driver, f"#{submit}")


def log_in_admin(driver: Any, base: str, name: str, password: str) -> dict[str, str]:
    """Open the status page, get sent to the login, log in: where the browser went, and
    the page's role and mode."""
    driver.get(f"{base}/")
    sent_to = driver.current_url
    fill(driver, {"name": name, "password": password}, "login-submit")
    wait_for_element(driver, "#logout-submit")
    return {
        "sent_to": sent_to,
        "landed": driver.current_url,
        "role": text(driver, "#role"),
        "mode": text(driver, "#mode"),
    }


def log_out_admin(driver: Any, base: str) -> dict[str, str]:
    """Log out; then open the status page again: the page after logging out, its
    notice, and where the status page sent the browser."""
    click_and_load(driver, "#logout-submit")
    wait_for_element(driver, "#login")
    after, notice = driver.current_url, text(driver, "#notice")
    driver.get(f"{base}/")
    wait_for_element(driver, "#login")
    return {"after": after, "notice": notice, "then": driver.current_url}


def held_jobs(driver: Any) -> dict[str, list[str]]:
    """The release station's job rows: uuid -> the cells' text (the checkbox's state
    first)."""
    wait_for_element(driver, "#jobs")
    rows = {}
    for row in driver.find_elements("css selector", "#jobs tr.job"):
        box = row.find_element("css selector", "input[name=job]")
        cells = [c.text for c in row.find_elements("css selector", "td")[1:]]
        rows[row.get_attribute("data-uuid")] = ["checked" if box.is_selected() else "", *cells]
    return rows


def release(driver: Any, printer: str, button: str) -> str:
    """Choose the printer, press a release button: the notice shown after."""
    from selenium.webdriver.support.select import Select

    Select(wait_for_element(driver, "select#printer")).select_by_value(printer)
    click_and_load(driver, f"#{button}")
    return text(driver, "#notice")


class BrowserTests(ProcessTestCase):
    """A browser at primary "hq" and its site "north"."""

    timeout = 90

    def setUp(self) -> None:
        super().setUp()
        skip_without_browser()
        self.primary = write_primary_config(self.directory, "hq")
        tls_init(self.primary)
        self.site = write_site_config(self.directory, "north", self.primary)
        # The site's own administrator, from its config (the primary's are not replicated).
        with open(self.site.config, "a", encoding="utf-8") as f:
            f.write(f'\n[web.admins]\n{SITE_ADMIN[0]} = "{make_verifier(SITE_ADMIN[1])}"\n')
        enrol(self.primary, self.site)
        admin_sync(
            self.primary,
            "admin",
            "add",
            PRIMARY_ADMIN[0],
            "--password-stdin",
            stdin=f"{PRIMARY_ADMIN[1]}\n",
        )
        admin_sync(
            self.primary, "user", "add", "alice", "--full-name", "Alice A", "--balance", "5"
        )
        admin_sync(self.primary, "user", "set-password", "alice", stdin=f"{PASSWORD}\n")
        admin_sync(self.primary, "card", "add", "alice", CARD)
        admin_sync(self.primary, "user", "set-pin", "alice", stdin=f"{PIN}\n")
        admin_sync(
            self.primary,
            *("printer", "add", "p1", "--site", "north", "--hold"),
            *("--price-mono", "0.10", "--price-colour", "0.50"),
        )
        admin_sync(
            self.primary,
            *("device", "add", "mfd", "--site", "north", "--connector", "http", "--printer", "p1"),
        )
        self.provider_key = admin_sync(
            self.primary, "provider", "add", "spool", "--site", "north"
        ).out.strip()

    def base(self, node: Any) -> str:
        """The URL of a server's web port."""
        return f"http://127.0.0.1:{node.web_port}"

    async def browser(self) -> Any:
        """A new headless Chromium, quit when the test ends."""
        driver = await deferToThread(start_browser, os.path.join(self.directory, "browser"))
        self.addCleanup(deferToThread, stop_browser, driver)
        return driver

    def browse(self, step: Callable[..., T], *args: Any) -> Deferred[T]:
        """Run a blocking browser step in a thread (Selenium bounds each wait)."""
        return deferToThread(step, *args)

    async def test_status_pages(self) -> None:
        """An administrator opens each server's status page: sent to the login first,
        then the page with the mode and the site (at the primary) or the devices and
        providers (at the site); logging out means logging in again. Screenshots of both
        pages are saved."""
        await self.start_primary_and_site(self.primary, self.site)
        await connect_provider(self, self.site.providers_port, self.provider_key)
        driver = await self.browser()
        primary = self.base(self.primary)

        seen = await self.browse(log_in_admin, driver, primary, *PRIMARY_ADMIN)
        self.assertEqual(
            seen,
            {
                "sent_to": f"{primary}/login?next=/",
                "landed": f"{primary}/",
                "role": "primary",
                "mode": "online",
            },
        )
        sites = await self.browse(text, driver, "#sites")
        self.assertIn("north", sites)
        self.assertIn("connected", sites)
        await self.browse(save_screenshot, driver, "status-page-primary.png")
        left = await self.browse(log_out_admin, driver, primary)
        self.assertEqual(
            left,
            {
                "after": f"{primary}/login",
                "notice": "Logged out.",
                "then": f"{primary}/login?next=/",
            },
        )

        site = self.base(self.site)
        seen = await self.browse(log_in_admin, driver, site, *SITE_ADMIN)
        self.assertEqual((seen["role"], seen["mode"]), ("site", "online"))
        devices = await self.browse(text, driver, "#devices")
        self.assertIn("mfd", devices)
        providers = await self.browse(text, driver, "#providers")
        self.assertIn("spool connected", providers)
        transitions = await self.browse(text, driver, "#transitions")
        self.assertIn("online", transitions)
        path = await self.browse(save_screenshot, driver, "status-page.png")
        with open(path, "rb") as f:
            self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")

    async def test_wrong_admin_password(self) -> None:
        """A wrong password keeps the administrator at the login with an error; the
        primary's database administrators are not the site's."""
        await self.start_primary_and_site(self.primary, self.site)
        driver = await self.browser()

        def attempt(base: str, name: str, password: str) -> tuple[str, str]:
            driver.get(f"{base}/")
            fill(driver, {"name": name, "password": password}, "login-submit")
            return driver.current_url, text(driver, "#error")

        url, error = await self.browse(attempt, self.base(self.primary), "boss", "wrong-pass")
        self.assertEqual(
            (url, error), (f"{self.base(self.primary)}/login", "Wrong name or password.")
        )
        url, error = await self.browse(attempt, self.base(self.site), *PRIMARY_ADMIN)
        self.assertEqual(
            (url, error), (f"{self.base(self.site)}/login", "Wrong name or password.")
        )

    async def test_session_cookie(self) -> None:
        """The session cookie is HttpOnly and SameSite=Strict, before and after logging
        in, and scripts on the page cannot read it."""
        await self.start_primary(self.primary)
        driver = await self.browser()
        primary = self.base(self.primary)

        def cookies() -> list[dict[str, Any]]:
            return [
                {k: c.get(k) for k in ("name", "httpOnly", "sameSite", "secure", "path")}
                for c in driver.get_cookies()
            ]

        def script_sees() -> str:
            return str(driver.execute_script("return document.cookie"))

        expected = [
            {
                "name": "sitesrv_session",
                "httpOnly": True,
                "sameSite": "Strict",
                "secure": False,
                "path": "/",
            }
        ]
        await self.browse(driver.get, f"{primary}/login")
        self.assertEqual(await self.browse(cookies), expected)
        anonymous = await self.browse(driver.get_cookie, "sitesrv_session")
        self.assertEqual(await self.browse(script_sees), "")

        await self.browse(log_in_admin, driver, primary, *PRIMARY_ADMIN)
        self.assertEqual(await self.browse(cookies), expected)
        self.assertEqual(await self.browse(script_sees), "")
        # A new session id at login: one seen before it is worth nothing after.
        logged_in = await self.browse(driver.get_cookie, "sitesrv_session")
        self.assertNotEqual(logged_in["value"], anonymous["value"])

    async def test_release_online(self) -> None:
        """Username and password: the held job is listed with its pages and cost,
        released to p1, and gone; the provider is told to print it and the charge
        reaches the primary's ledger."""
        await self.start_primary_and_site(self.primary, self.site)
        provider = await connect_provider(self, self.site.providers_port, self.provider_key)
        job = await provider.submit()
        driver = await self.browser()
        site = self.base(self.site)

        def log_in() -> dict[str, list[str]]:
            driver.get(f"{site}/release")
            fill(driver, {"username": "alice", "password": PASSWORD}, "password-submit")
            wait_for_element(driver, "#logout-submit")
            return held_jobs(driver)

        listed = await self.browse(log_in)
        self.assertEqual(listed, {job: ["checked", f"{job[:8]}.pdf", "p1", "2", "mono", "0.20"]})
        self.assertEqual(await self.browse(text, driver, "#balance"), "5.00")
        self.assertEqual(await self.browse(driver.find_elements, "css selector", "#offline"), [])

        notice = await self.browse(release, driver, "p1", "release-selected")
        self.assertEqual(notice, "Released 1 job to p1 (cost 0.20).")
        self.assertEqual(await self.browse(held_jobs, driver), {})
        self.assertEqual(
            await self.browse(text, driver, "#jobs"), "You have no held jobs at this site."
        )
        released, release_id, printer = await provider.released()
        self.assertEqual((released, printer), (job, "p1"))
        self.assertEqual(await provider.printed(job, release_id), 20)
        txn = charge_uuid(job, release_id)
        await wait_for(
            lambda: scalar(
                self.primary.database, "SELECT 1 FROM transactions WHERE uuid = ?", txn
            ),
            "the release's charge in the primary's ledger",
            deadline=5.0,
        )

        await self.browse(click_and_load, driver, "#logout-submit")
        self.assertEqual(await self.browse(text, driver, "#notice"), "Logged out.")
        await self.browse(wait_for_element, driver, "#login-password")

    async def test_release_offline(self) -> None:
        """Primary down: card and PIN, the offline banner, Release all; the provider is
        told to print; the charge waits in the outbox and reaches the primary's ledger
        exactly once when it is back."""
        primary, site_process = await self.start_primary_and_site(self.primary, self.site)
        provider = await connect_provider(self, self.site.providers_port, self.provider_key)
        job = await provider.submit()
        self.assertIn(primary.stop(), CLEAN_EXITS)
        await wait_for_mode(site_process, "offline")
        driver = await self.browser()
        site = self.base(self.site)

        def log_in() -> tuple[str, dict[str, list[str]]]:
            driver.get(f"{site}/release")
            banner = text(driver, "#offline")
            fill(driver, {"card": CARD, "pin": PIN}, "card-submit")
            wait_for_element(driver, "#logout-submit")
            return banner, held_jobs(driver)

        banner, listed = await self.browse(log_in)
        self.assertIn("cannot reach the central server", banner)
        self.assertEqual(listed, {job: ["checked", f"{job[:8]}.pdf", "p1", "2", "mono", "0.20"]})
        self.assertIn("cannot reach", await self.browse(text, driver, "#offline"))

        notice = await self.browse(release, driver, "p1", "release-all")
        self.assertEqual(notice, "Released 1 job to p1 (cost 0.20).")
        self.assertEqual(await self.browse(held_jobs, driver), {})
        released, release_id, printer = await provider.released()
        self.assertEqual((released, printer), (job, "p1"))
        self.assertEqual(await provider.printed(job, release_id), 20)
        txn = charge_uuid(job, release_id)
        shown = (await admin(self.site, "--json", "outbox", "show")).json()
        self.assertEqual(
            [(r["state"], r["offline"]) for r in shown if r["uuid"] == txn], [("pending", True)]
        )

        primary.start()
        await wait_for_mode(site_process, "online", deadline=30)

        async def applied() -> bool:
            shown = (await admin(self.site, "--json", "outbox", "show")).json()
            return [r["state"] for r in shown if r["uuid"] == txn] == ["applied"]

        await wait_for(
            lambda: Deferred.fromCoroutine(applied()),
            "the offline release's charge applied at the primary",
            deadline=10.0,
        )
        # Applied means handed over and acknowledged: the ledger has it, once.
        listed = await admin(self.primary, "--json", "transactions", "list", "--user", "alice")
        self.assertEqual([t["uuid"] for t in listed.json()].count(txn), 1)
        shown = (await admin(self.primary, "--json", "user", "show", "alice")).json()
        self.assertEqual(shown["balance"], "4.80")
