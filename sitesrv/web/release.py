"""``/release``: the web release station.

A user logs in with their username and password, or their card number and PIN, sees
their held jobs with pages and cost, and releases some or all of them to a printer of
this site. Everything goes through the gate and the Find-Me queue, so a site that lost
its primary works under its offline policies (``offline.password_login``,
``offline.release``, the offline allowance) exactly as a card reader or an MFD would.
Every form carries the session's CSRF token; after each POST the browser is sent back
to ``/release`` with a one-time notice (post/redirect/get), so reloading never repeats
a release.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web.server import Request
from twisted.web.template import Tag, tags

from sitesrv.core.auth import AuthFailed, Identity
from sitesrv.core.findme import HeldJob, ReleaseOutcome
from sitesrv.core.gate import Gate
from sitesrv.errors import SitesrvError
from sitesrv.interfaces import IFindMe
from sitesrv.money import format_amount
from sitesrv.store.policies import thdDecimals
from sitesrv.store.printers import Printer, thdListPrinters
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
)

log = Logger()

PATH = "/release"
#: Most jobs named in one release.
MAX_JOBS = 100


def _pages(job: HeldJob) -> str:
    copies = f" x {job.copies}" if job.copies > 1 else ""
    return f"{job.pages}{copies}"


def _kind(job: HeldJob) -> str:
    return ("colour" if job.colour else "mono") + (", duplex" if job.duplex else "")


def summary(outcomes: list[ReleaseOutcome], printer: str, decimals: int) -> tuple[str, bool]:
    """One sentence on what a release did, and whether nothing was released."""
    released = [o for o in outcomes if o.released]
    refused = [o for o in outcomes if not o.released]
    parts = []
    if released:
        cost = format_amount(sum(o.cost for o in released), decimals)
        n = len(released)
        parts.append(f"Released {n} job{'s' * (n != 1)} to {printer} (cost {cost}).")
    for o in refused:
        parts.append(f"Job {o.job[:8]} not released: {o.reason}.")
    if not outcomes:
        parts.append("There was nothing to release.")
    return " ".join(parts), not released


class ReleaseStation(Page):
    """The release station of one server (its own site's printers)."""

    def __init__(
        self,
        sessions: Sessions,
        gate: Gate,
        findme: IFindMe,
        read: Callable[..., Deferred[Any]],
        site: str,
    ) -> None:
        super().__init__()
        self.sessions = sessions
        self.gate = gate
        self.findme = findme
        self.read = read
        self.site = site

    async def get(self, request: Request) -> HTML | Redirect:
        """The login forms, or the logged-in user's held jobs."""
        session = self.sessions.ensure(request)
        if session.user is None:
            return self._login(session)
        return await self._jobs(session, session.user)

    async def post(self, request: Request) -> HTML | Redirect:
        """Log in, release, or log out; then back to ``/release``."""
        session = self.sessions.find(request)
        fields = checked_form(request, session)
        assert session is not None
        action = first(fields, "action")
        if action in ("password", "card"):
            return await self._logIn(request, session, action, fields)
        if action == "logout":
            session.user = None
            self.sessions.renew(request, session).tell("Logged out.")
            return Redirect(PATH)
        if session.user is None:
            session.tell("Log in first.", error=True)
            return Redirect(PATH)
        if action in ("release", "release-all"):
            await self._release(session, session.user, fields, action == "release-all")
            return Redirect(PATH)
        session.tell(f"Unknown action {action[:40]!r}.", error=True)
        return Redirect(PATH)

    # -- logging in ------------------------------------------------------------------

    def _login(self, session: WebSession, error: str = "", code: int = 200) -> HTML:
        offline = self.gate.disconnected()
        by_password = post_form(
            session,
            PATH,
            tags.input(type="hidden", name="action", value="password"),
            field("Username", "username", autocomplete="username"),
            field("Password", "password", "password", autocomplete="current-password"),
            tags.div(button("Log in", "password-submit")),
            id="login-password",
        )
        by_card = post_form(
            session,
            PATH,
            tags.input(type="hidden", name="action", value="card"),
            field("Card number", "card", autocomplete="off"),
            field("PIN", "pin", "password", autocomplete="off", inputmode="numeric"),
            tags.div(button("Log in", "card-submit")),
            id="login-card",
        )
        content: list[Any] = []
        if error:
            content.append(tags.p(error, class_="error", id="error"))
        if offline:
            content.append(self._offlineBanner())
        content.append(
            tags.div(
                tags.section(tags.h2("Username and password"), by_password),
                tags.section(tags.h2("Card and PIN"), by_card),
                class_="columns",
            )
        )
        return HTML(
            layout("Release print jobs", *content, session=session, heading="Release print jobs"),
            code,
        )

    def _offlineBanner(self) -> Tag:
        return tags.p(
            "This site cannot reach the central server just now. You can still release "
            "jobs; charges are recorded here and handed over when the link returns.",
            class_="warning",
            id="offline",
        )

    async def _logIn(
        self, request: Request, session: WebSession, how: str, fields: dict[str, list[str]]
    ) -> HTML | Redirect:
        device = f"web:{client_address(request)}"
        try:
            if how == "password":
                identity = await self.gate.password(
                    first(fields, "username").strip(), first(fields, "password"), device
                )
            else:
                pin = first(fields, "pin")
                if not pin:
                    raise AuthFailed("a PIN is needed to log in with a card here")
                identity = await self.gate.card(first(fields, "card").strip(), device, pin)
        except AuthFailed as e:
            return self._login(session, f"Not logged in: {e.reason}.", 403)
        except SitesrvError as e:
            return self._login(session, f"Not logged in: {e}", 503)
        if identity.user.id is None or identity.user.id <= 0:
            # An unknown card let in under the offline policy has no jobs of its own.
            return self._login(session, "Not logged in: this card is not known here.", 403)
        session.user = identity
        self.sessions.renew(request, session)
        log.info(
            "{user!r} logged in to the release station by {method}",
            user=identity.user.username,
            method=identity.method,
        )
        return Redirect(PATH)

    # -- the jobs ------------------------------------------------------------------

    def _printers(self) -> Deferred[list[Printer]]:
        return self.read(thdListPrinters, self.site)

    async def _jobs(self, session: WebSession, identity: Identity) -> HTML:
        decimals = await self.read(thdDecimals)
        try:
            held = await self.findme.held(identity)
            balance: int | None = await self.gate.balance(identity)
        except SitesrvError as e:
            held, balance = [], None
            session.tell(f"Jobs cannot be listed now: {e}", error=True)
        printers = await self._printers()
        user = identity.user
        rows = [
            tags.tr(
                tags.td(
                    tags.input(
                        type="checkbox",
                        name="job",
                        value=job.uuid,
                        id=f"job-{job.uuid}",
                        checked="",
                    )
                ),
                tags.td(tags.label(job.document or "(untitled)", for_=f"job-{job.uuid}")),
                tags.td(job.queue),
                tags.td(_pages(job), class_="num"),
                tags.td(_kind(job)),
                tags.td(format_amount(job.cost, decimals), class_="num"),
                class_="job",
                **{"data-uuid": job.uuid},
            )
            for job in held
        ]
        choose = tags.select(
            *(tags.option(p.name, value=p.name) for p in printers), name="printer", id="printer"
        )
        if not held:
            jobs: Any = tags.p("You have no held jobs at this site.", class_="muted", id="jobs")
        elif not printers:
            jobs = tags.p("This site has no printers to release to.", class_="error", id="jobs")
        else:
            jobs = post_form(
                session,
                PATH,
                tags.table(
                    tags.thead(
                        tags.tr(
                            tags.th(""),
                            tags.th("Document"),
                            tags.th("Queue"),
                            tags.th("Pages", class_="num"),
                            tags.th("Kind"),
                            tags.th("Cost", class_="num"),
                        )
                    ),
                    tags.tbody(*rows),
                    id="jobs",
                ),
                tags.label("Print on", for_="printer"),
                choose,
                tags.div(
                    button("Release selected", "release-selected", name="action", value="release"),
                    button("Release all", "release-all", name="action", value="release-all"),
                ),
                id="release-form",
            )
        logout = post_form(
            session,
            PATH,
            tags.span(f"{user.full_name or user.username} ", class_="muted"),
            button("Log out", "logout-submit", name="action", value="logout"),
            id="release-logout",
            class_="inline",
        )
        content: list[Any] = []
        if self.gate.disconnected():
            content.append(self._offlineBanner())
        content.append(
            tags.section(
                tags.h2("Your held jobs"),
                tags.p(
                    "Balance: ",
                    tags.strong(
                        "unavailable" if balance is None else format_amount(balance, decimals),
                        id="balance",
                    ),
                ),
                jobs,
            )
        )
        page = layout(
            "Release print jobs",
            *content,
            session=session,
            heading="Release print jobs",
            header_extra=logout,
        )
        return HTML(page)

    async def _release(
        self,
        session: WebSession,
        identity: Identity,
        fields: dict[str, list[str]],
        everything: bool,
    ) -> None:
        printer = first(fields, "printer")
        if printer not in {p.name for p in await self._printers()}:
            session.tell("Choose a printer of this site.", error=True)
            return
        chosen = fields.get("job", [])
        if not everything and not chosen:
            session.tell("Tick the jobs to release, or press Release all.", error=True)
            return
        if len(chosen) > MAX_JOBS:
            session.tell(f"Release at most {MAX_JOBS} jobs at a time.", error=True)
            return
        try:
            outcomes = await self.findme.release(identity, printer, None if everything else chosen)
        except SitesrvError as e:
            session.tell(f"Nothing released: {e}", error=True)
            return
        text, bad = summary(list(outcomes), printer, await self.read(thdDecimals))
        session.tell(text, error=bad)
