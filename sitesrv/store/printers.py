"""Printers with their per-page prices."""

from __future__ import annotations

from typing import Any

import attrs
from sqlalchemy import Connection, bindparam, select

from sitesrv.costing import Prices
from sitesrv.errors import AlreadyExists, Invalid, NotFound
from sitesrv.store.changelog import thdInsert
from sitesrv.store.schema import printers, sites
from sitesrv.store.sites import thdSite
from sitesrv.store.users import check_name


@attrs.frozen
class Printer:
    """A printer and where it is."""

    id: int
    name: str
    site: str
    price_mono: int
    price_colour: int
    duplex_discount: int
    uri: str
    hold: bool

    @property
    def prices(self) -> Prices:
        """The printer's prices, for ``costing.job_cost``."""
        return Prices(self.price_mono, self.price_colour, self.duplex_discount)


def _query() -> Any:
    return select(printers, sites.c.name.label("site_name")).select_from(
        printers.join(sites, sites.c.id == printers.c.site_id)
    )


def _printer(row: Any) -> Printer:
    return Printer(
        id=row.id,
        name=row.name,
        site=row.site_name,
        price_mono=row.price_mono,
        price_colour=row.price_colour,
        duplex_discount=row.duplex_discount,
        uri=row.uri,
        hold=bool(row.hold),
    )


def thdAddPrinter(
    conn: Connection,
    name: str,
    site: str,
    price_mono: int,
    price_colour: int,
    now: float,
    *,
    duplex_discount: int = 0,
    uri: str = "",
    hold: bool = False,
) -> Printer:
    """Add a printer at a site."""
    name = check_name("printer", name)
    if price_mono < 0 or price_colour < 0:
        raise Invalid("prices must not be negative")
    if not 0 <= duplex_discount <= 100:
        raise Invalid("the duplex discount is a percentage from 0 to 100")
    if conn.execute(select(printers.c.id).where(printers.c.name == name)).first():
        raise AlreadyExists(f"printer {name!r} already exists")
    site_id = thdSite(conn, site).id
    thdInsert(
        conn,
        printers,
        {
            "name": name,
            "site_id": site_id,
            "price_mono": price_mono,
            "price_colour": price_colour,
            "duplex_discount": duplex_discount,
            "uri": uri,
            "hold": hold,
            "created_at": now,
        },
        now,
    )
    return thdPrinter(conn, name)


# Every print-provider decision looks its printer up, so these are built once: building
# a statement and its cache key costs more than SQLite takes to run it.
_BY_NAME = _query().where(printers.c.name == bindparam("name"))
_BY_ID = _query().where(printers.c.id == bindparam("printer_id"))


def thdPrinter(conn: Connection, name: str) -> Printer:
    """The printer named ``name``."""
    row = conn.execute(_BY_NAME, {"name": name}).first()
    if row is None:
        raise NotFound(f"no printer named {name!r}")
    return _printer(row)


def thdPrinterById(conn: Connection, printer_id: int) -> Printer | None:
    """The printer with this id, or None."""
    row = conn.execute(_BY_ID, {"printer_id": printer_id}).first()
    return None if row is None else _printer(row)


def thdListPrinters(conn: Connection, site: str | None = None) -> list[Printer]:
    """Printers in name order, optionally of one site."""
    q = _query().order_by(printers.c.name)
    if site is not None:
        q = q.where(sites.c.name == site)
    return [_printer(r) for r in conn.execute(q)]
