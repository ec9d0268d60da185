"""The authentication core: card, card + PIN, and username + password.

Lookups run on the store's reader threads and verifier checks (scrypt) on a separate CPU
thread pool, never on the reactor thread. Disabled users are refused. Repeated failures
for one user or from one device are slowed down by ``FailureThrottle``, whose clock is
injected so tests drive it with ``task.Clock``.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, TypeVar

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from sitesrv.cardnumber import CardNormaliser, CardNumberError
from sitesrv.secrets import check_verifier
from sitesrv.store.users import Credentials, User, thdCredentialsByCard, thdCredentialsByUsername

T = TypeVar("T")

log = Logger()

#: Longest card number, username, PIN or password accepted from any front-end.
MAX_INPUT = 1024


class AuthFailed(Exception):
    """Authentication was refused; ``reason`` is safe to show to the user."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@attrs.frozen
class Identity:
    """A successfully authenticated user and how they proved it."""

    user: User
    method: str  # "card" | "card+pin" | "password"


@attrs.define
class _Failures:
    count: int = 0
    blocked_until: float = 0.0
    last: float = 0.0


@attrs.define
class FailureThrottle:
    """Back-off after repeated failures, per key (a user or a device).

    The first ``free`` failures cost nothing; each further one blocks the key for
    ``base`` seconds, doubling up to ``cap``. A success clears the key. Keys that have
    been quiet for ``cap`` seconds are forgotten, and at most ``max_keys`` are kept, so
    a flood of made-up usernames cannot grow memory without bound.
    """

    clock: IReactorTime
    free: int = 3
    base: float = 1.0
    cap: float = 60.0
    max_keys: int = 100_000
    _keys: OrderedDict[str, _Failures] = attrs.field(factory=OrderedDict)

    def wait(self, key: str) -> float:
        """Seconds until ``key`` may try again (0 when it may try now)."""
        entry = self._keys.get(key)
        if entry is None:
            return 0.0
        now = self.clock.seconds()
        if now - entry.last > self.cap and now >= entry.blocked_until:
            del self._keys[key]
            return 0.0
        return max(0.0, entry.blocked_until - now)

    def failed(self, key: str) -> None:
        """Count a failure for ``key``."""
        now = self.clock.seconds()
        entry = self._keys.pop(key, None) or _Failures()
        entry.count += 1
        entry.last = now
        if entry.count > self.free:
            entry.blocked_until = now + min(
                self.cap, self.base * 2 ** (entry.count - self.free - 1)
            )
        self._keys[key] = entry
        while len(self._keys) > self.max_keys:
            self._keys.popitem(last=False)

    def succeeded(self, key: str) -> None:
        """Forget the failures of ``key``."""
        self._keys.pop(key, None)


def _check(value: str, what: str) -> None:
    if not value or len(value) > MAX_INPUT:
        raise AuthFailed(f"{what} missing or too long")


@attrs.define
class Authenticator:
    """Checks credentials against the store.

    ``read`` runs a ``thd`` function in a read transaction (``Store.runRead``);
    ``verify`` runs a CPU-heavy function off the reactor thread (in the server:
    the CPU thread pool). Tests pass synchronous versions of both.
    """

    read: Callable[..., Deferred[Any]]
    throttle: FailureThrottle
    verify: Callable[..., Deferred[Any]]
    normaliser: CardNormaliser = attrs.field(factory=CardNormaliser)
    #: At a site: asks the primary to check a password the replica has no verifier for;
    #: fires True/False (False also when the primary cannot be reached).
    remote_password: Callable[[str, str], Deferred[bool]] | None = None

    def _throttled(self, *keys: str) -> None:
        waits = [self.throttle.wait(k) for k in keys]
        longest = max(waits, default=0.0)
        if longest > 0:
            raise AuthFailed(f"too many failed attempts; try again in {math.ceil(longest)} s")

    def _refuse(self, reason: str, method: str, *keys: str) -> AuthFailed:
        for key in keys:
            self.throttle.failed(key)
        log.info("authentication refused ({method}): {reason}", method=method, reason=reason)
        return AuthFailed(reason)

    def _accept(self, user: User, method: str, *keys: str) -> Identity:
        for key in keys:
            self.throttle.succeeded(key)
        return Identity(user, method)

    async def card(self, number: str, device: str = "", pin: str | None = None) -> Identity:
        """Authenticate by card number (and PIN when given)."""
        method = "card" if pin is None else "card+pin"
        device_key = f"device:{device}"
        self._throttled(device_key)
        _check(number, "card number")
        try:
            normalised = self.normaliser.normalise(number)
        except CardNumberError as e:
            raise self._refuse(f"unreadable card: {e}", method, device_key) from None
        creds = await self.read(thdCredentialsByCard, normalised)
        if creds is None:
            raise self._refuse("unknown card", method, device_key)
        if pin is None:
            # Nothing secret to guess per user: only the device is throttled.
            keys: tuple[str, ...] = (device_key,)
        else:
            # Per user and per method, so wrong passwords typed at a web page cannot
            # lock someone out of the card readers.
            keys = (device_key, f"pin:{creds.user.username}")
        self._throttled(*keys)
        if creds.user.disabled:
            raise self._refuse("user disabled", method, device_key)
        if pin is not None:
            await self._verify(creds.pin_verifier, pin, "wrong PIN", method, *keys)
        return self._accept(creds.user, method, *keys)

    async def password(self, username: str, password: str, device: str = "") -> Identity:
        """Authenticate by username and password."""
        method = "password"
        device_key = f"device:{device}"
        _check(username, "username")
        _check(password, "password")
        user_key = f"password:{username}"
        self._throttled(device_key, user_key)
        creds: Credentials | None = await self.read(thdCredentialsByUsername, username)
        # The same message for an unknown user and a wrong password: no user enumeration.
        if creds is None:
            raise self._refuse("wrong username or password", method, device_key, user_key)
        if creds.password_verifier is None and self.remote_password is not None:
            # This replica holds no verifiers (the site's policy refuses password login
            # offline); while connected, the primary checks the password for us.
            _check(password, "password")
            if not await self.remote_password(username, password):
                raise self._refuse("wrong username or password", method, device_key, user_key)
        else:
            await self._verify(
                creds.password_verifier,
                password,
                "wrong username or password",
                method,
                device_key,
                user_key,
            )
        if creds.user.disabled:
            raise self._refuse("user disabled", method, device_key)
        return self._accept(creds.user, method, device_key, user_key)

    async def _verify(
        self, verifier: str | None, secret: str, reason: str, method: str, *keys: str
    ) -> None:
        _check(secret, "PIN" if method == "card+pin" else "password")
        if verifier is None:
            raise self._refuse("no PIN set" if method == "card+pin" else reason, method, *keys)
        ok = await self.verify(check_verifier, secret, verifier)
        if not ok:
            raise self._refuse(reason, method, *keys)


def run_inline(fn: Callable[..., T], *args: Any) -> Deferred[T]:
    """Run ``fn`` now on this thread (for tests and the CLI)."""
    return succeed(fn(*args))
