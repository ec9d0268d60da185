"""The status page, the administrators' login and the web release station.

Route tests over a real ``Server`` (inline store, ``MemoryReactorClock``, no sockets),
through ``tests.inprocess.Browser``, which keeps cookies and reads each page's CSRF token
as a browser would. What a user would notice: no admin page without a login, no form
accepted without its CSRF token, cookies a script cannot read, the status page's facts,
jobs held, released and gone, offline rules at a site, and no stack trace in any answer.
Headless-Chromium tests of the same pages are in ``tests/test_browser.py``.
"""

from __future__ import annotations

import io
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from sitesrv.core.findme import JobDetails
from sitesrv.secrets import make_verifier
from sitesrv.server import Server
from sitesrv.store import admins
from sitesrv.store.audit import thdAudit
from sitesrv.store.devices import thdAddProvider
from sitesrv.store.printers import thdAddPrinter
from sitesrv.store.users import thdAddCard, thdAddUser, thdSetPin
from sitesrv.web.pages import MAX_SESSIONS, SESSION_IDLE, Sessions
from tests.inprocess import Browser, make_server
from tests.support import NOW
from tests.test_findme import FakeLinks, feed, uuid_of

PASSWORD = "correct horse"


def cheap(secret: str) -> str:
    """A verifier that is quick to check (tests only)."""
    return make_verifier(secret, n=2**4)


def inline_cpu(server: Server) -> None:
    """Check passwords on the test's thread."""

    def run(fn: Any, *args: Any) -> Deferred[Any]:
        return succeed(fn(*args))

    server.runCPU = run  # type: ignore[method-assign]


def primary(testcase: SynchronousTestCase) -> Server:
    """A primary "hq" with the administrator "root" in its database."""
    server = make_server(testcase)
    inline_cpu(server)
    server.store.write(admins.thdAddAdmin, "root", cheap(PASSWORD), NOW)
    return server


def log_in(browser: Browser, name: str = "root", password: str = PASSWORD) -> Any:
    """Log in at /login the way a person does: load the form, then post it."""
    browser.get("/login")
    return browser.post("/login", {"name": name, "password": password, "next": "/"})


