"""Tests for ``sitesrv-admin``, run in-process against a real database in a temp dir.

Every test goes through `main` exactly as the console script does and checks what an
administrator would see: stdout, stderr and the exit status. `PostgreSQLAdminCLITests`
runs them all again on PostgreSQL when ``SITESRV_TEST_POSTGRES_URL`` is set.
"""

from __future__ import annotations

import io
import json
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy import Connection, select
from twisted.trial.unittest import SynchronousTestCase

from sitesrv.admin.cli import main
from sitesrv.config import load
from sitesrv.secrets import check_verifier, token_matches
from sitesrv.store import Store
from sitesrv.store.engine import normalise_url
from sitesrv.store.jobs import thdLogJob
from sitesrv.store.schema import audit_log, changelog, devices, passwords, sites, users
from sitesrv.tls import fingerprint_of
from tests.support import POSTGRES_ENV, postgres_skip, reset_postgres

T = TypeVar("T")


PRIMARY = """\
role = "primary"
name = "hq"
data_dir = "{data_dir}"
{extra}
"""

SITE = """\
role = "site"
name = "north"
data_dir = "{data_dir}"
{extra}

[primary]
endpoint = "tcp:127.0.0.1:9192"
insecure = true
token_file = "token"
"""

PIN = "97531086"
PASSWORD = "correct horse battery staple"

#: Every write command, for checking that a site refuses them all.
WRITES = (
    ["user", "add", "bob"],
    ["user", "disable", "alice"],
    ["user", "enable", "alice"],
    ["user", "remove", "alice"],
    ["user", "set-pin", "alice"],
    ["user", "set-password", "alice"],
    ["card", "add", "alice", "1"],
    ["card", "remove", "1"],
    ["balance", "adjust", "alice", "1"],
    ["account", "add", "x"],
    ["group", "add", "x"],
    ["group", "add-member", "x", "alice"],
    ["printer", "add", "p", "--site", "north", "--price-mono", "0", "--price-colour", "0"],
    ["device", "add", "d", "--site", "north", "--connector", "http"],
    ["device", "remove", "d"],
    ["provider", "add", "p", "--site", "north"],
    ["provider", "remove", "p"],
    ["provider", "rotate-key", "p"],
    ["site", "add", "x"],
    ["site", "revoke", "x"],
    ["site", "rotate-token", "x"],
    ["policy", "set", "offline.release", "refuse"],
)


