"""Server-rendered HTML pages: the layout, browser sessions, CSRF tokens and forms.

The status page and the web release station are plain HTML forms (no JavaScript), built
with ``twisted.web.template`` tags so that every value is escaped. Every form carries
the session's CSRF token; a POST without the right one is refused before anything is
done. The session cookie is ``HttpOnly`` and ``SameSite=Strict``, and ``Secure`` when
the request came over TLS. Sessions live in memory (a restart logs everybody out),
bounded in number, and end after a time without requests.
"""

from __future__ import annotations

import hmac
import secrets
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from twisted.web.template import Tag, flattenString, tags

from sitesrv.core.auth import Identity

log = Logger()

COOKIE = b"sitesrv_session"
#: A browser session ends after this long without a request.
SESSION_IDLE = 1800.0
#: A release-station login ends sooner: it is often a shared computer.
USER_IDLE = 300.0
#: Most browser sessions held at once (the least recently used is dropped first).
MAX_SESSIONS = 10_000
#: Most fields in one form, and the longest value of one field (characters).
MAX_FIELDS = 200
MAX_FIELD_LENGTH = 1024

#: Headers on every page: no caching of personal pages, no framing, no scripts at all.
SECURITY_HEADERS = {
    b"cache-control": b"no-store",
    b"content-security-policy": (
        b"default-src 'none'; style-src 'unsafe-inline'; img-src 'self'; "
        b"form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    b"x-frame-options": b"DENY",
    b"x-content-type-options": b"nosniff",
    b"referrer-policy": b"same-origin",
}

# No "<", ">" or "&" here: the text of a <style> tag is escaped like any other text.
CSS = """
body { font-family: system-ui, sans-serif; margin: 0; color: #1d2330; background: #f4f6f9; }
header { background: #1d2330; color: #fff; padding: .6em 1.2em; display: flex;
         align-items: center; gap: 1.2em; flex-wrap: wrap; }
header h1 { font-size: 1.15em; margin: 0; font-weight: 600; }
header form { margin-left: auto; }
main { padding: 1em 1.2em; max-width: 72em; }
section { background: #fff; border: 1px solid #d8dde6; border-radius: 6px;
          padding: .4em 1em .8em; margin-bottom: 1em; }
h2 { font-size: 1.05em; margin: .6em 0; }
table { border-collapse: collapse; width: 100%; font-size: .92em; }
th, td { text-align: left; padding: .3em .6em; border-bottom: 1px solid #e6e9ef;
         vertical-align: top; }
th { color: #556; font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: .25em 1.2em; }
dl.facts dt { color: #556; }
dl.facts dd { margin: 0; }
.mode { display: inline-block; padding: .1em .6em; border-radius: 1em; color: #fff;
        font-weight: 600; background: #6b7280; }
.mode.online { background: #15803d; }
.mode.offline { background: #b91c1c; }
.mode.reconciling, .mode.syncing { background: #b45309; }
.notice { background: #ecfdf5; border: 1px solid #15803d; padding: .5em 1em;
          border-radius: 6px; margin-bottom: 1em; }
.error { background: #fef2f2; border: 1px solid #b91c1c; padding: .5em 1em;
         border-radius: 6px; margin-bottom: 1em; }
.warning { background: #fffbeb; border: 1px solid #b45309; padding: .5em 1em;
           border-radius: 6px; margin-bottom: 1em; }
.muted { color: #6b7280; }
form.inline { display: inline; }
label { display: block; margin: .5em 0 .2em; }
td label { display: inline; margin: 0; }
input[type=text], input[type=password] { padding: .35em; width: 16em; max-width: 100%; }
button { padding: .4em 1em; margin: .6em .4em 0 0; cursor: pointer; }
button.danger { background: #b91c1c; color: #fff; border: 1px solid #7f1d1d; }
.columns { display: flex; gap: 1em; flex-wrap: wrap; }
.columns section { flex: 1 1 20em; }
"""


class FormError(Exception):
    """A form the server refuses: an HTTP status and a sentence for the page."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@attrs.define
class WebSession:
    """One browser's session: its CSRF token and who (if anyone) is logged in."""

    id: str
    csrf: str
    expires: float
    #: The administrator logged in to the status page, if any.
    admin: str | None = None
    #: The user logged in to the release station, and until when.
    user: Identity | None = None
    user_expires: float = 0.0
    #: A sentence to show once on the next page (after a redirect), and whether it is bad news.
    notice: str = ""
    notice_is_error: bool = False

    def tell(self, text: str, error: bool = False) -> None:
        """Show ``text`` on the next page this browser loads."""
        self.notice, self.notice_is_error = text, error


class Sessions:
    """The browser sessions of one web port, in memory."""

    def __init__(
        self,
        clock: IReactorTime,
        idle: float = SESSION_IDLE,
        user_idle: float = USER_IDLE,
        limit: int = MAX_SESSIONS,
    ) -> None:
        self.clock = clock
        self.idle = idle
        self.user_idle = user_idle
        self.limit = limit
        self._sessions: OrderedDict[str, WebSession] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sessions)

    def find(self, request: Request) -> WebSession | None:
        """The live session named by the request's cookie, or None."""
        sid = request.getCookie(COOKIE)
        if not sid:
            return None
        session = self._sessions.get(sid.decode("ascii", "replace"))
        now = self.clock.seconds()
        if session is None:
            return None
        if session.expires <= now:
            del self._sessions[session.id]
            return None
        session.expires = now + self.idle
        if session.user is not None:
            if session.user_expires <= now:
                session.user = None
                session.tell("You were logged out after a time without activity.")
            else:
                session.user_expires = now + self.user_idle
        self._sessions.move_to_end(session.id)
        return session

    def ensure(self, request: Request) -> WebSession:
        """The request's session, or a new (anonymous) one with its cookie set."""
        return self.find(request) or self._new(request)

    def renew(self, request: Request, session: WebSession) -> WebSession:
        """Give ``session`` a new id and CSRF token (at each login and logout), so a
        session id someone saw before the change is worth nothing after it."""
        self._sessions.pop(session.id, None)
        fresh = self._new(request)
        fresh.admin, fresh.user, fresh.user_expires = session.admin, session.user, 0.0
        if fresh.user is not None:
            fresh.user_expires = self.clock.seconds() + self.user_idle
        fresh.notice, fresh.notice_is_error = session.notice, session.notice_is_error
        return fresh

    def _drop_one(self) -> None:
        """Make room: drop the least recently used session nobody is logged in to, so
        that a flood of page loads cannot log administrators or users out; only when
        every session has a login, the least recently used of all."""
        anonymous = next(
            (s.id for s in self._sessions.values() if s.admin is None and s.user is None), None
        )
        if anonymous is None:
            self._sessions.popitem(last=False)
        else:
            del self._sessions[anonymous]

    def _new(self, request: Request) -> WebSession:
        now = self.clock.seconds()
        # Every use moves a session to the end with the same idle time, so the expired
        # ones are all at the front.
        while self._sessions and next(iter(self._sessions.values())).expires <= now:
            self._sessions.popitem(last=False)
        while len(self._sessions) >= self.limit:
            self._drop_one()
        session = WebSession(
            id=secrets.token_urlsafe(32),
            csrf=secrets.token_urlsafe(32),
            expires=now + self.idle,
        )
        self._sessions[session.id] = session
        request.addCookie(
            COOKIE,
            session.id.encode("ascii"),
            path=b"/",
            httpOnly=True,
            sameSite="strict",
            secure=request.isSecure(),
        )
        return session


