"""Certificates and TLS contexts for the replication link (DESIGN.md, "Replication").

``init_tls`` makes a private CA and a primary certificate; the primary listens on an
``ssl:`` endpoint naming those files (it sends only the first certificate of ``certKey``:
a CA-signed certificate's intermediates go in ``extraCertChain=``), and
``server_context_factory`` builds the same context for tests; a site connects with
``client_context_factory``, trusting either that CA (chain and host name checked by
service-identity) or a pinned SHA-256 fingerprint of the primary's certificate, over
``wrap_client_endpoint``.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from attrs import frozen
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL, crypto
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.endpoints import clientFromString, wrapClientTLS
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IStreamClientEndpoint,
)
from twisted.internet.ssl import Certificate, CertificateOptions, TLSVersion, optionsForClientTLS
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

log = Logger()

#: Oldest protocol either side will speak.
MINIMUM_TLS_VERSION = TLSVersion.TLSv1_2

#: Default certificate lifetime: the longest that browsers and most TLS stacks accept.
DEFAULT_DAYS = 825

_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")
_FINGERPRINT = re.compile(r"[0-9a-f]{64}")


class TLSError(Exception):
    """A certificate or TLS setting is unusable; ``str()`` is one clear sentence."""


class CertificateFingerprintMismatch(TLSError):
    """The peer's certificate is not the pinned one."""


@frozen
class TLSFiles:
    """Paths written by `init_tls`, and the server certificate's SHA-256 fingerprint."""

    ca_cert: str
    ca_key: str
    server_cert: str
    server_key: str
    fingerprint: str


# -- certificates -----------------------------------------------------------------------


