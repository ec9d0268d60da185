"""The ``sitesrv-provider`` TOML configuration: reading, validating, value types.

Checked the way the server's config is (`sitesrv.config`: one schema entry per key, its
type and value checks), with the same one-line `ConfigError` naming the file, the dotted
key and the problem. ``queues`` and ``printers`` are tables of tables whose keys are
names chosen by the administrator. See ``docs/provider.rst`` for every key.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from typing import Any

import attrs

from sitesrv.config import (
    LOG_LEVELS,
    ConfigError,
    _check_table,
    _client_endpoint,
    _endpoint_check,
    _fingerprint,
    _in_range,
    _Key,
    _link_trust,
    _matches,
    _not_empty,
    _one_of,
    _positive,
    _Problem,
    _server_endpoint,
    _Table,
)
from sitesrv.provider.deliver import parse_target

#: What the provider does with a job while it cannot reach its server.
OFFLINE_POLICIES = ("hold", "print-later", "print-untracked")

MIB = 1 << 20
KIB = 1 << 10

_NAME = r"[A-Za-z0-9._-]{1,100}"
_NAME_TEXT = "1 to 100 characters of A-Z a-z 0-9 . _ -"


@attrs.frozen
class ServerLink:
    """How the provider reaches and trusts its server (the ``[server]`` table)."""

    endpoint: str
    key_file: str
    ca: str | None = None
    fingerprint: str | None = None
    hostname: str | None = None
    insecure: bool = False
    # Seconds to wait for a decision before applying the offline policy.
    decision_timeout: float = 10.0
    # Longest wait between reconnection attempts.
    max_backoff: float = 30.0


@attrs.frozen
class IPPConfig:
    """The IPP listener and its request limits."""

    listen: str = "tcp:631"
    max_document: int = 100 * MIB
    max_attributes: int = 64 * KIB


@attrs.frozen
class SpoolConfig:
    """Where documents are spooled, and how much and how long."""

    directory: str
    quota: int = 2048 * MIB
    # Jobs spooled longer than this without being printed are deleted (seconds).
    max_age: float = 72 * 3600.0
    # Finished jobs' records stay this long (seconds) for Get-Jobs and duplicate releases.
    keep_finished: float = 24 * 3600.0


@attrs.frozen
class DeliveryConfig:
    """Retries of delivery to physical printers."""

    retries: int = 3
    backoff: float = 5.0
    timeout: float = 120.0


@attrs.frozen
class Queue:
    """A virtual IPP queue: ``/ipp/print/NAME`` and the server printer it stands for."""

    name: str
    printer: str
    info: str = ""
    location: str = ""


@attrs.frozen
class ProviderConfig:
    """A validated provider configuration: absolute paths, defaults filled in."""

    path: str
    name: str
    data_dir: str
    server: ServerLink
    ipp: IPPConfig
    spool: SpoolConfig
    delivery: DeliveryConfig
    queues: Mapping[str, Queue]
    # Server printer name → delivery URI, overriding the one the server has on record.
    printers: Mapping[str, str]
    offline_policy: str = "hold"
    log_level: str = "info"

    def queue_for_printer(self, printer: str) -> Queue | None:
        """The first queue standing for ``printer``, or None."""
        for queue in self.queues.values():
            if queue.printer == printer:
                return queue
        return None


def _delivery_uri(value: str) -> str:
    parse_target(value)
    return value.strip()


_SCHEMA = _Table(
    {
        "name": _Key(str, required=True, checks=(_matches(_NAME, _NAME_TEXT),)),
        "data_dir": _Key(str, required=True, checks=(_not_empty,)),
        "offline_policy": _Key(str, checks=(_one_of(*OFFLINE_POLICIES),)),
        "log_level": _Key(str, checks=(_one_of(*LOG_LEVELS),)),
        "server": _Table(
            {
                "endpoint": _Key(str, required=True, checks=(_endpoint_check(_client_endpoint),)),
                "key_file": _Key(str, required=True, checks=(_not_empty,)),
                "ca": _Key(str, checks=(_not_empty,)),
                "fingerprint": _Key(str, checks=(_fingerprint,)),
                "hostname": _Key(str, checks=(_not_empty,)),
                "insecure": _Key(bool),
                "decision_timeout": _Key(float, checks=(_positive,)),
                "max_backoff": _Key(float, checks=(_positive,)),
            },
            required=True,
        ),
        "ipp": _Table(
            {
                "listen": _Key(str, checks=(_endpoint_check(_server_endpoint),)),
                "max_document_mib": _Key(int, checks=(_in_range(1, 100_000),)),
                "max_attributes_kib": _Key(int, checks=(_in_range(4, 16_384),)),
            }
        ),
        "spool": _Table(
            {
                "dir": _Key(str, checks=(_not_empty,)),
                "quota_mib": _Key(int, checks=(_in_range(1),)),
                "max_age_hours": _Key(float, checks=(_positive,)),
                "keep_finished_hours": _Key(float, checks=(_positive,)),
            }
        ),
        "delivery": _Table(
            {
                "retries": _Key(int, checks=(_in_range(0, 100),)),
                "backoff": _Key(float, checks=(_positive,)),
                "timeout": _Key(float, checks=(_positive,)),
            }
        ),
    }
)

_QUEUE = _Table(
    {
        "printer": _Key(str, checks=(_matches(r"\S.{0,199}", "a printer name"),)),
        "info": _Key(str),
        "location": _Key(str),
    }
)

_PRINTER = _Table({"uri": _Key(str, required=True, checks=(_delivery_uri,))})

# Characters allowed in a queue name: it becomes a URL path segment.
_QUEUE_NAME = re.compile(_NAME)


def load(path: str) -> ProviderConfig:
    """Read and validate the TOML file at ``path``; raise `ConfigError` if unusable."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ConfigError(path, "", f"cannot read the file: {e.strerror or e}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(path, "", f"not UTF-8 text (bad byte at offset {e.start})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(path, "", f"invalid TOML: {e}") from None
    return from_dict(data, path)


def from_dict(data: Mapping[str, Any], path: str = "") -> ProviderConfig:
    """Validate an already-parsed config; ``path`` names it and anchors relative paths."""
    try:
        rest = {k: v for k, v in data.items() if k not in ("queues", "printers")}
        values = _check_table(_SCHEMA, rest, ())
        queues = _named_tables(data, "queues", _QUEUE)
        printers = _named_tables(data, "printers", _PRINTER)
        return _build(values, queues, printers, path)
    except _Problem as p:
        raise ConfigError(path, p.key, p.problem) from None


def _named_tables(data: Mapping[str, Any], key: str, schema: _Table) -> dict[str, dict[str, Any]]:
    """Check ``[key.NAME]`` tables: each NAME a valid name, each table against schema."""
    tables = data.get(key, {})
    if not isinstance(tables, Mapping):
        raise _Problem(key, f"expected a table of [{key}.NAME] tables")
    checked: dict[str, dict[str, Any]] = {}
    for name, table in tables.items():
        where = f"{key}.{json.dumps(name) if not _QUEUE_NAME.fullmatch(name) else name}"
        if key == "queues" and not _QUEUE_NAME.fullmatch(name):
            raise _Problem(where, f"a queue name must be {_NAME_TEXT}")
        if not isinstance(table, Mapping):
            raise _Problem(where, "expected a table")
        checked[name] = _check_table(schema, table, (key, name))
    return checked


def _build(
    values: dict[str, Any],
    queues: dict[str, dict[str, Any]],
    printers: dict[str, dict[str, Any]],
    path: str,
) -> ProviderConfig:
    base = os.path.dirname(os.path.abspath(path)) if path else os.getcwd()

    def resolve(p: str) -> str:
        return os.path.normpath(os.path.join(base, p))

    data_dir = resolve(values["data_dir"])
    if not queues:
        raise _Problem("queues", "no queues: add at least one [queues.NAME] table")

    ipp_values = values.get("ipp", {})
    ipp = IPPConfig(
        listen=ipp_values.get("listen", IPPConfig.listen),
        max_document=ipp_values.get("max_document_mib", 100) * MIB,
        max_attributes=ipp_values.get("max_attributes_kib", 64) * KIB,
    )
    spool_values = values.get("spool", {})
    spool = SpoolConfig(
        directory=resolve(spool_values.get("dir", os.path.join(data_dir, "spool"))),
        quota=spool_values.get("quota_mib", 2048) * MIB,
        max_age=spool_values.get("max_age_hours", 72.0) * 3600.0,
        keep_finished=spool_values.get("keep_finished_hours", 24.0) * 3600.0,
    )
    if spool.quota < ipp.max_document:
        raise _Problem(
            "spool.quota_mib",
            f"must be at least ipp.max_document_mib ({ipp.max_document // MIB}),"
            f" got {spool.quota // MIB}",
        )
    return ProviderConfig(
        path=path,
        name=values["name"],
        data_dir=data_dir,
        server=_build_server(values["server"], resolve),
        ipp=ipp,
        spool=spool,
        delivery=DeliveryConfig(**values.get("delivery", {})),
        queues={
            name: Queue(
                name=name,
                printer=q.get("printer", name),
                info=q.get("info", ""),
                location=q.get("location", ""),
            )
            for name, q in queues.items()
        },
        printers={name: p["uri"] for name, p in printers.items()},
        **{k: values[k] for k in ("offline_policy", "log_level") if k in values},
    )


def _build_server(values: dict[str, Any], resolve: Callable[[str], str]) -> ServerLink:
    # The same trust rules as a site's [primary] table.
    return ServerLink(
        endpoint=values["endpoint"],
        key_file=resolve(values["key_file"]),
        **_link_trust("server", "server", values, resolve),
        decision_timeout=values.get("decision_timeout", 10.0),
        max_backoff=values.get("max_backoff", 30.0),
    )


def read_key(path: str) -> str:
    """The provider key from ``key_file``; ValueError/OSError with a clear message."""
    with open(path, encoding="utf-8") as f:
        key = f.read(1000).strip()
    if not key:
        raise ValueError(f"key file {path} is empty")
    if len(key) > 200:
        raise ValueError(f"key file {path} holds more than a provider key")
    return key
