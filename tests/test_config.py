"""Tests for sitesrv.config: the examples load, defaults, paths, and one-line errors."""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.endpoints import _parse as twisted_parse
from twisted.trial.unittest import SynchronousTestCase

from sitesrv import config
from sitesrv.config import Config, ConfigError, ListenConfig, ReplicationConfig, TLSConfig

EXAMPLES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples")

FINGERPRINT = "ab" * 32

PRIMARY = """\
role = "primary"
name = "hq"
data_dir = "data"
"""

SITE = """\
role = "site"
name = "branch-north"
data_dir = "data"

[primary]
endpoint = "tcp:hq.example.org:9192"
ca = "ca.crt"
token_file = "token"
"""


class ConfigTestCase(SynchronousTestCase):
    """Helpers: write a config into a fresh directory and load it."""

    def write(self, text: str, name: str = "sitesrv.toml") -> str:
        directory = self.mktemp()
        os.makedirs(directory)
        path = os.path.join(directory, name)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return path

    def load(self, text: str) -> Config:
        return config.load(self.write(text))

    def error(self, text: str) -> tuple[str, ConfigError]:
        """Load *text*, expecting a ConfigError; return the file's path and the error."""
        path = self.write(text)
        e = self.assertRaises(ConfigError, config.load, path)
        message = str(e)
        self.assertNotIn("\n", message)
        self.assertTrue(message.startswith(path + ": "), message)
        return path, e

    def assertError(self, text: str, key: str, *fragments: str) -> ConfigError:
        """Loading *text* fails naming *key*, with a message containing *fragments*."""
        path, e = self.error(text)
        self.assertEqual(e.key, key)
        self.assertTrue(str(e).startswith(f"{path}: {key}: "), str(e))
        for fragment in fragments:
            self.assertIn(fragment, str(e))
        return e