# -- forms ------------------------------------------------------------------------------


def form_fields(request: Request) -> dict[str, list[str]]:
    """The fields of a posted ``application/x-www-form-urlencoded`` form, bounded."""
    kind = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
    if kind != b"application/x-www-form-urlencoded":
        raise FormError(415, "Send the form as application/x-www-form-urlencoded.")
    args = request.args or {}
    if sum(len(v) for v in args.values()) > MAX_FIELDS:
        raise FormError(413, f"A form may have at most {MAX_FIELDS} fields.")
    fields: dict[str, list[str]] = {}
    try:
        for key, values in args.items():
            fields[key.decode("utf-8")] = [v.decode("utf-8") for v in values]
    except UnicodeDecodeError:
        raise FormError(400, "The form is not valid UTF-8.") from None
    for name, values in fields.items():
        if any(len(v) > MAX_FIELD_LENGTH for v in values):
            raise FormError(
                413, f"The field {name!r} is longer than {MAX_FIELD_LENGTH} characters."
            )
    return fields


def checked_form(request: Request, session: WebSession | None) -> dict[str, list[str]]:
    """The form's fields, after checking it carries ``session``'s CSRF token."""
    fields = form_fields(request)
    token = first(fields, "csrf")
    if session is None or not hmac.compare_digest(token.encode(), session.csrf.encode()):
        raise FormError(
            403,
            "This form has expired or did not come from this server: "
            "reload the page and try again.",
        )
    return fields


def first(fields: dict[str, list[str]], name: str) -> str:
    """The first value of field ``name``, or the empty string."""
    values = fields.get(name)
    return values[0] if values else ""


def csrf_field(session: WebSession) -> Tag:
    """The hidden field every form carries."""
    return tags.input(type="hidden", name="csrf", value=session.csrf)


def post_form(session: WebSession, action: str, *content: Any, **attributes: str) -> Tag:
    """A POST form to ``action`` with the CSRF field."""
    return tags.form(csrf_field(session), *content, method="post", action=action, **attributes)


def field(label: str, name: str, kind: str = "text", **attributes: str) -> list[Tag]:
    """A required input with its label (the input's id is its name)."""
    return [
        tags.label(label, for_=name),
        tags.input(type=kind, name=name, id=name, required="", **attributes),
    ]


