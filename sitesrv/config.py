"""The TOML configuration file: reading, validating and the resulting value types.

A config is read with :mod:`tomllib`, checked against a small declarative schema
(``_SCHEMA``: one entry per key with its type, whether it is required and its value
checks), then the rules that tie keys together (role, TLS trust) are applied. Every
problem raises :class:`ConfigError`, whose text is one line naming the file, the dotted
key and what is wrong, so ``twistd`` and ``sitesrv-admin`` can print it without a
traceback. See ``docs/configuration.rst`` for every key.
"""

from __future__ import annotations

import datetime
import difflib
import json
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from typing import Any

import attrs
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError
from twisted.internet.endpoints import quoteStringArgument

from sitesrv.errors import Invalid
from sitesrv.secrets import is_verifier
from sitesrv.store.admins import check_admin_name

ROLES = ("primary", "site")
LOG_LEVELS = ("debug", "info", "warn", "error")
DEFAULT_REPLICATION_PORT = 9192


class ConfigError(Exception):
    """A configuration file that cannot be used; ``str()`` is one line: file, key, problem."""

    def __init__(self, path: str, key: str, problem: str) -> None:
        self.path = path
        self.key = key
        # Messages go to a terminal or a log line: never let one span several lines.
        self.problem = " ".join(problem.split())
        where = path or "<config>"
        super().__init__(f"{where}: {key}: {self.problem}" if key else f"{where}: {self.problem}")


@attrs.frozen
class ListenConfig:
    """Twisted server endpoint strings for the ports this server listens on."""

    providers: str = "tcp:9191"
    web: str = "tcp:9193"
    # Primary only; None means the ssl:9192 default built from [tls].
    replication: str | None = None


@attrs.frozen
class PrimaryLink:
    """How a site reaches and trusts its primary (the ``[primary]`` table)."""

    endpoint: str
    token_file: str
    ca: str | None = None
    fingerprint: str | None = None
    hostname: str | None = None
    insecure: bool = False


@attrs.frozen
class TLSConfig:
    """This server's TLS key, certificate and CA certificate (PEM file paths)."""

    cert: str
    key: str
    ca: str


@attrs.frozen
class ReplicationConfig:
    """Replication timing and retention."""

    heartbeat: float = 1.0
    max_backoff: float = 2.0
    changelog_max_age_days: int = 30
    outbox_retention_days: int = 7


@attrs.frozen
class WebConfig:
    """The web port's monitoring and API settings (the ``[web]`` table)."""

    #: Seconds an enrolled site may be disconnected before ``/health/sites`` answers 500.
    site_grace: float = 60.0
    #: The PaperCut-compatible XML-RPC API's token; None leaves the API switched off.
    xmlrpc_token: str | None = None
    #: A file holding that token instead (read when the server starts).
    xmlrpc_token_file: str | None = None
    #: ``[web.admins]``: administrator name → password verifier (``sitesrv-admin admin
    #: hash``). A site's only administrators; a primary's are these and its database's.
    #: (Left out of the hash, which a dict would break.)
    admins: dict[str, str] = attrs.field(factory=dict, hash=False)


@attrs.frozen
class ProvidersConfig:
    """Print providers and the Find-Me queue (the ``[providers]`` table)."""

    #: Hours a held (Find-Me) job waits for release before it expires.
    hold_hours: float = 8.0
    #: Seconds between heartbeats on provider links (a provider silent for 3 is dropped).
    heartbeat: float = 5.0


@attrs.frozen
class Config:
    """A validated configuration: absolute paths, defaults filled in."""

    path: str
    role: str
    name: str
    data_dir: str
    database: str
    listen: ListenConfig
    primary: PrimaryLink | None
    tls: TLSConfig
    replication: ReplicationConfig
    currency: str = "USD"
    decimals: int = 2
    log_level: str = "info"
    web: WebConfig = attrs.field(factory=WebConfig)
    providers: ProvidersConfig = attrs.field(factory=ProvidersConfig)

    @property
    def replication_endpoint(self) -> str:
        """The server endpoint string for port 9192: ``listen.replication`` or TLS from [tls]."""
        if self.listen.replication is not None:
            return self.listen.replication
        return (
            f"ssl:{DEFAULT_REPLICATION_PORT}"
            f":privateKey={quoteStringArgument(self.tls.key)}"
            f":certKey={quoteStringArgument(self.tls.cert)}"
        )