class DefaultTests(ConfigTestCase):
    def test_primary_defaults(self) -> None:
        """A minimal primary gets the documented defaults."""
        c = self.load(PRIMARY)
        data_dir = c.data_dir
        self.assertEqual(c.database, f"sqlite:///{data_dir}/sitesrv.db")
        self.assertEqual(c.listen, ListenConfig("tcp:9191", "tcp:9193", None))
        self.assertEqual(
            c.tls,
            TLSConfig(
                cert=f"{data_dir}/tls/server.crt",
                key=f"{data_dir}/tls/server.key",
                ca=f"{data_dir}/tls/ca.crt",
            ),
        )
        self.assertEqual(c.replication, ReplicationConfig(1.0, 2.0, 30, 7))
        self.assertEqual((c.currency, c.decimals, c.log_level), ("USD", 2, "info"))
        self.assertIsNone(c.primary)

    def test_replication_endpoint_default(self) -> None:
        """Port 9192 defaults to TLS with the [tls] files, colons in paths escaped."""
        c = self.load(PRIMARY + '[tls]\nkey = "C:/keys/server.key"\ncert = "/x/a:b.crt"\n')
        key = os.path.join(os.path.dirname(os.path.abspath(c.path)), "C:/keys/server.key")
        self.assertEqual(
            c.replication_endpoint,
            "ssl:9192:privateKey=" + key.replace(":", "\\:") + r":certKey=/x/a\:b.crt",
        )
        # Twisted reads it back to the same paths.
        self.assertEqual(
            twisted_parse(c.replication_endpoint),
            (["ssl", "9192"], {"privateKey": key, "certKey": "/x/a:b.crt"}),
        )

    def test_replication_endpoint_given(self) -> None:
        """listen.replication, when given, is the replication endpoint."""
        c = self.load(PRIMARY + '[listen]\nreplication = "tcp:9999"\n')
        self.assertEqual(c.replication_endpoint, "tcp:9999")

    def test_site_defaults(self) -> None:
        """A site's hostname comes from its endpoint; insecure is off."""
        c = self.load(SITE)
        assert c.primary is not None
        self.assertEqual(c.primary.hostname, "hq.example.org")
        self.assertFalse(c.primary.insecure)

    def test_all_keys(self) -> None:
        """Every key can be set, and is read as given."""
        c = self.load(
            PRIMARY
            + 'database = "postgresql://sitesrv@db/sitesrv"\ncurrency = "EUR"\n'
            + 'decimals = 0\nlog_level = "debug"\n'
            + '[listen]\nproviders = "tcp:1"\nweb = "tcp:2"\nreplication = "tcp:3"\n'
            + "[replication]\nheartbeat = 2\nmax_backoff = 0.5\n"
            + "changelog_max_age_days = 3\noutbox_retention_days = 0\n"
        )
        self.assertEqual(c.database, "postgresql://sitesrv@db/sitesrv")
        self.assertEqual((c.currency, c.decimals, c.log_level), ("EUR", 0, "debug"))
        self.assertEqual(c.listen, ListenConfig("tcp:1", "tcp:2", "tcp:3"))
        self.assertEqual(c.replication, ReplicationConfig(2.0, 0.5, 3, 0))
        # An integer is accepted for a float key, and stored as a float.
        self.assertIsInstance(c.replication.heartbeat, float)

    def test_fingerprint_normalised(self) -> None:
        """A fingerprint with colons and upper case is stored as lower-case bare hex."""
        pinned = ":".join([FINGERPRINT.upper()[i : i + 2] for i in range(0, 64, 2)])
        c = self.load(SITE.replace('ca = "ca.crt"', f'fingerprint = "{pinned}"'))
        assert c.primary is not None
        self.assertEqual(c.primary.fingerprint, FINGERPRINT)
        self.assertIsNone(c.primary.ca)

    def test_hostname_from_keyword_endpoint(self) -> None:
        """The hostname is derived from tcp:host=H:port=P too, and an explicit one wins."""
        c = self.load(SITE.replace("tcp:hq.example.org:9192", "tcp:host=10.0.0.5:port=9192"))
        assert c.primary is not None
        self.assertEqual(c.primary.hostname, "10.0.0.5")
        c = self.load(SITE + 'hostname = "primary.internal"\n')
        assert c.primary is not None
        self.assertEqual(c.primary.hostname, "primary.internal")

    def test_hostname_ipv6(self) -> None:
        """An escaped IPv6 address in the endpoint becomes the hostname, unescaped."""
        c = self.load(SITE.replace('"tcp:hq.example.org:9192"', r"'tcp:\:\:1:9192'"))
        assert c.primary is not None
        self.assertEqual(c.primary.hostname, "::1")

    def test_insecure(self) -> None:
        """insecure = true needs neither ca nor fingerprint."""
        c = self.load(SITE.replace('ca = "ca.crt"', "insecure = true"))
        assert c.primary is not None
        self.assertTrue(c.primary.insecure)
        self.assertIsNone(c.primary.ca)

    def test_from_dict(self) -> None:
        """from_dict validates a dict; relative paths are then relative to the cwd."""
        c = config.from_dict({"role": "primary", "name": "demo", "data_dir": "var/demo"})
        self.assertEqual(c.path, "")
        self.assertEqual(c.data_dir, os.path.join(os.getcwd(), "var", "demo"))
        e = self.assertRaises(ConfigError, config.from_dict, {"role": "primary"})
        self.assertEqual(str(e), "<config>: name: required key is missing")


class PathTests(ConfigTestCase):
    def test_relative_paths(self) -> None:
        """Relative paths are resolved against the config file's directory."""
        c = self.load(SITE + '[tls]\ncert = "../certs/site.crt"\n')
        here = os.path.dirname(os.path.abspath(c.path))
        self.assertEqual(c.data_dir, os.path.join(here, "data"))
        self.assertEqual(c.database, f"sqlite:///{here}/data/sitesrv.db")
        assert c.primary is not None
        self.assertEqual(c.primary.ca, os.path.join(here, "ca.crt"))
        self.assertEqual(c.primary.token_file, os.path.join(here, "token"))
        self.assertEqual(c.tls.cert, os.path.join(os.path.dirname(here), "certs", "site.crt"))
        self.assertEqual(c.tls.key, os.path.join(here, "data", "tls", "server.key"))

    def test_relative_sqlite_database(self) -> None:
        """A relative SQLite file in database is relative to the config file too."""
        c = self.load(PRIMARY + 'database = "sqlite:///db/main.db"\n')
        here = os.path.dirname(os.path.abspath(c.path))
        self.assertEqual(c.database, f"sqlite:///{here}/db/main.db")

    def test_absolute_paths(self) -> None:
        """Absolute paths are kept as written."""
        c = self.load(SITE.replace('"ca.crt"', '"/etc/ca.crt"').replace('"data"', '"/srv/d"'))
        self.assertEqual(c.data_dir, "/srv/d")
        assert c.primary is not None
        self.assertEqual(c.primary.ca, "/etc/ca.crt")


