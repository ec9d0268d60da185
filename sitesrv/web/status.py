"""The status page ``/`` and the administrators' login.

Server-rendered and refreshing itself every few seconds, readable without JavaScript:
the role, mode and since when, last sync, lag, outbox and the last transitions with
their reasons; on the primary, every site (lag, skew, pending outbox), the
offline-overdraft, suspense and dead-letter reports and the audit log; at a site, its
devices and print providers and whether each is connected.

Only administrators see it: on the primary those created with ``sitesrv-admin admin add``
(never replicated), and on any server those in its config's ``[web.admins]`` table.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

from sqlalchemy import Connection
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web.server import Request
from twisted.web.template import Tag, tags

from sitesrv.connectormanager import DeviceState
from sitesrv.core.auth import FailureThrottle
from sitesrv.money import format_amount
from sitesrv.store import ledger
from sitesrv.store.audit import AuditEntry, thdListAudit
from sitesrv.store.devices import thdListProviders
from sitesrv.store.outbox import DeadLetterRecord, thdListDeadLetters
from sitesrv.store.policies import thdDecimals
from sitesrv.web.pages import (
    HTML,
    Page,
    Redirect,
    Sessions,
    WebSession,
    button,
    checked_form,
    client_address,
    field,
    first,
    layout,
    post_form,
    redirect_to_login,
    safe_next,
)

log = Logger()

#: Seconds between the status page's refreshes.
REFRESH = 5
#: Rows shown in each table of the status page.
ROWS = 20
LOGIN = "/login"


class DemoControls(Protocol):
    """The demo's buttons on the status page (``sitesrv.demo``); None outside the demo."""

    def linkCut(self) -> bool:
        """Whether the demo's replication link is cut now."""

    def cutLink(self) -> Deferred[None]:
        """Cut the link between the demo's site and primary (a simulated outage)."""

    def restoreLink(self) -> Deferred[None]:
        """Restore the link: the site reconnects and reconciles."""

    def printSample(self) -> Deferred[str]:
        """Print a sample document as a demo user; fires with a sentence for the page."""


class StatusSource(Protocol):
    """What the status page reads from its server (``sitesrv.server.Server``)."""

    def status(self) -> Deferred[dict[str, Any]]:
        """What ``/health`` reports."""

    def deviceStates(self) -> list[DeviceState]:
        """This site's devices and their connectors."""

    def providersConnected(self) -> frozenset[str]:
        """Names of the print providers connected now."""


AdminCheck = Callable[[str, str], Deferred[bool]]


def when(at: float | None, now: float) -> Any:
    """A time as UTC text with how long ago it was."""
    if at is None:
        return tags.span("never", class_="muted")
    text = datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return [text, tags.span(f" ({ago(now - at)})", class_="muted")]


def ago(seconds: float) -> str:
    """``"12 s ago"``, ``"3 min ago"``, ``"2 h ago"``, ``"4 days ago"``."""
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    if seconds < 172800:
        return f"{seconds / 3600:.0f} h ago"
    return f"{seconds / 86400:.0f} days ago"


def table(
    table_id: str, headings: Sequence[str], rows: Sequence[Sequence[Any]], empty: str
) -> Tag:
    """A table (numbers right-aligned where the heading starts with '#'), or ``empty``."""
    if not rows:
        return tags.p(empty, class_="muted", id=table_id)
    numeric = [h.startswith("#") for h in headings]

    def cell(tag: Tag, content: Any, number: bool) -> Tag:
        return tag(content, class_="num") if number else tag(content)

    head = tags.tr(
        *(cell(tags.th(), h.lstrip("#"), n) for h, n in zip(headings, numeric, strict=True))
    )
    body = [
        tags.tr(*(cell(tags.td(), c, n) for c, n in zip(row, numeric, strict=True)))
        for row in rows
    ]
    return tags.table(tags.thead(head), tags.tbody(*body), id=table_id)


def dash(value: Any) -> Any:
    """``value``, or an em dash for None."""
    return "—" if value is None else value


def skew_text(skew: float | None) -> str:
    """A clock difference in seconds, signed."""
    return "—" if skew is None else f"{skew:+.1f} s"