def load(path: str) -> Config:
    """Read and validate the TOML file at *path*; raise `ConfigError` if it is unusable."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ConfigError(path, "", f"cannot read the file: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(path, "", f"not UTF-8 text (bad byte at offset {e.start})") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        # tomllib's message already ends with "(at line N, column M)".
        raise ConfigError(path, "", f"invalid TOML: {e}") from None
    return from_dict(data, path)


def from_dict(data: Mapping[str, Any], path: str = "") -> Config:
    """Validate an already-parsed config; *path* names it in errors and anchors relative paths."""
    try:
        values = _check_table(_SCHEMA, data, ())
        return _build(values, path)
    except _Problem as p:
        raise ConfigError(path, p.key, p.problem) from None


# --- endpoint strings ------------------------------------------------------------------
#
# Parsed the way twisted.internet.endpoints does (":" separates arguments, the first "="
# in an argument makes it a keyword, a backslash escapes the next character), without
# importing a reactor or creating anything.


# tcp, ssl, unix, or a name an endpoint plugin registers (e.g. onion, systemd).
_ENDPOINT_TYPE = re.compile(r"[A-Za-z][A-Za-z0-9+._-]*")


def _split_endpoint(description: str) -> tuple[str, list[str], dict[str, str]]:
    """Split an endpoint description into (type, positional args, keyword args)."""
    parts: list[list[str]] = [[""]]
    chars = iter(description)
    for c in chars:
        if c == ":":
            parts.append([""])
        elif c == "=" and len(parts[-1]) == 1:
            parts[-1].append("")
        elif c == "\\":
            escaped = next(chars, None)
            if escaped is None:
                raise ValueError("ends with a lone backslash")
            parts[-1][-1] += escaped
        else:
            parts[-1][-1] += c
    args = [p[0] for p in parts if len(p) == 1]
    kwargs = {p[0]: p[1] for p in parts if len(p) == 2}
    if args and args[0].isdigit():
        raise ValueError(f"no endpoint type, did you mean tcp:{args[0]}?")
    if not args or not _ENDPOINT_TYPE.fullmatch(args[0]):
        raise ValueError("does not start with an endpoint type such as tcp: or ssl:")
    if description.startswith(f"{args[0]}://"):
        raise ValueError("this is a URL; an endpoint string looks like tcp:9193 or ssl:9193:...")
    return args[0], args[1:], kwargs


def _port_of(args: list[str], kwargs: dict[str, str], index: int, kind: str) -> int:
    """The port argument of a tcp-like endpoint, given positionally at *index* or as port=."""
    text = kwargs.get("port", args[index] if len(args) > index else None)
    if text is None:
        raise ValueError(f"{kind}: needs a port")
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise ValueError(f"port {json.dumps(text)} is not a number from 0 to 65535")
    return int(text)


def _server_endpoint(value: str) -> str:
    kind, args, kwargs = _split_endpoint(value)
    if kind in ("tcp", "ssl"):
        _port_of(args, kwargs, 0, kind)
    if kind == "ssl" and "privateKey" not in kwargs and len(args) < 2:
        # Twisted would silently fall back to ./server.pem, which is never what was meant.
        raise ValueError("ssl: needs privateKey=PATH (and certKey=PATH)")
    if kind == "unix" and not kwargs.get("address", args[0] if args else ""):
        raise ValueError("unix: needs a socket path")
    return value


def _tcp_client_host(args: list[str], kwargs: dict[str, str]) -> str:
    host = kwargs.get("host", args[0] if args else "")
    if not host:
        raise ValueError("tcp: needs a host (expected tcp:HOST:PORT)")
    # A positional port follows the host only when the host was positional too.
    port = _port_of(args, kwargs, 0 if "host" in kwargs else 1, "tcp")
    if port == 0:
        raise ValueError("port 0 is not a port to connect to")
    return host


def _client_endpoint(value: str) -> str:
    kind, args, kwargs = _split_endpoint(value)
    if kind in ("ssl", "tls"):
        raise ValueError(
            "use a plain tcp:HOST:PORT endpoint; sitesrv adds TLS itself (checked with ca"
            f" or fingerprint), so not {kind}:"
        )
    if kind == "tcp":
        _tcp_client_host(args, kwargs)
    return value


def _endpoint_host(value: str) -> str | None:
    """The host a tcp: client endpoint connects to, or None for other endpoint types."""
    kind, args, kwargs = _split_endpoint(value)
    return _tcp_client_host(args, kwargs) if kind == "tcp" else None


def _listening_port(value: str) -> tuple[int, str] | None:
    """(port, interface) of a tcp: or ssl: server endpoint, for spotting clashes."""
    kind, args, kwargs = _split_endpoint(value)
    if kind not in ("tcp", "ssl"):
        return None
    # Positionally, tcp takes PORT:INTERFACE and ssl PORT:KEY:CERT:METHOD:INTERFACE.
    at = 1 if kind == "tcp" else 4
    interface = kwargs.get("interface", args[at] if len(args) > at else "")
    return _port_of(args, kwargs, 0, kind), interface


# --- the declarative schema ------------------------------------------------------------

# A check takes a value of the right type and returns it (possibly normalised), or raises
# ValueError with the problem.
_Check = Callable[[Any], Any]


class _Problem(Exception):
    """Raised inside validation; `from_dict` turns it into a `ConfigError` with the path."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(key, problem)
        self.key = key
        self.problem = problem


