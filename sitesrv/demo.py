"""The demo: ``twistd -n sitesrv --demo`` runs sitesrv with no set-up.

It writes a config under ``./var/demo``, seeds demo users, cards, a PIN, printers and a
device on first start, prints a short "try this" sheet and runs the server on localhost.
"""

from __future__ import annotations

import os
import sys
import textwrap
from typing import Any

from twisted.application.service import IService

from sitesrv.config import load
from sitesrv.secrets import make_verifier
from sitesrv.server import make_server
from sitesrv.store import Store
from sitesrv.store import devices, printers, users
from sitesrv.store.audit import thdAudit

DEMO_DIR = os.path.join("var", "demo")
PRIMARY_NAME = "main"
WEB_PORT = 9193
PROVIDER_PORT = 9191

PRIMARY_CONFIG = f"""\
# Written by `twistd -n sitesrv --demo`; edit freely, it is not overwritten.
role = "primary"
name = "{PRIMARY_NAME}"
data_dir = "primary"

[listen]
web = "tcp:{WEB_PORT}:interface=127.0.0.1"
providers = "tcp:{PROVIDER_PORT}:interface=127.0.0.1"
"""

DEMO_USERS = (
    # username, full name, balance (minor units), card, PIN, password
    ("alice", "Alice Example", 1000, "1001", "1234", "alice-pass"),
    ("bob", "Bob Example", 200, "1002", None, "bob-pass"),
    ("carol", "Carol Example", 0, "0A1B2C3D", None, None),
)


def _thdSeed(conn: Any, now: float) -> bool:
    """Create the demo data unless it exists; return whether it was created."""
    if users.thdListUsers(conn, limit=1):
        return False
    for username, full_name, balance, card, pin, password in DEMO_USERS:
        users.thdAddUser(
            conn,
            username,
            now,
            full_name=full_name,
            email=f"{username}@example.org",
            balance=balance,
            site=PRIMARY_NAME,
            # Cheaper scrypt for demo data only, so the first start is quick.
            password_verifier=None if password is None else make_verifier(password, n=2**12),
        )
        users.thdAddCard(conn, username, card, now)
        if pin is not None:
            users.thdSetPin(conn, username, make_verifier(pin, n=2**12), now)
    printers.thdAddPrinter(conn, "library-mono", PRIMARY_NAME, 10, 10, now, hold=True)
    printers.thdAddPrinter(
        conn, "library-colour", PRIMARY_NAME, 10, 50, now, duplex_discount=10, hold=True
    )
    devices.thdAddDevice(
        conn,
        "library-mfd",
        PRIMARY_NAME,
        "http",
        now,
        printer="library-colour",
    )
    thdAudit(conn, "demo", "demo.seed", PRIMARY_NAME, now)
    return True


def cheat_sheet(config_path: str) -> str:
    """The "try this" sheet printed at start."""
    admin = f"sitesrv-admin --config {config_path}"
    return textwrap.dedent(
        f"""
        ==================================================================
         sitesrv demo: a primary called {PRIMARY_NAME!r}, data in {DEMO_DIR}/
        ==================================================================
         Health:        curl http://127.0.0.1:{WEB_PORT}/health
         Users:         {admin} user list
         One user:      {admin} user show alice
         Top up:        {admin} balance adjust bob 5.00 --comment "demo top-up"
         Printers:      {admin} printer list
         Policies:      {admin} policy show
         Audit log:     {admin} audit list
         Demo users:    alice (card 1001, PIN 1234, balance 10.00)
                        bob (card 1002, balance 2.00), carol (card 0A1B2C3D)
         Stop with Ctrl-C; delete {DEMO_DIR}/ to start afresh.
        ==================================================================
        """
    )


def make_demo(reactor: Any) -> IService:
    """Prepare ``./var/demo`` and return the demo's service tree."""
    os.makedirs(DEMO_DIR, exist_ok=True)
    config_path = os.path.join(DEMO_DIR, "primary.toml")
    if not os.path.exists(config_path):
        with open(config_path, "w", encoding="utf-8") as f:
            f.write(PRIMARY_CONFIG)
    config = load(config_path)
    server = make_server(config, reactor)
    store: Store = server.store
    store.write(_thdSeed, reactor.seconds())
    # The sheet is for the person who typed the command, not a log event.
    sys.stdout.write(cheat_sheet(config_path))
    sys.stdout.flush()
    return server
