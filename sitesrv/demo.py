"""The demo: ``twistd -n sitesrv --demo`` runs sitesrv with no set-up.

A primary ("main") and one site server ("branch") in one process, each with its own
ports and SQLite database under ``./var/demo``, replicating over TLS on localhost with
certificates made on first start. The site reaches the primary through a fault proxy in
the same process, which the status page's "Simulate outage" button cuts and "Restore
link" heals. A print provider ("branch-spool", an IPP printer for users' computers)
holds jobs for the site's Find-Me queue and delivers released ones to a demo raw-socket
printer that counts them. Demo users, cards, a PIN, printers, an MFD device and an admin
login are seeded on first start, with one held job for alice, and a short "try this"
sheet is printed.
"""

from __future__ import annotations

import os
import sys
import textwrap
from collections.abc import Callable
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.endpoints import quoteStringArgument
from twisted.logger import Logger

from sitesrv.config import Config, load
from sitesrv.demoparts import Controls, DemoPrinter, FirstSample, LinkProxy, StartWhen
from sitesrv.errors import NotFound
from sitesrv.provider.config import from_dict as provider_config
from sitesrv.provider.service import Provider, make_provider
from sitesrv.secrets import make_verifier
from sitesrv.server import Server, make_server
from sitesrv.store import admins, devices, policies, printers, sites, users
from sitesrv.store.audit import thdAudit
from sitesrv.tls import init_tls

log = Logger()

DEMO_DIR = os.path.join("var", "demo")
PRIMARY_NAME = "main"
SITE_NAME = "branch"

#: The primary's replication port, and the fault proxy in front of it the site uses.
REPLICATION_PORT = 9192
LINK_PROXY_PORT = 9195
#: The branch's demo card reader listens here (a swipe is a card number and Enter).
CARD_READER_PORT = 9294
#: The demo print provider: its name, its IPP port and its hold queue.
PROVIDER_NAME = "branch-spool"
IPP_PORT = 9631
HOLD_QUEUE = "branch-colour"
#: The demo raw-socket printer behind the hold queue.
PRINTER_PORT = 9101

ADMIN_NAME = "admin"
ADMIN_PASSWORD = "admin-pass"

PRIMARY_CONFIG = f"""\
# Written by `twistd -n sitesrv --demo`; edit freely, it is not overwritten.
role = "primary"
name = "{PRIMARY_NAME}"
data_dir = "primary"

[listen]
web = "tcp:9193:interface=127.0.0.1"
providers = "tcp:9191:interface=127.0.0.1"
replication = "ssl:{REPLICATION_PORT}:interface=127.0.0.1:privateKey={{key}}:certKey={{cert}}"
"""

SITE_CONFIG = f"""\
# Written by `twistd -n sitesrv --demo`; edit freely, it is not overwritten.
role = "site"
name = "{SITE_NAME}"
data_dir = "branch"

[listen]
web = "tcp:9293:interface=127.0.0.1"
providers = "ssl:9291:interface=127.0.0.1:privateKey={{key}}:certKey={{cert}}"

[primary]
# The demo's fault proxy, in front of the primary's port {REPLICATION_PORT}: the status
# page's "Simulate outage" button cuts it.
endpoint = "tcp:127.0.0.1:{LINK_PROXY_PORT}"
ca = "tls/ca.crt"
hostname = "localhost"
token_file = "branch/token"

[replication]
# Reconnect within 2 s of "Restore link".
max_backoff = 2.0

[web.admins]
# The status page's login: {ADMIN_NAME} / {ADMIN_PASSWORD}.
{ADMIN_NAME} = "{{admin}}"
"""

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
        conn,
        HOLD_QUEUE,
        SITE_NAME,
        10,
        50,
        now,
        duplex_discount=10,
        hold=True,
        uri=f"socket://127.0.0.1:{PRINTER_PORT}",
    )
    key = devices.thdAddDevice(conn, "branch-mfd", SITE_NAME, "http", now, printer=HOLD_QUEUE)
    # A network card reader at the branch: connect to it and type a card number.
    devices.thdAddDevice(
        conn,
        "branch-reader",
        SITE_NAME,
        "card-reader",
        now,
        printer=HOLD_QUEUE,
        options={"listen": f"tcp:{CARD_READER_PORT}:interface=127.0.0.1", "feedback": "line"},
    )
    policies.thdSetPolicy(conn, "offline.allowance", "5.00", now, site=SITE_NAME)
    thdAudit(conn, "demo", "demo.seed", PRIMARY_NAME, now)
    return {"token": token, "key": key}


