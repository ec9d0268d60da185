"""``sitesrv-admin``: the administrator's command line (see docs/cli.rst).

Each command is a handler that reads from or writes to the store synchronously (no
reactor) and returns an output value — a table, a record, a confirmation or a secret —
which one renderer prints as aligned text or, with ``--json``, as JSON. Writes go through
`Admin.write`, which refuses them on a site and audits them in the same transaction.
"""

from __future__ import annotations

import argparse
import enum
import getpass
import json
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import redirect_stderr, redirect_stdout
from datetime import UTC, datetime
from typing import Any, TextIO, TypeAlias, TypeVar

import attrs
from sqlalchemy import Connection
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from sitesrv import __version__
from sitesrv.config import Config, ConfigError, load
from sitesrv.errors import AlreadyExists, Invalid, NotFound, ReadOnly, SitesrvError
from sitesrv.money import AmountError, format_amount, parse_amount
from sitesrv.secrets import make_verifier
from sitesrv.store import (
    Store,
    admins,
    changelog,
    ledger,
    policies,
    printers,
    replica,
    sites,
    users,
)
from sitesrv.store import devices as devicestore
from sitesrv.store import jobs as jobstore
from sitesrv.store import outbox as outboxstore
from sitesrv.store.audit import thdAudit, thdListAudit
from sitesrv.store.bootstrap import open_store, thdInitPrimary
from sitesrv.store.migrate import upgrade
from sitesrv.tls import TLSError, init_tls

PROG = "sitesrv-admin"
CONFIG_ENV = "SITESRV_CONFIG"

#: PINs are short so that people can type them on a device keypad; lockouts protect them.
PIN = re.compile(r"[0-9]{4,12}")
MAX_PASSWORD = 1024
#: Web administrators guard every admin page: longer than a user's minimum of one.
MIN_ADMIN_PASSWORD = 8

#: Why ``admin add/password/remove/list`` refuse to run with a site's config.
_SITE_ADMINS = (
    "web administrators live in the primary's database and are never replicated; a"
    " site's are the [web.admins] table of its config (make a verifier with"
    " `sitesrv-admin admin hash --password-stdin`)"
)
ADMINS_CHANGED_ON_SITE = f"make changes on the primary: {_SITE_ADMINS}"
ADMINS_LISTED_ON_SITE = f"list administrators on the primary: {_SITE_ADMINS}"

#: Policies whose stored value is an amount in minor units (shown and typed as an amount).
AMOUNT_POLICIES = frozenset({"offline.allowance"})

T = TypeVar("T")


class CommandError(Exception):
    """A problem to report on one line with exit status 1."""


class UsageError(Exception):
    """A command line that cannot be run as given: exit status 2, like argparse."""


class Kind(enum.Enum):
    """What a command needs, which decides how it is run."""

    READ = "read"  # the store; allowed on a site (it reads the replica)
    WRITE = "write"  # the store; refused on a site
    SCHEMA = "schema"  # the store, not migrated first (db upgrade); allowed on a site
    LOCAL = "local"  # no store, and a config only if given (tls init)


# -- outputs ---------------------------------------------------------------------------


@attrs.frozen
class Column:
    """A field shown in text output: its key in the data and its heading."""

    key: str
    title: str
    right: bool = False


@attrs.frozen
class Table:
    """Rows of objects: an aligned table, or a JSON list."""

    columns: tuple[Column, ...]
    rows: list[dict[str, Any]]
    empty: str


@attrs.frozen
class Record:
    """One object: "title: value" lines, or a JSON object."""

    fields: tuple[Column, ...]
    data: dict[str, Any]


@attrs.frozen
class Done:
    """The result of a change: a sentence, or a JSON object."""

    text: str
    data: dict[str, Any]


@attrs.frozen
class Secret:
    """A token or key shown once: alone on stdout (the explanation goes to stderr)."""

    field: str
    value: str
    text: str
    data: dict[str, Any]


Output = Table | Record | Done | Secret


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ", ".join(map(_cell, value)) or "-"
    if isinstance(value, dict):
        # Compact JSON: unambiguous even when a value holds "=" or ",".
        value = json.dumps(value, ensure_ascii=False, separators=(",", ":")) if value else ""
    text = str(value)
    if not text:
        return "-"
    # Comments, documents and options are free text: keep a row on one line, and never
    # let stored text send escape sequences to the administrator's terminal.
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _print_table(table: Table, out: TextIO) -> None:
    if not table.rows:
        print(table.empty, file=out)
        return
    header = [c.title for c in table.columns]
    cells = [[_cell(row.get(c.key)) for c in table.columns] for row in table.rows]
    widths = [max(len(line[i]) for line in [header, *cells]) for i in range(len(header))]
    for line in [header, *cells]:
        padded = (
            text.rjust(width) if column.right else text.ljust(width)
            for text, width, column in zip(line, widths, table.columns, strict=True)
        )
        print("  ".join(padded).rstrip(), file=out)


def _render(output: Output, as_json: bool, out: TextIO, err: TextIO) -> None:
    if as_json:
        data: Any = output.rows if isinstance(output, Table) else output.data
        print(json.dumps(data, indent=2, ensure_ascii=False), file=out)
    elif isinstance(output, Table):
        _print_table(output, out)
    elif isinstance(output, Record):
        width = max(len(f.title) for f in output.fields) + 1
        for f in output.fields:
            print(f"{f.title + ':':<{width}} {_cell(output.data.get(f.key))}", file=out)
    elif isinstance(output, Secret):
        # The explanation goes to stderr so that `$(sitesrv-admin site add x)` captures
        # exactly the secret.
        print(output.text, file=err)
        err.flush()
        print(output.value, file=out)
    else:
        print(output.text, file=out)


# -- the context a command runs in -----------------------------------------------------


def _actor() -> str:
    try:
        name = getpass.getuser()
    except (OSError, KeyError, ImportError):
        # No login name (a container without a passwd entry): the uid still says who.
        name = str(os.getuid()) if hasattr(os, "getuid") else "unknown"
    return f"cli:{name}"


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0].strip() if lines else type(error).__name__


