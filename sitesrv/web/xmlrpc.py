"""A PaperCut-compatible XML-RPC API at ``/rpc/api/xmlrpc``, on the primary only.

Scripts written for PaperCut's public API keep working: the same method names
(``api.getUserAccountBalance``...), the same argument order, the auth token as the first
argument of every call, amounts as floats and user properties as strings. Inside, money
stays integer minor units: floats are converted at this boundary with ``sitesrv.money``.
Every change goes through the store's change-logged functions (so it replicates to the
sites) and is written to the audit log with actor ``xmlrpc``, in the same transaction.

The token is compared in constant time; wrong tokens are logged and, after a few from
one address, slowed down. Every error is an XML-RPC fault with one clear sentence,
never a stack trace. ``docs/xmlrpc.rst`` documents each method.
"""

from __future__ import annotations

import hashlib
import hmac
import inspect
import math
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy import Connection, select
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from twisted.web.xmlrpc import XMLRPC, Fault, NoSuchFunction, withRequest

from sitesrv.cardnumber import CardNormaliser, CardNumberError
from sitesrv.config import MIN_API_TOKEN, WebConfig
from sitesrv.core.auth import FailureThrottle
from sitesrv.errors import AlreadyExists, Invalid, NotFound, SitesrvError
from sitesrv.money import AmountError, format_amount, from_float, parse_amount, to_float
from sitesrv.store import ledger, users
from sitesrv.store.audit import thdAudit
from sitesrv.store.policies import thdDecimals
from sitesrv.store.schema import accounts

log = Logger()

#: Who the audit log says made a change through this API.
ACTOR = "xmlrpc"
#: Largest request body accepted, bytes.
MAX_BODY = 65_536
#: Most usernames ``api.listUserAccounts`` returns at once (PaperCut's limit too).
MAX_LIST = 1000
#: Longest full name, email or comment accepted (the database's column size).
MAX_TEXT = 200
MAX_COMMENT = 1000

# Fault codes (Twisted's own: 8001 no such method, 8002 internal error).
FAULT_NO_METHOD = XMLRPC.NOT_FOUND
FAULT_INTERNAL = XMLRPC.FAILURE
FAULT_AUTH = 8003
FAULT_INVALID = 8004
FAULT_NOT_FOUND = 8005
FAULT_EXISTS = 8006

#: The user properties ``getUserProperty`` / ``setUserProperty`` know.
#: ``disabled-print`` is PaperCut's name for ``disabled``.
PROPERTIES = ("full-name", "email", "balance", "disabled", "disabled-print", "restricted")


def read_api_token(web: WebConfig) -> str | None:
    """The configured token (from ``xmlrpc_token`` or its file), or None when the API is off.

    Raises ValueError with a one-line message when the file is unreadable or unfit.
    """
    if web.xmlrpc_token is not None:
        return web.xmlrpc_token
    path = web.xmlrpc_token_file
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read(4096).splitlines()
    except (OSError, UnicodeDecodeError) as e:
        reason = getattr(e, "strerror", None) or str(e)
        raise ValueError(f"cannot read web.xmlrpc_token_file {path}: {reason}") from None
    token = lines[0].strip() if lines else ""
    if len(token) < MIN_API_TOKEN:
        raise ValueError(
            f"web.xmlrpc_token_file {path}: the token must be at least {MIN_API_TOKEN} characters"
        )
    return token


def mount(root: Resource, api: Resource) -> None:
    """Serve ``api`` at ``/rpc/api/xmlrpc`` under ``root``."""
    rpc = root.getStaticEntity(b"rpc")
    if rpc is None:
        rpc = Resource()
        root.putChild(b"rpc", rpc)
    inner = rpc.getStaticEntity(b"api")
    if inner is None:
        inner = Resource()
        rpc.putChild(b"api", inner)
    inner.putChild(b"xmlrpc", api)


# -- argument checks ---------------------------------------------------------------------