def _thdProviderKey(conn: Any, now: float, have_key: bool) -> str | None:
    """Add the demo print provider (or give it a new key if its key file is gone)."""
    try:
        devices.thdProvider(conn, PROVIDER_NAME)
    except NotFound:
        return devices.thdAddProvider(conn, PROVIDER_NAME, SITE_NAME, now)
    return None if have_key else devices.thdRotateProviderKey(conn, PROVIDER_NAME, now)


def _thdSeedAdmin(conn: Any, now: float) -> None:
    """Add the primary's demo administrator unless there is one."""
    if admins.thdAdminVerifier(conn, ADMIN_NAME) is None:
        verifier = make_verifier(ADMIN_PASSWORD, n=2**12)
        admins.thdAddAdmin(conn, ADMIN_NAME, verifier, now)
        thdAudit(conn, "demo", "demo.seed-admin", ADMIN_NAME, now)


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
         Status:      http://127.0.0.1:9193/ (primary), http://127.0.0.1:9293/ (site)
                      log in as {ADMIN_NAME} / {ADMIN_PASSWORD}
         Release:     http://127.0.0.1:9293/release  as alice / alice-pass,
                      or card 1001 + PIN 1234
         Print:       add the printer ipp://127.0.0.1:{IPP_PORT}/ipp/print/{HOLD_QUEUE}
                      (jobs are held for release; the demo printer only counts them)
         Try the outage:
           1) open the branch status page http://127.0.0.1:9293/
           2) press "Simulate outage": the site goes offline
           3) release alice's job at http://127.0.0.1:9293/release
           4) press "Restore link" and watch the outbox drain to 0
         Health:      curl http://127.0.0.1:9293/health      (site: watch "mode")
         Top up:      {primary} balance adjust bob 5.00 --comment "demo top-up"
         ...at site:  {site} user show bob      (replicated within a second)
         MFD login:   curl -s {auth} \\
                        -d '{{"card": "1001", "pin": "1234"}}' {api}/sessions
         Card reader: nc 127.0.0.1 {CARD_READER_PORT}   then type 1001 and Enter: a swipe
                      releases alice's held jobs
         Ledger:      {primary} transactions list --user alice
         Users:       {primary} user list
         Demo users:  alice (card 1001, PIN 1234, balance 10.00, password alice-pass)
                      bob (card 1002, balance 2.00), carol (card 0A1B2C3D)
         Stop with Ctrl-C; delete {DEMO_DIR}/ to start afresh.
        ======================================================================
        """
    )


class Demo(MultiService):
    """The demo's service tree, with its parts named for the controls and for tests."""

    def __init__(
        self,
        primary: Server,
        site: Server,
        proxy: LinkProxy,
        printer: DemoPrinter,
        provider: Provider,
        controls: Controls,
    ) -> None:
        super().__init__()
        self.primary = primary
        self.site = site
        self.proxy = proxy
        self.printer = printer
        self.provider = provider
        self.controls = controls

    async def _stop(self) -> None:
        Service.stopService(self)
        # The link proxy last, so that the site closes its link itself, not by a cut.
        others = [s for s in reversed(list(self)) if s is not self.proxy]
        await DeferredList([maybeDeferred(s.stopService) for s in others])
        await self.proxy.stopService()

    def stopService(self) -> Deferred[None]:
        """Stop the servers, the provider and the printer, then the link proxy."""
        return Deferred.fromCoroutine(self._stop())


def _provider_config(site: Config, key_file: str, ca: str) -> dict[str, Any]:
    """The demo provider's config: IPP on loopback, connected to the site's providers port."""
    port = site.listen.providers.split(":")[1]
    server: dict[str, Any] = {
        "endpoint": f"tcp:127.0.0.1:{port}",
        "key_file": key_file,
        "max_backoff": 2.0,
    }
    if site.listen.providers.startswith("ssl:"):
        server.update(ca=ca, hostname="localhost")
    else:
        # A branch.toml from an older demo: its providers port is plain TCP.
        server["insecure"] = True
    return {
        "name": PROVIDER_NAME,
        "data_dir": os.path.abspath(os.path.join(DEMO_DIR, PROVIDER_NAME)),
        "server": server,
        "ipp": {"listen": f"tcp:{IPP_PORT}:interface=127.0.0.1"},
        "delivery": {"retries": 2, "backoff": 1.0, "timeout": 30.0},
        "queues": {
            HOLD_QUEUE: {
                "info": "Branch colour printer (print, then release at the branch)",
                "location": "sitesrv demo, site branch",
            }
        },
        # Deliver to the demo printer whatever URI the server has on record.
        "printers": {HOLD_QUEUE: {"uri": f"socket://127.0.0.1:{PRINTER_PORT}"}},
    }