def _thdReports(
    conn: Connection,
) -> tuple[int, list[ledger.Transaction], list[ledger.Transaction], list[DeadLetterRecord]]:
    """The primary's reports for the status page, in one read transaction: the currency's
    decimals, offline overdrafts, suspense and unresolved dead letters."""
    return (
        thdDecimals(conn),
        ledger.thdOverdrafts(conn, ROWS),
        ledger.thdSuspense(conn, ROWS),
        thdListDeadLetters(conn, False)[:ROWS],
    )


class AdminPage(Page):
    """A page only a logged-in administrator sees."""

    def __init__(self, sessions: Sessions) -> None:
        super().__init__()
        self.sessions = sessions

    def admin(self, request: Request) -> WebSession | None:
        """The request's session if an administrator is logged in to it."""
        session = self.sessions.find(request)
        return session if session is not None and session.admin else None


class StatusPage(AdminPage):
    """``/``: the status page."""

    def __init__(
        self,
        sessions: Sessions,
        source: StatusSource,
        read: Callable[..., Deferred[Any]],
        clock: Any,
    ) -> None:
        super().__init__(sessions)
        self.source = source
        self.read = read
        self.clock = clock
        #: The demo's controls; set by ``sitesrv.demo``.
        self.demo: DemoControls | None = None

    async def get(self, request: Request) -> HTML | Redirect:
        """The page, or the login page first."""
        session = self.admin(request)
        if session is None:
            return redirect_to_login("/", LOGIN)
        status = await self.source.status()
        now = self.clock.seconds()
        role, name = status["role"], status["name"]
        content: list[Any] = [self._overview(status, now)]
        if self.demo is not None:
            content.append(self._demo(session))
        if role == "primary":
            content.append(self._sites(status.get("sites", []), now))
            content.append(await self._reports(now))
            content.append(await self._audit(now))
        else:
            content.append(self._transitions(status.get("transitions", []), now))
            content.append(
                tags.div(self._devices(), await self._providers(name), class_="columns")
            )
        logout = post_form(
            session,
            "/logout",
            tags.span(f"{session.admin} ", class_="muted"),
            button("Log out", "logout-submit"),
            id="logout",
            class_="inline",
        )
        page = layout(
            f"sitesrv {role} {name}",
            *content,
            heading=f"sitesrv — {role} “{name}”",
            refresh=REFRESH,
            session=session,
            header_extra=logout,
        )
        return HTML(page)

    def _overview(self, status: dict[str, Any], now: float) -> Tag:
        mode = status["mode"]
        facts: list[tuple[str, Any]] = [
            ("Role", tags.span(status["role"], id="role")),
            ("Mode", tags.span(mode, class_=f"mode {mode}", id="mode")),
            ("Since", when(status.get("since"), now)),
        ]
        if status["role"] == "site":
            facts += [
                ("Last sync", tags.span(when(status.get("last_sync"), now), id="last-sync")),
                ("Replication lag", tags.span(f"{dash(status.get('lag'))} changes", id="lag")),
                (
                    "Outbox pending",
                    tags.span(str(dash(status.get("outbox_pending"))), id="outbox"),
                ),
                ("Clock skew", skew_text(status.get("clock_skew"))),
            ]
        facts += [
            ("Change-log position", str(dash(status.get("position")))),
            ("Print providers connected", ", ".join(status.get("providers", [])) or "none"),
            ("Version", status["version"]),
        ]
        items: list[Any] = []
        for label, value in facts:
            items += [tags.dt(label), tags.dd(value)]
        problems = status.get("problems") or []
        found: Any = (
            tags.div(
                tags.strong("Problems"),
                tags.ul(*(tags.li(p) for p in problems)),
                class_="warning",
                id="problems",
            )
            if problems
            else tags.p("No problems.", class_="muted", id="problems")
        )
        return tags.section(tags.h2("This server"), tags.dl(*items, class_="facts"), found)

    def _demo(self, session: WebSession) -> Tag:
        assert self.demo is not None
        if self.demo.linkCut():
            link = button("Restore link", "restore-link", name="action", value="restore")
            state = "The demo's replication link is cut: the site works offline."
        else:
            link = button(
                "Simulate outage", "cut-link", name="action", value="cut", class_="danger"
            )
            state = "The demo's replication link is up."
        sample = button(
            "Print a sample job for alice", "print-sample", name="action", value="print"
        )
        return tags.section(
            tags.h2("Demo"),
            tags.p(state, id="link-state"),
            post_form(session, "/demo", link, sample, id="demo-controls"),
            tags.p(
                "Release held jobs at the site's ",
                tags.a("release station", href="/release"),
                " (alice / alice-pass, or card 1001 with PIN 1234).",
                class_="muted",
            ),
        )

    def _transitions(self, transitions: list[dict[str, Any]], now: float) -> Tag:
        rows = [
            [when(t["at"], now), f"{t['from']} → {t['to']}", t["reason"]]
            for t in transitions[:ROWS]  # newest first, as the machine keeps them
        ]
        return tags.section(
            tags.h2(f"Last {ROWS} mode changes"),
            table("transitions", ["When", "Change", "Reason"], rows, "No mode changes yet."),
        )

    def _sites(self, sites: list[dict[str, Any]], now: float) -> Tag:
        rows = [
            [
                s["name"],
                tags.span(s["state"], class_=f"mode {'online' if s['connected'] else 'offline'}"),
                when(s["last_seen"], now) if s["last_seen"] is not None else "never",
                str(dash(s["lag"])),
                skew_text(s["clock_skew"]),
                str(dash(s.get("outbox_pending"))),
                dash(s["software_version"]),
            ]
            for s in sites
        ]
        return tags.section(
            tags.h2("Sites"),
            table(
                "sites",
                [
                    "Site",
                    "State",
                    "Last seen",
                    "#Lag",
                    "#Clock skew",
                    "#Outbox pending",
                    "Version",
                ],
                rows,
                "No sites enrolled yet (sitesrv-admin site add NAME).",
            ),
        )

    def _devices(self) -> Tag:
        rows = [
            [
                d.name,
                d.connector,
                dash(d.printer),
                tags.span(
                    "connected" if d.connections else d.state,
                    class_="mode online" if d.connections else "mode",
                ),
                str(d.connections),
                d.problem,
            ]
            for d in self.source.deviceStates()
        ]
        return tags.section(
            tags.h2("Devices"),
            table(
                "devices",
                ["Device", "Connector", "Printer", "State", "#Connections", "Problem"],
                rows,
                "No devices at this site.",
            ),
        )

    async def _providers(self, site: str) -> Tag:
        connected = self.source.providersConnected()
        rows = [
            [
                p.name,
                tags.span(
                    "connected" if p.name in connected else "not connected",
                    class_="mode online" if p.name in connected else "mode offline",
                ),
            ]
            for p in await self.read(thdListProviders, site)
        ]
        return tags.section(
            tags.h2("Print providers"),
            table("providers", ["Provider", "State"], rows, "No print providers at this site."),
        )

    async def _reports(self, now: float) -> Tag:
        decimals, overdrafts, suspense, letters = await self.read(_thdReports)

        def charges(table_id: str, found: list[ledger.Transaction], empty: str) -> Tag:
            rows = [
                [
                    when(t.created_at, now),
                    t.account_name,
                    format_amount(t.amount, decimals),
                    format_amount(t.balance_after, decimals),
                    t.site,
                    t.comment or t.reason,
                ]
                for t in found
            ]
            return table(
                table_id,
                ["When", "Account", "#Amount", "#Balance after", "Site", "Note"],
                rows,
                empty,
            )

        letter_rows = [
            [str(d.id), d.site, str(d.seq), when(d.created_at, now), d.error] for d in letters
        ]
        return tags.section(
            tags.h2("Reports"),
            tags.h3("Offline overdrafts"),
            charges("overdrafts", overdrafts, "No offline overdrafts."),
            tags.h3("Suspense"),
            charges("suspense", suspense, "Nothing in suspense."),
            tags.h3("Dead letters (unresolved)"),
            table(
                "dead-letters",
                ["#ID", "Site", "#Seq", "When", "Error"],
                letter_rows,
                "No dead letters.",
            ),
            id="reports",
        )

    async def _audit(self, now: float) -> Tag:
        entries: list[AuditEntry] = await self.read(thdListAudit, ROWS)
        rows = [[when(e.at, now), e.actor, e.action, e.target] for e in entries]
        return tags.section(
            tags.h2(f"Audit log (last {ROWS})"),
            table("audit", ["When", "Who", "Action", "Target"], rows, "Nothing audited yet."),
        )


