"""Tests for web administrators: the store, ``check_admin``, ``[web.admins]`` and the CLI.

The store tests run on a SQLite file and on PostgreSQL (skipped unless
``SITESRV_TEST_POSTGRES_URL`` is set), as the other store tests do; so do the CLI tests.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, func, select
from twisted.internet.defer import Deferred, succeed
from twisted.trial.unittest import SynchronousTestCase

from sitesrv import config
from sitesrv.admin.cli import main
from sitesrv.config import ConfigError
from sitesrv.errors import AlreadyExists, Invalid, NotFound
from sitesrv.secrets import (
    SCRYPT_N,
    SCRYPT_P,
    SCRYPT_R,
    check_verifier,
    is_verifier,
    make_verifier,
)
from sitesrv.store import Store
from sitesrv.store.admins import (
    DUMMY_VERIFIER,
    Admin,
    check_admin,
    thdAddAdmin,
    thdAdminVerifier,
    thdListAdmins,
    thdRemoveAdmin,
    thdSetAdminPassword,
)
from sitesrv.store.audit import thdListAudit
from sitesrv.store.changelog import thdChangesSince, thdState
from sitesrv.store.engine import normalise_url
from sitesrv.store.schema import REPLICATED_BY_NAME, SHADOW, web_admins
from sitesrv.store.sites import thdAddSite
from sitesrv.store.snapshot import Snapshot
from tests.support import (
    NOW,
    POSTGRES_ENV,
    StoreMixin,
    postgres_skip,
    postgres_url,
    reset_postgres,
)
from tests.test_outbox import load_snapshot, open_site_store, sync

# Mixins are test cases to the type checker only; the concrete classes add the real base.
if TYPE_CHECKING:
    _TestCase = SynchronousTestCase
else:
    _TestCase = object

#: Why the PostgreSQL variants skip (``None``: they run).
POSTGRES_SKIP = (
    None if postgres_url() else f"PostgreSQL not configured: set {POSTGRES_ENV} (CI does)"
)

#: Cheap scrypt cost for test verifiers (the real cost is 2**14).
CHEAP_N = 2**4

PASSWORD = "correct horse battery staple"


def cheap(secret: str) -> str:
    """A verifier of ``secret`` that is quick to make and check."""
    return make_verifier(secret, n=CHEAP_N)


def thdCountAdmins(conn: Connection) -> int:
    return conn.execute(select(func.count()).select_from(web_admins)).scalar_one()


# -- the store ------------------------------------------------------------------------


class AdminStoreMixin(StoreMixin, _TestCase):
    """Adding, listing, changing and removing web administrators on a primary."""

    def setUp(self) -> None:
        super().setUp()
        self.store = self.open_primary()

    def test_add_and_list(self) -> None:
        """Added administrators are listed in name order with their times, no verifier."""
        self.store.write(thdAddAdmin, "root", cheap("a"), NOW)
        self.store.write(thdAddAdmin, "alice", cheap("b"), NOW + 1)
        self.assertEqual(
            self.store.read(thdListAdmins),
            [Admin("alice", NOW + 1, NOW + 1), Admin("root", NOW, NOW)],
        )
        verifier = self.store.read(thdAdminVerifier, "root")
        assert verifier is not None
        self.assertTrue(check_verifier("a", verifier))
        self.assertIsNone(self.store.read(thdAdminVerifier, "nobody"))

    def test_add_twice(self) -> None:
        """A taken name is refused with AlreadyExists, and the first password stays."""
        self.store.write(thdAddAdmin, "root", cheap("a"), NOW)
        e = self.assertRaises(
            AlreadyExists, self.store.write, thdAddAdmin, "root", cheap("b"), NOW
        )
        self.assertEqual(str(e), "admin 'root' already exists")
        verifier = self.store.read(thdAdminVerifier, "root")
        assert verifier is not None
        self.assertTrue(check_verifier("a", verifier))

    def test_names(self) -> None:
        """Names are 1 to 64 characters without control characters; spaces around go."""
        for name, problem in (
            ("", "admin name must not be empty"),
            ("   ", "admin name must not be empty"),
            ("x" * 65, "admin name is longer than 64 characters"),
            ("a\nb", "admin name contains control characters"),
        ):
            e = self.assertRaises(Invalid, self.store.write, thdAddAdmin, name, cheap("a"), NOW)
            self.assertEqual(str(e), problem)
        self.store.write(thdAddAdmin, " " + "x" * 64 + " ", cheap("a"), NOW)
        self.store.write(thdAddAdmin, "Zoë Admin", cheap("a"), NOW)
        self.assertEqual([a.name for a in self.store.read(thdListAdmins)], ["Zoë Admin", "x" * 64])

    def test_set_password(self) -> None:
        """A new password replaces the old one and moves updated_at."""
        self.store.write(thdAddAdmin, "root", cheap("old"), NOW)
        self.store.write(thdSetAdminPassword, "root", cheap("new"), NOW + 60)
        verifier = self.store.read(thdAdminVerifier, "root")
        assert verifier is not None
        self.assertTrue(check_verifier("new", verifier))
        self.assertFalse(check_verifier("old", verifier))
        self.assertEqual(self.store.read(thdListAdmins), [Admin("root", NOW, NOW + 60)])

    def test_remove(self) -> None:
        """A removed administrator is gone; the name can be used again."""
        self.store.write(thdAddAdmin, "root", cheap("a"), NOW)
        self.store.write(thdRemoveAdmin, "root", NOW)
        self.assertEqual(self.store.read(thdListAdmins), [])
        self.assertIsNone(self.store.read(thdAdminVerifier, "root"))
        self.store.write(thdAddAdmin, "root", cheap("b"), NOW)

    def test_unknown(self) -> None:
        """Changing or removing an unknown administrator raises NotFound."""
        e = self.assertRaises(
            NotFound, self.store.write, thdSetAdminPassword, "root", cheap("a"), NOW
        )
        self.assertEqual(str(e), "no admin named 'root'")
        self.assertRaises(NotFound, self.store.write, thdRemoveAdmin, "root", NOW)

    def test_never_in_the_change_log(self) -> None:
        """Adding, changing and removing administrators writes nothing to the change log."""
        epoch, head = self.store.read(thdState)
        self.store.write(thdAddAdmin, "root", cheap("a"), NOW)
        self.store.write(thdSetAdminPassword, "root", cheap("b"), NOW)
        self.store.write(thdAddAdmin, "other", cheap("c"), NOW)
        self.store.write(thdRemoveAdmin, "other", NOW)
        self.assertEqual(self.store.read(thdState), (epoch, head))
        changes, _upto, _limited = self.store.read(thdChangesSince, 0, 100_000, (None, "hq"))
        self.assertNotIn("web_admins", {c.table for c in changes})

    def test_not_replicated(self) -> None:
        """The table is neither replicated nor has a shadow table for snapshots."""
        self.assertNotIn("web_admins", REPLICATED_BY_NAME)
        self.assertNotIn("web_admins", SHADOW)

    def test_snapshot_holds_no_admins(self) -> None:
        """A site's snapshot of the primary holds no administrator, nor its verifier."""
        self.store.write(thdAddSite, "north", NOW)
        verifier = cheap("a")
        self.store.write(thdAddAdmin, "root", verifier, NOW)
        snapshot = Snapshot(self.store.reader, "north")
        snapshot.open()
        pages = []
        try:
            while (page := snapshot.next_rows()) is not None:
                pages.append(page)
        finally:
            snapshot.close()
        tables = {table for table, _columns, _rows in pages}
        self.assertIn("sites", tables)
        self.assertNotIn("web_admins", tables)
        self.assertNotIn(verifier, repr(pages))
        self.assertNotIn("'root'", repr(pages))

    def test_site_replica_holds_no_admins(self) -> None:
        """A site built from the primary by snapshot and change log has no administrators."""
        self.store.write(thdAddSite, "north", NOW)
        self.store.write(thdAddAdmin, "before", cheap("a"), NOW)
        site = open_site_store(self)
        load_snapshot(self.store, site)
        self.store.write(thdAddAdmin, "after", cheap("b"), NOW)
        self.store.write(thdSetAdminPassword, "before", cheap("c"), NOW)
        sync(self.store, site)
        self.assertEqual(site.read(thdCountAdmins), 0)
        self.assertEqual(self.store.read(thdCountAdmins), 2)