class AdminCLITests(SynchronousTestCase):
    """``sitesrv-admin`` on a primary (and a site) with SQLite files in a temp dir."""

    #: Extra config lines (PostgreSQL sets ``database``).
    extra = ""

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.config = self.writeConfig("hq.toml", PRIMARY, self.dir)
        self.siteConfig = self.writeConfig("north.toml", SITE, os.path.join(self.dir, "north"))

    def writeConfig(self, name: str, template: str, data_dir: str, extra: str = "") -> str:
        path = os.path.join(self.dir, name)
        with open(path, "w") as f:
            f.write(template.format(data_dir=data_dir, extra=f"{self.extra}\n{extra}"))
        return path

    # -- running the command -----------------------------------------------------------

    def cli(self, *argv: str, stdin: str = "", config: str | None = None) -> tuple[int, str, str]:
        """Run ``sitesrv-admin --config CONFIG *argv``; return (status, stdout, stderr)."""
        out, err = io.StringIO(), io.StringIO()
        code = main(
            ["--config", config or self.config, *argv],
            stdin=io.StringIO(stdin),
            stdout=out,
            stderr=err,
        )
        self.assertNotIn("Traceback", err.getvalue())
        return code, out.getvalue(), err.getvalue()

    def ok(self, *argv: str, stdin: str = "", config: str | None = None) -> str:
        """Run a command that must succeed; return its stdout."""
        code, out, err = self.cli(*argv, stdin=stdin, config=config)
        self.assertEqual(code, 0, f"{argv} failed: {err}")
        return out

    def failed(self, *argv: str, code: int = 1, stdin: str = "", config: str | None = None) -> str:
        """Run a command that must fail with ``code``; return its one-line stderr message."""
        status, out, err = self.cli(*argv, stdin=stdin, config=config)
        self.assertEqual((status, out), (code, ""), err)
        if code == 1:
            self.assertEqual(err.count("\n"), 1, err)
            self.assertTrue(err.startswith("sitesrv-admin: "), err)
        return err

    def json(self, *argv: str, stdin: str = "", config: str | None = None) -> Any:
        """Run a command with ``--json``; return the parsed output."""
        return json.loads(self.ok(*argv, "--json", stdin=stdin, config=config))

    def query(self, fn: Callable[[Connection], T]) -> T:
        """Read the primary's database directly, as the server would see it."""
        store = Store(load(self.config).database, readers=1)
        try:
            return store.read(fn)
        finally:
            store.writer.dispose()
            store.reader.dispose()

    def setEnvironment(self, config: str | None) -> None:
        """Set (or, with None, unset) SITESRV_CONFIG for this test."""
        environ = {k: v for k, v in os.environ.items() if k != "SITESRV_CONFIG"}
        if config is not None:
            environ["SITESRV_CONFIG"] = config
        self.patch(os, "environ", environ)

    def addAlice(self) -> None:
        self.ok("user", "add", "alice", "--full-name", "Alice Liddell", "--balance", "8.50")

    # -- users -------------------------------------------------------------------------

    def test_user_add_then_show(self) -> None:
        """A new user's balance, cards, groups and details show in ``user show``."""
        out = self.ok(
            "user", "add", "alice", "--full-name", "Alice Liddell", "--email", "a@example.org",
            "--balance", "8.50",
        )  # fmt: skip
        self.assertEqual(out, "added user alice (balance 8.50)\n")
        self.ok("card", "add", "alice", " 0042 ")
        self.ok("group", "add", "staff")
        self.ok("group", "add-member", "staff", "alice")
        out = self.ok("user", "show", "alice")
        self.assertIn("full name:    Alice Liddell\n", out)
        self.assertIn("balance:      8.50\n", out)
        self.assertIn("cards:        0042\n", out)
        self.assertIn("groups:       staff\n", out)
        self.assertIn("pin set:      no\n", out)

    def test_user_show_json(self) -> None:
        """``user show --json`` is an object with amounts as text and as minor units."""
        self.addAlice()
        self.ok("card", "add", "alice", "1234")
        shown = self.json("user", "show", "alice")
        self.assertEqual(
            shown,
            {
                "username": "alice",
                "full_name": "Alice Liddell",
                "email": "",
                "disabled": False,
                "balance": "8.50",
                "balance_minor": 850,
                "restricted": True,
                "credit_limit": "0.00",
                "credit_limit_minor": 0,
                "has_pin": False,
                "has_password": False,
                "cards": ["1234"],
                "groups": [],
            },
        )

    def test_user_list(self) -> None:
        """``user list`` is an aligned table, or a JSON list with stable keys."""
        self.assertEqual(self.ok("user", "list"), "no users\n")
        self.addAlice()
        self.ok("user", "add", "bob", "--unrestricted")
        # Columns are aligned, amounts to the right; empty values show as "-".
        self.assertEqual(
            self.ok("user", "list"),
            "USERNAME  FULL NAME      EMAIL  BALANCE  RESTRICTED  CREDIT LIMIT  DISABLED\n"
            "alice     Alice Liddell  -         8.50  yes                 0.00  no\n"
            "bob       -              -         0.00  no                  0.00  no\n",
        )
        listed = self.json("user", "list")
        self.assertEqual([u["username"] for u in listed], ["alice", "bob"])
        self.assertEqual(
            set(listed[0]),
            {
                "username", "full_name", "email", "disabled", "balance", "balance_minor",
                "restricted", "credit_limit", "credit_limit_minor", "has_pin",
            },
        )  # fmt: skip
        self.assertEqual((listed[1]["restricted"], listed[0]["balance_minor"]), (False, 850))

    def test_user_add_credit(self) -> None:
        """``--credit-limit`` and ``--unrestricted`` set how far a balance may go negative."""
        self.ok("user", "add", "carol", "--credit-limit", "2.5")
        self.assertEqual(self.json("user", "show", "carol")["credit_limit"], "2.50")
        self.failed("user", "add", "dave", "--credit-limit", "1", "--unrestricted", code=2)
        err = self.failed("user", "add", "erin", "--credit-limit", "-1")
        self.assertEqual(err, "sitesrv-admin: the credit limit must not be negative\n")

    def test_user_add_twice(self) -> None:
        """Adding a user that exists says so."""
        self.addAlice()
        err = self.failed("user", "add", "alice")
        self.assertEqual(err, "sitesrv-admin: user 'alice' already exists\n")

    def test_user_disable_enable(self) -> None:
        """Disabling and enabling a user shows in ``user show``."""
        self.addAlice()
        self.assertEqual(self.ok("user", "disable", "alice"), "disabled user alice\n")
        self.assertTrue(self.json("user", "show", "alice")["disabled"])
        self.assertEqual(self.ok("user", "enable", "alice"), "enabled user alice\n")
        self.assertFalse(self.json("user", "show", "alice")["disabled"])

    def test_user_remove(self) -> None:
        """A removed user is gone, with their card; the ledger keeps their history."""
        self.addAlice()
        self.ok("card", "add", "alice", "77")
        self.assertIn("removed user alice", self.ok("user", "remove", "alice"))
        err = self.failed("user", "show", "alice")
        self.assertEqual(err, "sitesrv-admin: no user named 'alice'\n")
        self.assertIn("no card '77'", self.failed("card", "remove", "77"))
        self.assertEqual(self.json("transactions", "list")[0]["account"], "alice")

    def test_set_pin(self) -> None:
        """A PIN from stdin is stored only as a verifier that checks against it."""
        self.addAlice()
        self.ok("user", "set-pin", "alice", stdin=f"{PIN}\n")
        self.assertTrue(self.json("user", "show", "alice")["has_pin"])
        verifier = self.query(
            lambda conn: conn.execute(
                select(users.c.pin_verifier).where(users.c.username == "alice")
            ).scalar_one()
        )
        self.assertNotIn(PIN, verifier)
        self.assertTrue(verifier.startswith("scrypt$"))
        self.assertTrue(check_verifier(PIN, verifier))

    def test_set_pin_refuses_bad_pins(self) -> None:
        """A PIN must be 4 to 12 digits; nothing is stored otherwise."""
        self.addAlice()
        for pin in ("12ab", "123", "1234567890123", ""):
            err = self.failed("user", "set-pin", "alice", stdin=f"{pin}\n")
            self.assertEqual(err, "sitesrv-admin: a PIN must be 4 to 12 digits\n")
        err = self.failed("user", "set-pin", "alice")
        self.assertEqual(err, "sitesrv-admin: no PIN on standard input\n")
        self.assertFalse(self.json("user", "show", "alice")["has_pin"])
        err = self.failed("user", "set-pin", "nobody", stdin="1234\n")
        self.assertEqual(err, "sitesrv-admin: no user named 'nobody'\n")

    def test_set_password(self) -> None:
        """Passwords come from stdin's first line and are stored only as verifiers."""
        self.ok("user", "add", "alice", "--password-stdin", stdin=f"{PASSWORD}\nignored\n")
        self.assertTrue(self.json("user", "show", "alice")["has_password"])
        self.ok("user", "set-password", "alice", stdin="second one\r\n")

        def thdVerifier(conn: Connection) -> str:
            return conn.execute(select(passwords.c.verifier)).scalar_one()

        verifier = self.query(thdVerifier)
        self.assertNotIn("second one", verifier)
        self.assertTrue(check_verifier("second one", verifier))
        self.assertFalse(check_verifier(PASSWORD, verifier))

    def test_set_password_refuses_bad_passwords(self) -> None:
        """An empty or over-long password is refused with a reason."""
        self.addAlice()
        err = self.failed("user", "set-password", "alice", stdin="\n")
        self.assertEqual(err, "sitesrv-admin: the password must not be empty\n")
        err = self.failed("user", "set-password", "alice", stdin="x" * 1025)
        self.assertEqual(err, "sitesrv-admin: the password must be at most 1024 characters\n")
        self.assertFalse(self.json("user", "show", "alice")["has_password"])

    # -- cards and balances ------------------------------------------------------------

    def test_cards(self) -> None:
        """A card belongs to one user; removing it frees it."""
        self.addAlice()
        self.ok("user", "add", "bob")
        self.assertEqual(self.ok("card", "add", "alice", "5555"), "added card 5555 to alice\n")
        err = self.failed("card", "add", "bob", "5555")
        self.assertEqual(err, "sitesrv-admin: card '5555' already belongs to 'alice'\n")
        self.assertEqual(self.ok("card", "remove", "5555"), "removed card 5555 from alice\n")
        self.ok("card", "add", "bob", "5555")
        self.assertEqual(self.json("user", "show", "bob")["cards"], ["5555"])
        self.assertEqual(self.json("user", "show", "alice")["cards"], [])

    def test_balance_adjust(self) -> None:
        """An adjustment changes the balance and adds a transaction with its comment."""
        self.addAlice()
        out = self.ok("balance", "adjust", "alice", "-1.50", "--comment", "jammed printer")
        self.assertEqual(out, "balance of alice is now 7.00\n")
        self.assertEqual(self.json("user", "show", "alice")["balance"], "7.00")
        newest = self.json("transactions", "list", "--user", "alice")[0]
        self.assertEqual(
            {k: newest[k] for k in ("account", "amount", "amount_minor", "balance_after")},
            {"account": "alice", "amount": "-1.50", "amount_minor": -150, "balance_after": "7.00"},
        )
        self.assertEqual((newest["reason"], newest["comment"]), ("adjust", "jammed printer"))
        self.assertEqual(
            set(newest),
            {
                "id", "uuid", "time", "account", "amount", "amount_minor", "balance_after",
                "balance_after_minor", "reason", "site", "comment", "job_uuid",
            },
        )  # fmt: skip
        adjusted = self.json("balance", "adjust", "alice", "2")
        self.assertEqual((adjusted["balance"], adjusted["balance_minor"]), ("9.00", 900))

    def test_balance_adjust_bad_amounts(self) -> None:
        """Amounts that are not amounts, or are zero, are refused with the reason."""
        self.addAlice()
        err = self.failed("balance", "adjust", "alice", "1.234")
        self.assertEqual(err, "sitesrv-admin: '1.234' has more than 2 decimal places\n")
        err = self.failed("balance", "adjust", "alice", "ten")
        self.assertEqual(err, "sitesrv-admin: 'ten' is not an amount\n")
        err = self.failed("balance", "adjust", "alice", "0")
        self.assertEqual(err, "sitesrv-admin: an adjustment of zero changes nothing\n")
        err = self.failed("balance", "adjust", "nobody", "1")
        self.assertEqual(err, "sitesrv-admin: no user named 'nobody'\n")
        self.assertEqual(self.json("user", "show", "alice")["balance"], "8.50")

    def test_configured_decimals(self) -> None:
        """Amounts are typed and shown with the currency's configured decimals."""
        self.config = self.writeConfig("yen.toml", PRIMARY, self.dir + "-yen", "decimals = 0")
        self.ok("user", "add", "kenji", "--balance", "500")
        self.assertEqual(self.json("user", "show", "kenji")["balance"], "500")
        err = self.failed("balance", "adjust", "kenji", "1.5")
        self.assertEqual(err, "sitesrv-admin: '1.5' must be a whole amount\n")

    def test_transactions_list(self) -> None:
        """Transactions are listed newest first, per user and up to a limit."""
        self.addAlice()
        self.ok("user", "add", "bob", "--balance", "1")
        self.ok("balance", "adjust", "alice", "0.25")
        lines = self.ok("transactions", "list").splitlines()
        self.assertEqual(lines[0].split()[:3], ["TIME", "ACCOUNT", "AMOUNT"])
        self.assertEqual([line.split()[1] for line in lines[1:]], ["alice", "bob", "alice"])
        self.assertEqual(len(self.json("transactions", "list", "--user", "alice")), 2)
        self.assertEqual(len(self.json("transactions", "list", "--limit", "1")), 1)
        self.failed("transactions", "list", "--limit", "0", code=2)

    # -- accounts and groups -----------------------------------------------------------

    def test_accounts(self) -> None:
        """Shared accounts are listed with the system ones; ``--all`` adds personal ones."""
        self.assertEqual(self.ok("account", "add", "Physics"), "added shared account Physics\n")
        self.addAlice()
        names = [a["name"] for a in self.json("account", "list")]
        self.assertEqual(names, ["Offline Account", "Physics", "Suspense"])
        listed = self.json("account", "list", "--all")
        self.assertIn(("alice", "personal"), [(a["name"], a["type"]) for a in listed])
        self.assertIn("already exists", self.failed("account", "add", "Physics"))

    def test_groups(self) -> None:
        """Groups list their member counts; adding a member twice is harmless."""
        self.addAlice()
        self.ok("group", "add", "staff")
        self.ok("group", "add", "empty")
        self.assertEqual(
            self.ok("group", "add-member", "staff", "alice"), "added alice to group staff\n"
        )
        self.assertEqual(
            self.ok("group", "add-member", "staff", "alice"), "alice is already in group staff\n"
        )
        self.assertEqual(
            self.ok("group", "list"), "NAME   MEMBERS\nempty        0\nstaff        1\n"
        )
        self.assertEqual(self.json("group", "list")[1], {"name": "staff", "members": 1})
        err = self.failed("group", "add-member", "nogroup", "alice")
        self.assertEqual(err, "sitesrv-admin: no group named 'nogroup'\n")

    # -- printers, devices, providers --------------------------------------------------

    def test_printers(self) -> None:
        """A printer at a site is listed with its prices."""
        out = self.ok(
            "printer", "add", "lobby", "--site", "hq", "--price-mono", "0.10",
            "--price-colour", "0.5", "--duplex-discount", "20", "--uri", "ipp://lobby/ipp",
            "--hold",
        )  # fmt: skip
        self.assertEqual(out, "added printer lobby at hq\n")
        lines = self.ok("printer", "list").splitlines()
        self.assertEqual(
            lines[1].split(), ["lobby", "hq", "0.10", "0.50", "20", "yes", "ipp://lobby/ipp"]
        )
        self.assertEqual(
            self.json("printer", "list"),
            [
                {
                    "name": "lobby", "site": "hq", "price_mono": "0.10", "price_mono_minor": 10,
                    "price_colour": "0.50", "price_colour_minor": 50, "duplex_discount": 20,
                    "uri": "ipp://lobby/ipp", "hold": True,
                }
            ],
        )  # fmt: skip
        err = self.failed(
            "printer", "add", "x", "--site", "mars", "--price-mono", "0", "--price-colour", "0"
        )
        self.assertEqual(err, "sitesrv-admin: no site named 'mars'\n")
        err = self.failed(
            "printer", "add", "y", "--site", "hq", "--price-mono", "0", "--price-colour", "0",
            "--duplex-discount", "120",
        )  # fmt: skip
        self.assertIn("duplex discount", err)

    def test_devices(self) -> None:
        """``device add`` prints only the API key on stdout; the list never shows it."""
        self.ok(
            "printer", "add", "lobby", "--site", "hq", "--price-mono", "0", "--price-colour", "0"
        )
        code, out, err = self.cli(
            "device", "add", "reader1", "--site", "hq", "--connector", "card-reader",
            "--printer", "lobby", "--option", "port=7000", "--option", "regex=^(\\d+)=",
        )  # fmt: skip
        self.assertEqual(code, 0, err)
        key = out.strip()
        self.assertEqual(out, key + "\n")
        self.assertGreater(len(key), 30)
        self.assertIn("shown only this once", err)
        stored = self.query(lambda conn: conn.execute(select(devices.c.api_key_hash)).scalar_one())
        self.assertTrue(token_matches(key, stored))

        listing = self.ok("device", "list")
        self.assertIn("reader1", listing)
        self.assertIn("card-reader", listing)
        self.assertNotIn(key, listing)
        self.assertEqual(
            self.json("device", "list"),
            [
                {
                    "name": "reader1",
                    "site": "hq",
                    "connector": "card-reader",
                    "printer": "lobby",
                    "options": {"port": "7000", "regex": "^(\\d+)="},
                }
            ],
        )
        self.assertEqual(self.ok("device", "remove", "reader1"), "removed device reader1\n")
        self.assertEqual(self.ok("device", "list"), "no devices\n")
        self.assertIn("no device named", self.failed("device", "remove", "reader1"))

    def test_device_add_json_and_bad_options(self) -> None:
        """With --json the key is in ``{"key": ...}``; a malformed option is a usage error."""
        added = self.json("device", "add", "mfd", "--site", "hq", "--connector", "http")
        self.assertEqual(set(added), {"device", "key"})
        err = self.failed(
            "device", "add", "x", "--site", "hq", "--connector", "http", "--option", "novalue",
            code=2,
        )  # fmt: skip
        self.assertIn("expected KEY=VALUE, got 'novalue'", err)
        err = self.failed(
            "device", "add", "x", "--site", "hq", "--connector", "http", "--option", "a=1",
            "--option", "a=2",
        )  # fmt: skip
        self.assertEqual(err, "sitesrv-admin: option 'a' is given twice\n")

    def test_providers(self) -> None:
        """Providers get a key once; rotating it gives a new one; removing lists none."""
        self.ok("site", "add", "north")
        key = self.ok("provider", "add", "north-pp", "--site", "north").strip()
        self.assertEqual(self.json("provider", "list"), [{"name": "north-pp", "site": "north"}])
        rotated = self.json("provider", "rotate-key", "north-pp")
        self.assertEqual(set(rotated), {"provider", "key"})
        self.assertNotEqual(rotated["key"], key)
        self.assertEqual(
            self.ok("provider", "remove", "north-pp"), "removed print provider north-pp\n"
        )
        self.assertEqual(self.ok("provider", "list"), "no providers\n")
        self.assertIn("no provider named", self.failed("provider", "rotate-key", "north-pp"))

    # -- sites and policies ------------------------------------------------------------

    def test_sites(self) -> None:
        """``site add`` prints the token once with a hint; revoke and rotate-token work."""
        code, out, err = self.cli("site", "add", "north")
        self.assertEqual(code, 0)
        token = out.strip()
        self.assertEqual(out, token + "\n")
        self.assertIn("token_file", err)

        def thdHash(conn: Connection) -> str:
            return conn.execute(
                select(sites.c.token_hash).where(sites.c.name == "north")
            ).scalar_one()

        self.assertTrue(token_matches(token, self.query(thdHash)))
        listed = self.json("site", "list")
        self.assertEqual(
            [(s["name"], s["primary"], s["revoked"]) for s in listed],
            [("hq", True, False), ("north", False, False)],
        )
        self.assertEqual(
            set(listed[0]),
            {
                "name",
                "primary",
                "revoked",
                "state",
                "connected",
                "position",
                "lag",
                "last_seen",
                "skew",
                "version",
                "address",
                "applied_seq",
                "created",
            },
        )
        self.assertEqual(listed[0]["state"], "this primary")
        self.assertEqual(listed[1]["state"], "never connected")
        self.assertIn("revoked site north", self.ok("site", "revoke", "north"))
        self.assertTrue(self.json("site", "list")[1]["revoked"])
        rotated = self.json("site", "rotate-token", "north")
        self.assertEqual(set(rotated), {"site", "token"})
        self.assertTrue(token_matches(rotated["token"], self.query(thdHash)))
        self.assertFalse(token_matches(token, self.query(thdHash)))
        self.assertFalse(self.json("site", "list")[1]["revoked"])
        err = self.failed("site", "revoke", "hq")
        self.assertEqual(err, "sitesrv-admin: 'hq' is the primary itself, not an enrolled site\n")

    def test_policies(self) -> None:
        """A site override shows with source "site", a global one with "global"."""
        self.ok("site", "add", "north")
        self.assertEqual(
            self.ok("policy", "set", "--site", "north", "offline.allowance", "5"),
            "set offline.allowance = 5.00 for site north\n",
        )
        self.ok("policy", "set", "offline.release", "refuse")
        shown = {p["key"]: p for p in self.json("policy", "show", "--site", "north")}
        self.assertEqual(
            shown["offline.allowance"],
            {"key": "offline.allowance", "value": "5.00", "source": "site"},
        )
        self.assertEqual(
            shown["offline.release"],
            {"key": "offline.release", "value": "refuse", "source": "global"},
        )
        self.assertEqual(shown["offline.account"]["source"], "default")
        text = self.ok("policy", "show", "--site", "north")
        self.assertIn("offline.allowance       5.00      site\n", text)
        globally = {p["key"]: p["source"] for p in self.json("policy", "show")}
        self.assertEqual(globally["offline.allowance"], "default")

    def test_policy_errors(self) -> None:
        """A bad policy value, key or site exits 1 with a clear message."""
        err = self.failed("policy", "set", "offline.account", "bogus")
        self.assertEqual(
            err,
            "sitesrv-admin: policy offline.account: expected one of personal, "
            "offline-account, refuse, got 'bogus'\n",
        )
        self.assertIn(
            "unknown policy 'offline.colour'", self.failed("policy", "set", "offline.colour", "x")
        )
        err = self.failed("policy", "set", "--site", "mars", "offline.release", "allow")
        self.assertEqual(err, "sitesrv-admin: no site named 'mars'\n")
        self.assertIn("no site named 'mars'", self.failed("policy", "show", "--site", "mars"))

    # -- history -----------------------------------------------------------------------

    def test_jobs_list(self) -> None:
        """Logged jobs are listed newest first, filtered by user."""
        self.assertEqual(self.ok("jobs", "list"), "no jobs\n")
        store = Store(load(self.config).database, readers=1)
        try:
            for n, user in enumerate(["alice", "bob"]):
                store.write(
                    thdLogJob, 1_700_000_000.0 + n, uuid=f"00000000-0000-0000-0000-00000000000{n}",
                    kind="print", username=user, site="hq", printer_name="lobby",
                    document="report.pdf", pages=3, copies=1, colour=False, duplex=False, cost=30,
                    status="printed",
                )  # fmt: skip
        finally:
            store.writer.dispose()
            store.reader.dispose()
        lines = self.ok("jobs", "list").splitlines()
        self.assertEqual(
            lines[2].split(),
            ["2023-11-14T22:13:20Z", "alice", "print", "lobby", "hq", "3", "1", "no", "0.30",
             "printed", "report.pdf"],
        )  # fmt: skip
        [job] = self.json("jobs", "list", "--user", "bob")
        self.assertEqual((job["username"], job["cost"], job["cost_minor"]), ("bob", "0.30", 30))
        self.assertEqual(len(self.json("jobs", "list", "--limit", "1")), 1)

    def test_audit_list(self) -> None:
        """Every change is audited with a cli: actor, and no secret ever reaches the log."""
        self.ok("user", "add", "alice", "--password-stdin", stdin=PASSWORD + "\n")
        self.ok("user", "set-pin", "alice", stdin=PIN + "\n")
        self.ok("user", "set-password", "alice", stdin=PASSWORD + "2\n")
        token = self.ok("site", "add", "north").strip()
        token2 = self.ok("site", "rotate-token", "north").strip()
        key = self.ok("device", "add", "d1", "--site", "north", "--connector", "http").strip()
        key2 = self.ok("provider", "add", "p1", "--site", "north").strip()
        key3 = self.ok("provider", "rotate-key", "p1").strip()
        self.ok("balance", "adjust", "alice", "3")
        entries = self.json("audit", "list")
        self.assertEqual(
            [e["action"] for e in entries],
            [
                "balance.adjust", "provider.rotate-key", "provider.add", "device.add",
                "site.rotate-token", "site.add", "user.set-password", "user.set-pin", "user.add",
            ],
        )  # fmt: skip
        self.assertEqual(entries[0]["details"]["amount"], "3.00")
        self.assertEqual(entries[-1]["target"], "alice")
        self.assertEqual(set(entries[0]), {"id", "time", "actor", "action", "target", "details"})
        for entry in entries:
            self.assertTrue(entry["actor"].startswith("cli:"), entry)
            self.assertGreater(len(entry["actor"]), len("cli:"))
        text = self.ok("audit", "list")
        self.assertIn("user.set-pin", text)
        raw = self.query(lambda conn: [tuple(r) for r in conn.execute(select(audit_log))])
        for secret in (PIN, PASSWORD, token, token2, key, key2, key3):
            for shown in (text, json.dumps(entries), repr(raw)):
                self.assertNotIn(secret, shown)
        self.assertEqual(len(self.json("audit", "list", "--limit", "2")), 2)

    def test_no_plain_secrets_in_database(self) -> None:
        """The PIN and password appear nowhere in the database, not even in the change log."""
        self.ok("user", "add", "alice", "--password-stdin", stdin=PASSWORD + "\n")
        self.ok("user", "set-pin", "alice", stdin=PIN + "\n")

        def thdAll(conn: Connection) -> str:
            rows = [
                *conn.execute(select(users)),
                *conn.execute(select(passwords)),
                *conn.execute(select(changelog)),
                *conn.execute(select(audit_log)),
            ]
            return repr([tuple(r) for r in rows])

        dump = self.query(thdAll)
        self.assertIn("scrypt$", dump)
        self.assertNotIn(PIN, dump)
        self.assertNotIn(PASSWORD, dump)

    # -- tls and db --------------------------------------------------------------------

    def test_tls_init(self) -> None:
        """``tls init`` writes the four files and prints the certificate's fingerprint."""
        out_dir = os.path.join(self.dir, "tls-out")
        argv = [
            "tls",
            "init",
            "--hostname",
            "hq.example.org",
            "--ip",
            "10.0.0.1",
            "--out",
            out_dir,
        ]
        out = self.ok(*argv)
        with open(os.path.join(out_dir, "server.crt"), "rb") as f:
            fingerprint = fingerprint_of(f.read())
        self.assertIn(f"server certificate SHA-256 fingerprint: {fingerprint}\n", out)
        for name in ("ca.crt", "ca.key", "server.crt", "server.key"):
            self.assertIn(os.path.join(out_dir, name), out)
        err = self.failed(*argv)
        self.assertIn("refusing to overwrite", err)
        self.assertIn("--force", err)
        replaced = self.json(*argv, "--force")
        self.assertEqual(
            set(replaced), {"ca_cert", "ca_key", "server_cert", "server_key", "fingerprint"}
        )
        self.assertNotEqual(replaced["fingerprint"], fingerprint)
        err = self.failed("tls", "init", "--out", out_dir, "--force")
        self.assertEqual(
            err, "sitesrv-admin: give at least one --hostname or --ip for the certificate\n"
        )

    def test_tls_init_without_config_or_out(self) -> None:
        """Without ``--out`` the config's [tls] directory is used; with neither, usage error."""
        out = self.ok("tls", "init", "--hostname", "hq.example.org")
        self.assertIn(os.path.join(self.dir, "tls", "server.crt"), out)
        self.assertTrue(os.path.exists(load(self.config).tls.key))
        self.setEnvironment(None)
        out, err = io.StringIO(), io.StringIO()
        self.assertEqual(main(["tls", "init", "--hostname", "x"], stdout=out, stderr=err), 2)
        self.assertIn("give --out DIR", err.getvalue())

    def test_db_upgrade(self) -> None:
        """``db upgrade`` migrates a new database, then reports it is up to date."""
        out = self.ok("db", "upgrade")
        self.assertRegex(out, r"^database upgraded: \(empty\) -> \w+\n$")
        self.assertRegex(self.ok("db", "upgrade"), r"^database already at revision \w+\n$")
        upgraded = self.json("db", "upgrade")
        self.assertEqual(upgraded["before"], upgraded["after"])
        self.assertEqual(self.json("audit", "list")[0]["action"], "db.upgrade")

    # -- sites, errors, plumbing -------------------------------------------------------

    def test_site_refuses_writes(self) -> None:
        """On a site, every write is refused with "make changes on the primary"."""
        for argv in WRITES:
            err = self.failed(*argv, stdin=f"{PIN}\n", config=self.siteConfig)
            self.assertEqual(err, "sitesrv-admin: make changes on the primary\n", argv)

    def test_site_reads(self) -> None:
        """Reads work on a site (from its replica), as do ``db upgrade`` and ``policy show``."""
        self.assertRegex(self.ok("db", "upgrade", config=self.siteConfig), r"^database ")
        self.assertEqual(self.ok("user", "list", config=self.siteConfig), "no users\n")
        self.assertEqual(self.json("audit", "list", config=self.siteConfig), [])
        shown = self.json("policy", "show", config=self.siteConfig)
        self.assertEqual({p["source"] for p in shown}, {"default"})
        # The site's replica is not the primary's database.
        self.addAlice()
        if not self.extra:
            self.assertEqual(self.ok("user", "list", config=self.siteConfig), "no users\n")

    def test_config_errors(self) -> None:
        """A missing or bad config is one line naming the file; no config is a usage error."""
        missing = os.path.join(self.dir, "nope.toml")
        err = self.failed("user", "list", config=missing)
        self.assertEqual(
            err, f"sitesrv-admin: {missing}: cannot read the file: No such file or directory\n"
        )
        bad = self.writeConfig("bad.toml", 'role = "primary"\nname = "hq"\n', self.dir)
        err = self.failed("user", "list", config=bad)
        self.assertEqual(err, f"sitesrv-admin: {bad}: data_dir: required key is missing\n")
        self.setEnvironment(None)
        out, err_stream = io.StringIO(), io.StringIO()
        self.assertEqual(main(["user", "list"], stdout=out, stderr=err_stream), 2)
        self.assertEqual(
            err_stream.getvalue(),
            "sitesrv-admin: no configuration: give --config FILE or set SITESRV_CONFIG\n",
        )

    def test_config_from_environment(self) -> None:
        """``SITESRV_CONFIG`` names the config when ``--config`` is not given."""
        self.setEnvironment(self.config)
        out = io.StringIO()
        self.assertEqual(main(["user", "list"], stdout=out, stderr=io.StringIO()), 0)
        self.assertEqual(out.getvalue(), "no users\n")

    def test_database_cannot_open(self) -> None:
        """A database that cannot be opened is one line naming it, without a traceback."""
        os.makedirs(os.path.join(self.dir, "adir"))
        url = f"sqlite:///{self.dir}/adir"
        bad = self.writeConfig(
            "baddb.toml", PRIMARY.replace("{extra}", f'database = "{url}"'), self.dir
        )
        err = self.failed("user", "list", config=bad)
        self.assertTrue(err.startswith(f"sitesrv-admin: cannot open database {url}: "), err)

    def test_usage_errors(self) -> None:
        """Unknown commands and missing arguments exit 2 with argparse's usage message."""
        err = self.failed("user", code=2)
        self.assertIn("usage: sitesrv-admin user", err)
        self.assertIn("invalid choice", self.failed("frobnicate", code=2))
        self.assertIn("--site", self.failed("printer", "add", "p", code=2))
        code, out, _ = self.cli("--help")
        self.assertEqual(code, 0)
        self.assertIn("tls", out)

    def test_json_before_or_after_the_command(self) -> None:
        """``--json`` works before the command as well as after it."""
        self.addAlice()
        before = json.loads(self.ok("--json", "user", "list"))
        after = json.loads(self.ok("user", "list", "--json"))
        self.assertEqual(before, after)
        self.assertEqual(before[0]["username"], "alice")

    def test_negative_amount_is_not_an_option(self) -> None:
        """``balance adjust NAME -.5`` reads -.5 as the amount."""
        self.addAlice()
        self.assertEqual(
            self.ok("balance", "adjust", "alice", "-.5"), "balance of alice is now 8.00\n"
        )

    def test_closed_output(self) -> None:
        """A reader that goes away (``| head``) ends the command quietly with status 1."""

        class Closed(io.StringIO):
            def write(self, text: str) -> int:
                raise BrokenPipeError(32, "Broken pipe")

        err = io.StringIO()
        code = main(["--config", self.config, "user", "list"], stdout=Closed(), stderr=err)
        self.assertEqual((code, err.getvalue()), (1, ""))

    def test_console_script(self) -> None:
        """Called with no arguments, as the console script, main exits with the status."""
        out, err = io.StringIO(), io.StringIO()
        self.patch(sys, "argv", ["sitesrv-admin", "--config", self.config, "user", "show", "x"])
        with self.assertRaises(SystemExit) as raised:
            main(stdout=out, stderr=err)
        self.assertEqual(raised.exception.code, 1)
        self.assertEqual(err.getvalue(), "sitesrv-admin: no user named 'x'\n")


class PostgreSQLAdminCLITests(AdminCLITests):
    """The same tests with the primary's database (and the site's) on PostgreSQL."""

    skip = postgres_skip()

    def setUp(self) -> None:
        url = normalise_url(os.environ[POSTGRES_ENV])
        reset_postgres(url)
        self.extra = f"database = {json.dumps(url)}"
        super().setUp()