class LoginPage(Page):
    """``/login``: administrators log in with a name and password."""

    def __init__(
        self, sessions: Sessions, check: AdminCheck, throttle: FailureThrottle, role: str
    ) -> None:
        super().__init__()
        self.sessions = sessions
        self.check = check
        self.throttle = throttle
        self.role = role

    def _form(self, session: WebSession, target: str, error: str = "", code: int = 200) -> HTML:
        how = (
            "Administrators are added with `sitesrv-admin admin add NAME --password-stdin` "
            "on the primary, or in this server's config ([web.admins])."
            if self.role == "primary"
            else "This site's administrators are in its config ([web.admins]); "
            "make a password hash with `sitesrv-admin admin hash --password-stdin`."
        )
        form = post_form(
            session,
            LOGIN,
            tags.input(type="hidden", name="next", value=target),
            field("Name", "name", autocomplete="username"),
            field("Password", "password", "password", autocomplete="current-password"),
            tags.div(button("Log in", "login-submit")),
            id="login",
        )
        content: list[Any] = []
        if error:
            content.append(tags.p(error, class_="error", id="error"))
        content += [
            tags.section(tags.h2("Administrator login"), form, tags.p(how, class_="muted"))
        ]
        return HTML(layout("sitesrv login", *content, session=session), code)

    async def get(self, request: Request) -> HTML | Redirect:
        """The login form (or the page asked for, when already logged in)."""
        target = safe_next((request.args or {}).get(b"next", [b"/"])[0].decode("utf-8", "replace"))
        session = self.sessions.ensure(request)
        if session.admin:
            return Redirect(target)
        return self._form(session, target)

    async def post(self, request: Request) -> HTML | Redirect:
        """Check the name and password; log in and go on, or say no."""
        session = self.sessions.find(request)
        fields = checked_form(request, session)
        assert session is not None
        name, password = first(fields, "name").strip(), first(fields, "password")
        target = safe_next(first(fields, "next"))
        address = client_address(request)
        keys = (f"admin:{name}", f"admin-from:{address}")
        wait = max(self.throttle.wait(k) for k in keys)
        if wait > 0:
            return self._form(
                session, target, f"Too many failed logins: try again in {wait:.0f} s.", 429
            )
        if not name or not password or not await self.check(name, password):
            for key in keys:
                self.throttle.failed(key)
            log.warn(
                "administrator login as {name!r} from {address} refused",
                name=name[:64],
                address=address,
            )
            return self._form(session, target, "Wrong name or password.", 403)
        for key in keys:
            self.throttle.succeeded(key)
        session.admin = name
        self.sessions.renew(request, session)
        log.info("administrator {name!r} logged in from {address}", name=name, address=address)
        return Redirect(target)