class ErrorTests(ConfigTestCase):
    def test_missing_file(self) -> None:
        """A file that cannot be read is named, with the reason."""
        path = os.path.join(self.mktemp(), "nowhere.toml")
        e = self.assertRaises(ConfigError, config.load, path)
        self.assertEqual(str(e), f"{path}: cannot read the file: No such file or directory")

    def test_invalid_toml(self) -> None:
        """A syntax error names the line."""
        path, e = self.error('role = "primary"\nname = \n')
        self.assertEqual(str(e), f"{path}: invalid TOML: Invalid value (at line 2, column 8)")

    def test_not_utf8(self) -> None:
        """A file that is not UTF-8 is refused cleanly."""
        path = self.write("")
        with open(path, "wb") as f:
            f.write(b'name = "\xff"\n')
        e = self.assertRaises(ConfigError, config.load, path)
        self.assertIn("not UTF-8", str(e))

    def test_unknown_top_level_key(self) -> None:
        """An unknown key lists the known ones and suggests a close match."""
        path, e = self.error(PRIMARY + 'colour = "blue"\n')
        self.assertEqual(
            str(e),
            f"{path}: colour: unknown key (known keys: currency, data_dir, database,"
            " decimals, listen, log_level, name, primary, providers, replication, role, tls, web)",
        )
        self.assertError(
            PRIMARY + 'log-level = "debug"\n', "log-level", "(did you mean log_level? known"
        )

    def test_unknown_key_in_table(self) -> None:
        """An unknown key in a table is named with its table."""
        self.assertError(
            PRIMARY + '[listen]\nwebb = "tcp:1"\n',
            "listen.webb",
            "unknown key (did you mean web? known keys: providers, replication, web)",
        )

    def test_unknown_table(self) -> None:
        """A misspelt table name is an unknown key."""
        self.assertError(PRIMARY + "[replicaton]\nheartbeat = 1\n", "replicaton", "unknown key")

    def test_odd_key_quoted(self) -> None:
        """A quoted key with a newline is shown escaped, keeping the message one line."""
        self.assertError(PRIMARY + '[listen]\n"a\\nb" = 1\n', 'listen."a\\nb"', "unknown key")

    def test_wrong_types(self) -> None:
        """Each kind of wrong type names what was expected and what was found."""
        cases = [
            ("[listen]\nweb = 9193\n", "listen.web", "expected a string, got an integer"),
            ("decimals = 2.0\n", "decimals", "expected an integer, got a float"),
            ('decimals = "2"\n', "decimals", "expected an integer, got a string"),
            ("decimals = true\n", "decimals", "expected an integer, got a boolean"),
            ('[replication]\nheartbeat = "1"\n', "replication.heartbeat", "expected a number"),
            ("[replication]\nheartbeat = true\n", "replication.heartbeat", "got a boolean"),
            ("currency = [1]\n", "currency", "expected a string, got an array"),
            ("currency = 1979-05-27\n", "currency", "expected a string, got a date"),
            ('listen = "tcp:1"\n', "listen", "expected a table, got a string"),
        ]
        for text, key, problem in cases:
            self.assertError(PRIMARY + text, key, problem)
        self.assertError(
            SITE + 'insecure = "yes"\n', "primary.insecure", "expected a boolean", "got a string"
        )
        self.assertError(SITE + "insecure = 1\n", "primary.insecure", "got an integer")

    def test_missing_required_key(self) -> None:
        """Each required key, when missing, is named."""
        for key in ("role", "name", "data_dir"):
            lines = [line for line in PRIMARY.splitlines() if not line.startswith(key)]
            self.assertError("\n".join(lines) + "\n", key, "required key is missing")
        self.assertError(
            SITE.replace('token_file = "token"\n', ""),
            "primary.token_file",
            "required key is missing",
        )
        self.assertError(
            SITE.replace('endpoint = "tcp:hq.example.org:9192"\n', ""),
            "primary.endpoint",
            "required key is missing",
        )

    def test_site_without_primary(self) -> None:
        """A site without [primary] is told which key to add."""
        path, e = self.error('role = "site"\nname = "s"\ndata_dir = "d"\n')
        self.assertEqual(str(e), f'{path}: primary.endpoint: required for role = "site"')

    def test_primary_with_primary_table(self) -> None:
        """[primary] in a primary's config is an error, not silently ignored."""
        self.assertError(
            PRIMARY + '[primary]\nendpoint = "tcp:x:1"\n',
            "primary",
            'only used with role = "site", this is role = "primary"',
        )

    def test_site_with_replication_listener(self) -> None:
        """A site does not serve replication, so listen.replication is refused."""
        self.assertError(
            SITE + '[listen]\nreplication = "tcp:9192"\n',
            "listen.replication",
            'only used with role = "primary"',
        )

    def test_bad_values(self) -> None:
        """Values of the right type but out of range name the rule."""
        cases = [
            ('role = "replica"', "role", 'must be "primary" or "site", got "replica"'),
            ('name = "north site"', "name", "1 to 100 characters"),
            ('name = ""', "name", "1 to 100 characters"),
            (f'name = "{"x" * 101}"', "name", "1 to 100 characters"),
            ('data_dir = ""', "data_dir", "must not be empty"),
            ('currency = "usd"', "currency", "3 upper-case letters"),
            ("decimals = 5", "decimals", "must be from 0 to 4, got 5"),
            ('log_level = "verbose"', "log_level", '"debug" or "info" or "warn" or "error"'),
            ('database = "nonsense"', "database", "not a SQLAlchemy database URL"),
            ('database = "sqlite://"', "database", "not an in-memory database"),
        ]
        for line, key, problem in cases:
            text = "\n".join(other for other in PRIMARY.splitlines() if other.split(" ")[0] != key)
            self.assertError(text + "\n" + line + "\n", key, problem)
        self.assertError(
            PRIMARY + "[replication]\nheartbeat = 0\n", "replication.heartbeat", "greater than 0"
        )
        self.assertError(
            PRIMARY + "[replication]\nmax_backoff = -1\n", "replication.max_backoff", "than 0"
        )
        self.assertError(
            PRIMARY + "[replication]\nheartbeat = inf\n", "replication.heartbeat", "than 0"
        )
        self.assertError(
            PRIMARY + "[replication]\nchangelog_max_age_days = 0\n",
            "replication.changelog_max_age_days",
            "must be at least 1, got 0",
        )

    def test_bad_listen_endpoints(self) -> None:
        """Listen endpoints must at least look like server endpoint strings."""
        cases = [
            ('web = ""', "must not be empty"),
            ('web = "9193"', "no endpoint type, did you mean tcp:9193?"),
            ('web = "http://localhost"', "this is a URL"),
            ('web = "-x:1"', "endpoint type"),
            ('web = ":9193"', "endpoint type"),
            ('web = "tcp:http"', 'port "http" is not a number'),
            ('web = "tcp:70000"', "from 0 to 65535"),
            ('web = "ssl:9193"', "ssl: needs privateKey"),
            ('web = "unix:"', "unix: needs a socket path"),
            ("web = 'tcp:9193\\'", "lone backslash"),
        ]
        for line, problem in cases:
            self.assertError(PRIMARY + f"[listen]\n{line}\n", "listen.web", problem)

    def test_listen_port_clash(self) -> None:
        """Two listeners on one port are caught before start."""
        self.assertError(
            PRIMARY + '[listen]\nweb = "tcp:9191"\n',
            "listen.web",
            "port 9191 is also used by listen.providers",
        )
        # The default replication port counts on a primary.
        self.assertError(
            PRIMARY + '[listen]\nproviders = "tcp:9192"\n',
            "listen.replication",
            "port 9192 is also used by listen.providers",
        )
        # Different interfaces may share a port.
        self.load(
            PRIMARY + "[listen]\nweb = 'tcp:8080:interface=10.0.0.1'\n"
            "providers = 'tcp:8080:interface=10.0.0.2'\n"
        )

    def test_bad_primary_endpoint(self) -> None:
        """The primary endpoint is a plain client endpoint with a host and port."""
        cases = [
            (
                "ssl:hq:9192",
                "sitesrv adds TLS itself (checked with ca or fingerprint), so not ssl:",
            ),
            ("tcp:hq", "needs a port"),
            ("tcp:port=9192", "needs a host"),
            ("tcp:hq:0", "port 0 is not a port"),
        ]
        for endpoint, problem in cases:
            self.assertError(
                SITE.replace("tcp:hq.example.org:9192", endpoint), "primary.endpoint", problem
            )

    def test_non_tcp_endpoint_needs_hostname(self) -> None:
        """Without a tcp host to derive it from, hostname must be given for TLS."""
        text = SITE.replace("tcp:hq.example.org:9192", "unix:/run/primary.sock")
        self.assertError(text, "primary.hostname", "required when endpoint is not tcp:HOST:PORT")
        c = self.load(text + 'hostname = "hq.example.org"\n')
        assert c.primary is not None
        self.assertEqual(c.primary.hostname, "hq.example.org")

    def test_bad_fingerprint(self) -> None:
        """A fingerprint must be 64 hex digits."""
        for bad, problem in [
            ("ab:cd", "has 64 hex digits, this one has 4"),
            ("a" * 40, "this one has 40"),
            ("zz" * 32, "hexadecimal digits"),
        ]:
            self.assertError(
                SITE.replace('ca = "ca.crt"', f'fingerprint = "{bad}"'),
                "primary.fingerprint",
                problem,
            )

    def test_ca_and_fingerprint_both(self) -> None:
        """ca and fingerprint together are ambiguous."""
        self.assertError(
            SITE + f'fingerprint = "{FINGERPRINT}"\n',
            "primary.fingerprint",
            "either ca or fingerprint, not both",
        )

    def test_ca_and_fingerprint_neither(self) -> None:
        """Without ca, fingerprint or insecure, the primary cannot be trusted."""
        self.assertError(
            SITE.replace('ca = "ca.crt"\n', ""),
            "primary.ca",
            "give ca",
            "or fingerprint",
            "or insecure = true",
        )

    def test_insecure_with_ca(self) -> None:
        """insecure = true with a ca would look like TLS while being plain TCP."""
        self.assertError(
            SITE + "insecure = true\n", "primary.ca", "cannot be used with insecure = true"
        )


