"""Tests for sitesrv.tls: certificates from ``tls init`` and real handshakes on loopback."""

from __future__ import annotations

import ipaddress
import os
import stat
from datetime import UTC, datetime, timedelta
from typing import cast

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import SSL4ServerEndpoint
from twisted.internet.interfaces import IListeningPort, IOpenSSLClientConnectionCreator
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from sitesrv.tls import (
    CertificateFingerprintMismatch,
    TLSError,
    TLSFiles,
    client_context_factory,
    fingerprint_of,
    init_tls,
    normalise_fingerprint,
    server_context_factory,
    wrap_client_endpoint,
)

NOW = datetime(2025, 3, 4, 5, 6, 7, tzinfo=UTC)


def _load(path: str) -> x509.Certificate:
    with open(path, "rb") as f:
        return x509.load_pem_x509_certificate(f.read())


class InitTLSTests(SynchronousTestCase):
    """`init_tls` writes a usable CA and server certificate, safely."""

    def setUp(self) -> None:
        self.out = self.mktemp()
        self.files = init_tls(
            self.out,
            ["primary.example.org", "localhost"],
            ["127.0.0.1", "::1"],
            now=NOW,
        )

    def test_writes_four_files(self) -> None:
        self.assertEqual(
            sorted(os.listdir(self.out)), ["ca.crt", "ca.key", "server.crt", "server.key"]
        )
        self.assertEqual(self.files.server_cert, os.path.join(self.out, "server.crt"))

    def test_keys_are_private(self) -> None:
        for path in (self.files.ca_key, self.files.server_key):
            self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600, path)

    def test_server_certificate_names(self) -> None:
        cert = _load(self.files.server_cert)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(
            san.get_values_for_type(x509.DNSName), ["primary.example.org", "localhost"]
        )
        self.assertEqual(
            san.get_values_for_type(x509.IPAddress),
            [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")],
        )
        cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        self.assertEqual(cn, "primary.example.org")
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        self.assertEqual(list(eku), [ExtendedKeyUsageOID.SERVER_AUTH])

    def test_signed_by_ca(self) -> None:
        ca = _load(self.files.ca_cert)
        self.assertTrue(ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
        _load(self.files.server_cert).verify_directly_issued_by(ca)

    def test_valid_from_a_day_before_now(self) -> None:
        cert = _load(self.files.server_cert)
        self.assertEqual(cert.not_valid_before_utc, NOW - timedelta(days=1))
        self.assertEqual(cert.not_valid_after_utc, NOW + timedelta(days=825))

    def test_fingerprint_matches_file(self) -> None:
        with open(self.files.server_cert, "rb") as f:
            self.assertEqual(self.files.fingerprint, fingerprint_of(f.read()))
        self.assertEqual(len(self.files.fingerprint), 64)

    def test_refuses_to_overwrite(self) -> None:
        with open(self.files.server_cert, "rb") as f:
            before = f.read()
        e = self.assertRaises(TLSError, init_tls, self.out, ["other.example.org"], [])
        self.assertIn("refusing to overwrite", str(e))
        self.assertNotIn("\n", str(e))
        with open(self.files.server_cert, "rb") as f:
            self.assertEqual(f.read(), before)

    def test_force_replaces(self) -> None:
        again = init_tls(self.out, ["other.example.org"], [], force=True)
        self.assertNotEqual(again.fingerprint, self.files.fingerprint)
        self.assertEqual(stat.S_IMODE(os.stat(again.server_key).st_mode), 0o600)
        self.assertEqual(
            sorted(os.listdir(self.out)), ["ca.crt", "ca.key", "server.crt", "server.key"]
        )

    def test_needs_a_name(self) -> None:
        self.assertRaises(TLSError, init_tls, self.mktemp(), [], [])

    def test_rejects_bad_ip(self) -> None:
        e = self.assertRaises(TLSError, init_tls, self.mktemp(), ["a.example"], ["10.0.0.300"])
        self.assertIn("10.0.0.300", str(e))

    def test_rejects_bad_hostname(self) -> None:
        self.assertRaises(TLSError, init_tls, self.mktemp(), ["bad_name!.example"], [])

    def test_ip_only_certificate(self) -> None:
        files = init_tls(self.mktemp(), [], ["192.0.2.7"], now=NOW)
        cert = _load(files.server_cert)
        cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        self.assertEqual(cn, "192.0.2.7")

    def test_ip_given_as_hostname_becomes_ip_entry(self) -> None:
        # service-identity matches an IP literal only against IP entries.
        files = init_tls(self.mktemp(), ["10.1.2.3"], [], now=NOW)
        san = _load(files.server_cert).extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        )
        self.assertEqual(san.value.get_values_for_type(x509.DNSName), [])
        self.assertEqual(
            san.value.get_values_for_type(x509.IPAddress), [ipaddress.ip_address("10.1.2.3")]
        )


class FingerprintTests(SynchronousTestCase):
    """Fingerprints are compared in one canonical form."""

    def test_colon_upper_case_form(self) -> None:
        canonical = "ab" * 32
        self.assertEqual(normalise_fingerprint(":".join(["AB"] * 32)), canonical)
        self.assertEqual(normalise_fingerprint(f" {canonical}\n"), canonical)

    def test_rejects_short_or_non_hex(self) -> None:
        self.assertRaises(TLSError, normalise_fingerprint, "ab" * 20)
        self.assertRaises(TLSError, normalise_fingerprint, "zz" * 32)

    def test_not_a_certificate(self) -> None:
        self.assertRaises(TLSError, fingerprint_of, b"not a certificate")


class ContextFactoryErrorTests(SynchronousTestCase):
    """Bad settings fail at start-up with one clear sentence, not at first connection."""

    def setUp(self) -> None:
        self.files = init_tls(self.mktemp(), ["localhost"], [])

    def test_server_missing_file(self) -> None:
        e = self.assertRaises(
            TLSError, server_context_factory, "/nonexistent/server.crt", self.files.server_key
        )
        self.assertIn("/nonexistent/server.crt", str(e))

    def test_server_key_mismatch(self) -> None:
        e = self.assertRaises(
            TLSError, server_context_factory, self.files.server_cert, self.files.ca_key
        )
        self.assertIn("does not belong", str(e))

    def test_server_key_not_a_key(self) -> None:
        self.assertRaises(
            TLSError, server_context_factory, self.files.server_cert, self.files.server_cert
        )

    def test_client_needs_exactly_one_trust(self) -> None:
        self.assertRaises(TLSError, client_context_factory, "localhost")
        self.assertRaises(
            TLSError,
            client_context_factory,
            "localhost",
            ca_path=self.files.ca_cert,
            fingerprint=self.files.fingerprint,
        )

    def test_client_bad_fingerprint(self) -> None:
        self.assertRaises(TLSError, client_context_factory, "localhost", fingerprint="abc")

    def test_client_missing_ca(self) -> None:
        self.assertRaises(TLSError, client_context_factory, "localhost", ca_path="/nonexistent")

    def test_client_ca_not_a_certificate(self) -> None:
        self.assertRaises(TLSError, client_context_factory, "localhost", ca_path=self.files.ca_key)

    def test_client_ca_is_not_a_ca(self) -> None:
        e = self.assertRaises(
            TLSError, client_context_factory, "localhost", ca_path=self.files.server_cert
        )
        self.assertIn("not a CA certificate", str(e))

    def test_bad_endpoint(self) -> None:
        creator = client_context_factory("localhost", ca_path=self.files.ca_cert)
        self.assertRaises(TLSError, wrap_client_endpoint, "nonsense:1", reactor, creator)


# -- real handshakes over loopback ------------------------------------------------------


class _Echo(Protocol):
    """Server side: echo everything; note when the connection is gone."""

    def __init__(self) -> None:
        self.lost: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:
        self.lost.callback(None)


class _EchoFactory(Factory):
    def __init__(self) -> None:
        self.connections: list[_Echo] = []

    def buildProtocol(self, addr: object) -> _Echo:
        protocol = _Echo()
        self.connections.append(protocol)
        return protocol


class _Ping(Protocol):
    """Client side: send ``ping``, hang up once it comes back, report what arrived."""

    def __init__(self) -> None:
        self.received = b""
        self.reason: Failure | None = None
        self.lost: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        # Written before the handshake: the TLS layer holds it until the peer is trusted.
        self.transport.write(b"ping")  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self.received == b"ping":
            self.transport.loseConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:
        # Not callback(reason): a Deferred treats a Failure result as an error.
        self.reason = reason
        self.lost.callback(None)


class LoopbackTests(TestCase):
    """A site connects to a primary over real TLS on 127.0.0.1 and trusts only the right one."""

    timeout = 5

    def setUp(self) -> None:
        self.files = init_tls(self.mktemp(), ["localhost"], ["127.0.0.1"])

    async def _listen(self, files: TLSFiles) -> tuple[int, _EchoFactory]:
        factory = _EchoFactory()
        endpoint = SSL4ServerEndpoint(
            reactor,
            0,
            server_context_factory(files.server_cert, files.server_key),
            interface="127.0.0.1",
        )
        port: IListeningPort = await endpoint.listen(factory)
        self.addCleanup(port.stopListening)
        return port.getHost().port, factory  # type: ignore[attr-defined]

    async def _ping(
        self, creator: IOpenSSLClientConnectionCreator, files: TLSFiles | None = None
    ) -> tuple[bytes, Failure]:
        """Connect with *creator* to a primary using *files*; what came back, and why it ended."""
        port, server = await self._listen(files or self.files)
        endpoint = wrap_client_endpoint(f"tcp:127.0.0.1:{port}", reactor, creator)
        client = cast(_Ping, await endpoint.connect(Factory.forProtocol(_Ping)))
        await client.lost
        assert client.reason is not None
        # Wait for the primary's side to close too, so no socket outlives the test.
        await gatherResults([c.lost for c in server.connections])
        return client.received, client.reason

    def assertRefused(self, received: bytes, reason: Failure, *errors: type) -> None:
        """Nothing got through, and the connection ended for a TLS reason."""
        self.assertEqual(received, b"")
        self.assertIsNotNone(reason.check(*errors), reason.getTraceback())

    async def test_ca_and_dns_name(self) -> None:
        creator = client_context_factory("localhost", ca_path=self.files.ca_cert)
        received, _ = await self._ping(creator)
        self.assertEqual(received, b"ping")

    async def test_ca_and_ip_address(self) -> None:
        creator = client_context_factory("127.0.0.1", ca_path=self.files.ca_cert)
        received, _ = await self._ping(creator)
        self.assertEqual(received, b"ping")

    async def test_other_ca_refused(self) -> None:
        other = init_tls(self.mktemp(), ["localhost"], ["127.0.0.1"])
        creator = client_context_factory("localhost", ca_path=other.ca_cert)
        received, reason = await self._ping(creator)
        self.assertRefused(received, reason, SSL.Error)
        self.assertIn("certificate verify failed", str(reason.value))

    async def test_wrong_hostname_refused(self) -> None:
        creator = client_context_factory("primary.example.org", ca_path=self.files.ca_cert)
        self.assertRefused(*await self._ping(creator), VerificationError)

    async def test_ip_not_in_certificate_refused(self) -> None:
        # 127.0.0.1 is connected to, but the certificate names only localhost.
        files = init_tls(self.mktemp(), ["localhost"], [])
        creator = client_context_factory("127.0.0.1", ca_path=files.ca_cert)
        self.assertRefused(*await self._ping(creator, files), VerificationError)

    async def test_expired_refused(self) -> None:
        files = init_tls(self.mktemp(), ["localhost"], [], days=1, now=NOW - timedelta(days=3650))
        creator = client_context_factory("localhost", ca_path=files.ca_cert)
        self.assertRefused(*await self._ping(creator, files), SSL.Error)

    async def test_pinned_fingerprint(self) -> None:
        # The pin is the whole trust: no CA is given and the host name is not in the cert.
        colons = ":".join(self.files.fingerprint[i : i + 2] for i in range(0, 64, 2)).upper()
        creator = client_context_factory("primary.example.org", fingerprint=colons)
        received, _ = await self._ping(creator)
        self.assertEqual(received, b"ping")

    async def test_pinned_expired_certificate(self) -> None:
        # Like an SSH host key, a pinned certificate is trusted whatever its dates say.
        files = init_tls(self.mktemp(), ["localhost"], [], days=1, now=NOW - timedelta(days=3650))
        creator = client_context_factory("localhost", fingerprint=files.fingerprint)
        received, _ = await self._ping(creator, files)
        self.assertEqual(received, b"ping")

    async def test_wrong_pin_refused(self) -> None:
        other = init_tls(self.mktemp(), ["localhost"], ["127.0.0.1"])
        creator = client_context_factory("localhost", fingerprint=other.fingerprint)
        received, reason = await self._ping(creator)
        self.assertRefused(received, reason, CertificateFingerprintMismatch)
        message = str(reason.value)
        self.assertIn("certificate fingerprint mismatch", message)
        self.assertIn(f"expected {other.fingerprint}", message)
        self.assertIn(f"got {self.files.fingerprint}", message)