class AdminLoginTests(SynchronousTestCase):
    """Only administrators see the status page; the login is guarded."""

    def setUp(self) -> None:
        self.server = primary(self)
        self.browser = Browser(self.server)

    def test_status_page_needs_a_login(self) -> None:
        """Without a login, ``/`` and ``/demo`` send the browser to the login page."""
        page = self.browser.get("/")
        self.assertEqual((page.code, page.location), (303, "/login?next=/"))
        self.assertNotIn(b"mode", page.body)
        self.browser.get("/login")
        page = self.browser.post("/demo", {"action": "cut"})
        self.assertEqual(page.code, 303)
        self.assertTrue(page.location and page.location.startswith("/login"))

    def test_log_in_and_out(self) -> None:
        """A right password opens the status page in a new session; logging out ends it."""
        self.browser.get("/login")
        before = self.browser.cookies[b"sitesrv_session"]
        page = self.browser.post("/login", {"name": "root", "password": PASSWORD, "next": "/"})
        self.assertEqual((page.code, page.location), (303, "/"))
        # A new session id at login: one seen before it is worth nothing.
        self.assertNotEqual(self.browser.cookies[b"sitesrv_session"], before)
        page = self.browser.get("/")
        self.assertEqual(page.code, 200)
        self.assertIn('id="mode"', page.text)
        page = self.browser.post("/logout", {})
        self.assertEqual((page.code, page.location), (303, "/login"))
        self.assertEqual(self.browser.get("/").code, 303)

    def test_wrong_password(self) -> None:
        """A wrong password or unknown name is refused with one sentence, then throttled."""
        for name in ("root", "nobody"):
            page = log_in(self.browser, name, "wrong password")
            self.assertEqual(page.code, 403)
            self.assertIn("Wrong name or password.", page.text)
        for _ in range(3):
            log_in(self.browser, "root", "wrong again")
        page = log_in(self.browser)
        self.assertEqual(page.code, 429)
        self.assertIn("Too many failed logins", page.text)
        self.assertEqual(self.browser.get("/").code, 303)
        self.server.reactor.advance(120)
        self.assertEqual(log_in(self.browser).code, 303)

    def test_login_needs_csrf_token(self) -> None:
        """A login form without the session's token (or with another's) is refused."""
        self.browser.get("/login")
        fields = {"name": "root", "password": PASSWORD}
        page = self.browser.post("/login", fields, csrf=False)
        self.assertEqual(page.code, 403)
        self.assertIn("expired or did not come from this server", page.text)
        page = self.browser.post("/login", {**fields, "csrf": "x" * 43}, csrf=False)
        self.assertEqual(page.code, 403)
        # A forged cross-site form has no session cookie at all.
        page = Browser(self.server).post("/login", {**fields, "csrf": "x"}, csrf=False)
        self.assertEqual(page.code, 403)
        self.assertEqual(self.browser.get("/").code, 303)

    def test_logout_needs_csrf_token(self) -> None:
        """Another site cannot log an administrator out (nor do anything else)."""
        log_in(self.browser)
        self.assertEqual(self.browser.post("/logout", {}, csrf=False).code, 403)
        self.assertEqual(self.browser.get("/").code, 200)

    def test_cookie_flags(self) -> None:
        """The session cookie is HttpOnly and SameSite=Strict; Secure only over TLS."""
        page = self.browser.get("/login")
        (cookie,) = page.set_cookies
        self.assertIn(b"HttpOnly", cookie)
        self.assertIn(b"SameSite=strict", cookie)
        self.assertNotIn(b"Secure", cookie)
        (cookie,) = Browser(self.server, secure=True).get("/login").set_cookies
        self.assertIn(b"Secure", cookie)

    def test_next_is_a_local_path(self) -> None:
        """After login the browser goes back where it was, never to another host."""
        self.browser.get("/login")
        fields = {"name": "root", "password": PASSWORD, "next": "//evil.example/x"}
        self.assertEqual(self.browser.post("/login", fields).location, "/")

    def test_config_admin(self) -> None:
        """An administrator from the config's [web.admins] logs in too."""
        server = make_server(self, web={"admins": {"ops": cheap("ops password")}})
        inline_cpu(server)
        browser = Browser(server)
        self.assertEqual(log_in(browser, "ops", "ops password").code, 303)
        self.assertEqual(browser.get("/").code, 200)

    def test_no_icon(self) -> None:
        """Browsers' favicon requests get an empty, cacheable answer, not a 404."""
        page = self.browser.get("/favicon.ico")
        self.assertEqual((page.code, page.body), (204, b""))
        self.assertEqual(page.headers[b"cache-control"], b"max-age=86400")

    def test_security_headers(self) -> None:
        """Pages cannot be framed or cached, and run no scripts."""
        headers = self.browser.get("/login").headers
        self.assertEqual(headers[b"x-frame-options"], b"DENY")
        self.assertEqual(headers[b"cache-control"], b"no-store")
        self.assertIn(b"default-src 'none'", headers[b"content-security-policy"])
        self.assertIn(b"frame-ancestors 'none'", headers[b"content-security-policy"])