class EndpointParsingTests(SynchronousTestCase):
    def test_matches_twisted(self) -> None:
        """Our endpoint splitting agrees with twisted.internet.endpoints on tricky strings."""
        descriptions = [
            "tcp:9191",
            "tcp:port=9191:interface=127.0.0.1",
            r"tcp:\:\:1:9192",
            r"ssl:443:privateKey=C\:\\k.pem:certKey=/a\:b",
            "unix:address=/run/x.sock:mode=660",
            "tcp:host=h:port=1:a=b=c",
        ]
        for description in descriptions:
            kind, args, kwargs = config._split_endpoint(description)
            expected: tuple[list[Any], dict[str, Any]] = twisted_parse(description)
            self.assertEqual(([kind, *args], kwargs), expected, description)

    def test_ssl_positional_key(self) -> None:
        """ssl:PORT:KEY names its key positionally, as Twisted allows."""
        c = config.from_dict(
            {"role": "primary", "name": "hq", "data_dir": "/d", "listen": {"web": "ssl:1:/k"}}
        )
        self.assertEqual(c.listen.web, "ssl:1:/k")


class DocumentationTests(SynchronousTestCase):
    def test_every_key_documented(self) -> None:
        """docs/configuration.rst describes every key the validator knows."""
        docs = os.path.join(os.path.dirname(EXAMPLES), "docs", "configuration.rst")
        with open(docs, encoding="utf-8") as f:
            text = f.read()
        for name, spec in config._SCHEMA.keys.items():
            if isinstance(spec, config._Table):
                self.assertIn(f"``[{name}]``", text)
                for inner in spec.keys:
                    self.assertIn(f"``{inner}`` —", text, f"{name}.{inner}")
            else:
                self.assertIn(f"``{name}`` —", text, name)