class AdminStoreSQLiteTests(AdminStoreMixin, SynchronousTestCase):
    backend = "sqlite"


class AdminStorePostgresTests(AdminStoreMixin, SynchronousTestCase):
    backend = "postgres"
    skip = POSTGRES_SKIP


# -- checking a password --------------------------------------------------------------


class FakeReader:
    """``Store.runRead`` over a dict of database administrators, recording each call."""

    def __init__(self, verifiers: dict[str, str]) -> None:
        self.verifiers = verifiers
        self.calls: list[tuple[Any, ...]] = []

    def __call__(self, fn: Callable[..., Any], *args: Any) -> Deferred[Any]:
        self.calls.append((fn, *args))
        assert fn is thdAdminVerifier, fn
        return succeed(self.verifiers.get(args[0]))


class CheckAdminTests(SynchronousTestCase):
    """``check_admin``: config administrators first, then the database's; one check each."""

    def setUp(self) -> None:
        self.checked: list[str] = []
        self.config_admins = {"site-admin": cheap("site password")}
        self.read = FakeReader({"root": cheap(PASSWORD), "site-admin": cheap("db password")})

    def run_cpu(self, fn: Callable[..., Any], *args: Any) -> Deferred[Any]:
        """Run ``fn`` at once, noting the verifier each scrypt check used."""
        self.assertIs(fn, check_verifier)
        self.checked.append(args[1])
        return succeed(fn(*args))

    def check(self, name: str, password: str, *, site: bool = False) -> bool:
        coroutine = check_admin(
            name,
            password,
            config_admins=self.config_admins,
            read=None if site else self.read,
            run_cpu=self.run_cpu,
        )
        result = self.successResultOf(Deferred.fromCoroutine(coroutine))
        self.assertIsInstance(result, bool)
        self.assertEqual(len(self.checked), 1, "exactly one scrypt check per attempt")
        self.checked.clear()
        return bool(result)

    def test_database_admin(self) -> None:
        """A database administrator's password is accepted; a wrong one is not."""
        self.assertTrue(self.check("root", PASSWORD))
        self.assertFalse(self.check("root", "wrong password"))
        self.assertEqual(self.read.calls[0], (thdAdminVerifier, "root"))

    def test_config_admin_first(self) -> None:
        """A name in [web.admins] is checked against the config's verifier only."""
        self.assertTrue(self.check("site-admin", "site password"))
        self.assertFalse(self.check("site-admin", "db password"))
        self.assertEqual(self.read.calls, [])

    def test_site_uses_config_only(self) -> None:
        """At a site (no ``read``) only [web.admins] counts."""
        self.assertTrue(self.check("site-admin", "site password", site=True))
        self.assertFalse(self.check("root", PASSWORD, site=True))

    def test_unknown_name_costs_a_check(self) -> None:
        """An unknown name is refused after a check against the dummy verifier."""
        coroutine = check_admin(
            "nobody", "", config_admins={}, read=self.read, run_cpu=self.run_cpu
        )
        self.assertIs(self.successResultOf(Deferred.fromCoroutine(coroutine)), False)
        self.assertEqual(self.checked, [DUMMY_VERIFIER])

    def test_dummy_verifier_costs_as_much(self) -> None:
        """The dummy verifier is well-formed and has the cost of a real one."""
        self.assertTrue(is_verifier(DUMMY_VERIFIER))
        _scheme, n, r, p, _salt, _hash = DUMMY_VERIFIER.split("$")
        self.assertEqual((int(n), int(r), int(p)), (SCRYPT_N, SCRYPT_R, SCRYPT_P))
        _scheme, n, r, p, _salt, _hash = make_verifier("x").split("$")
        self.assertEqual((int(n), int(r), int(p)), (SCRYPT_N, SCRYPT_R, SCRYPT_P))


