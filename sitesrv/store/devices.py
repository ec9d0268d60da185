"""Devices (driven by connector plugins) and print providers.

Both authenticate with a random key that is shown once and stored only as a hash.
"""

from __future__ import annotations

import json
from typing import Any

import attrs
from sqlalchemy import Connection, select

from sitesrv.errors import AlreadyExists, Invalid, NotFound
from sitesrv.secrets import hash_token, new_token
from sitesrv.store.changelog import thdDelete, thdInsert, thdUpdate
from sitesrv.store.printers import thdPrinter
from sitesrv.store.schema import devices, printers, providers, sites
from sitesrv.store.sites import thdSite
from sitesrv.store.users import check_name

MAX_OPTIONS = 8192


@attrs.frozen
class Device:
    """A device record: which connector drives it, with what options, for which printer."""

    id: int
    name: str
    site: str
    connector: str
    options: dict[str, str]
    printer: str | None
    api_key_hash: str


@attrs.frozen
class Provider:
    """A print provider record."""

    id: int
    name: str
    site: str
    key_hash: str


def _device(row: Any) -> Device:
    return Device(
        id=row.id,
        name=row.name,
        site=row.site_name,
        connector=row.connector,
        options=json.loads(row.options),
        printer=row.printer_name,
        api_key_hash=row.api_key_hash,
    )


def _device_query() -> Any:
    return select(
        devices, sites.c.name.label("site_name"), printers.c.name.label("printer_name")
    ).select_from(
        devices.join(sites, sites.c.id == devices.c.site_id).outerjoin(
            printers, printers.c.id == devices.c.printer_id
        )
    )


def thdAddDevice(
    conn: Connection,
    name: str,
    site: str,
    connector: str,
    now: float,
    *,
    printer: str | None = None,
    options: dict[str, str] | None = None,
) -> str:
    """Add a device; return its API key (shown once)."""
    name = check_name("device", name)
    connector = check_name("connector", connector)
    encoded = json.dumps(options or {}, sort_keys=True)
    if len(encoded) > MAX_OPTIONS:
        raise Invalid(f"device options are longer than {MAX_OPTIONS} bytes")
    if conn.execute(select(devices.c.id).where(devices.c.name == name)).first():
        raise AlreadyExists(f"device {name!r} already exists")
    site_id = thdSite(conn, site).id
    printer_id = None
    if printer is not None:
        p = thdPrinter(conn, printer)
        if p.site != site:
            raise Invalid(f"printer {printer!r} is at site {p.site!r}, not {site!r}")
        printer_id = p.id
    key = new_token()
    thdInsert(
        conn,
        devices,
        {
            "name": name,
            "site_id": site_id,
            "connector": connector,
            "options": encoded,
            "printer_id": printer_id,
            "api_key_hash": hash_token(key),
            "created_at": now,
        },
        now,
    )
    return key


def thdListDevices(conn: Connection, site: str | None = None) -> list[Device]:
    """Devices in name order, optionally of one site."""
    q = _device_query().order_by(devices.c.name)
    if site is not None:
        q = q.where(sites.c.name == site)
    return [_device(r) for r in conn.execute(q)]


def thdDevice(conn: Connection, name: str) -> Device:
    """The device named ``name``."""
    row = conn.execute(_device_query().where(devices.c.name == name)).first()
    if row is None:
        raise NotFound(f"no device named {name!r}")
    return _device(row)


def thdRemoveDevice(conn: Connection, name: str, now: float) -> None:
    """Remove a device."""
    thdDelete(conn, devices, thdDevice(conn, name).id, now)


# -- providers ------------------------------------------------------------------------


def _provider_query() -> Any:
    return select(providers, sites.c.name.label("site_name")).select_from(
        providers.join(sites, sites.c.id == providers.c.site_id)
    )


def _provider(row: Any) -> Provider:
    return Provider(id=row.id, name=row.name, site=row.site_name, key_hash=row.key_hash)


def thdAddProvider(conn: Connection, name: str, site: str, now: float) -> str:
    """Add a print provider; return its key (shown once)."""
    name = check_name("provider", name)
    if conn.execute(select(providers.c.id).where(providers.c.name == name)).first():
        raise AlreadyExists(f"provider {name!r} already exists")
    site_id = thdSite(conn, site).id
    key = new_token()
    thdInsert(
        conn,
        providers,
        {"name": name, "site_id": site_id, "key_hash": hash_token(key), "created_at": now},
        now,
    )
    return key


def thdProvider(conn: Connection, name: str) -> Provider:
    """The provider named ``name``."""
    row = conn.execute(_provider_query().where(providers.c.name == name)).first()
    if row is None:
        raise NotFound(f"no provider named {name!r}")
    return _provider(row)


def thdListProviders(conn: Connection, site: str | None = None) -> list[Provider]:
    """Providers in name order, optionally of one site."""
    q = _provider_query().order_by(providers.c.name)
    if site is not None:
        q = q.where(sites.c.name == site)
    return [_provider(r) for r in conn.execute(q)]


def thdRemoveProvider(conn: Connection, name: str, now: float) -> None:
    """Remove a provider: its key stops working."""
    thdDelete(conn, providers, thdProvider(conn, name).id, now)


def thdRotateProviderKey(conn: Connection, name: str, now: float) -> str:
    """Give a provider a new key; the old one stops working. Return the new key."""
    provider = thdProvider(conn, name)
    key = new_token()
    thdUpdate(conn, providers, provider.id, {"key_hash": hash_token(key)}, now)
    return key


def thdDeviceByKey(conn: Connection, key: str) -> Device | None:
    """The device whose API key this is, or None (compared by hash)."""
    row = conn.execute(_device_query().where(devices.c.api_key_hash == hash_token(key))).first()
    return None if row is None else _device(row)