class LogoutPage(Page):
    """``/logout``: end the administrator's login (a POST with the CSRF token)."""

    def __init__(self, sessions: Sessions) -> None:
        super().__init__()
        self.sessions = sessions

    async def post(self, request: Request) -> HTML | Redirect:
        """Log out and go to the login page."""
        session = self.sessions.find(request)
        checked_form(request, session)
        assert session is not None
        if session.admin:
            log.info("administrator {name!r} logged out", name=session.admin)
        session.admin = None
        fresh = self.sessions.renew(request, session)
        fresh.tell("Logged out.")
        return Redirect(LOGIN)


class DemoPage(AdminPage):
    """``/demo``: the demo's buttons (administrators only, CSRF-checked)."""

    def __init__(self, sessions: Sessions, status: StatusPage) -> None:
        super().__init__(sessions)
        self.status = status

    async def post(self, request: Request) -> HTML | Redirect:
        """Cut or restore the demo's link, or print a sample job; back to the status page."""
        session = self.admin(request)
        if session is None:
            return redirect_to_login("/", LOGIN)
        fields = checked_form(request, session)
        demo = self.status.demo
        if demo is None:
            session.tell("This server is not running the demo.", error=True)
            return Redirect("/")
        action = first(fields, "action")
        if action == "cut":
            await demo.cutLink()
            session.tell("Link cut: the site is offline until you restore it.")
        elif action == "restore":
            await demo.restoreLink()
            session.tell("Link restored: the site reconnects and hands back what it recorded.")
        elif action == "print":
            session.tell(await demo.printSample())
        else:
            session.tell(f"Unknown demo action {action[:40]!r}.", error=True)
        log.info("demo action {action!r} by {name!r}", action=action[:40], name=session.admin)
        return Redirect("/")