def button(text: str, element_id: str, **attributes: str) -> Tag:
    """A submit button (``name``/``value`` attributes say which action it asks for)."""
    return tags.button(text, type="submit", id=element_id, **attributes)


def client_address(request: Request) -> str:
    """The peer's address, for throttling and logs."""
    peer = request.getClientAddress()
    return str(getattr(peer, "host", "unknown"))


# -- pages ------------------------------------------------------------------------------


@attrs.frozen
class Redirect:
    """A 303 See Other to ``location`` (a path on this server)."""

    location: str


@attrs.frozen
class HTML:
    """A page to send: its status code and content."""

    tag: Tag
    code: int = 200


def redirect_to_login(path: str, login: str) -> Redirect:
    """Where to send a browser that must log in first, coming back to ``path`` after."""
    return Redirect(f"{login}?next={quote(path, safe='/')}")


def layout(
    title: str,
    *content: Any,
    heading: str = "",
    refresh: int | None = None,
    session: WebSession | None = None,
    header_extra: Any = (),
) -> Tag:
    """A whole page: head, the dark header bar and ``content``, plus any one-time notice."""
    head = tags.head(
        tags.meta(charset="utf-8"),
        tags.meta(name="viewport", content="width=device-width, initial-scale=1"),
        tags.title(title),
        tags.style(CSS),
    )
    if refresh is not None:
        head(tags.meta(**{"http-equiv": "refresh", "content": str(refresh)}))
    notice: Any = ()
    if session is not None and session.notice:
        notice = tags.p(
            session.notice, class_="error" if session.notice_is_error else "notice", id="notice"
        )
        session.notice = ""
    return tags.html(
        head,
        tags.body(
            tags.header(tags.h1(heading or title), header_extra),
            Tag("main")(notice, *content),
        ),
        lang="en",
    )


def message_page(title: str, text: str, code: int) -> HTML:
    """A page that only says ``text``: errors and refusals."""
    return HTML(layout(title, tags.p(text, class_="error", id="error")), code)


Handler = Callable[[Request], Awaitable["HTML | Redirect"]]


class Page(Resource):
    """A page answered by coroutines ``get`` and ``post``; nothing below it.

    Unexpected errors are logged and answered with a plain 500 page: no stack trace
    ever reaches the browser. `FormError` becomes its status and sentence.
    """

    isLeaf = True

    async def get(self, request: Request) -> HTML | Redirect:
        """Answer a GET (and HEAD)."""
        return message_page("Not allowed", "This page does not answer GET.", 405)

    async def post(self, request: Request) -> HTML | Redirect:
        """Answer a POST."""
        return message_page("Not allowed", "This page does not answer POST.", 405)

    def render_GET(self, request: Request) -> int:
        """Run ``get``."""
        return self._run(request, self.get)

    def render_HEAD(self, request: Request) -> int:
        """As GET; twisted.web drops the body."""
        return self._run(request, self.get)

    def render_POST(self, request: Request) -> int:
        """Run ``post``."""
        return self._run(request, self.post)

    def _run(self, request: Request, handler: Handler) -> int:
        gone: list[Failure] = []
        request.notifyFinish().addErrback(gone.append)
        for name, value in SECURITY_HEADERS.items():
            request.setHeader(name, value)

        async def answer() -> None:
            try:
                code, location, body = await self._respond(request, handler)
            except Exception:
                log.failure("web page {path} failed", path=_path(request))
                code, location, body = 500, None, PLAIN_500
            if gone:
                return
            request.setResponseCode(code)
            if location is not None:
                request.setHeader(b"location", location.encode("utf-8"))
            else:
                request.setHeader(b"content-type", b"text/html; charset=utf-8")
            request.write(body)
            request.finish()

        Deferred.fromCoroutine(answer()).addErrback(
            lambda f: log.failure("answering {path}", f, path=_path(request))
        )
        return NOT_DONE_YET

    async def _respond(self, request: Request, handler: Handler) -> tuple[int, str | None, bytes]:
        try:
            result = await handler(request)
        except FormError as e:
            result = message_page("Refused", e.message, e.code)
        if isinstance(result, Redirect):
            return 303, result.location, b""
        return result.code, None, b"<!DOCTYPE html>\n" + await flattenString(None, result.tag)


def _path(request: Request) -> str:
    return bytes(getattr(request, "path", b"") or b"").decode("latin-1")


PLAIN_500 = (
    b"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>Error</title>"
    b"</head><body><p id='error'>Something went wrong on the server; the details are in "
    b"its log.</p></body></html>\n"
)


class NoIcon(Resource):
    """``/favicon.ico``: browsers ask for it with every page; answer that there is none
    (204, cached for a day) rather than a 404 in the log each time."""

    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        """No content."""
        request.setResponseCode(204)
        request.setHeader(b"cache-control", b"max-age=86400")
        return b""


def safe_next(target: str, default: str = "/") -> str:
    """``target`` if it is a path on this server (not ``//host`` or a URL), else ``default``."""
    if target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target
    return default