class IsVerifierTests(SynchronousTestCase):
    """``is_verifier`` accepts what ``make_verifier`` writes and little else."""

    def test_made_verifiers(self) -> None:
        self.assertTrue(is_verifier(cheap("x")))
        self.assertTrue(is_verifier(DUMMY_VERIFIER))

    def test_malformed(self) -> None:
        good = cheap("x").split("$")
        bad = [
            "",
            "password",
            "$".join(good[:5]),
            "$".join(["bcrypt", *good[1:]]),
            "$".join([good[0], "15", *good[2:]]),
            "$".join([good[0], "1", *good[2:]]),
            "$".join([good[0], good[1], "0", *good[3:]]),
            "$".join([good[0], good[1], good[2], "-1", *good[4:]]),
            "$".join([*good[:4], "not base64!", good[5]]),
            "$".join([*good[:5], ""]),
            "$".join(good) + "$",
            " " + "$".join(good),
        ]
        for value in bad:
            self.assertFalse(is_verifier(value), value)


# -- [web.admins] ---------------------------------------------------------------------

PRIMARY_CONFIG = """\
role = "primary"
name = "hq"
data_dir = "data"
"""

SITE_CONFIG = """\
role = "site"
name = "north"
data_dir = "data"

[primary]
endpoint = "tcp:hq.example.org:9192"
insecure = true
token_file = "token"
"""