class StatusPageTests(SynchronousTestCase):
    """What the status page shows, by role."""

    def test_primary(self) -> None:
        """The primary: mode, the sites table, the reports and the audit log."""
        server = primary(self)
        server.store.write(thdAudit, "root", "user.add", "alice", NOW)
        browser = Browser(server)
        log_in(browser)
        page = browser.get("/").text
        self.assertIn('<meta http-equiv="refresh" content="5"', page)
        self.assertIn('<span class="mode online" id="mode">online</span>', page)
        for section in ("sites", "overdrafts", "suspense", "dead-letters", "audit"):
            self.assertIn(f'id="{section}"', page)
        self.assertIn("<td>user.add</td><td>alice</td>", page)

    def test_site(self) -> None:
        """A site: its mode, outbox, transitions with reasons, devices and providers."""
        server = make_server(self, role="site", web={"admins": {"ops": cheap(PASSWORD)}})
        inline_cpu(server)
        assert server.failover is not None
        feed(server.failover, "replicaFound", "connected", "lost")
        browser = Browser(server)
        log_in(browser, "ops")
        page = browser.get("/").text
        # Newest first.
        self.assertLess(page.index("test: lost"), page.index("test: connected"))
        self.assertLess(page.index("test: connected"), page.index("test: replicaFound"))
        self.assertIn('id="mode">offline</span>', page)
        self.assertIn('id="outbox">0</span>', page)
        self.assertIn("unsynced → offline", page)
        self.assertIn("test: replicaFound", page)
        for section in ("transitions", "devices", "providers"):
            self.assertIn(f'id="{section}"', page)
        self.assertNotIn('id="audit"', page)

    def test_failure_shows_no_traceback(self) -> None:
        """A failure while building the page is logged; the browser gets a plain 500."""
        server = primary(self)
        browser = Browser(server)
        log_in(browser)

        def broken() -> Deferred[dict[str, Any]]:
            raise RuntimeError("secret internals")

        server.status = broken  # type: ignore[method-assign]
        page = browser.get("/")
        self.assertEqual(page.code, 500)
        self.assertNotIn("secret internals", page.text)
        self.assertIn("details are in its log", page.text)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class FakeDemo:
    """Demo controls that remember what was pressed."""

    def __init__(self) -> None:
        self.cut = False
        self.printed = 0

    def linkCut(self) -> bool:
        return self.cut

    def cutLink(self) -> Deferred[None]:
        self.cut = True
        return succeed(None)

    def restoreLink(self) -> Deferred[None]:
        self.cut = False
        return succeed(None)

    def printSample(self) -> Deferred[str]:
        self.printed += 1
        return succeed("alice's sample job: held")


class DemoButtonTests(SynchronousTestCase):
    """The demo's buttons on the status page."""

    def test_cut_restore_print(self) -> None:
        server = primary(self)
        demo = FakeDemo()
        server.status_page.demo = demo
        browser = Browser(server)
        log_in(browser)
        self.assertIn('id="cut-link"', browser.get("/").text)
        self.assertEqual(browser.post("/demo", {"action": "cut"}).location, "/")
        page = browser.get("/").text
        self.assertTrue(demo.cut)
        self.assertIn("Link cut", page)
        self.assertIn('id="restore-link"', page)
        browser.post("/demo", {"action": "restore"})
        self.assertFalse(demo.cut)
        browser.get("/")
        browser.post("/demo", {"action": "print"})
        self.assertIn(
            "alice&#x27;s sample job: held", browser.get("/").text.replace("'", "&#x27;")
        )
        self.assertEqual(demo.printed, 1)

    def test_demo_needs_csrf(self) -> None:
        server = primary(self)
        demo = FakeDemo()
        server.status_page.demo = demo
        browser = Browser(server)
        log_in(browser)
        self.assertEqual(browser.post("/demo", {"action": "cut"}, csrf=False).code, 403)
        self.assertFalse(demo.cut)


