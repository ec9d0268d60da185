"""Opening a server's database: migrate, then make sure the primary's base rows exist."""

from __future__ import annotations

import os

from sqlalchemy import Connection, select
from sqlalchemy.engine import make_url

from sitesrv.errors import Invalid
from sitesrv.store import Store
from sitesrv.store.changelog import thdEnsureState
from sitesrv.store.ledger import SYSTEM_ACCOUNTS, thdAddAccount
from sitesrv.store.migrate import upgrade
from sitesrv.store.policies import thdSetSetting
from sitesrv.store.schema import accounts, printers, settings, transactions
from sitesrv.store.sites import thdEnsurePrimarySite


def thdInitPrimary(conn: Connection, name: str, currency: str, decimals: int, now: float) -> None:
    """Create the change-log state, the primary's site row, settings and system accounts."""
    thdEnsureState(conn)
    thdEnsurePrimarySite(conn, name, now)
    stored = conn.execute(select(settings.c.value).where(settings.c.key == "decimals")).scalar()
    if stored is not None and int(stored) != decimals and _thdHasMoney(conn):
        # Amounts are integers in minor units: a new number of decimals would silently
        # multiply or divide every balance and price by a power of ten.
        raise Invalid(
            f"decimals = {decimals} in the config, but the database's amounts use {stored}: "
            f"changing it would change every balance and price; set decimals = {stored}"
        )
    thdSetSetting(conn, "currency", currency, now)
    thdSetSetting(conn, "decimals", str(decimals), now)
    for account in SYSTEM_ACCOUNTS:
        if conn.execute(select(accounts.c.id).where(accounts.c.name == account)).first() is None:
            thdAddAccount(conn, account, now, restricted=False)


def _thdHasMoney(conn: Connection) -> bool:
    """Whether any amount is stored yet (a transaction or a printer's price)."""
    return any(
        conn.execute(select(table.c.id).limit(1)).first() is not None
        for table in (transactions, printers)
    )


def open_store(url: str, readers: int = 4) -> Store:
    """Create the SQLite file's directory if needed, connect, and migrate to the newest schema."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database:
        os.makedirs(os.path.dirname(os.path.abspath(parsed.database)), exist_ok=True)
    store = Store(url, readers=readers)
    upgrade(store)
    return store
