"""The demo: ``twistd -n sitesrv --demo`` runs sitesrv with no set-up.

A primary ("main") and one site server ("branch") in one process, each with its own
ports and SQLite database under ``./var/demo``, replicating over TLS on localhost with
certificates made on first start. Demo users, cards, a PIN, printers and an MFD device
are seeded on first start, and a short "try this" sheet is printed.
"""

from __future__ import annotations

import os
import sys
import textwrap
from typing import Any

from twisted.application.service import IService, MultiService
from twisted.internet.endpoints import quoteStringArgument

from sitesrv.config import load
from sitesrv.secrets import make_verifier
from sitesrv.server import make_server
from sitesrv.store import devices, policies, printers, sites, users
from sitesrv.store.audit import thdAudit
from sitesrv.tls import init_tls

DEMO_DIR = os.path.join("var", "demo")
PRIMARY_NAME = "main"
SITE_NAME = "branch"

PRIMARY_CONFIG = f"""\
# Written by `twistd -n sitesrv --demo`; edit freely, it is not overwritten.
role = "primary"
name = "{PRIMARY_NAME}"
data_dir = "primary"

[listen]
web = "tcp:9193:interface=127.0.0.1"
providers = "tcp:9191:interface=127.0.0.1"
replication = "ssl:9192:interface=127.0.0.1:privateKey={{key}}:certKey={{cert}}"
"""

SITE_CONFIG = f"""\
# Written by `twistd -n sitesrv --demo`; edit freely, it is not overwritten.
role = "site"
name = "{SITE_NAME}"
data_dir = "branch"

[listen]
web = "tcp:9293:interface=127.0.0.1"
providers = "tcp:9291:interface=127.0.0.1"

[primary]
endpoint = "tcp:127.0.0.1:9192"
ca = "tls/ca.crt"
hostname = "localhost"
token_file = "branch/token"
"""

#: The branch's demo card reader listens here (a swipe is a card number and Enter).
CARD_READER_PORT = 9294

DEMO_USERS = (
    # username, full name, balance (minor units), card, PIN, password
    ("alice", "Alice Example", 1000, "1001", "1234", "alice-pass"),
    ("bob", "Bob Example", 200, "1002", None, "bob-pass"),
    ("carol", "Carol Example", 0, "0A1B2C3D", None, None),
)


def _thdSeed(conn: Any, now: float) -> dict[str, str] | None:
    """Create the demo data unless it exists; return the secrets made, or None."""
    if users.thdListUsers(conn, limit=1):
        return None
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
    token = sites.thdAddSite(conn, SITE_NAME, now)
    printers.thdAddPrinter(conn, "library-mono", PRIMARY_NAME, 10, 10, now, hold=True)
    printers.thdAddPrinter(
        conn, "branch-colour", SITE_NAME, 10, 50, now, duplex_discount=10, hold=True
    )
    key = devices.thdAddDevice(conn, "branch-mfd", SITE_NAME, "http", now, printer="branch-colour")
    # A network card reader at the branch: connect to it and type a card number.
    devices.thdAddDevice(
        conn,
        "branch-reader",
        SITE_NAME,
        "card-reader",
        now,
        printer="branch-colour",
        options={"listen": f"tcp:{CARD_READER_PORT}:interface=127.0.0.1", "feedback": "line"},
    )
    policies.thdSetPolicy(conn, "offline.allowance", "5.00", now, site=SITE_NAME)
    thdAudit(conn, "demo", "demo.seed", PRIMARY_NAME, now)
    return {"token": token, "key": key}


def _write(path: str, text: str, mode: int = 0o644) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)


def cheat_sheet(key: str) -> str:
    """The "try this" sheet printed at start."""
    primary = f"sitesrv-admin --config {os.path.join(DEMO_DIR, 'primary.toml')}"
    site = f"sitesrv-admin --config {os.path.join(DEMO_DIR, 'branch.toml')}"
    api = "http://127.0.0.1:9293/api/v1"
    auth = f"-H 'Authorization: Bearer {key}'"
    return textwrap.dedent(
        f"""
        ======================================================================
         sitesrv demo: primary {PRIMARY_NAME!r} and site {SITE_NAME!r}, data in {DEMO_DIR}/
        ======================================================================
         Health:      curl http://127.0.0.1:9193/health      (primary)
                      curl http://127.0.0.1:9293/health      (site: watch "mode")
         Users:       {primary} user list
         Sites:       {primary} site list
         Top up:      {primary} balance adjust bob 5.00 --comment "demo top-up"
         ...at site:  {site} user show bob      (replicated within a second)
         MFD login:   curl -s {auth} \\
                        -d '{{"card": "1001", "pin": "1234"}}' {api}/sessions
         Copy charge: curl -s {auth} \\
                        -d '{{"kind": "copy", "pages": 3}}' {api}/sessions/SESSION/usage
         Card reader: nc 127.0.0.1 {CARD_READER_PORT}   then type 1001 and Enter: a swipe
                      releases alice's held jobs (answers "OK 0 jobs")
         Ledger:      {primary} transactions list --user alice
         Outbox:      {site} outbox show
         Demo users:  alice (card 1001, PIN 1234, balance 10.00, password alice-pass)
                      bob (card 1002, balance 2.00), carol (card 0A1B2C3D)
         Stop with Ctrl-C; delete {DEMO_DIR}/ to start afresh.
        ======================================================================
        """
    )


def make_demo(reactor: Any) -> IService:
    """Prepare ``./var/demo`` and return the demo's service tree (primary and site)."""
    branch_dir = os.path.join(DEMO_DIR, "branch")
    os.makedirs(branch_dir, exist_ok=True)
    tls_dir = os.path.join(DEMO_DIR, "tls")
    if not os.path.exists(os.path.join(tls_dir, "server.key")):
        init_tls(tls_dir, ["localhost"], ["127.0.0.1"], force=True)
    # Endpoint strings are not paths the config resolves: give them absolute ones.
    primary_config = PRIMARY_CONFIG.format(
        key=quoteStringArgument(os.path.abspath(os.path.join(tls_dir, "server.key"))),
        cert=quoteStringArgument(os.path.abspath(os.path.join(tls_dir, "server.crt"))),
    )
    for name, text in (("primary.toml", primary_config), ("branch.toml", SITE_CONFIG)):
        path = os.path.join(DEMO_DIR, name)
        if not os.path.exists(path):
            _write(path, text)
    primary = make_server(load(os.path.join(DEMO_DIR, "primary.toml")), reactor)
    made = primary.store.write(_thdSeed, reactor.seconds())
    key_file = os.path.join(branch_dir, "mfd.key")
    if made is not None:
        _write(os.path.join(branch_dir, "token"), made["token"] + "\n", 0o600)
        _write(key_file, made["key"] + "\n", 0o600)
    site = make_server(load(os.path.join(DEMO_DIR, "branch.toml")), reactor)
    demo = MultiService()
    primary.setServiceParent(demo)
    site.setServiceParent(demo)
    with open(key_file, encoding="utf-8") as f:
        key = f.read().strip()
    # The sheet is for the person who typed the command, not a log event.
    sys.stdout.write(cheat_sheet(key))
    sys.stdout.flush()
    return demo