class WebAdminsConfigTests(SynchronousTestCase):
    """The ``[web.admins]`` table of a config: name → verifier, on either role."""

    def load(self, text: str) -> config.Config:
        directory = self.mktemp()
        os.makedirs(directory)
        path = os.path.join(directory, "sitesrv.toml")
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return config.load(path)

    def assertError(self, text: str, key: str, fragment: str) -> None:
        e = self.assertRaises(ConfigError, self.load, text)
        self.assertEqual(e.key, key)
        self.assertNotIn("\n", str(e))
        self.assertIn(fragment, str(e))

    def test_default_empty(self) -> None:
        """Without the table there are no config administrators."""
        self.assertEqual(self.load(PRIMARY_CONFIG).web.admins, {})
        self.assertEqual(self.load(SITE_CONFIG).web.admins, {})

    def test_both_roles(self) -> None:
        """A site and a primary both take administrators from their config."""
        root, other = cheap("a"), cheap("b")
        table = f'\n[web.admins]\nroot = "{root}"\n"site admin" = " {other} "\n'
        for base in (PRIMARY_CONFIG, SITE_CONFIG):
            self.assertEqual(
                self.load(base + table).web.admins, {"root": root, "site admin": other}
            )

    def test_config_is_hashable(self) -> None:
        """A config with administrators is still a hashable value."""
        hash(self.load(SITE_CONFIG + f'\n[web.admins]\nroot = "{cheap("a")}"\n'))

    def test_bad_verifier(self) -> None:
        """A value that is not a verifier (a plain password, say) names the entry."""
        self.assertError(
            SITE_CONFIG + '\n[web.admins]\nroot = "hunter22"\n',
            "web.admins.root",
            "not a password verifier (make one with `sitesrv-admin admin hash",
        )
        self.assertError(
            SITE_CONFIG + "\n[web.admins]\nroot = 1\n",
            "web.admins.root",
            "expected a string, got an integer",
        )

    def test_bad_name(self) -> None:
        """Names follow the rules of ``admin add``."""
        verifier = cheap("a")
        for name, key, problem in (
            ('""', 'web.admins.""', "must not be empty"),
            ("x" * 65, f"web.admins.{'x' * 65}", "longer than 64 characters"),
            ('" root"', 'web.admins." root"', "must not begin or end with spaces"),
            ('"a\\tb"', 'web.admins."a\\tb"', "control characters"),
        ):
            self.assertError(
                SITE_CONFIG + f'\n[web.admins]\n{name} = "{verifier}"\n', key, problem
            )

    def test_not_a_table(self) -> None:
        self.assertError(
            PRIMARY_CONFIG + '\n[web]\nadmins = "root"\n',
            "web.admins",
            "expected a table, got a string",
        )


# -- sitesrv-admin admin ... ----------------------------------------------------------

PRIMARY_TEMPLATE = """\
role = "primary"
name = "hq"
data_dir = "{data_dir}"
{extra}
"""

SITE_TEMPLATE = """\
role = "site"
name = "north"
data_dir = "{data_dir}"
{extra}

[primary]
endpoint = "tcp:127.0.0.1:9192"
insecure = true
token_file = "token"
"""


