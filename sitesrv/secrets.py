"""Verifiers for PINs and passwords, and random tokens and keys.

Passwords and PINs are stored only as scrypt verifiers
(``scrypt$N$r$p$salt$hash``, base64); tokens and API keys are 256-bit random values
stored as SHA-256 hashes (a fast hash is enough for a value with that much entropy).
Comparisons are constant-time. Callers run ``make_verifier`` and ``check_verifier`` off
the reactor thread: they cost tens of milliseconds on purpose.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

#: scrypt cost: N=2**14, r=8, p=1 uses 16 MiB and ~50 ms, OWASP's minimum for scrypt.
SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1
_MAX_SECRET = 1024


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def make_verifier(secret: str, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P) -> str:
    """Return a salted scrypt verifier for ``secret``."""
    if len(secret) > _MAX_SECRET:
        raise ValueError("secret too long")
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(
        secret.encode("utf-8"), salt=salt, n=n, r=r, p=p, maxmem=256 * 1024 * 1024, dklen=32
    )
    return f"scrypt${n}${r}${p}${_b64(salt)}${_b64(digest)}"


def check_verifier(secret: str, verifier: str) -> bool:
    """Whether ``secret`` matches ``verifier``; False for malformed verifiers."""
    try:
        scheme, n, r, p, salt, digest = verifier.split("$")
        if scheme != "scrypt" or len(secret) > _MAX_SECRET:
            return False
        expected = base64.b64decode(digest)
        actual = hashlib.scrypt(
            secret.encode("utf-8"),
            salt=base64.b64decode(salt),
            n=int(n),
            r=int(r),
            p=int(p),
            maxmem=256 * 1024 * 1024,
            dklen=len(expected),
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(actual, expected)


def _b64_bytes(text: str) -> bytes | None:
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        return None


def is_verifier(text: str) -> bool:
    """Whether ``text`` is a well-formed verifier as `make_verifier` writes them.

    Only the form is checked (scheme, cost parameters, base64 salt and hash), so a config
    file's pasted verifier can be refused when it is loaded, not at the first login.
    """
    parts = text.split("$")
    if len(parts) != 6 or parts[0] != "scrypt":
        return False
    if not all(p.isascii() and p.isdigit() for p in parts[1:4]):
        return False
    n, r, p = (int(x) for x in parts[1:4])
    # n a power of two above 1, as scrypt requires; r and p at least 1.
    if n < 2 or n & (n - 1) or r < 1 or p < 1:
        return False
    salt, digest = _b64_bytes(parts[4]), _b64_bytes(parts[5])
    return bool(salt) and bool(digest)


def new_token() -> str:
    """A new random token (enrolment tokens, provider and device API keys)."""
    return secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    """The stored form of a token."""
    return "sha256$" + hashlib.sha256(token.encode("utf-8")).hexdigest()


def token_matches(token: str, stored: str | None) -> bool:
    """Constant-time check of ``token`` against its stored hash."""
    if not stored:
        return False
    return hmac.compare_digest(hash_token(token), stored)