@attrs.frozen
class _Key:
    """One key: its TOML type, whether it must be given, its value checks, the roles using it."""

    type: type
    required: bool = False
    checks: tuple[_Check, ...] = ()
    roles: tuple[str, ...] = ROLES


@attrs.frozen
class _Table:
    """A TOML table: its known keys (in the order they are checked), the roles using it."""

    keys: Mapping[str, _Key | _Table | _Map]
    required: bool = False
    roles: tuple[str, ...] = ROLES


@attrs.frozen
class _Map:
    """A TOML table whose keys are names the administrator chooses, all of one kind.

    ``name_checks`` check each name, ``value`` each value (its type and checks).
    """

    value: _Key
    name_checks: tuple[_Check, ...] = ()
    required: bool = False
    roles: tuple[str, ...] = ROLES


def _one_of(*choices: str) -> _Check:
    def check(value: str) -> str:
        if value not in choices:
            options = " or ".join(json.dumps(c) for c in choices)
            raise ValueError(f"must be {options}, got {json.dumps(value)}")
        return value

    return check


def _matches(pattern: str, description: str) -> _Check:
    regex = re.compile(pattern)

    def check(value: str) -> str:
        if not regex.fullmatch(value):
            raise ValueError(f"must be {description}, got {json.dumps(value)}")
        return value

    return check


def _in_range(low: int, high: int | None = None) -> _Check:
    def check(value: int) -> int:
        if value < low or (high is not None and value > high):
            expected = f"from {low} to {high}" if high is not None else f"at least {low}"
            raise ValueError(f"must be {expected}, got {value}")
        return value

    return check


def _positive_hours(value: float) -> float:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"must be a number of hours greater than 0, got {value}")
    return value


def _positive(value: float) -> float:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"must be a number of seconds greater than 0, got {value}")
    return value