def _fault(code: int, message: str) -> Fault:
    return Fault(code, message)


def _text(value: Any, what: str, limit: int = MAX_TEXT) -> str:
    if not isinstance(value, str):
        raise _fault(FAULT_INVALID, f"{what} must be a string")
    if len(value) > limit:
        raise _fault(FAULT_INVALID, f"{what} is longer than {limit} characters")
    return value


def _username(value: Any) -> str:
    name = _text(value, "the username").strip()
    if not name:
        raise _fault(FAULT_INVALID, "the username must not be empty")
    return name


def _amount(value: Any, what: str) -> float:
    # XML-RPC <double> (and <int>, which PaperCut's clients sometimes send); never <boolean>.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _fault(FAULT_INVALID, f"{what} must be a number")
    if isinstance(value, float) and not math.isfinite(value):
        raise _fault(FAULT_INVALID, f"{what} must be a finite number")
    return float(value)


def _personal(account_name: Any) -> None:
    name = _text(account_name, "accountName")
    if name.strip():
        raise _fault(
            FAULT_INVALID,
            f"unknown account {name!r}: sitesrv has one personal account per user; "
            'give accountName as ""',
        )


def _integer(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fault(FAULT_INVALID, f"{what} must be an integer")
    return value


def _boolean(value: str, what: str) -> bool:
    text = value.strip().lower()
    if text in ("true", "yes", "y", "1"):
        return True
    if text in ("false", "no", "n", "0"):
        return False
    raise _fault(FAULT_INVALID, f'{what} must be "true" or "false", not {value[:40]!r}')


# -- the transactions (on the database threads) -------------------------------------------


def thdUserExists(conn: Connection, username: str) -> bool:
    """Whether there is a user named ``username``."""
    try:
        users.thdUser(conn, username)
    except NotFound:
        return False
    return True


def thdBalance(conn: Connection, username: str) -> float:
    """The user's personal balance as a float of currency units."""
    user = users.thdUser(conn, username)
    return to_float(user.balance, thdDecimals(conn))


def thdAdjust(
    conn: Connection, username: str, amount: float, comment: str, now: float, site: str
) -> None:
    """Add ``amount`` (currency units, may be negative) to the user's balance; audited."""
    decimals = thdDecimals(conn)
    minor = from_float(amount, decimals)
    user = users.thdUser(conn, username)
    if minor == 0:
        return  # nothing changes, so nothing to record
    txn = ledger.thdPost(conn, user.account_id, minor, "adjust", now, site=site, comment=comment)
    thdAudit(
        conn,
        ACTOR,
        "balance.adjust",
        username,
        now,
        amount=format_amount(minor, decimals),
        amount_minor=minor,
        balance=format_amount(txn.balance_after, decimals),
        comment=comment,
    )


def thdSetBalance(
    conn: Connection, username: str, balance: int, comment: str, now: float, site: str
) -> None:
    """Set the user's balance to ``balance`` minor units (one "set" transaction); audited."""
    decimals = thdDecimals(conn)
    user = users.thdUser(conn, username)
    # The row lock first, so the difference is computed from the balance it applies to.
    current = conn.execute(
        select(accounts.c.balance).where(accounts.c.id == user.account_id).with_for_update()
    ).scalar_one()
    if balance == current:
        return
    ledger.thdPost(
        conn, user.account_id, balance - current, "set", now, site=site, comment=comment
    )
    thdAudit(
        conn,
        ACTOR,
        "balance.set",
        username,
        now,
        balance=format_amount(balance, decimals),
        balance_minor=balance,
        previous=format_amount(current, decimals),
        comment=comment,
    )


def thdSetBalanceFloat(
    conn: Connection, username: str, balance: float, comment: str, now: float, site: str
) -> None:
    """``thdSetBalance`` with the balance as a float of currency units."""
    thdSetBalance(conn, username, from_float(balance, thdDecimals(conn)), comment, now, site)


def thdGetProperty(conn: Connection, username: str, name: str) -> str:
    """A user property as PaperCut gives it: a string."""
    user = users.thdUser(conn, username)
    if name == "full-name":
        return user.full_name
    if name == "email":
        return user.email
    if name == "balance":
        return format_amount(user.balance, thdDecimals(conn))
    if name in ("disabled", "disabled-print"):
        return "true" if user.disabled else "false"
    if name == "restricted":
        return "true" if user.restricted else "false"
    raise AssertionError(name)  # checked before


def thdSetProperty(
    conn: Connection, username: str, name: str, value: str, now: float, site: str
) -> None:
    """Set a user property from its string form; audited when it changes anything."""
    user = users.thdUser(conn, username)
    if name in ("full-name", "email"):
        column = "full_name" if name == "full-name" else "email"
        if getattr(user, column) == value:
            return
        users.thdUpdateUser(conn, username, now, **{column: value})
        thdAudit(conn, ACTOR, "user.update", username, now, **{column: value})
    elif name == "balance":
        try:
            balance = parse_amount(value, thdDecimals(conn))
        except AmountError as e:
            raise Invalid(f"balance: {e}") from None
        thdSetBalance(conn, username, balance, "set by XML-RPC setUserProperty", now, site)
    elif name in ("disabled", "disabled-print"):
        disabled = _boolean(value, name)
        if disabled != user.disabled:
            users.thdSetDisabled(conn, username, disabled, now)
            action = "user.disable" if disabled else "user.enable"
            thdAudit(conn, ACTOR, action, username, now)
    elif name == "restricted":
        restricted = _boolean(value, name)
        if restricted != user.restricted:
            users.thdSetCredit(conn, username, restricted, user.credit_limit, now)
            thdAudit(conn, ACTOR, "user.set-credit", username, now, restricted=restricted)
    else:
        raise AssertionError(name)  # checked before


def thdAddUser(conn: Connection, username: str, now: float, site: str) -> None:
    """Create a user with a zero, restricted personal balance; audited."""
    users.thdAddUser(conn, username, now, site=site)
    thdAudit(conn, ACTOR, "user.add", username, now)


def thdListUsernames(conn: Connection, offset: int, limit: int) -> list[str]:
    """Usernames in name order, ``limit`` from ``offset``."""
    return [u.username for u in users.thdListUsers(conn, offset, limit)]


def thdUsernameByCard(conn: Connection, number: str) -> str:
    """The username holding the (normalised) card ``number``, or ""."""
    credentials = users.thdCredentialsByCard(conn, number)
    return "" if credentials is None else credentials.user.username


def thdAddToGroup(conn: Connection, username: str, group: str, now: float) -> None:
    """Add a user to an existing group; audited when they were not a member yet."""
    if users.thdAddMember(conn, group, username, now):
        thdAudit(conn, ACTOR, "group.add-member", group, now, username=username)


# -- the resource ------------------------------------------------------------------------

Procedure = Callable[..., Awaitable[Any]]


class PaperCutAPI(XMLRPC):
    """The XML-RPC resource: ``api.<method>(token, ...)`` as PaperCut names them.

    ``read`` and ``write`` run ``thd`` functions off the reactor thread (``Store.runRead``
    and ``runWrite``); ``site`` is the primary's name, recorded on ledger transactions.
    """

    def __init__(
        self,
        token: str,
        read: Callable[..., Deferred[Any]],
        write: Callable[..., Deferred[Any]],
        clock: IReactorTime,
        site: str,
        normaliser: CardNormaliser | None = None,
        throttle: FailureThrottle | None = None,
    ) -> None:
        super().__init__(allowNone=False, useDateTime=False)
        self._digest = hashlib.sha256(token.encode("utf-8")).digest()
        self.read = read
        self.write = write
        self.clock = clock
        self.site = site
        self.normaliser = normaliser or CardNormaliser()
        self.throttle = throttle or FailureThrottle(clock)
        self.procedures: dict[str, Procedure] = {
            "api.isUserExists": self.isUserExists,
            "api.getUserAccountBalance": self.getUserAccountBalance,
            "api.adjustUserAccountBalance": self.adjustUserAccountBalance,
            "api.setUserAccountBalance": self.setUserAccountBalance,
            "api.getUserProperty": self.getUserProperty,
            "api.setUserProperty": self.setUserProperty,
            "api.addNewUser": self.addNewUser,
            "api.listUserAccounts": self.listUserAccounts,
            "api.lookUpUserNameByCardNo": self.lookUpUserNameByCardNo,
            "api.addUserToGroup": self.addUserToGroup,
        }

    # -- plumbing -----------------------------------------------------------------------

    def render_POST(self, request: Request) -> int | bytes:
        """Refuse an oversized body before parsing it; otherwise answer as XMLRPC does."""
        length = request.getHeader(b"content-length")
        assert request.content is not None
        too_long = length is not None and (not length.isdigit() or int(length) > MAX_BODY)
        if not too_long:
            request.content.seek(0, 2)
            too_long = request.content.tell() > MAX_BODY
        if too_long:
            self._cbRender(_fault(FAULT_INVALID, f"request larger than {MAX_BODY} bytes"), request)
            return NOT_DONE_YET
        result: int | bytes = super().render_POST(request)
        return result

    def listProcedures(self) -> list[str]:
        """The methods this API implements."""
        return sorted(self.procedures)

    def lookupProcedure(self, procedurePath: str) -> Callable[..., Deferred[Any]]:
        """The callable for ``api.<method>``; a fault naming the method otherwise."""
        procedure = self.procedures.get(procedurePath)
        if procedure is None:
            raise NoSuchFunction(FAULT_NO_METHOD, f"no such method: {procedurePath[:100]}")

        @withRequest
        def call(request: Request, *args: Any) -> Deferred[Any]:
            return Deferred.fromCoroutine(self._call(request, procedurePath, procedure, args))

        return call

    async def _call(
        self, request: Request, path: str, procedure: Procedure, args: tuple[Any, ...]
    ) -> Any:
        peer = getattr(request.getClientAddress(), "host", "unknown")
        key = f"xmlrpc:{peer}"
        wait = self.throttle.wait(key)
        if wait > 0:
            raise _fault(FAULT_AUTH, f"too many failed attempts; try again in {math.ceil(wait)} s")
        if not args or not self._tokenMatches(args[0]):
            self.throttle.failed(key)
            log.warn("XML-RPC {method} from {peer} refused: wrong token", method=path, peer=peer)
            raise _fault(FAULT_AUTH, "invalid authentication token")
        self.throttle.succeeded(key)
        rest = args[1:]
        try:
            inspect.signature(procedure).bind(*rest)
        except TypeError:
            names = ", ".join(["authToken", *inspect.signature(procedure).parameters])
            raise _fault(FAULT_INVALID, f"{path} takes ({names})") from None
        try:
            return await procedure(*rest)
        except Fault:
            raise
        except NotFound as e:
            raise _fault(FAULT_NOT_FOUND, str(e)) from None
        except AlreadyExists as e:
            raise _fault(FAULT_EXISTS, str(e)) from None
        except (SitesrvError, AmountError) as e:
            raise _fault(FAULT_INVALID, str(e)) from None
        except Exception:
            log.failure("XML-RPC {method} failed", method=path)
            raise _fault(
                FAULT_INTERNAL, "internal error; the server's log has the details"
            ) from None

    def _tokenMatches(self, given: Any) -> bool:
        if not isinstance(given, str):
            return False
        digest = hashlib.sha256(given.encode("utf-8", "surrogatepass")).digest()
        return hmac.compare_digest(digest, self._digest)

    def _now(self) -> float:
        return self.clock.seconds()

    # -- the methods (arguments after the token, in PaperCut's order) ---------------------

    async def isUserExists(self, userName: Any) -> bool:
        """Whether the user exists."""
        exists: bool = await self.read(thdUserExists, _username(userName))
        return exists

    async def getUserAccountBalance(self, userName: Any, accountName: Any = "") -> float:
        """The user's balance (accountName "" is their personal account)."""
        _personal(accountName)
        balance: float = await self.read(thdBalance, _username(userName))
        return balance

    async def adjustUserAccountBalance(
        self, userName: Any, adjustment: Any, comment: Any = "", accountName: Any = ""
    ) -> bool:
        """Add ``adjustment`` (negative to deduct) to the user's balance."""
        name = _username(userName)
        amount = _amount(adjustment, "the adjustment")
        text = _text(comment, "the comment", MAX_COMMENT)
        _personal(accountName)
        await self.write(thdAdjust, name, amount, text, self._now(), self.site)
        return True

    async def setUserAccountBalance(
        self, userName: Any, balance: Any, comment: Any = "", accountName: Any = ""
    ) -> bool:
        """Set the user's balance to ``balance``."""
        name = _username(userName)
        amount = _amount(balance, "the balance")
        text = _text(comment, "the comment", MAX_COMMENT)
        _personal(accountName)
        await self.write(thdSetBalanceFloat, name, amount, text, self._now(), self.site)
        return True

    async def getUserProperty(self, userName: Any, propertyName: Any) -> str:
        """A user property as a string (see ``PROPERTIES``)."""
        name = _username(userName)
        prop = _property(propertyName)
        value: str = await self.read(thdGetProperty, name, prop)
        return value

    async def setUserProperty(self, userName: Any, propertyName: Any, propertyValue: Any) -> bool:
        """Set a user property from a string (see ``PROPERTIES``)."""
        name = _username(userName)
        prop = _property(propertyName)
        value = _text(propertyValue, "the property value")
        if prop in ("full-name", "email"):
            value = value.strip()
        elif prop != "balance":
            _boolean(value, prop)  # refuse a bad value before opening a transaction
        await self.write(thdSetProperty, name, prop, value, self._now(), self.site)
        return True

    async def addNewUser(self, userName: Any) -> bool:
        """Create the user (zero balance, restricted), as sitesrv-admin user add does."""
        await self.write(thdAddUser, _username(userName), self._now(), self.site)
        return True

    async def listUserAccounts(self, offset: Any, limit: Any) -> list[str]:
        """Usernames in name order: ``limit`` (at most 1000) starting at ``offset``."""
        start = _integer(offset, "offset")
        count = _integer(limit, "limit")
        if start < 0:
            raise _fault(FAULT_INVALID, "offset must not be negative")
        if not 0 <= count <= MAX_LIST:
            raise _fault(FAULT_INVALID, f"limit must be from 0 to {MAX_LIST}")
        names: list[str] = await self.read(thdListUsernames, start, count)
        return names

    async def lookUpUserNameByCardNo(self, cardNo: Any) -> str:
        """The username of the card's holder, or "" when no user has that card."""
        raw = _text(cardNo, "the card number")
        try:
            number = self.normaliser.normalise(raw)
        except CardNumberError:
            return ""
        username: str = await self.read(thdUsernameByCard, number)
        return username

    async def addUserToGroup(self, userName: Any, groupName: Any) -> bool:
        """Add the user to an existing group (already a member: nothing changes)."""
        name = _username(userName)
        group = _text(groupName, "the group name").strip()
        await self.write(thdAddToGroup, name, group, self._now())
        return True


def _property(value: Any) -> str:
    name = _text(value, "the property name").strip().lower()
    if name not in PROPERTIES:
        raise _fault(
            FAULT_INVALID,
            f"unknown user property {name[:40]!r}; known: {', '.join(PROPERTIES)}",
        )
    return name