def _shown_url(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "(invalid URL)"


def _time(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@attrs.define
class Admin:
    """What a command works with: its arguments, config, store and streams."""

    args: argparse.Namespace
    config: Config | None
    stdin: TextIO
    stderr: TextIO
    store: Store | None = None
    actor: str = attrs.field(factory=_actor)
    clock: Callable[[], float] = time.time
    _decimals: int | None = None

    @property
    def cfg(self) -> Config:
        """The configuration (commands that need one are only run with one)."""
        assert self.config is not None
        return self.config

    @property
    def db(self) -> Store:
        """The open store."""
        assert self.store is not None
        return self.store

    def init_primary(self) -> None:
        """On a primary, make sure its base rows exist (idempotent)."""
        if self.cfg.role == "primary":
            c = self.cfg
            self.db.write(thdInitPrimary, c.name, c.currency, c.decimals, self.clock())

    def read(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn(conn, *args, **kwargs)`` in a read transaction."""
        return self.db.read(fn, *args, **kwargs)

    def write(
        self, action: str, target: str, fn: Callable[[Connection, float], T], **details: Any
    ) -> T:
        """Run ``fn(conn, now)`` and audit it in the same transaction; refused on a site.

        ``details`` go into the audit log, so they must never hold a secret.
        """
        if self.cfg.role != "primary":
            raise ReadOnly()
        now = self.clock()

        def thd(conn: Connection) -> T:
            result = fn(conn, now)
            thdAudit(conn, self.actor, action, target, now, **details)
            return result

        return self.db.write(thd)

    @property
    def decimals(self) -> int:
        """The currency's decimals, from the database (the primary keeps it = config)."""
        if self._decimals is None:
            self._decimals = self.read(policies.thdDecimals)
        return self._decimals

    def amount(self, text: str) -> int:
        """Parse a typed amount into minor units."""
        return parse_amount(text, self.decimals)

    def money(self, key: str, minor: int) -> dict[str, Any]:
        """``{key: "8.50", key_minor: 850}``: an amount for people and for scripts."""
        return {key: format_amount(minor, self.decimals), f"{key}_minor": minor}

    def read_secret(self, what: str) -> str:
        """Read a PIN or password: the first line of stdin, or prompted twice on a tty."""
        if self.stdin.isatty():
            first = getpass.getpass(f"{what}: ", stream=self.stderr)
            if getpass.getpass(f"repeat the {what}: ", stream=self.stderr) != first:
                raise CommandError(f"the two {what}s differ")
            return first
        line = self.stdin.readline()
        if not line:
            raise CommandError(f"no {what} on standard input")
        return line.rstrip("\r\n")


Handler = Callable[[Admin], Output]


# -- users -----------------------------------------------------------------------------

USER_COLUMNS = (
    Column("username", "USERNAME"),
    Column("full_name", "FULL NAME"),
    Column("email", "EMAIL"),
    Column("balance", "BALANCE", right=True),
    Column("restricted", "RESTRICTED"),
    Column("credit_limit", "CREDIT LIMIT", right=True),
    Column("disabled", "DISABLED"),
)


def _user_row(admin: Admin, user: users.User) -> dict[str, Any]:
    return {
        "username": user.username,
        "full_name": user.full_name,
        "email": user.email,
        "disabled": user.disabled,
        **admin.money("balance", user.balance),
        "restricted": user.restricted,
        **admin.money("credit_limit", user.credit_limit),
        "has_pin": user.has_pin,
    }


def _password(admin: Admin) -> str:
    password = admin.read_secret("password")
    if not password:
        raise CommandError("the password must not be empty")
    if len(password) > MAX_PASSWORD:
        raise CommandError(f"the password must be at most {MAX_PASSWORD} characters")
    return password


def _user_add(admin: Admin) -> Output:
    a = admin.args
    balance = admin.amount(a.balance) if a.balance is not None else 0
    credit_limit = admin.amount(a.credit_limit) if a.credit_limit is not None else 0
    # Hashing is slow on purpose: do it before the write transaction, not inside it.
    verifier = make_verifier(_password(admin)) if a.password_stdin else None
    restricted = not a.unrestricted
    user = admin.write(
        "user.add",
        a.name,
        lambda conn, now: users.thdAddUser(
            conn,
            a.name,
            now,
            full_name=a.full_name,
            email=a.email,
            balance=balance,
            restricted=restricted,
            credit_limit=credit_limit,
            password_verifier=verifier,
            site=admin.cfg.name,
        ),
        full_name=a.full_name,
        email=a.email,
        restricted=restricted,
        password=verifier is not None,
        **admin.money("balance", balance),
        **admin.money("credit_limit", credit_limit),
    )
    row = _user_row(admin, user)
    return Done(f"added user {user.username} (balance {row['balance']})", row)


def _user_list(admin: Admin) -> Output:
    rows = [_user_row(admin, u) for u in admin.read(users.thdListUsers)]
    return Table(USER_COLUMNS, rows, "no users")


def _thdUserDetails(conn: Connection, name: str) -> tuple[users.User, list[str], list[str], bool]:
    user = users.thdUser(conn, name)
    credentials = users.thdCredentialsByUsername(conn, name)
    has_password = credentials is not None and credentials.password_verifier is not None
    return (
        user,
        users.thdCardsOf(conn, user.id),
        users.thdGroupsOf(conn, user.id),
        has_password,
    )


def _user_show(admin: Admin) -> Output:
    user, cards, groups, has_password = admin.read(_thdUserDetails, admin.args.name)
    data = {**_user_row(admin, user), "has_password": has_password}
    data.update(cards=cards, groups=groups)
    fields = (
        *USER_COLUMNS,
        Column("has_pin", "PIN SET"),
        Column("has_password", "PASSWORD SET"),
        Column("cards", "CARDS"),
        Column("groups", "GROUPS"),
    )
    return Record(tuple(Column(f.key, f.title.lower()) for f in fields), data)


def _user_set_disabled(disabled: bool) -> Handler:
    def handler(admin: Admin) -> Output:
        name = admin.args.name
        verb = "disable" if disabled else "enable"
        admin.write(
            f"user.{verb}", name, lambda conn, now: users.thdSetDisabled(conn, name, disabled, now)
        )
        return Done(f"{verb}d user {name}", {"username": name, "disabled": disabled})

    return handler


def _user_remove(admin: Admin) -> Output:
    name = admin.args.name
    user = admin.write("user.remove", name, lambda conn, now: users.thdRemoveUser(conn, name, now))
    return Done(
        f"removed user {name} (final balance {format_amount(user.balance, admin.decimals)})",
        {"username": name, "removed": True},
    )


def _user_set_pin(admin: Admin) -> Output:
    name = admin.args.name
    # Fail on an unknown user before asking for the PIN and hashing it.
    admin.read(users.thdUser, name)
    pin = admin.read_secret("PIN").strip()
    if not PIN.fullmatch(pin):
        raise CommandError("a PIN must be 4 to 12 digits")
    verifier = make_verifier(pin)
    admin.write("user.set-pin", name, lambda conn, now: users.thdSetPin(conn, name, verifier, now))
    return Done(f"set the PIN of {name}", {"username": name, "has_pin": True})


def _user_set_password(admin: Admin) -> Output:
    name = admin.args.name
    admin.read(users.thdUser, name)
    verifier = make_verifier(_password(admin))
    admin.write(
        "user.set-password",
        name,
        lambda conn, now: users.thdSetPassword(conn, name, verifier, now),
    )
    return Done(f"set the password of {name}", {"username": name, "has_password": True})


# -- web administrators ----------------------------------------------------------------


def _admin_password(admin: Admin) -> str:
    if not admin.args.password_stdin and not admin.stdin.isatty():
        raise CommandError("give --password-stdin to read the password from standard input")
    password = admin.read_secret("password")
    if not password:
        raise CommandError("the password must not be empty")
    if len(password) < MIN_ADMIN_PASSWORD:
        raise CommandError(
            f"an administrator's password must be at least {MIN_ADMIN_PASSWORD} characters"
        )
    if len(password) > MAX_PASSWORD:
        raise CommandError(f"the password must be at most {MAX_PASSWORD} characters")
    return password


def _admin_add(admin: Admin) -> Output:
    name = admins.check_admin_name(admin.args.name)
    # Fail on a taken name before asking for the password and hashing it.
    if admin.read(admins.thdAdminVerifier, name) is not None:
        raise AlreadyExists(f"admin {name!r} already exists")
    # Hashing is slow on purpose: do it before the write transaction, not inside it.
    verifier = make_verifier(_admin_password(admin))
    admin.write("admin.add", name, lambda conn, now: admins.thdAddAdmin(conn, name, verifier, now))
    return Done(f"added web administrator {name}", {"admin": name})


def _admin_password_set(admin: Admin) -> Output:
    name = admin.args.name
    # Fail on an unknown name before asking for the password and hashing it.
    if admin.read(admins.thdAdminVerifier, name) is None:
        raise NotFound(f"no admin named {name!r}")
    verifier = make_verifier(_admin_password(admin))
    admin.write(
        "admin.password",
        name,
        lambda conn, now: admins.thdSetAdminPassword(conn, name, verifier, now),
    )
    return Done(f"set the password of web administrator {name}", {"admin": name})


def _admin_remove(admin: Admin) -> Output:
    name = admin.args.name
    admin.write("admin.remove", name, lambda conn, now: admins.thdRemoveAdmin(conn, name, now))
    return Done(f"removed web administrator {name}", {"admin": name, "removed": True})


def _admin_list(admin: Admin) -> Output:
    rows = [
        {"name": a.name, "created": _time(a.created_at), "updated": _time(a.updated_at)}
        for a in admin.read(admins.thdListAdmins)
    ]
    columns = (Column("name", "NAME"), Column("created", "CREATED"), Column("updated", "UPDATED"))
    return Table(columns, rows, "no web administrators")


def _admin_hash(admin: Admin) -> Output:
    verifier = make_verifier(_admin_password(admin))
    return Secret(
        "verifier",
        verifier,
        'password verifier for a [web.admins] entry in a config (NAME = "..."):',
        {"verifier": verifier},
    )


# -- cards and balances ----------------------------------------------------------------


def _card_add(admin: Admin) -> Output:
    name, number = admin.args.name, admin.args.number.strip()
    admin.write(
        "card.add",
        name,
        lambda conn, now: users.thdAddCard(conn, name, number, now),
        number=number,
    )
    return Done(f"added card {number} to {name}", {"username": name, "number": number})


def _card_remove(admin: Admin) -> Output:
    number = admin.args.number.strip()
    owner = admin.write(
        "card.remove", number, lambda conn, now: users.thdRemoveCard(conn, number, now)
    )
    return Done(f"removed card {number} from {owner}", {"username": owner, "number": number})


def _thdAdjust(
    conn: Connection, name: str, amount: int, comment: str, now: float, site: str
) -> ledger.Transaction:
    user = users.thdUser(conn, name)
    return ledger.thdPost(conn, user.account_id, amount, "adjust", now, site=site, comment=comment)


def _balance_adjust(admin: Admin) -> Output:
    a = admin.args
    amount = admin.amount(a.amount)
    if amount == 0:
        raise Invalid("an adjustment of zero changes nothing")
    txn = admin.write(
        "balance.adjust",
        a.name,
        lambda conn, now: _thdAdjust(conn, a.name, amount, a.comment, now, admin.cfg.name),
        comment=a.comment,
        **admin.money("amount", amount),
    )
    data = {
        "username": a.name,
        **admin.money("amount", amount),
        **admin.money("balance", txn.balance_after),
    }
    return Done(f"balance of {a.name} is now {data['balance']}", data)


# -- accounts and groups ---------------------------------------------------------------


def _account_add(admin: Admin) -> Output:
    name = admin.args.name
    admin.write("account.add", name, lambda conn, now: ledger.thdAddAccount(conn, name, now))
    return Done(f"added shared account {name}", {"account": name})


def _account_list(admin: Admin) -> Output:
    rows = [
        {
            "name": account.name,
            "type": account.type,
            **admin.money("balance", account.balance),
            "restricted": account.restricted,
            **admin.money("credit_limit", account.credit_limit),
        }
        for account in admin.read(ledger.thdListAccounts, shared_only=not admin.args.all)
    ]
    columns = (
        Column("name", "NAME"),
        Column("type", "TYPE"),
        Column("balance", "BALANCE", right=True),
        Column("restricted", "RESTRICTED"),
        Column("credit_limit", "CREDIT LIMIT", right=True),
    )
    return Table(columns, rows, "no accounts")


def _group_add(admin: Admin) -> Output:
    name = admin.args.name
    admin.write("group.add", name, lambda conn, now: users.thdAddGroup(conn, name, now))
    return Done(f"added group {name}", {"group": name})


def _group_add_member(admin: Admin) -> Output:
    group, name = admin.args.group, admin.args.user
    added = admin.write(
        "group.add-member",
        group,
        lambda conn, now: users.thdAddMember(conn, group, name, now),
        username=name,
    )
    text = f"added {name} to group {group}" if added else f"{name} is already in group {group}"
    return Done(text, {"group": group, "username": name, "added": added})


def _group_list(admin: Admin) -> Output:
    rows = [{"name": n, "members": count} for n, count in admin.read(users.thdListGroups)]
    columns = (Column("name", "NAME"), Column("members", "MEMBERS", right=True))
    return Table(columns, rows, "no groups")


# -- printers, devices, providers ------------------------------------------------------

PRINTER_COLUMNS = (
    Column("name", "NAME"),
    Column("site", "SITE"),
    Column("price_mono", "MONO", right=True),
    Column("price_colour", "COLOUR", right=True),
    Column("duplex_discount", "DUPLEX %", right=True),
    Column("hold", "HOLD"),
    Column("uri", "URI"),
)


def _printer_row(admin: Admin, printer: printers.Printer) -> dict[str, Any]:
    return {
        "name": printer.name,
        "site": printer.site,
        **admin.money("price_mono", printer.price_mono),
        **admin.money("price_colour", printer.price_colour),
        "duplex_discount": printer.duplex_discount,
        "uri": printer.uri,
        "hold": printer.hold,
    }


def _printer_add(admin: Admin) -> Output:
    a = admin.args
    mono, colour = admin.amount(a.price_mono), admin.amount(a.price_colour)
    printer = admin.write(
        "printer.add",
        a.name,
        lambda conn, now: printers.thdAddPrinter(
            conn,
            a.name,
            a.site,
            mono,
            colour,
            now,
            duplex_discount=a.duplex_discount,
            uri=a.uri,
            hold=a.hold,
        ),
        site=a.site,
        duplex_discount=a.duplex_discount,
        uri=a.uri,
        hold=a.hold,
        **admin.money("price_mono", mono),
        **admin.money("price_colour", colour),
    )
    return Done(f"added printer {printer.name} at {printer.site}", _printer_row(admin, printer))


def _printer_list(admin: Admin) -> Output:
    rows = [_printer_row(admin, p) for p in admin.read(printers.thdListPrinters)]
    return Table(PRINTER_COLUMNS, rows, "no printers")


def _option(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), value


def _device_add(admin: Admin) -> Output:
    a = admin.args
    options: dict[str, str] = {}
    for key, value in a.option:
        if key in options:
            raise Invalid(f"option {key!r} is given twice")
        options[key] = value
    key = admin.write(
        "device.add",
        a.name,
        lambda conn, now: devicestore.thdAddDevice(
            conn, a.name, a.site, a.connector, now, printer=a.printer, options=options
        ),
        site=a.site,
        connector=a.connector,
        printer=a.printer,
        options=options,
    )
    return Secret(
        "key",
        key,
        f"added device {a.name} at {a.site}; its API key is shown only this once:",
        {"device": a.name, "key": key},
    )


def _device_list(admin: Admin) -> Output:
    rows = [
        {
            "name": d.name,
            "site": d.site,
            "connector": d.connector,
            "printer": d.printer,
            "options": d.options,
        }
        for d in admin.read(devicestore.thdListDevices)
    ]
    columns = (
        Column("name", "NAME"),
        Column("site", "SITE"),
        Column("connector", "CONNECTOR"),
        Column("printer", "PRINTER"),
        Column("options", "OPTIONS"),
    )
    return Table(columns, rows, "no devices")


def _device_remove(admin: Admin) -> Output:
    name = admin.args.name
    admin.write(
        "device.remove", name, lambda conn, now: devicestore.thdRemoveDevice(conn, name, now)
    )
    return Done(f"removed device {name}", {"device": name, "removed": True})


def _provider_add(admin: Admin) -> Output:
    a = admin.args
    key = admin.write(
        "provider.add",
        a.name,
        lambda conn, now: devicestore.thdAddProvider(conn, a.name, a.site, now),
        site=a.site,
    )
    return Secret(
        "key",
        key,
        f"added print provider {a.name} at {a.site}; its key is shown only this once:",
        {"provider": a.name, "key": key},
    )


def _provider_list(admin: Admin) -> Output:
    rows = [{"name": p.name, "site": p.site} for p in admin.read(devicestore.thdListProviders)]
    return Table((Column("name", "NAME"), Column("site", "SITE")), rows, "no providers")


def _provider_remove(admin: Admin) -> Output:
    name = admin.args.name
    admin.write(
        "provider.remove", name, lambda conn, now: devicestore.thdRemoveProvider(conn, name, now)
    )
    return Done(f"removed print provider {name}", {"provider": name, "removed": True})


def _provider_rotate_key(admin: Admin) -> Output:
    name = admin.args.name
    key = admin.write(
        "provider.rotate-key",
        name,
        lambda conn, now: devicestore.thdRotateProviderKey(conn, name, now),
    )
    return Secret(
        "key",
        key,
        f"new key for print provider {name} (the old one no longer works), shown only once:",
        {"provider": name, "key": key},
    )


# -- sites and policies ----------------------------------------------------------------

_TOKEN_HINT = "put the token below in the site's token_file (readable only by sitesrv)"


def _site_add(admin: Admin) -> Output:
    name = admin.args.name
    token = admin.write("site.add", name, lambda conn, now: sites.thdAddSite(conn, name, now))
    return Secret(
        "token",
        token,
        f"added site {name}; {_TOKEN_HINT}. It is shown only this once:",
        {"site": name, "token": token},
    )


def _thdSiteList(
    conn: Connection,
) -> tuple[list[sites.Site], dict[str, sites.SiteLink], int]:
    return sites.thdListSites(conn), sites.thdLinks(conn), changelog.thdState(conn)[1]


def _link_state(link: sites.SiteLink | None) -> str:
    if link is None:
        return "never connected"
    if link.connected:
        return f"connected since {_time(link.since)}"
    return f"disconnected since {_time(link.since)}"


def _site_list(admin: Admin) -> Output:
    found, links, head = admin.read(_thdSiteList)
    rows = []
    for s in found:
        link = links.get(s.name)
        rows.append(
            {
                "name": s.name,
                "primary": s.is_primary,
                "revoked": s.revoked,
                "state": "this primary" if s.is_primary else _link_state(link),
                "connected": None if link is None else link.connected,
                "position": None if link is None else link.position,
                "lag": None if link is None or s.is_primary else max(head - link.position, 0),
                "last_seen": None if link is None else _time(link.last_seen),
                "skew": None if link is None else round(link.skew, 3),
                "version": None if link is None else link.software_version,
                "address": None if link is None else link.address,
                "applied_seq": s.applied_seq,
                "created": _time(s.created_at),
            }
        )
    columns = (
        Column("name", "NAME"),
        Column("state", "STATE"),
        Column("revoked", "REVOKED"),
        Column("position", "POSITION", right=True),
        Column("lag", "LAG", right=True),
        Column("last_seen", "LAST SEEN"),
        Column("skew", "SKEW S", right=True),
        Column("applied_seq", "APPLIED SEQ", right=True),
    )
    return Table(columns, rows, "no sites")


def _site_revoke(admin: Admin) -> Output:
    name = admin.args.name
    admin.write("site.revoke", name, lambda conn, now: sites.thdRevokeSite(conn, name, now))
    return Done(
        f"revoked site {name}: the primary refuses its link from now on",
        {"site": name, "revoked": True},
    )


def _site_rotate_token(admin: Admin) -> Output:
    name = admin.args.name
    token = admin.write(
        "site.rotate-token", name, lambda conn, now: sites.thdRotateToken(conn, name, now)
    )
    return Secret(
        "token",
        token,
        f"new enrolment token for site {name} (the old one no longer works); {_TOKEN_HINT}."
        " It is shown only this once:",
        {"site": name, "token": token},
    )


def _policy_value(admin: Admin, key: str, stored: str) -> str:
    if key in AMOUNT_POLICIES and stored.lstrip("-").isdigit():
        return format_amount(int(stored), admin.decimals)
    return stored


def _policy_set(admin: Admin) -> Output:
    a = admin.args
    site = a.site or ""
    stored = admin.write(
        "policy.set",
        f"{a.key}@{site}" if site else a.key,
        lambda conn, now: policies.thdSetPolicy(conn, a.key, a.value, now, site=site),
        site=site,
        value=a.value,
    )
    value = _policy_value(admin, a.key, stored)
    where = f"for site {site}" if site else "globally"
    return Done(f"set {a.key} = {value} {where}", {"key": a.key, "value": value, "site": site})


def _policy_show(admin: Admin) -> Output:
    site = admin.args.site
    if site:
        admin.read(sites.thdSite, site)
    elif admin.cfg.role == "site":
        # On a site, what matters is what applies here.
        site = admin.cfg.name
    effective = admin.read(policies.thdEffectivePolicies, site or "")
    rows = [
        {"key": key, "value": _policy_value(admin, key, value), "source": source}
        for key, (value, source) in sorted(effective.items())
    ]
    columns = (Column("key", "POLICY"), Column("value", "VALUE"), Column("source", "SOURCE"))
    return Table(columns, rows, "no policies")


# -- history ---------------------------------------------------------------------------


def _thdTransactions(
    conn: Connection, username: str | None, limit: int
) -> list[ledger.Transaction]:
    account_id = None if username is None else users.thdUser(conn, username).account_id
    return ledger.thdListTransactions(conn, account_id=account_id, limit=limit)


TRANSACTION_COLUMNS = (
    Column("time", "TIME"),
    Column("account", "ACCOUNT"),
    Column("amount", "AMOUNT", right=True),
    Column("balance_after", "BALANCE", right=True),
    Column("reason", "REASON"),
    Column("site", "SITE"),
    Column("comment", "COMMENT"),
)


def _transaction_table(
    admin: Admin, transactions: Sequence[ledger.Transaction], empty: str
) -> Table:
    rows = [
        {
            "id": t.id,
            "uuid": t.uuid,
            "time": _time(t.created_at),
            "account": t.account_name,
            **admin.money("amount", t.amount),
            **admin.money("balance_after", t.balance_after),
            "reason": t.reason,
            "site": t.site,
            "comment": t.comment,
            "job_uuid": t.job_uuid,
        }
        for t in transactions
    ]
    return Table(TRANSACTION_COLUMNS, rows, empty)


def _transactions_list(admin: Admin) -> Output:
    found = admin.read(_thdTransactions, admin.args.user, admin.args.limit)
    return _transaction_table(admin, found, "no transactions")


# -- reports ---------------------------------------------------------------------------


def _report_overdraft(admin: Admin) -> Output:
    found = admin.read(ledger.thdOverdrafts, admin.args.limit)
    return _transaction_table(admin, found, "no offline overdrafts")


def _report_suspense(admin: Admin) -> Output:
    found = admin.read(ledger.thdSuspense, admin.args.limit)
    return _transaction_table(admin, found, "nothing in suspense")


def _report_dead_letter(admin: Admin) -> Output:
    rows = [
        {
            "id": d.id,
            "site": d.site,
            "seq": d.seq,
            "uuid": d.uuid,
            "time": _time(d.created_at),
            "error": d.error,
            "payload": d.payload,
            "resolved": None if d.resolved_at is None else _time(d.resolved_at),
            "resolution": d.resolution,
        }
        for d in admin.read(outboxstore.thdListDeadLetters, admin.args.all)
    ]
    columns = (
        Column("id", "ID", right=True),
        Column("site", "SITE"),
        Column("seq", "SEQ", right=True),
        Column("time", "TIME"),
        Column("error", "ERROR"),
        Column("resolved", "RESOLVED"),
    )
    return Table(columns, rows, "no dead letters")


def _dead_letter_resolve(admin: Admin) -> Output:
    letter, note = admin.args.id, admin.args.note
    admin.write(
        "dead-letter.resolve",
        str(letter),
        lambda conn, now: outboxstore.thdResolveDeadLetter(conn, letter, note, now),
        note=note,
    )
    return Done(f"dead letter {letter} resolved", {"id": letter, "resolved": True})


# -- replication -----------------------------------------------------------------------


def _db_restored(admin: Admin) -> Output:
    epoch = admin.write("db.restored", "", lambda conn, now: changelog.thdNewEpoch(conn))
    return Done(
        "change log has a new epoch: every site will re-snapshot and resubmit the records it kept",
        {"epoch": epoch},
    )


def _replica_status(admin: Admin) -> Output:
    state, applied, pending = admin.read(_thdReplicaStatus)
    data = {
        "epoch": state.epoch,
        "position": state.position,
        "complete": state.complete,
        "last_sync": None if state.last_sync is None else _time(state.last_sync),
        "applied_seq": applied,
        "outbox_pending": pending,
    }
    return Record(
        (
            Column("complete", "complete replica"),
            Column("epoch", "epoch"),
            Column("position", "position"),
            Column("last_sync", "last sync"),
            Column("applied_seq", "applied at primary up to"),
            Column("outbox_pending", "outbox pending"),
        ),
        data,
    )


def _thdReplicaStatus(conn: Connection) -> tuple[Any, int, int]:
    return (
        replica.thdReplicaState(conn),
        outboxstore.thdOwnAppliedSeq(conn),
        outboxstore.thdPendingCount(conn),
    )


def _outbox_show(admin: Admin) -> Output:
    applied, records = admin.read(outboxstore.thdOutbox, admin.args.limit)
    rows = [
        {
            "seq": r.seq,
            "uuid": r.uuid,
            "state": "applied" if r.seq <= applied else "pending",
            "time": _time(float(r.payload.get("site_time", 0))),
            "user": r.payload.get("username", ""),
            "account": r.payload.get("account_name", ""),
            **admin.money("amount", int(r.payload.get("amount", 0))),
            "reason": r.payload.get("reason", ""),
            "offline": bool(r.payload.get("offline")),
        }
        for r in records
    ]
    columns = (
        Column("seq", "SEQ", right=True),
        Column("state", "STATE"),
        Column("time", "TIME"),
        Column("user", "USER"),
        Column("account", "ACCOUNT"),
        Column("amount", "AMOUNT", right=True),
        Column("reason", "REASON"),
        Column("offline", "OFFLINE"),
    )
    return Table(columns, rows, "the outbox is empty")


def _jobs_list(admin: Admin) -> Output:
    rows = [
        {
            "id": j.id,
            "uuid": j.uuid,
            "time": _time(j.created_at),
            "username": j.username,
            "kind": j.kind,
            "printer": j.printer_name,
            "site": j.site,
            "document": j.document,
            "pages": j.pages,
            "copies": j.copies,
            "colour": j.colour,
            "duplex": j.duplex,
            **admin.money("cost", j.cost),
            "status": j.status,
        }
        for j in admin.read(jobstore.thdListJobs, admin.args.user, admin.args.limit)
    ]
    columns = (
        Column("time", "TIME"),
        Column("username", "USER"),
        Column("kind", "KIND"),
        Column("printer", "PRINTER"),
        Column("site", "SITE"),
        Column("pages", "PAGES", right=True),
        Column("copies", "COPIES", right=True),
        Column("colour", "COLOUR"),
        Column("cost", "COST", right=True),
        Column("status", "STATUS"),
        Column("document", "DOCUMENT"),
    )
    return Table(columns, rows, "no jobs")


def _audit_list(admin: Admin) -> Output:
    rows = [
        {
            "id": e.id,
            "time": _time(e.at),
            "actor": e.actor,
            "action": e.action,
            "target": e.target,
            "details": e.details,
        }
        for e in admin.read(thdListAudit, admin.args.limit)
    ]
    columns = (
        Column("time", "TIME"),
        Column("actor", "ACTOR"),
        Column("action", "ACTION"),
        Column("target", "TARGET"),
        Column("details", "DETAILS"),
    )
    return Table(columns, rows, "no audit entries")


# -- TLS and the database --------------------------------------------------------------


def _tls_out_dir(admin: Admin) -> str:
    if admin.args.out:
        return str(admin.args.out)
    if admin.config is None:
        raise UsageError("give --out DIR (or --config FILE to use its [tls] paths)")
    tls = admin.config.tls
    out = os.path.dirname(tls.cert)
    expected = {tls.cert: "server.crt", tls.key: "server.key", tls.ca: "ca.crt"}
    if any(path != os.path.join(out, name) for path, name in expected.items()):
        raise UsageError(
            "the config's [tls] files are not server.crt, server.key and ca.crt in one"
            " directory; give --out DIR and move the files into place"
        )
    return out


def _tls_init(admin: Admin) -> Output:
    a = admin.args
    files = init_tls(_tls_out_dir(admin), a.hostname, a.ip, force=a.force)
    data = attrs.asdict(files)
    text = "\n".join(
        [
            f"wrote {files.ca_cert} (copy it to every site server)",
            f"      {files.ca_key} (keep it private and offline if you can)",
            f"      {files.server_cert}",
            f"      {files.server_key}",
            f"server certificate SHA-256 fingerprint: {files.fingerprint}",
        ]
    )
    return Done(text, data)


def _db_upgrade(admin: Admin) -> Output:
    before, after = upgrade(admin.db)
    admin.init_primary()
    if before != after and admin.cfg.role == "primary":
        admin.write("db.upgrade", "", lambda conn, now: None, before=before, after=after)
    if before == after:
        text = f"database already at revision {after}"
    else:
        text = f"database upgraded: {before or '(empty)'} -> {after}"
    return Done(text, {"before": before, "after": after})


# -- the command line ------------------------------------------------------------------


def _positive(text: str) -> int:
    try:
        number = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


Commands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def _command(
    group: Commands, name: str, handler: Handler, kind: Kind, help: str
) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = group.add_parser(name, help=help, description=help)
    parser.set_defaults(handler=handler, kind=kind)
    # SUPPRESS: a sub-command's default must not undo a --json given before it.
    parser.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="print JSON"
    )
    return parser


def _group(commands: Commands, name: str, help: str) -> Commands:
    parser = commands.add_parser(name, help=help, description=help)
    return parser.add_subparsers(title="commands", dest="subcommand", required=True)


def _password_stdin(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--password-stdin", action="store_true", help="read the password from stdin's first line"
    )


def _limit(parser: argparse.ArgumentParser, default: int = 100) -> None:
    parser.add_argument(
        "--limit", type=_positive, default=default, metavar="N", help="newest N (%(default)s)"
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``sitesrv-admin`` argument parser with all its sub-commands."""
    parser = argparse.ArgumentParser(
        prog=PROG, description="Administer a sitesrv primary, or inspect a site server."
    )
    parser.add_argument(
        "--config", metavar="FILE", help=f"the server's TOML config (default: ${CONFIG_ENV})"
    )
    parser.add_argument("--json", action="store_true", help="print JSON, for scripts")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(title="commands", dest="command", required=True)
    R, W = Kind.READ, Kind.WRITE

    g = _group(commands, "user", "users, their PINs and passwords")
    p = _command(g, "add", _user_add, W, "add a user")
    p.add_argument("name")
    p.add_argument("--full-name", default="", metavar="S")
    p.add_argument("--email", default="", metavar="S")
    p.add_argument("--balance", metavar="AMOUNT", help="opening balance")
    credit = p.add_mutually_exclusive_group()
    credit.add_argument("--credit-limit", metavar="AMOUNT", help="how far below zero (0)")
    credit.add_argument("--unrestricted", action="store_true", help="no limit at all")
    p.add_argument(
        "--password-stdin", action="store_true", help="read a password from stdin's first line"
    )
    _command(g, "list", _user_list, R, "list users")
    for name, handler, kind, help in (
        ("show", _user_show, R, "show a user with cards, groups and balance"),
        ("disable", _user_set_disabled(True), W, "disable a user (no login, no printing)"),
        ("enable", _user_set_disabled(False), W, "enable a disabled user"),
        ("remove", _user_remove, W, "remove a user, their cards and account"),
        ("set-pin", _user_set_pin, W, "set a PIN (4-12 digits) from stdin's first line"),
        ("set-password", _user_set_password, W, "set a password from stdin's first line"),
    ):
        _command(g, name, handler, kind, help).add_argument("name")

    g = _group(commands, "admin", "administrators of the web admin pages")
    for name, handler, kind, help in (
        ("add", _admin_add, W, "add an administrator; password from stdin's first line"),
        ("password", _admin_password_set, W, "set an administrator's password from stdin"),
        ("remove", _admin_remove, W, "remove an administrator"),
    ):
        p = _command(g, name, handler, kind, help)
        p.add_argument("name")
        if name != "remove":
            _password_stdin(p)
        p.set_defaults(site_refusal=ADMINS_CHANGED_ON_SITE)
    p = _command(g, "list", _admin_list, R, "list the administrators in the database")
    p.set_defaults(site_refusal=ADMINS_LISTED_ON_SITE)
    p = _command(
        g, "hash", _admin_hash, Kind.LOCAL, "print a password verifier for a [web.admins] entry"
    )
    _password_stdin(p)

    g = _group(commands, "card", "card numbers")
    p = _command(g, "add", _card_add, W, "give a user a card")
    p.add_argument("name")
    p.add_argument("number")
    p = _command(g, "remove", _card_remove, W, "remove a card")
    p.add_argument("number")

    g = _group(commands, "balance", "balances")
    p = _command(g, "adjust", _balance_adjust, W, "add to (or, negative, take from) a balance")
    p.add_argument("name")
    p.add_argument("amount", help="e.g. 5 or -1.50")
    p.add_argument("--comment", default="", metavar="S")

    g = _group(commands, "account", "shared accounts")
    p = _command(g, "add", _account_add, W, "add a shared account")
    p.add_argument("name")
    p = _command(g, "list", _account_list, R, "list shared accounts")
    p.add_argument("--all", action="store_true", help="include users' personal accounts")

    g = _group(commands, "group", "groups of users")
    p = _command(g, "add", _group_add, W, "add a group")
    p.add_argument("name")
    p = _command(g, "add-member", _group_add_member, W, "add a user to a group")
    p.add_argument("group")
    p.add_argument("user")
    _command(g, "list", _group_list, R, "list groups with their member counts")

    g = _group(commands, "printer", "printers and their prices")
    p = _command(g, "add", _printer_add, W, "add a printer")
    p.add_argument("name")
    p.add_argument("--site", required=True)
    p.add_argument("--price-mono", required=True, metavar="AMOUNT", help="per page")
    p.add_argument("--price-colour", required=True, metavar="AMOUNT", help="per page")
    p.add_argument("--duplex-discount", type=int, default=0, metavar="PERCENT")
    p.add_argument("--uri", default="", help="where jobs are delivered (ipp://, socket://)")
    p.add_argument("--hold", action="store_true", help="hold jobs for release (Find-Me)")
    _command(g, "list", _printer_list, R, "list printers")

    g = _group(commands, "device", "devices driven by connectors (card readers, MFDs)")
    p = _command(g, "add", _device_add, W, "add a device; prints its API key once")
    p.add_argument("name")
    p.add_argument("--site", required=True)
    p.add_argument("--connector", required=True, metavar="NAME")
    p.add_argument("--printer")
    p.add_argument("--option", type=_option, action="append", default=[], metavar="KEY=VALUE")
    _command(g, "list", _device_list, R, "list devices")
    p = _command(g, "remove", _device_remove, W, "remove a device")
    p.add_argument("name")

    g = _group(commands, "provider", "print providers")
    p = _command(g, "add", _provider_add, W, "add a print provider; prints its key once")
    p.add_argument("name")
    p.add_argument("--site", required=True)
    _command(g, "list", _provider_list, R, "list print providers")
    p = _command(g, "remove", _provider_remove, W, "remove a print provider")
    p.add_argument("name")
    p = _command(g, "rotate-key", _provider_rotate_key, W, "issue a new key; prints it once")
    p.add_argument("name")

    g = _group(commands, "site", "site servers")
    p = _command(g, "add", _site_add, W, "enrol a site; prints its token once")
    p.add_argument("name")
    _command(g, "list", _site_list, R, "list sites")
    p = _command(g, "revoke", _site_revoke, W, "revoke a site")
    p.add_argument("name")
    p = _command(g, "rotate-token", _site_rotate_token, W, "issue a new token; prints it once")
    p.add_argument("name")

    g = _group(commands, "policy", "offline policies")
    p = _command(g, "set", _policy_set, W, "set a policy globally or for one site")
    p.add_argument("--site", help="override for this site only")
    p.add_argument("key")
    p.add_argument("value")
    p = _command(g, "show", _policy_show, R, "show the policies that apply, and where from")
    p.add_argument("--site", help="as they apply at this site")

    g = _group(commands, "transactions", "the ledger")
    p = _command(g, "list", _transactions_list, R, "list the newest transactions")
    p.add_argument("--user", metavar="NAME")
    _limit(p)

    g = _group(commands, "jobs", "the job log")
    p = _command(g, "list", _jobs_list, R, "list the newest jobs")
    p.add_argument("--user", metavar="NAME")
    _limit(p)

    g = _group(commands, "audit", "the audit log of administrative changes")
    p = _command(g, "list", _audit_list, R, "list the newest audit entries")
    _limit(p)

    g = _group(commands, "tls", "certificates for the replication link")
    p = _command(g, "init", _tls_init, Kind.LOCAL, "make a CA and a server certificate")
    p.add_argument("--hostname", action="append", default=[], metavar="HOST")
    p.add_argument("--ip", action="append", default=[], metavar="ADDR")
    p.add_argument("--out", metavar="DIR", help="default: the config's [tls] directory")
    p.add_argument("--force", action="store_true", help="replace existing files")

    g = _group(commands, "db", "the database schema")
    _command(g, "upgrade", _db_upgrade, Kind.SCHEMA, "migrate to the newest schema")
    _command(
        g,
        "restored",
        _db_restored,
        W,
        "after restoring the primary from a backup: sites re-snapshot and resubmit",
    )

    g = _group(commands, "report", "reports for the administrator")
    p = _command(
        g, "offline-overdraft", _report_overdraft, R, "offline charges past a credit limit"
    )
    _limit(p)
    p = _command(g, "suspense", _report_suspense, R, "charges whose user or account was gone")
    _limit(p)
    p = _command(g, "dead-letter", _report_dead_letter, R, "site records that cannot apply")
    p.add_argument("--all", action="store_true", help="include resolved ones")

    g = _group(commands, "dead-letter", "records from sites that could not be applied")
    p = _command(g, "resolve", _dead_letter_resolve, W, "mark a dead letter as dealt with")
    p.add_argument("id", type=_positive)
    p.add_argument("--note", required=True, metavar="TEXT", help="what was done about it")

    g = _group(commands, "outbox", "what this site has recorded for the primary")
    p = _command(g, "show", _outbox_show, R, "the newest outbox records, pending or applied")
    _limit(p)

    g = _group(commands, "replica", "this site's replica of the primary's data")
    _command(g, "status", _replica_status, R, "position, completeness and outbox backlog")

    return parser


# -- running ---------------------------------------------------------------------------


def _connect(url: str, migrate: bool) -> Store:
    try:
        if migrate:
            return open_store(url, readers=1)
        parsed = make_url(url)
        if parsed.get_backend_name() == "sqlite" and parsed.database:
            # As open_store does: a fresh install runs `db upgrade` before anything else.
            os.makedirs(os.path.dirname(os.path.abspath(parsed.database)), exist_ok=True)
        return Store(url, readers=1)
    except SQLAlchemyError as e:
        reason = _first_line(getattr(e, "orig", None) or e)
    except OSError as e:
        reason = f"{e.strerror or e}: {e.filename}" if e.filename else str(e.strerror or e)
    raise CommandError(f"cannot open database {_shown_url(url)}: {reason}")


def _close(store: Store) -> None:
    store.writer.dispose()
    if store.reader is not store.writer:
        store.reader.dispose()


def _run(args: argparse.Namespace, stdin: TextIO, stdout: TextIO, stderr: TextIO) -> None:
    kind: Kind = args.kind
    path = args.config or os.environ.get(CONFIG_ENV)
    if not path and kind is not Kind.LOCAL:
        raise UsageError(f"no configuration: give --config FILE or set {CONFIG_ENV}")
    config = load(path) if path else None
    # Commands about what a site does not have (web administrators) say where it is.
    refusal = getattr(args, "site_refusal", None)
    if refusal is not None and config is not None and config.role != "primary":
        raise CommandError(refusal)
    if kind is Kind.WRITE and config is not None and config.role != "primary":
        # Refused before the database is opened: a site's data is the primary's replica.
        raise ReadOnly()
    admin = Admin(args, config, stdin, stderr)
    if config is not None and kind is not Kind.LOCAL:
        admin.store = _connect(config.database, migrate=kind is not Kind.SCHEMA)
    try:
        if kind in (Kind.READ, Kind.WRITE):
            admin.init_primary()
        output = args.handler(admin)
    finally:
        if admin.store is not None:
            _close(admin.store)
    _render(output, args.json, stdout, stderr)


def run(
    argv: Sequence[str],
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """Run ``sitesrv-admin`` with ``argv``; return the exit status (0, 1 error, 2 usage)."""
    stdin = sys.stdin if stdin is None else stdin
    stdout = sys.stdout if stdout is None else stdout
    stderr = sys.stderr if stderr is None else stderr
    parser = build_parser()
    try:
        # argparse writes usage and help to sys.stdout/sys.stderr and exits: point those
        # at our streams so that tests and callers in-process see them.
        with redirect_stdout(stdout), redirect_stderr(stderr):
            args = parser.parse_args(list(argv))
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    try:
        _run(args, stdin, stdout, stderr)
    except UsageError as e:
        print(f"{PROG}: {e}", file=stderr)
        return 2
    except (CommandError, SitesrvError, ConfigError, AmountError, TLSError) as e:
        print(f"{PROG}: {_one_line(e)}", file=stderr)
        return 1
    except SQLAlchemyError as e:
        print(f"{PROG}: database error: {_first_line(getattr(e, 'orig', None) or e)}", file=stderr)
        return 1
    except BrokenPipeError:
        # `sitesrv-admin user list | head`: the reader has all it wants. Point stdout at
        # /dev/null so that the interpreter's final flush does not complain either.
        if stdout is sys.stdout:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as e:
        where = f": {e.filename}" if e.filename else ""
        print(f"{PROG}: {e.strerror or e}{where}", file=stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=stderr)
        return 130
    return 0


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def main(
    argv: list[str] | None = None,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """Run ``sitesrv-admin``; as the console script (no ``argv``), exit with its status."""
    if argv is None:
        raise SystemExit(run(sys.argv[1:], stdin, stdout, stderr))
    return run(argv, stdin, stdout, stderr)