class ReleaseStationTests(SynchronousTestCase):
    """Log in, see held jobs with pages and cost, release some or all, see them gone."""

    def setUp(self) -> None:
        self.server = server = primary(self)
        w = server.store.write
        w(thdAddPrinter, "hq-hold", "hq", 10, 50, NOW, hold=True, uri="ipp://h/ipp/print")
        w(thdAddPrinter, "hq-colour", "hq", 20, 60, NOW, uri="ipp://c/ipp/print")
        w(thdAddProvider, "hq-spool", "hq", NOW)
        w(thdAddUser, "alice", NOW, balance=500, password_verifier=cheap("alice pass"))
        w(thdAddCard, "alice", "1001", NOW)
        w(thdSetPin, "alice", cheap("1234"), NOW)
        self.links = FakeLinks("hq-spool")
        server.findme.links = self.links
        for n in (1, 2):
            decision = self.successResultOf(
                server.findme.decide(
                    "hq-spool",
                    JobDetails(
                        uuid=uuid_of(n),
                        queue="hq-hold",
                        user="alice",
                        document=f"thesis-{n}.pdf",
                        pages=3,
                        size=1000,
                        submitted_at=NOW,
                    ),
                )
            )
            self.assertEqual(decision.decision, "hold", decision.reason)
        self.browser = Browser(server)

    def log_in(self, **fields: str) -> Any:
        self.browser.get("/release")
        return self.browser.post("/release", fields)

    def test_password_login_lists_jobs(self) -> None:
        page = self.log_in(action="password", username="alice", password="alice pass")
        self.assertEqual((page.code, page.location), (303, "/release"))
        page = self.browser.get("/release").text
        for n in (1, 2):
            self.assertIn(f'data-uuid="{uuid_of(n)}"', page)
            self.assertIn(f"thesis-{n}.pdf", page)
        self.assertIn('<td class="num">0.30</td>', page)  # 3 mono pages at 0.10
        self.assertIn('<strong id="balance">5.00</strong>', page)
        self.assertIn('<option value="hq-colour">hq-colour</option>', page)

    def test_card_and_pin(self) -> None:
        page = self.log_in(action="card", card="1001", pin="1234")
        self.assertEqual(page.location, "/release")
        self.assertIn("thesis-1.pdf", self.browser.get("/release").text)

    def test_card_without_pin_refused(self) -> None:
        page = self.log_in(action="card", card="1001", pin="")
        self.assertEqual(page.code, 403)
        self.assertIn("a PIN is needed", page.text)

    def test_wrong_password(self) -> None:
        page = self.log_in(action="password", username="alice", password="nope")
        self.assertEqual(page.code, 403)
        self.assertIn("Not logged in", page.text)
        self.assertNotIn("thesis", page.text)

    def test_release_selected_then_all(self) -> None:
        self.log_in(action="password", username="alice", password="alice pass")
        self.browser.get("/release")
        page = self.browser.post(
            "/release", {"action": "release", "printer": "hq-colour", "job": [uuid_of(1)]}
        )
        self.assertEqual(page.location, "/release")
        page = self.browser.get("/release").text
        self.assertIn("Released 1 job to hq-colour (cost 0.60).", page)
        self.assertNotIn("thesis-1.pdf", page)
        self.assertIn("thesis-2.pdf", page)
        self.assertEqual([r[1] for r in self.links.releases], [uuid_of(1)])
        self.browser.post("/release", {"action": "release-all", "printer": "hq-colour"})
        page = self.browser.get("/release").text
        self.assertIn("You have no held jobs", page)
        self.assertEqual(len(self.links.releases), 2)

    def test_release_needs_csrf_and_login(self) -> None:
        self.log_in(action="password", username="alice", password="alice pass")
        self.browser.get("/release")
        fields = {"action": "release-all", "printer": "hq-colour"}
        self.assertEqual(self.browser.post("/release", fields, csrf=False).code, 403)
        stranger = Browser(self.server)
        stranger.get("/release")
        stranger.post("/release", fields)
        self.assertIn("Log in first", stranger.get("/release").text)
        self.assertEqual(self.links.releases, [])

    def test_printer_of_another_site_refused(self) -> None:
        self.log_in(action="password", username="alice", password="alice pass")
        self.browser.get("/release")
        self.browser.post("/release", {"action": "release-all", "printer": "elsewhere"})
        self.assertIn("Choose a printer of this site", self.browser.get("/release").text)
        self.assertEqual(self.links.releases, [])

    def test_logout_and_idle_expiry(self) -> None:
        self.log_in(action="password", username="alice", password="alice pass")
        self.browser.get("/release")
        self.browser.post("/release", {"action": "logout"})
        self.assertIn('id="login-password"', self.browser.get("/release").text)
        self.log_in(action="password", username="alice", password="alice pass")
        self.server.reactor.advance(301)
        page = self.browser.get("/release").text
        self.assertIn("logged out after a time without activity", page)
        self.assertNotIn("thesis", page)