def _not_empty(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    return value


#: Shortest XML-RPC token accepted: the token alone guards balance changes.
MIN_API_TOKEN = 16


def _api_token(value: str) -> str:
    if len(value.strip()) < MIN_API_TOKEN:
        raise ValueError(f"must be at least {MIN_API_TOKEN} characters (it guards balances)")
    return value.strip()


def _endpoint_check(parse: Callable[[str], str]) -> _Check:
    def check(value: str) -> str:
        _not_empty(value)
        try:
            return parse(value)
        except ValueError as e:
            raise ValueError(f"bad endpoint string {json.dumps(value)}: {e}") from None

    return check


def _database_url(value: str) -> str:
    try:
        url = make_url(value)
    except ArgumentError:
        raise ValueError(f"not a SQLAlchemy database URL: {json.dumps(value)}") from None
    if url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:"):
        # An in-memory database would lose the outbox: acknowledged charges.
        raise ValueError("sitesrv needs a SQLite file, not an in-memory database")
    return value


def _admin_name(name: str) -> str:
    # The same rule as `sitesrv-admin admin add`.
    try:
        checked = check_admin_name(name)
    except Invalid as e:
        raise ValueError(str(e)) from None
    if checked != name:
        raise ValueError("admin name must not begin or end with spaces")
    return name


def _verifier(value: str) -> str:
    if not is_verifier(value.strip()):
        raise ValueError(
            "not a password verifier (make one with `sitesrv-admin admin hash"
            " --password-stdin`: it looks like scrypt$16384$8$1$...$...)"
        )
    return value.strip()


def _fingerprint(value: str) -> str:
    # Same normalisation as sitesrv.tls: colons and spaces are only for readability.
    digits = re.sub(r"[\s:]", "", value).lower()
    if not re.fullmatch(r"[0-9a-f]*", digits):
        raise ValueError("a SHA-256 fingerprint is hexadecimal digits, optionally colon-separated")
    if len(digits) != 64:
        raise ValueError(f"a SHA-256 fingerprint has 64 hex digits, this one has {len(digits)}")
    return digits


_SCHEMA = _Table(
    {
        "role": _Key(str, required=True, checks=(_one_of(*ROLES),)),
        "name": _Key(
            str,
            required=True,
            checks=(
                _matches(r"[A-Za-z0-9._-]{1,100}", "1 to 100 characters of A-Z a-z 0-9 . _ -"),
            ),
        ),
        "data_dir": _Key(str, required=True, checks=(_not_empty,)),
        "database": _Key(str, checks=(_database_url,)),
        "currency": _Key(str, checks=(_matches(r"[A-Z]{3}", "3 upper-case letters, e.g. USD"),)),
        "decimals": _Key(int, checks=(_in_range(0, 4),)),
        "log_level": _Key(str, checks=(_one_of(*LOG_LEVELS),)),
        "listen": _Table(
            {
                "providers": _Key(str, checks=(_endpoint_check(_server_endpoint),)),
                "web": _Key(str, checks=(_endpoint_check(_server_endpoint),)),
                "replication": _Key(
                    str, checks=(_endpoint_check(_server_endpoint),), roles=("primary",)
                ),
            }
        ),
        "primary": _Table(
            {
                "endpoint": _Key(str, required=True, checks=(_endpoint_check(_client_endpoint),)),
                "token_file": _Key(str, required=True, checks=(_not_empty,)),
                "ca": _Key(str, checks=(_not_empty,)),
                "fingerprint": _Key(str, checks=(_fingerprint,)),
                "hostname": _Key(str, checks=(_not_empty,)),
                "insecure": _Key(bool),
            },
            required=True,
            roles=("site",),
        ),
        "tls": _Table(
            {
                "cert": _Key(str, checks=(_not_empty,)),
                "key": _Key(str, checks=(_not_empty,)),
                "ca": _Key(str, checks=(_not_empty,)),
            }
        ),
        "replication": _Table(
            {
                "heartbeat": _Key(float, checks=(_positive,)),
                "max_backoff": _Key(float, checks=(_positive,)),
                "changelog_max_age_days": _Key(int, checks=(_in_range(1),)),
                "outbox_retention_days": _Key(int, checks=(_in_range(0),)),
            }
        ),
        "providers": _Table(
            {
                "hold_hours": _Key(float, checks=(_positive_hours,)),
                "heartbeat": _Key(float, checks=(_positive,)),
            }
        ),
        "web": _Table(
            {
                "site_grace": _Key(float, checks=(_positive,), roles=("primary",)),
                "xmlrpc_token": _Key(str, checks=(_api_token,), roles=("primary",)),
                "xmlrpc_token_file": _Key(str, checks=(_not_empty,), roles=("primary",)),
                "admins": _Map(_Key(str, checks=(_verifier,)), name_checks=(_admin_name,)),
            }
        ),
    }
)

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _dotted(parts: tuple[str, ...]) -> str:
    """A dotted key as TOML writes it (odd names quoted, so a message stays one line)."""
    return ".".join(p if _BARE_KEY.fullmatch(p) else json.dumps(p) for p in parts)


def _describe_type(expected: type) -> str:
    return {
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "a boolean (true or false)",
        dict: "a table",
    }[expected]


def _describe_value(value: object) -> str:
    # bool before int: True is an int in Python but a boolean in TOML.
    for kind, name in (
        (bool, "a boolean"),
        (int, "an integer"),
        (float, "a float"),
        (str, "a string"),
        (Mapping, "a table"),
        (list, "an array"),
        (datetime.datetime, "a date-time"),
        (datetime.date, "a date"),
        (datetime.time, "a time"),
    ):
        if isinstance(value, kind):
            return name
    return "None" if value is None else f"a {type(value).__name__}"


def _check_type(expected: type, value: object) -> Any:
    # TOML booleans must not pass as integers (True is an int in Python), and a float key
    # takes an integer ("heartbeat = 2") but nothing takes a string that looks like a number.
    if isinstance(value, bool) != (expected is bool):
        pass
    elif isinstance(value, expected):
        return value
    elif expected is float and isinstance(value, int):
        return float(value)
    raise ValueError(f"expected {_describe_type(expected)}, got {_describe_value(value)}")


def _unknown_key(name: str, known: Mapping[str, object]) -> str:
    names = sorted(known)
    hint = difflib.get_close_matches(name, names, n=1)
    guess = f"did you mean {hint[0]}? " if hint else ""
    return f"unknown key ({guess}known keys: {', '.join(names)})"


def _role_phrase(roles: tuple[str, ...]) -> str:
    return " or ".join(f"role = {json.dumps(r)}" for r in roles)


def _first_required(spec: _Key | _Table | _Map, key: tuple[str, ...]) -> tuple[str, ...]:
    """The key to name when *spec* is missing: a missing table is reported by its first
    required key, which is what the administrator has to add."""
    if isinstance(spec, _Table):
        for name, inner in spec.keys.items():
            if inner.required:
                return _first_required(inner, (*key, name))
    return key


def _check_table(
    schema: _Table, data: object, where: tuple[str, ...], role: str | None = None
) -> dict[str, Any]:
    """Check *data* against *schema*; return the given keys' checked values (nested)."""
    if not isinstance(data, Mapping):
        raise _Problem(
            _dotted(where), f"expected {_describe_type(dict)}, got {_describe_value(data)}"
        )
    for name in data:
        if name not in schema.keys:
            raise _Problem(_dotted((*where, str(name))), _unknown_key(str(name), schema.keys))
    values: dict[str, Any] = {}
    for name, spec in schema.keys.items():
        # "role" comes first in the schema, so it is known before any role-specific key.
        role = role or values.get("role")
        applies = role is None or role in spec.roles
        key = (*where, name)
        if name not in data:
            if spec.required and applies:
                problem = (
                    f"required for role = {json.dumps(role)}"
                    if spec.roles != ROLES
                    else "required key is missing"
                )
                raise _Problem(_dotted(_first_required(spec, key)), problem)
            continue
        if not applies:
            raise _Problem(
                _dotted(key),
                f"only used with {_role_phrase(spec.roles)}, this is role = {json.dumps(role)}",
            )
        if isinstance(spec, _Table):
            values[name] = _check_table(spec, data[name], key, role)
            continue
        if isinstance(spec, _Map):
            values[name] = _check_map(spec, data[name], key)
            continue
        try:
            value = _check_type(spec.type, data[name])
            for check in spec.checks:
                value = check(value)
        except ValueError as e:
            raise _Problem(_dotted(key), str(e)) from None
        values[name] = value
    return values


def _check_map(spec: _Map, data: object, where: tuple[str, ...]) -> dict[str, Any]:
    """Check each name and value of a `_Map` table; return the checked values."""
    if not isinstance(data, Mapping):
        raise _Problem(
            _dotted(where), f"expected {_describe_type(dict)}, got {_describe_value(data)}"
        )
    values: dict[str, Any] = {}
    for name, raw in data.items():
        key = _dotted((*where, str(name)))
        try:
            for check in spec.name_checks:
                check(name)
            value = _check_type(spec.value.type, raw)
            for check in spec.value.checks:
                value = check(value)
        except ValueError as e:
            raise _Problem(key, str(e)) from None
        values[name] = value
    return values


# --- rules between keys, defaults that depend on other keys -----------------------------


def _build(values: dict[str, Any], path: str) -> Config:
    # Relative paths are relative to the config file, not to wherever twistd was started.
    base = os.path.dirname(os.path.abspath(path)) if path else os.getcwd()

    def resolve(p: str) -> str:
        return os.path.normpath(os.path.join(base, p))

    role = values["role"]
    data_dir = resolve(values["data_dir"])

    database = values.get("database", f"sqlite:///{data_dir}/sitesrv.db")
    url = make_url(database)
    if url.get_backend_name() == "sqlite" and url.database and not os.path.isabs(url.database):
        database = url.set(database=resolve(url.database)).render_as_string(hide_password=False)

    tls_values = values.get("tls", {})
    tls = TLSConfig(
        cert=resolve(tls_values.get("cert", os.path.join(data_dir, "tls", "server.crt"))),
        key=resolve(tls_values.get("key", os.path.join(data_dir, "tls", "server.key"))),
        ca=resolve(tls_values.get("ca", os.path.join(data_dir, "tls", "ca.crt"))),
    )

    listen = ListenConfig(**values.get("listen", {}))
    _check_port_clashes(listen, role)
    # The schema made [primary] required for a site and refused it for a primary.
    primary = _build_primary(values["primary"], resolve) if "primary" in values else None

    web_values = values.get("web", {})
    if "xmlrpc_token" in web_values and "xmlrpc_token_file" in web_values:
        raise _Problem("web.xmlrpc_token_file", "give either xmlrpc_token or xmlrpc_token_file")
    if "xmlrpc_token_file" in web_values:
        web_values = {**web_values, "xmlrpc_token_file": resolve(web_values["xmlrpc_token_file"])}

    return Config(
        path=path,
        role=role,
        name=values["name"],
        data_dir=data_dir,
        database=database,
        listen=listen,
        primary=primary,
        tls=tls,
        replication=ReplicationConfig(**values.get("replication", {})),
        web=WebConfig(**web_values),
        providers=ProvidersConfig(**values.get("providers", {})),
        **{k: values[k] for k in ("currency", "decimals", "log_level") if k in values},
    )


def _link_trust(
    table: str, peer: str, values: dict[str, Any], resolve: Callable[[str], str]
) -> dict[str, Any]:
    """Check a client link's TLS trust keys (ca / fingerprint / insecure, hostname).

    Shared by a site's ``[primary]`` table and the print provider's ``[server]``; returns
    the resolved ``ca``, ``fingerprint``, ``hostname`` and ``insecure``.
    """
    insecure = values.get("insecure", False)
    trust = [k for k in ("ca", "fingerprint") if k in values]
    if insecure and trust:
        raise _Problem(
            f"{table}.{trust[0]}", "cannot be used with insecure = true (plain TCP, no TLS)"
        )
    if not insecure and len(trust) == 2:
        raise _Problem(f"{table}.fingerprint", "give either ca or fingerprint, not both")
    if not insecure and not trust:
        raise _Problem(
            f"{table}.ca",
            f"give ca (the {peer}'s CA certificate) or fingerprint (its certificate's"
            " SHA-256), or insecure = true for plain TCP",
        )
    hostname = values.get("hostname") or _endpoint_host(values["endpoint"])
    if hostname is None and not insecure:
        raise _Problem(
            f"{table}.hostname",
            f"required when endpoint is not tcp:HOST:PORT (the name to verify the {peer}'s"
            " certificate against)",
        )
    return {
        "ca": resolve(values["ca"]) if "ca" in values else None,
        "fingerprint": values.get("fingerprint"),
        "hostname": hostname,
        "insecure": insecure,
    }


def _build_primary(values: dict[str, Any], resolve: Callable[[str], str]) -> PrimaryLink:
    return PrimaryLink(
        endpoint=values["endpoint"],
        token_file=resolve(values["token_file"]),
        **_link_trust("primary", "primary", values, resolve),
    )


def _check_port_clashes(listen: ListenConfig, role: str) -> None:
    """Two listeners on one port would fail at start with a less helpful message."""
    endpoints = {"listen.providers": listen.providers, "listen.web": listen.web}
    if role == "primary":
        endpoints["listen.replication"] = listen.replication or f"tcp:{DEFAULT_REPLICATION_PORT}"
    seen: dict[tuple[int, str], str] = {}
    for key, endpoint in endpoints.items():
        where = _listening_port(endpoint)
        if where is None or where[0] == 0:
            continue
        # An empty interface means all of them, so it clashes with any interface.
        for (port, interface), other in seen.items():
            if port == where[0] and (not interface or not where[1] or interface == where[1]):
                raise _Problem(key, f"port {port} is also used by {other}")
        seen[where] = key
