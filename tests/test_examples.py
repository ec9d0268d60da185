"""The example deployment in ``examples/``, as ``docs/deployment.rst`` tells an
administrator to install it.

- Every ``examples/*.toml`` loads with the real loader (the server's or the provider's).
- They are the deployment the guide describes: TLS on every port with the ``tls init``
  files named in ``[tls]``, replication checked against a CA, PostgreSQL at the primary,
  SQLite at the site.
- Installed on three stand-in machines (each a temporary root; only the absolute paths
  move into it) with the certificates ``tls init`` makes and the CA copies, tokens and
  keys the comments ask for, every listening endpoint builds (Twisted reads its key and
  certificate), and the site's link to the primary and the provider's link to the site
  build their TLS from the CA files the examples name.
- The systemd units' command lines parse (twistd with the sitesrv plugin, and
  ``sitesrv-provider``) and load the config the guide installs.
- A real primary whose web and provider ports are ``ssl:`` endpoints with the ``tls
  init`` certificate answers ``/health`` over HTTPS, verified against the generated CA
  (and not against another CA), and accepts a print provider's hello over TLS.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shlex
import shutil
import ssl
import time
import tomllib
from typing import Any

from twisted.internet import protocol
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import connectProtocol, quoteStringArgument, serverFromString
from twisted.internet.threads import deferToThread
from twisted.protocols import amp
from twisted.python.failure import Failure
from twisted.scripts.twistd import ServerOptions
from twisted.trial.unittest import SynchronousTestCase

import sitesrv
from sitesrv import config as server_config
from sitesrv.provider import config as provider_config
from sitesrv.provider.main import parse as parse_provider_args
from sitesrv.provider.service import server_endpoint
from sitesrv.providers.commands import PROVIDER_PROTOCOL_VERSION, ProviderHello
from sitesrv.replication.site import link_endpoint, read_token
from sitesrv.tls import init_tls
from tests.processes import (
    ProcessTestCase,
    ServerProcess,
    admin_sync,
    listen_tls,
    reactor,
    tls_init,
    wait_for,
    write_primary_config,
)

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")

#: Where docs/deployment.rst and the units install each example.
INSTALLED = {
    "primary.toml": "/etc/sitesrv/sitesrv.toml",
    "site.toml": "/etc/sitesrv/sitesrv.toml",
    "provider.toml": "/etc/sitesrv-provider/provider.toml",
}

#: An absolute path in a config value or an endpoint argument (after a quote or "=").
_ABSOLUTE = re.compile(r'(?<=["=])/(?=(?:var|etc)/)')


def example(name: str) -> str:
    """The path of a file in examples/."""
    return os.path.join(EXAMPLES, name)


def is_server_config(path: str) -> bool:
    """A server config has a ``role``; a provider config has none."""
    with open(path, "rb") as f:
        return "role" in tomllib.load(f)


def load_any(path: str) -> Any:
    """Load a config with the loader that its kind needs."""
    return server_config.load(path) if is_server_config(path) else provider_config.load(path)


def tls_endpoint(port: int, key: str, cert: str) -> str:
    """The ``ssl:`` endpoint string an example writes for these files."""
    return f"ssl:{port}:privateKey={quoteStringArgument(key)}:certKey={quoteStringArgument(cert)}"


def unit(name: str) -> dict[str, str]:
    """The ``Key=Value`` settings of a systemd unit in examples/ (comments skipped)."""
    settings = {}
    with open(example(name), encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith(("#", ";", "[")):
                key, _, value = line.partition("=")
                settings[key.strip()] = value.strip()
    return settings


class Machine:
    """A stand-in machine: a temporary root holding an example installed as the guide says."""

    def __init__(self, root: str, example_name: str) -> None:
        self.root = root
        self.config = self.path(INSTALLED[example_name])
        os.makedirs(os.path.dirname(self.config))
        with open(example(example_name), encoding="utf-8") as f:
            text = f.read()
        # Only absolute paths change: /var/lib/... becomes <root>/var/lib/...
        with open(self.config, "w", encoding="utf-8") as f:
            f.write(_ABSOLUTE.sub(root + "/", text))

    def path(self, absolute: str) -> str:
        """Where an absolute path of the real machine is on this one."""
        return self.root + absolute

    def write(self, absolute: str, text: str) -> None:
        """Write a file (mode 0600, as the guide asks for secrets)."""
        path = self.path(absolute)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)

    def copy(self, source: str, absolute: str) -> None:
        """Copy a file from another machine to this one."""
        os.makedirs(os.path.dirname(self.path(absolute)), exist_ok=True)
        shutil.copyfile(source, self.path(absolute))


class ExampleConfigTests(SynchronousTestCase):
    """The example configs load and describe a TLS deployment."""

    def test_every_example_loads(self) -> None:
        """Each examples/*.toml loads, as it is, with the loader for its kind."""
        names = sorted(n for n in os.listdir(EXAMPLES) if n.endswith(".toml"))
        self.assertEqual(names, sorted(INSTALLED))
        for name in names:
            loaded = load_any(example(name))
            self.assertEqual(loaded.path, example(name))

    def test_primary_uses_postgresql_and_tls(self) -> None:
        """The primary: PostgreSQL, and TLS on the web, provider and replication ports."""
        primary = server_config.load(example("primary.toml"))
        self.assertEqual(primary.role, "primary")
        self.assertTrue(primary.database.startswith("postgresql://"), primary.database)
        self.assertEqual(primary.tls.cert, "/var/lib/sitesrv/tls/server.crt")
        self.assertEqual(primary.tls.key, "/var/lib/sitesrv/tls/server.key")
        self.assertEqual(primary.tls.ca, "/var/lib/sitesrv/tls/ca.crt")
        files = (primary.tls.key, primary.tls.cert)
        self.assertEqual(primary.listen.web, tls_endpoint(9193, *files))
        self.assertEqual(primary.listen.providers, tls_endpoint(9191, *files))
        self.assertIsNone(primary.listen.replication)
        self.assertEqual(primary.replication_endpoint, tls_endpoint(9192, *files))

    def test_site_uses_sqlite_and_tls(self) -> None:
        """The site: SQLite in data_dir, its own TLS ports, the primary checked by CA."""
        site = server_config.load(example("site.toml"))
        self.assertEqual(site.role, "site")
        self.assertEqual(site.database, "sqlite:////var/lib/sitesrv/sitesrv.db")
        files = (site.tls.key, site.tls.cert)
        self.assertEqual(site.listen.web, tls_endpoint(9193, *files))
        self.assertEqual(site.listen.providers, tls_endpoint(9191, *files))
        link = site.primary
        assert link is not None
        self.assertFalse(link.insecure)
        self.assertIsNone(link.fingerprint)
        self.assertEqual(link.ca, example("primary-ca.crt"))
        self.assertEqual(link.endpoint, "tcp:hq.example.org:9192")
        self.assertEqual(link.hostname, "hq.example.org")

    def test_site_admins_as_the_comment_says(self) -> None:
        """The site's [web.admins] block, uncommented with an `admin hash` verifier, loads."""
        verifier = admin_sync(
            None, "admin", "hash", "--password-stdin", stdin="a long passphrase\n"
        ).out.strip()
        with open(example("site.toml"), encoding="utf-8") as f:
            text = f.read()
        block = '# [web.admins]\n# alice = "scrypt$16384$8$1$...$..."\n'
        self.assertIn(block, text)
        path = os.path.join(os.path.abspath(self.mktemp()), "site.toml")
        os.makedirs(os.path.dirname(path))
        with open(path, "w", encoding="utf-8") as f:
            f.write(text.replace(block, f'[web.admins]\nalice = "{verifier}"\n'))
        self.assertEqual(server_config.load(path).web.admins, {"alice": verifier})

    def test_provider_uses_tls(self) -> None:
        """The provider: its site server's port 9191 checked by CA, IPP over TLS."""
        provider = provider_config.load(example("provider.toml"))
        self.assertEqual(provider.server.endpoint, "tcp:north.example.org:9191")
        self.assertFalse(provider.server.insecure)
        self.assertEqual(provider.server.ca, example("site-ca.crt"))
        tls = "/var/lib/sitesrv-provider/tls"
        self.assertEqual(
            provider.ipp.listen, tls_endpoint(631, f"{tls}/server.key", f"{tls}/server.crt")
        )


class InstalledExampleTests(SynchronousTestCase):
    """The examples installed on stand-in machines with the files the guide makes."""

    def setUp(self) -> None:
        base = os.path.abspath(self.mktemp())
        self.primary = Machine(os.path.join(base, "hq"), "primary.toml")
        self.site = Machine(os.path.join(base, "north"), "site.toml")
        self.provider = Machine(os.path.join(base, "print"), "provider.toml")

        # The primary: tls init into its [tls] directory.
        primary_tls = init_tls(self.primary.path("/var/lib/sitesrv/tls"), ["hq.example.org"], [])
        # The site: the primary's CA and the enrolment token next to its config, and its
        # own certificate for its web and provider ports.
        self.site.copy(primary_tls.ca_cert, "/etc/sitesrv/primary-ca.crt")
        self.site.write("/etc/sitesrv/site-token", "token-from-site-add\n")
        site_tls = init_tls(self.site.path("/var/lib/sitesrv/tls"), ["north.example.org"], [])
        # The provider: the site's CA, its key, and a certificate for its IPP port.
        self.provider.copy(site_tls.ca_cert, "/etc/sitesrv-provider/site-ca.crt")
        self.provider.write("/etc/sitesrv-provider/provider.key", "key-from-provider-add\n")
        init_tls(
            self.provider.path("/var/lib/sitesrv-provider/tls"), ["print.north.example.org"], []
        )

    def assertListens(self, endpoint: str) -> None:
        """The endpoint string builds: for ssl:, Twisted has read its key and certificate."""
        built = serverFromString(reactor, endpoint)
        self.assertIsNotNone(built)

    def test_server_endpoints_build(self) -> None:
        """Every listening port of the primary and the site builds with its TLS files."""
        for machine in (self.primary, self.site):
            config = server_config.load(machine.config)
            self.assertTrue(config.data_dir.startswith(machine.root))
            for endpoint in (config.listen.web, config.listen.providers):
                self.assertTrue(endpoint.startswith("ssl:"), endpoint)
                self.assertListens(endpoint)
        self.assertListens(server_config.load(self.primary.config).replication_endpoint)

    def test_site_reaches_primary_with_its_ca(self) -> None:
        """The site's link to the primary builds TLS from primary-ca.crt; the token reads."""
        link = server_config.load(self.site.config).primary
        assert link is not None
        self.assertEqual(link.ca, self.site.path("/etc/sitesrv/primary-ca.crt"))
        self.assertIsNotNone(link_endpoint(link, reactor))
        self.assertEqual(read_token(link.token_file), "token-from-site-add")

    def test_provider_reaches_site_with_its_ca(self) -> None:
        """The provider's link builds TLS from site-ca.crt; its IPP port builds."""
        config = provider_config.load(self.provider.config)
        self.assertEqual(config.server.ca, self.provider.path("/etc/sitesrv-provider/site-ca.crt"))
        self.assertIsNotNone(server_endpoint(config, reactor))
        self.assertEqual(provider_config.read_key(config.server.key_file), "key-from-provider-add")
        self.assertListens(config.ipp.listen)

    def test_server_unit_runs_the_installed_config(self) -> None:
        """sitesrv.service: twistd's command line parses and loads /etc/sitesrv/sitesrv.toml."""
        settings = unit("sitesrv.service")
        argv = shlex.split(settings["ExecStart"])
        self.assertEqual(os.path.basename(argv[0]), "twistd")
        self.assertEqual(argv[argv.index("--config") + 1], "/etc/sitesrv/sitesrv.toml")
        # data_dir is the unit's state directory and its working directory.
        self.assertEqual(settings["StateDirectory"], "sitesrv")
        self.assertEqual(settings["WorkingDirectory"], "/var/lib/sitesrv")
        self.assertEqual(settings["User"], "sitesrv")
        for machine in (self.primary, self.site):
            args = [machine.path(a) if a.startswith("/etc/") else a for a in argv[1:]]
            options = ServerOptions()
            options.parseOptions(args)
            self.assertEqual(options.subCommand, "sitesrv")
            self.assertTrue(options["nodaemon"])
            self.assertEqual(options["pidfile"], "")
            loaded = options.subOptions.config
            self.assertEqual(loaded.data_dir, machine.path("/var/lib/sitesrv"))

    def test_provider_unit_runs_the_installed_config(self) -> None:
        """sitesrv-provider.service: the command line parses and its config loads."""
        settings = unit("sitesrv-provider.service")
        argv = shlex.split(settings["ExecStart"])
        self.assertEqual(os.path.basename(argv[0]), "sitesrv-provider")
        self.assertEqual(settings["StateDirectory"], "sitesrv-provider")
        self.assertEqual(settings["User"], "sitesrv-provider")
        args = parse_provider_args(argv[1:])
        self.assertEqual(args.config, "/etc/sitesrv-provider/provider.toml")
        loaded = provider_config.load(self.provider.path(args.config))
        self.assertEqual(loaded.data_dir, self.provider.path("/var/lib/sitesrv-provider"))


# -- a real primary with TLS on its web and provider ports --------------------------------


def https_health(port: int, cafile: str) -> tuple[int, dict[str, Any]] | None:
    """GET https://127.0.0.1:port/health, trusting only ``cafile``; None if refused.

    The certificate's chain and its IP address name are checked, as a browser or
    ``curl --cacert`` would; a failed check raises ``ssl.SSLCertVerificationError``.
    """
    context = ssl.create_default_context(cafile=cafile)
    connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=5)
    try:
        connection.request("GET", "/health")
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    except ConnectionRefusedError:
        return None
    finally:
        connection.close()


def https_cookie(port: int, cafile: str) -> str:
    """The ``Set-Cookie`` header of the login page over verified HTTPS."""
    context = ssl.create_default_context(cafile=cafile)
    connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=5)
    try:
        connection.request("GET", "/login")
        response = connection.getresponse()
        response.read()
        return response.getheader("set-cookie") or ""
    finally:
        connection.close()


class _ClosingAMP(amp.AMP):
    """AMP that tells when its connection has gone."""

    def __init__(self) -> None:
        super().__init__()
        self.closed: Deferred[None] = Deferred()

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        super().connectionLost(reason)
        self.closed.callback(None)


class TLSPortsTests(ProcessTestCase):
    """A primary serves its web and provider ports over TLS with the tls init certificate."""

    timeout = 60

    async def test_web_and_provider_ports_over_tls(self) -> None:
        """/health over verified HTTPS (and a Secure session cookie from the login page);
        a provider's hello over verified TLS."""
        node = write_primary_config(self.directory)
        files = tls_init(node)
        key, cert, ca = files["server_key"], files["server_cert"], files["ca_cert"]
        assert node.replication_port is not None
        listen = {
            "web": listen_tls(node.web_port, key, cert),
            "providers": listen_tls(node.providers_port, key, cert),
            "replication": listen_tls(node.replication_port, key, cert),
        }
        with open(node.config, "w", encoding="utf-8") as f:
            # JSON strings are TOML basic strings.
            f.write(f'role = "primary"\nname = "{node.name}"\n')
            f.write(f"data_dir = {json.dumps(node.data_dir)}\n[listen]\n")
            f.writelines(f"{k} = {json.dumps(v)}\n" for k, v in listen.items())
        provider_key = admin_sync(node, "provider", "add", "hq-spool", "--site", node.name).out
        server = ServerProcess(node).start(self)

        def health() -> Deferred[Any]:
            if not server.running:
                raise AssertionError(f"the primary exited:\n{server.tail(20)}")
            return deferToThread(https_health, node.web_port, ca)

        code, body = await wait_for(health, "/health over HTTPS")
        self.assertEqual(code, 200)
        self.assertEqual((body["role"], body["name"], body["mode"]), ("primary", "hq", "online"))
        # Over TLS the web pages' session cookie is Secure (and HttpOnly, SameSite).
        cookie = await deferToThread(https_cookie, node.web_port, ca)
        attributes = {a.strip() for a in cookie.split(";")}
        self.assertTrue(cookie.startswith("sitesrv_session="), cookie)
        self.assertLessEqual({"Secure", "HttpOnly", "SameSite=strict", "Path=/"}, attributes)

        # Another CA's certificate is not this server's: the check is real.
        other = init_tls(os.path.join(self.directory, "other"), ["localhost"], ["127.0.0.1"])
        refused = deferToThread(https_health, node.web_port, other.ca_cert)
        await self.assertFailure(refused, ssl.SSLCertVerificationError)

        # A print provider connects as sitesrv-provider does: TLS over tcp:, checked
        # against the CA for the certificate's IP address name.
        provider = provider_config.from_dict(
            {
                "name": "hq-spool",
                "data_dir": os.path.join(self.directory, "spool"),
                "server": {
                    "endpoint": f"tcp:127.0.0.1:{node.providers_port}",
                    "key_file": "unused",
                    "ca": ca,
                },
                "queues": {"q": {}},
            }
        )
        amp_client = await connectProtocol(server_endpoint(provider, reactor), _ClosingAMP())
        try:
            answer = await amp_client.callRemote(
                ProviderHello,
                provider="hq-spool",
                key=provider_key.strip(),
                software_version=sitesrv.__version__,
                protocol_version=PROVIDER_PROTOCOL_VERSION,
                provider_time=time.time(),
            )
        finally:
            amp_client.transport.loseConnection()
            await amp_client.closed
        self.assertEqual((answer["server"], answer["site"]), ("hq", "hq"))
        self.assertEqual(server.count("Traceback"), 0)