def fingerprint_of(cert_pem: bytes) -> str:
    """SHA-256 of the (first) PEM certificate's DER encoding: lower-case hex, no colons."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as e:
        raise TLSError(f"not a PEM certificate: {e}") from None
    return cert.fingerprint(hashes.SHA256()).hex()


def normalise_fingerprint(text: str) -> str:
    """Turn ``AB:CD:…`` or ``abcd…`` into 64 lower-case hex digits, or raise TLSError."""
    cleaned = re.sub(r"[\s:]", "", text).lower()
    if not _FINGERPRINT.fullmatch(cleaned):
        raise TLSError(
            f"a certificate fingerprint is 64 hex digits (SHA-256), not {text.strip()!r}"
        )
    return cleaned


def init_tls(
    out_dir: str,
    hostnames: Sequence[str],
    ips: Sequence[str],
    days: int = DEFAULT_DAYS,
    now: datetime | None = None,
    *,
    force: bool = False,
) -> TLSFiles:
    """Make a CA and a server certificate for *hostnames* and *ips* in *out_dir*.

    Writes ``ca.crt``, ``ca.key``, ``server.crt`` and ``server.key`` (keys mode 0600).
    """
    dns_names, ip_addresses = _subject_names(hostnames, ips)
    if days < 1:
        raise TLSError(f"a certificate must be valid for at least one day, not {days}")
    if now is None:
        now = datetime.now(UTC)
    elif now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    # A day's grace so that a site whose clock runs somewhat behind still accepts it.
    not_before = now - timedelta(days=1)
    not_after = now + timedelta(days=days)
    common_name = dns_names[0] if dns_names else str(ip_addresses[0])

    paths = TLSFiles(
        ca_cert=os.path.join(out_dir, "ca.crt"),
        ca_key=os.path.join(out_dir, "ca.key"),
        server_cert=os.path.join(out_dir, "server.crt"),
        server_key=os.path.join(out_dir, "server.key"),
        fingerprint="",
    )
    targets = [paths.ca_cert, paths.ca_key, paths.server_cert, paths.server_key]
    existing = [p for p in targets if os.path.lexists(p)]
    if existing and not force:
        raise TLSError(f"refusing to overwrite {', '.join(existing)}; use --force to replace them")

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "sitesrv"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"sitesrv CA for {common_name}"),
        ]
    )
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    server_key = ec.generate_private_key(ec.SECP256R1())
    san: list[x509.GeneralName] = [x509.DNSName(name) for name in dns_names]
    san += [x509.IPAddress(address) for address in ip_addresses]
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "sitesrv"),
                    x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                ]
            )
        )
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )

    server_pem = server_cert.public_bytes(serialization.Encoding.PEM)
    os.makedirs(out_dir, exist_ok=True)
    _write(paths.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)
    _write(paths.ca_key, _key_pem(ca_key), 0o600)
    _write(paths.server_cert, server_pem, 0o644)
    _write(paths.server_key, _key_pem(server_key), 0o600)
    return TLSFiles(
        ca_cert=paths.ca_cert,
        ca_key=paths.ca_key,
        server_cert=paths.server_cert,
        server_key=paths.server_key,
        fingerprint=fingerprint_of(server_pem),
    )


def _subject_names(
    hostnames: Sequence[str], ips: Sequence[str]
) -> tuple[list[str], list[ipaddress.IPv4Address | ipaddress.IPv6Address]]:
    """Validate and de-duplicate the names a server certificate is for."""
    dns_names: list[str] = []
    addresses: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    for text in ips:
        try:
            address = ipaddress.ip_address(text.strip())
        except ValueError:
            raise TLSError(f"{text!r} is not an IP address") from None
        if address not in addresses:
            addresses.append(address)
    for text in hostnames:
        # service-identity matches an IP literal only against IP entries, never DNS ones.
        try:
            address = ipaddress.ip_address(text.strip())
        except ValueError:
            pass
        else:
            if address not in addresses:
                addresses.append(address)
            continue
        name = _dns_name(text)
        if name not in dns_names:
            dns_names.append(name)
    if not dns_names and not addresses:
        raise TLSError("give at least one --hostname or --ip for the certificate")
    return dns_names, addresses


def _dns_name(text: str) -> str:
    """The ASCII (IDNA) form of a host name, or TLSError if it cannot be one."""
    name = text.strip().rstrip(".").lower()
    try:
        name = name.encode("idna").decode("ascii")
    except UnicodeError:
        raise TLSError(f"{text!r} is not a valid host name") from None
    labels = name.split(".")
    if len(name) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise TLSError(f"{text!r} is not a valid host name")
    return name


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    # Unencrypted: the server has to read its key unattended at start-up.
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write(path: str, data: bytes, mode: int) -> None:
    """Write *path* whole, with *mode*, replacing any old file in one step."""
    # mkstemp creates the file 0600 whatever the umask, so a key is never readable by
    # others, not even briefly; os.replace means a reader never sees half a file.
    fd, temporary = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tls-")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


# -- server -----------------------------------------------------------------------------


def server_context_factory(cert_path: str, key_path: str) -> CertificateOptions:
    """TLS options for listening with the certificate (and chain) and key in PEM files."""
    cert_pem = _read(cert_path, "certificate")
    key_pem = _read(key_path, "private key")
    try:
        chain = x509.load_pem_x509_certificates(cert_pem)
    except ValueError:
        raise TLSError(f"{cert_path} does not hold a PEM certificate") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise TLSError(f"{key_path} is encrypted; sitesrv needs an unencrypted key") from None
    except (ValueError, UnsupportedAlgorithm):
        raise TLSError(f"{key_path} does not hold a PEM private key") from None
    if not isinstance(
        key,
        rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey,
    ):
        raise TLSError(f"{key_path} holds a key type TLS servers cannot use; use EC or RSA")
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    if chain[0].public_key().public_bytes(
        serialization.Encoding.DER, public
    ) != key.public_key().public_bytes(serialization.Encoding.DER, public):
        raise TLSError(f"the key in {key_path} does not belong to the certificate {cert_path}")
    # Twisted only hands these to pyOpenSSL's Context, which takes cryptography objects
    # directly and warns (DeprecationWarning) about its own PKey/X509 wrappers.
    options = CertificateOptions(
        privateKey=cast(Any, key),
        certificate=cast(Any, chain[0]),
        extraCertChain=cast(Any, chain[1:]),
        raiseMinimumTo=MINIMUM_TLS_VERSION,
    )
    try:
        # Build the (cached) context now, so a problem shows at start-up, not per client.
        options.getContext()
    except SSL.Error as e:
        raise TLSError(f"cannot use {cert_path} and {key_path} for TLS: {e}") from None
    return options


# -- client -----------------------------------------------------------------------------


def client_context_factory(
    hostname: str, ca_path: str | None = None, fingerprint: str | None = None
) -> IOpenSSLClientConnectionCreator:
    """TLS options for connecting to *hostname*, trusting a CA file or a pinned fingerprint.

    Exactly one of *ca_path* and *fingerprint* must be given.
    """
    if not hostname:
        raise TLSError("the primary's host name for TLS is empty")
    if (ca_path is None) == (fingerprint is None):
        raise TLSError("give exactly one of a CA certificate file and a certificate fingerprint")
    if fingerprint is not None:
        return PinnedCertificateOptions(hostname, normalise_fingerprint(fingerprint))
    assert ca_path is not None
    ca_pem = _read(ca_path, "CA certificate")
    try:
        ca_cert = x509.load_pem_x509_certificate(ca_pem)
        ca = Certificate.loadPEM(ca_pem)
    except (ValueError, crypto.Error):
        raise TLSError(f"{ca_path} does not hold a PEM CA certificate") from None
    # A server certificate given as the CA would fail every handshake with an obscure
    # "unable to get local issuer certificate"; say so now instead.
    try:
        is_ca = ca_cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise TLSError(f"{ca_path} is not a CA certificate (use the ca.crt from tls init)")
    # optionsForClientTLS checks the chain against only this CA, and the host name (DNS
    # name, or IP address for an IP literal) with service-identity.
    return optionsForClientTLS(
        hostname,
        trustRoot=ca,
        extraCertificateOptions={"raiseMinimumTo": MINIMUM_TLS_VERSION},
    )


_VerifyCallback = Callable[[SSL.Connection, crypto.X509, int, int, int], bool]


@implementer(IOpenSSLClientConnectionCreator)
class PinnedCertificateOptions:
    """Client TLS that accepts exactly the server certificate with a given SHA-256.

    The pin is the whole trust decision: the CA chain, host name and validity dates of
    that certificate are not checked, like an SSH host key.
    """

    def __init__(self, hostname: str, fingerprint: str) -> None:
        self._fingerprint = normalise_fingerprint(fingerprint)
        # Like Twisted's own client options: SNI for names, none for IP literals (RFC 6066).
        self._server_name: bytes | None = None
        if not (isIPAddress(hostname) or isIPv6Address(hostname)):
            try:
                self._server_name = hostname.encode("idna")
            except UnicodeError:
                raise TLSError(f"{hostname!r} is not a valid host name") from None
        self._options = CertificateOptions(raiseMinimumTo=MINIMUM_TLS_VERSION)

    def clientConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        """Make an OpenSSL connection that fails its handshake unless the pin matches."""
        connection = SSL.Connection(self._options.getContext(), None)
        if self._server_name is not None:
            connection.set_tlsext_host_name(self._server_name)
        connection.set_verify(
            SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT,
            self._verify_callback(tlsProtocol),
        )
        return connection

    def _verify_callback(self, tls_protocol: TLSMemoryBIOProtocol) -> _VerifyCallback:
        expected = self._fingerprint
        # Dropped once the leaf is judged (as Twisted's own callback does), so the
        # connection, this callback and the protocol do not keep each other alive.
        protocol: list[TLSMemoryBIOProtocol] = [tls_protocol]

        def verify(
            connection: SSL.Connection, cert: crypto.X509, errno: int, depth: int, ok: int
        ) -> bool:
            # OpenSSL calls this for every certificate in the chain and again for each
            # problem; the chain does not matter here, only the leaf (depth 0) does.
            if depth != 0:
                return True
            tls = protocol.pop() if protocol else None
            try:
                got = cert.to_cryptography().fingerprint(hashes.SHA256()).hex()
                if hmac.compare_digest(got, expected):
                    return True
                if tls is not None:
                    # This reason, not OpenSSL's generic one, reaches connectionLost.
                    tls.failVerification(
                        Failure(
                            CertificateFingerprintMismatch(
                                f"certificate fingerprint mismatch: expected {expected}, got {got}"
                            )
                        )
                    )
            except BaseException:
                # An exception escaping an OpenSSL callback is lost; log it and refuse.
                log.failure("while checking the pinned certificate fingerprint")
            return False

        return verify


def wrap_client_endpoint(
    endpoint_description: str,
    reactor: object,
    context_factory: IOpenSSLClientConnectionCreator,
) -> IStreamClientEndpoint:
    """An endpoint that runs TLS over a plain client endpoint such as ``tcp:host:9192``."""
    try:
        plain = clientFromString(reactor, endpoint_description)
    except (ValueError, KeyError, TypeError) as e:
        raise TLSError(f"bad endpoint {endpoint_description!r}: {e}") from None
    return wrapClientTLS(context_factory, plain)


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise TLSError(f"cannot read the TLS {what} {path}: {e.strerror}") from None