class LimitsTests(SynchronousTestCase):
    """Every input is bounded."""

    def test_sessions_bounded(self) -> None:
        server = primary(self)
        sessions = Sessions(server.reactor, limit=3)
        for _ in range(5):
            sessions.ensure(_Req())  # type: ignore[arg-type]
        self.assertEqual(len(sessions), 3)
        self.assertEqual(Sessions(server.reactor).limit, MAX_SESSIONS)

    def test_idle_sessions_end_and_are_forgotten(self) -> None:
        """A session unused for 30 minutes is logged out and no longer held."""
        server = primary(self)
        admin = Browser(server)
        log_in(admin)
        for _ in range(3):
            Browser(server).get("/login")
        server.reactor.advance(SESSION_IDLE - 1)
        self.assertEqual(admin.get("/").code, 200)  # used: kept for another 30 minutes
        server.reactor.advance(2)
        Browser(server).get("/login")
        self.assertEqual(len(server.sessions), 2)  # the admin's and the newest
        server.reactor.advance(SESSION_IDLE)
        self.assertEqual(admin.get("/").code, 303)

    def test_flood_does_not_log_people_out(self) -> None:
        """New anonymous sessions push out other anonymous ones, not a logged-in one."""
        server = primary(self)
        server.sessions.limit = 3
        admin = Browser(server)
        log_in(admin)
        for _ in range(10):
            Browser(server).get("/login")
        self.assertEqual(len(server.sessions), 3)
        self.assertEqual(admin.get("/").code, 200)

    def test_form_too_many_fields(self) -> None:
        server = primary(self)
        browser = Browser(server)
        browser.get("/login")
        fields = {f"f{i}": "x" for i in range(300)}
        page = browser.post("/login", fields)
        self.assertEqual(page.code, 413)

    def test_field_too_long(self) -> None:
        server = primary(self)
        browser = Browser(server)
        browser.get("/login")
        page = browser.post("/login", {"name": "x" * 5000, "password": "y"})
        self.assertEqual(page.code, 413)

    def test_request_body_too_large(self) -> None:
        """A body past the web port's limit is discarded as it arrives and answered 413."""
        server = primary(self)
        channel = server.site.buildProtocol(None)
        transport = StringTransport()
        channel.makeConnection(transport)
        size = server.site.max_body + 1
        channel.dataReceived(
            b"POST /login HTTP/1.1\r\nHost: localhost\r\n"
            b"Content-Type: application/x-www-form-urlencoded\r\n"
            b"Content-Length: " + str(size).encode() + b"\r\n\r\n"
        )
        for _ in range(size // 65536 + 1):
            channel.dataReceived(b"a" * min(65536, size))
        response = transport.value()
        self.assertTrue(response.startswith(b"HTTP/1.1 413 "), response[:80])
        self.assertNotIn(b"Traceback", response)
        channel.connectionLost(io.StringIO())  # type: ignore[arg-type]


class _Req:
    """The least a request needs for ``Sessions``: no cookie, a cookie jar, plain HTTP."""

    def getCookie(self, key: bytes) -> None:
        return None

    def addCookie(self, *args: Any, **kwargs: Any) -> None:
        pass

    def isSecure(self) -> bool:
        return False