class AdminCommandTests(SynchronousTestCase):
    """``sitesrv-admin admin ...`` on a primary and a site, SQLite files in a temp dir."""

    #: Extra config lines (PostgreSQL sets ``database``).
    extra = ""

    def setUp(self) -> None:
        environ = {k: v for k, v in os.environ.items() if k != "SITESRV_CONFIG"}
        self.patch(os, "environ", environ)
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.config = self.writeConfig("hq.toml", PRIMARY_TEMPLATE, self.dir)
        self.siteConfig = self.writeConfig(
            "north.toml", SITE_TEMPLATE, os.path.join(self.dir, "north")
        )

    def writeConfig(self, name: str, template: str, data_dir: str) -> str:
        path = os.path.join(self.dir, name)
        with open(path, "w") as f:
            f.write(template.format(data_dir=data_dir, extra=self.extra))
        return path

    def cli(self, *argv: str, stdin: str = "", config: str | None = None) -> tuple[int, str, str]:
        """Run ``sitesrv-admin --config CONFIG *argv``; return (status, stdout, stderr)."""
        out, err = io.StringIO(), io.StringIO()
        # config="" runs without one.
        given = self.config if config is None else config
        args = ["--config", given, *argv] if given else list(argv)
        code = main(args, stdin=io.StringIO(stdin), stdout=out, stderr=err)
        self.assertNotIn("Traceback", err.getvalue())
        return code, out.getvalue(), err.getvalue()

    def ok(self, *argv: str, stdin: str = "", config: str | None = None) -> str:
        code, out, err = self.cli(*argv, stdin=stdin, config=config)
        self.assertEqual(code, 0, f"{argv} failed: {err}")
        return out

    def json(self, *argv: str, stdin: str = "", config: str | None = None) -> Any:
        """Run a command with ``--json``; return the parsed output."""
        return json.loads(self.ok(*argv, "--json", stdin=stdin, config=config))

    def failed(self, *argv: str, stdin: str = "", config: str | None = None) -> str:
        """Run a command that must fail with status 1; return its one-line message."""
        status, out, err = self.cli(*argv, stdin=stdin, config=config)
        self.assertEqual((status, out), (1, ""), err)
        self.assertEqual(err.count("\n"), 1, err)
        return err.removeprefix("sitesrv-admin: ").rstrip("\n")

    def query(self, fn: Callable[[Connection], Any]) -> Any:
        store = Store(config.load(self.config).database, readers=1)
        try:
            return store.read(fn)
        finally:
            store.writer.dispose()
            store.reader.dispose()

    def verifier(self, name: str) -> str | None:
        return self.query(lambda conn: thdAdminVerifier(conn, name))

    def test_add_list_remove(self) -> None:
        """An added administrator is listed, can change password, and can be removed."""
        out = self.ok("admin", "add", "root", "--password-stdin", stdin=f"{PASSWORD}\n")
        self.assertEqual(out, "added web administrator root\n")
        verifier = self.verifier("root")
        assert verifier is not None
        self.assertTrue(check_verifier(PASSWORD, verifier))
        self.assertNotIn(PASSWORD, verifier)
        listed = self.json("admin", "list")
        self.assertEqual([a["name"] for a in listed], ["root"])
        self.assertEqual(set(listed[0]), {"name", "created", "updated"})
        table = self.ok("admin", "list")
        self.assertTrue(table.startswith("NAME  CREATED"), table)
        self.assertIn("\nroot  20", table)

        out = self.ok("admin", "password", "root", "--password-stdin", stdin="new password\r\n")
        self.assertEqual(out, "set the password of web administrator root\n")
        verifier = self.verifier("root")
        assert verifier is not None
        self.assertTrue(check_verifier("new password", verifier))

        self.assertEqual(self.json("admin", "remove", "root"), {"admin": "root", "removed": True})
        self.assertEqual(self.ok("admin", "list"), "no web administrators\n")

    def test_audited_without_secrets(self) -> None:
        """Each change is in the audit log; no password or verifier is."""
        self.ok("admin", "add", "root", "--password-stdin", stdin=f"{PASSWORD}\n")
        self.ok("admin", "password", "root", "--password-stdin", stdin="another one\n")
        self.ok("admin", "remove", "root")
        entries = self.query(lambda conn: thdListAudit(conn))
        self.assertEqual(
            [(e.action, e.target) for e in entries[:3]],
            [("admin.remove", "root"), ("admin.password", "root"), ("admin.add", "root")],
        )
        self.assertTrue(all(e.actor.startswith("cli:") for e in entries[:3]))
        self.assertNotIn("scrypt", repr(entries))
        self.assertNotIn(PASSWORD, repr(entries))

    def test_nothing_for_sites(self) -> None:
        """Adding an administrator leaves the change log as it was."""
        self.ok("user", "list")  # creates the primary's base rows
        before = self.query(thdState)
        self.ok("admin", "add", "root", "--password-stdin", stdin=f"{PASSWORD}\n")
        self.assertEqual(self.query(thdState), before)

    def test_passwords_refused(self) -> None:
        """Empty, short and missing passwords are refused with a clear message."""
        for stdin, problem in (
            ("", "no password on standard input"),
            ("\n", "the password must not be empty"),
            ("seven77\n", "an administrator's password must be at least 8 characters"),
            ("x" * 1025 + "\n", "the password must be at most 1024 characters"),
        ):
            self.assertEqual(
                self.failed("admin", "add", "root", "--password-stdin", stdin=stdin), problem
            )
        self.assertEqual(
            self.failed("admin", "add", "root", stdin=f"{PASSWORD}\n"),
            "give --password-stdin to read the password from standard input",
        )
        self.assertEqual(self.ok("admin", "list"), "no web administrators\n")
        self.ok("admin", "add", "root", "--password-stdin", stdin="eight888\n")

    def test_errors(self) -> None:
        """Taken, unknown and bad names are one-line errors."""
        self.ok("admin", "add", "root", "--password-stdin", stdin=f"{PASSWORD}\n")
        self.assertEqual(
            self.failed("admin", "add", "root", "--password-stdin", stdin=f"{PASSWORD}\n"),
            "admin 'root' already exists",
        )
        self.assertEqual(
            self.failed("admin", "password", "bob", "--password-stdin", stdin=f"{PASSWORD}\n"),
            "no admin named 'bob'",
        )
        self.assertEqual(self.failed("admin", "remove", "bob"), "no admin named 'bob'")
        self.assertEqual(
            self.failed("admin", "add", "x" * 65, "--password-stdin", stdin=f"{PASSWORD}\n"),
            "admin name is longer than 64 characters",
        )

    def test_site_refuses(self) -> None:
        """On a site, add/password/remove/list are refused, pointing at [web.admins]."""
        for argv in (
            ["admin", "add", "root", "--password-stdin"],
            ["admin", "password", "root", "--password-stdin"],
            ["admin", "remove", "root"],
            ["admin", "list"],
        ):
            message = self.failed(*argv, stdin=f"{PASSWORD}\n", config=self.siteConfig)
            self.assertIn("on the primary", message)
            self.assertIn("[web.admins]", message)
        self.assertTrue(
            self.failed("admin", "remove", "root", config=self.siteConfig).startswith(
                "make changes on the primary"
            )
        )
        # Refused before the database is even opened.
        self.assertFalse(os.path.exists(os.path.join(self.dir, "north")))

    def test_hash(self) -> None:
        """``admin hash`` prints only a verifier, on any role or none, changing nothing."""
        for config_path in (self.siteConfig, self.config, ""):
            code, out, err = self.cli(
                "admin", "hash", "--password-stdin", stdin=f"{PASSWORD}\n", config=config_path
            )
            self.assertEqual(code, 0, err)
            self.assertIn("[web.admins]", err)
            verifier = out.rstrip("\n")
            self.assertEqual(out.count("\n"), 1)
            self.assertTrue(is_verifier(verifier))
            self.assertTrue(check_verifier(PASSWORD, verifier))
        self.assertFalse(os.path.exists(os.path.join(self.dir, "north")))
        self.assertFalse(os.path.exists(os.path.join(self.dir, "sitesrv.db")))
        data = self.json("admin", "hash", "--password-stdin", stdin=f"{PASSWORD}\n")
        self.assertEqual(set(data), {"verifier"})
        self.assertTrue(check_verifier(PASSWORD, data["verifier"]))
        self.assertEqual(
            self.failed("admin", "hash", "--password-stdin", stdin="short\n"),
            "an administrator's password must be at least 8 characters",
        )

    def test_hash_fits_a_site_config(self) -> None:
        """What ``admin hash`` prints loads as a [web.admins] entry of a site's config."""
        verifier = self.ok("admin", "hash", "--password-stdin", stdin=f"{PASSWORD}\n").strip()
        with open(self.siteConfig, "a") as f:
            f.write(f'\n[web.admins]\nroot = "{verifier}"\n')
        self.assertEqual(config.load(self.siteConfig).web.admins, {"root": verifier})


class PostgreSQLAdminCommandTests(AdminCommandTests):
    """The same commands with the primary's database (and the site's) on PostgreSQL."""

    skip = postgres_skip()

    def setUp(self) -> None:
        url = normalise_url(os.environ[POSTGRES_ENV])
        reset_postgres(url)
        self.extra = f"database = {json.dumps(url)}"
        super().setUp()