def make_demo(reactor: Any) -> Demo:
    """Prepare ``./var/demo`` and return the demo's service tree."""
    branch_dir = os.path.join(DEMO_DIR, "branch")
    os.makedirs(branch_dir, exist_ok=True)
    tls_dir = os.path.join(DEMO_DIR, "tls")
    if not os.path.exists(os.path.join(tls_dir, "server.key")):
        init_tls(tls_dir, ["localhost"], ["127.0.0.1"], force=True)
    # Endpoint strings are not paths the config resolves: give them absolute ones.
    tls_files = {
        "key": quoteStringArgument(os.path.abspath(os.path.join(tls_dir, "server.key"))),
        "cert": quoteStringArgument(os.path.abspath(os.path.join(tls_dir, "server.crt"))),
    }
    configs: dict[str, Callable[[], str]] = {
        "primary.toml": lambda: PRIMARY_CONFIG.format(**tls_files),
        # Cheaper scrypt for the demo's admin only, so the first start is quick.
        "branch.toml": lambda: SITE_CONFIG.format(
            admin=make_verifier(ADMIN_PASSWORD, n=2**12), **tls_files
        ),
    }
    for name, text in configs.items():
        path = os.path.join(DEMO_DIR, name)
        if not os.path.exists(path):
            _write(path, text())
    primary = make_server(load(os.path.join(DEMO_DIR, "primary.toml")), reactor)
    made = primary.store.write(_thdSeed, reactor.seconds())
    primary.store.write(_thdSeedAdmin, reactor.seconds())
    key_file = os.path.join(branch_dir, "mfd.key")
    if made is not None:
        _write(os.path.join(branch_dir, "token"), made["token"] + "\n", 0o600)
        _write(key_file, made["key"] + "\n", 0o600)
    provider_key_file = os.path.abspath(os.path.join(branch_dir, "provider.key"))
    provider_key = primary.store.write(
        _thdProviderKey, reactor.seconds(), os.path.exists(provider_key_file)
    )
    if provider_key is not None:
        _write(provider_key_file, provider_key + "\n", 0o600)
    site_config = load(os.path.join(DEMO_DIR, "branch.toml"))
    site = make_server(site_config, reactor)

    proxy = LinkProxy(LINK_PROXY_PORT, REPLICATION_PORT, reactor)
    assert site_config.primary is not None
    if (
        site_config.primary.endpoint != f"tcp:127.0.0.1:{LINK_PROXY_PORT}"
        or ADMIN_NAME not in site_config.web.admins
    ):
        log.warn(
            "{path} predates the demo's status page: its site may not use the link proxy "
            "(the outage button then changes nothing) or have no admin login; delete "
            "{dir}/ to start afresh",
            path=site_config.path,
            dir=DEMO_DIR,
        )
    printer = DemoPrinter(PRINTER_PORT, reactor)
    provider = make_provider(
        provider_config(
            _provider_config(
                site_config, provider_key_file, os.path.abspath(os.path.join(tls_dir, "ca.crt"))
            )
        ),
        reactor,
    )
    controls = Controls(
        proxy.proxy, f"http://127.0.0.1:{IPP_PORT}/ipp/print/{HOLD_QUEUE}", HOLD_QUEUE, reactor
    )

    def site_knows_provider() -> Deferred[bool]:
        # Start the provider once the site serves and its replica has the provider.
        if not site.serving():
            return succeed(False)
        d = site.store.runRead(devices.thdListProviders, SITE_NAME)
        return d.addCallback(lambda found: any(p.name == PROVIDER_NAME for p in found))

    provider_start = StartWhen(site_knows_provider, reactor, f"print provider {PROVIDER_NAME!r}")
    provider.setServiceParent(provider_start)
    sample = FirstSample(
        controls, provider, os.path.join(DEMO_DIR, PROVIDER_NAME, "sample-printed"), reactor
    )

    demo = Demo(primary, site, proxy, printer, provider, controls)
    for service in (proxy, primary, site, printer, provider_start, sample):
        service.setServiceParent(demo)
    # The status pages' demo buttons (sitesrv.web.status.DemoControls) call these.
    primary.status_page.demo = controls
    site.status_page.demo = controls
    with open(key_file, encoding="utf-8") as f:
        key = f.read().strip()
    # The sheet is for the person who typed the command, not a log event.
    sys.stdout.write(cheat_sheet(key))
    sys.stdout.flush()
    return demo
