"""The core API one device's connector gets (``IDeviceCore``), over the gate and Find-Me.

A connector plugin never sees the store or the gate: the connector manager gives each
device a `DeviceCore`, which authenticates through the gate (so offline policies apply
and failures are throttled per device), lists, releases and cancels held jobs through
the Find-Me queue (``IFindMe``) to the device's printer, and prices copy/scan/fax usage
with ``costing.job_cost`` at the device's printer's prices before charging it through
the gate. Its only store access is reading (printer prices, the currency's decimals).

Refusals reach the connector as one exception, `DeviceRefused`, with a sentence it may
show on the device; anything else that fails is a bug and propagates as it is.
"""

from __future__ import annotations

import uuid as uuidlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol, TypeVar

import attrs
from twisted.internet.defer import Deferred
from zope.interface import implementer

from sitesrv.core.auth import AuthFailed, Identity
from sitesrv.core.gate import Gate, JobInfo, Refused
from sitesrv.costing import job_cost
from sitesrv.errors import InsufficientFunds, SitesrvError
from sitesrv.interfaces import IDeviceCore, IFindMe
from sitesrv.money import format_amount
from sitesrv.store.devices import Device
from sitesrv.store.policies import thdDecimals
from sitesrv.store.printers import Printer, thdPrinter

T = TypeVar("T")

#: The kinds of usage a device records.
USAGE_KINDS = ("copy", "scan", "fax")
#: Largest page count or copy count in one usage record.
MAX_PAGES = 100_000

#: `DeviceRefused.kind` values.
AUTH = "auth"
POLICY = "policy"
FUNDS = "funds"
UNAVAILABLE = "unavailable"
INVALID = "invalid"


class DeviceRefused(SitesrvError):
    """The core refused a device's request; ``reason`` is safe to show on the device.

    ``kind`` says why: "auth" (login failed), "policy" (an offline policy refuses it),
    "funds" (balance or offline allowance), "unavailable" (the site is unsynced or
    revoked), "invalid" (a bad request, or the device has no printer).
    """

    def __init__(self, reason: str, kind: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind = kind


class InvalidOptions(SitesrvError):
    """A device record's options are wrong for its connector (a sentence for the admin)."""


@attrs.frozen
class Amount:
    """An amount of money: integer minor units, and as the currency writes it."""

    minor: int
    text: str


@attrs.frozen
class UsageResult:
    """A recorded copy, scan or fax: what it cost and what the user has left."""

    uuid: str
    cost: Amount
    balance: Amount
    #: The account charged (the personal account, or the Offline Account by policy).
    account: str
    #: Whether offline policies governed the charge.
    offline: bool
    #: False when this uuid had been recorded before (charged once).
    recorded: bool


class HeldJobView(Protocol):
    """What ``IDeviceCore.heldJobs`` promises about each held job."""

    @property
    def uuid(self) -> str: ...
    @property
    def document(self) -> str: ...
    @property
    def pages(self) -> int: ...
    @property
    def copies(self) -> int: ...
    @property
    def colour(self) -> bool: ...
    @property
    def duplex(self) -> bool: ...
    @property
    def cost(self) -> int: ...


class ReleaseView(Protocol):
    """What ``IDeviceCore.release`` promises about each job it was asked to release."""

    @property
    def job(self) -> str: ...
    @property
    def released(self) -> bool: ...
    @property
    def reason(self) -> str: ...
    @property
    def cost(self) -> int: ...


@implementer(IDeviceCore)
class DeviceCore:
    """``IDeviceCore`` for one device, over the gate, the Find-Me queue and the costing.

    ``read`` runs ``thd`` functions in a read transaction (``Store.runRead``).
    ``changed`` is called (with this core) whenever the connection count or the
    reported problem changes, so the manager can update ``/health`` and the metrics.
    """

    def __init__(
        self,
        device: Device,
        gate: Gate,
        findme: IFindMe,
        read: Callable[..., Deferred[Any]],
        reactor: Any,
        changed: Callable[[DeviceCore], None] = lambda core: None,
    ) -> None:
        self.device = device
        self.gate = gate
        self.findme = findme
        self.read = read
        self.reactor = reactor
        self.changed = changed
        #: Connections the connector reports open now.
        self.connections = 0
        #: What the connector reports wrong with the device now, or None.
        self.problem: str | None = None

    # -- plumbing -----------------------------------------------------------------------

    def _serving(self) -> bool:
        failover = self.gate.failover
        return failover is None or failover.serving()

    def _call(self, work: Callable[[], Awaitable[T]]) -> Deferred[T]:
        """Run ``work`` and turn every refusal into `DeviceRefused`."""

        async def run() -> T:
            try:
                return await work()
            except AuthFailed as e:
                raise DeviceRefused(e.reason, AUTH) from None
            except InsufficientFunds as e:
                raise DeviceRefused(str(e), FUNDS) from None
            except Refused as e:
                raise DeviceRefused(str(e), POLICY if self._serving() else UNAVAILABLE) from None
            except DeviceRefused:
                raise
            except SitesrvError as e:
                raise DeviceRefused(str(e), INVALID) from None

        return Deferred.fromCoroutine(run())

    def _printer(self) -> str:
        if self.device.printer is None:
            raise DeviceRefused(
                f"device {self.device.name!r} has no printer (set one at the primary)", INVALID
            )
        return self.device.printer

    async def _amount(self, minor: int) -> Amount:
        decimals = await self.read(thdDecimals)
        return Amount(minor, format_amount(minor, decimals))

    # -- IDeviceCore ------------------------------------------------------------------

    def authenticateCard(self, number: str, pin: str | None = None) -> Deferred[Identity]:
        """Authenticate by card (and PIN) at this device."""
        return self._call(lambda: self.gate.card(number, self.device.name, pin))

    def authenticatePassword(self, username: str, password: str) -> Deferred[Identity]:
        """Authenticate by username and password at this device."""
        return self._call(lambda: self.gate.password(username, password, self.device.name))

    def heldJobs(self, identity: Identity) -> Deferred[list[HeldJobView]]:
        """The user's held jobs, oldest first."""

        async def held() -> list[HeldJobView]:
            return list(await self.findme.held(identity))

        return self._call(held)

    def release(
        self, identity: Identity, job_uuids: Sequence[str] | None = None
    ) -> Deferred[list[ReleaseView]]:
        """Release the user's held jobs (all, or those named) to the device's printer."""

        async def release() -> list[ReleaseView]:
            printer = self._printer()
            if job_uuids is None:
                # Most swipes find nothing held: answer those from a read, without a
                # write transaction (and its fsync) on the store's single writer. The
                # policy is checked first, so a refusal reads the same either way.
                await self.gate.may_release()
                if not await self.findme.held(identity):
                    return []
            names = None if job_uuids is None else list(job_uuids)
            return list(await self.findme.release(identity, printer, names))

        return self._call(release)

    def cancel(self, identity: Identity, job_uuids: Sequence[str] | None = None) -> Deferred[int]:
        """Cancel the user's held jobs (all, or those named); how many were."""

        async def cancel() -> int:
            names = None if job_uuids is None else list(job_uuids)
            return int(await self.findme.cancel(identity, names))

        return self._call(cancel)

    def recordUsage(
        self,
        identity: Identity,
        kind: str,
        pages: int,
        copies: int = 1,
        colour: bool = False,
        duplex: bool = False,
        uuid: str | None = None,
    ) -> Deferred[UsageResult]:
        """Price copy/scan/fax usage at the device's printer and charge it once."""

        async def record() -> UsageResult:
            if kind not in USAGE_KINDS:
                raise DeviceRefused(f"usage kind must be one of {', '.join(USAGE_KINDS)}", INVALID)
            for what, value, least in (("pages", pages, 0), ("copies", copies, 1)):
                if isinstance(value, bool) or not isinstance(value, int):
                    raise DeviceRefused(f"{what} must be a whole number", INVALID)
                if not least <= value <= MAX_PAGES:
                    raise DeviceRefused(f"{what} must be {least}-{MAX_PAGES}", INVALID)
            try:
                txn = str(uuidlib.UUID(uuid) if uuid else uuidlib.uuid4())
            except ValueError:
                raise DeviceRefused("the usage uuid must be a UUID", INVALID) from None
            printer: Printer = await self.read(thdPrinter, self._printer())
            cost = job_cost(printer.prices, pages, copies, colour, duplex)
            job = JobInfo(
                kind=kind,
                printer_id=printer.id,
                printer_name=printer.name,
                pages=pages,
                copies=copies,
                colour=colour,
                duplex=duplex,
                document=f"{kind} at {self.device.name}",
                status="done",
                uuid=txn,
            )
            result = await self.gate.charge(identity, cost, kind, job, txn)
            return UsageResult(
                uuid=result.txn_uuid,
                cost=await self._amount(-result.amount),
                balance=await self._amount(result.balance),
                account=result.account_name,
                offline=result.offline,
                recorded=result.recorded,
            )

        return self._call(record)

    def balance(self, identity: Identity) -> Deferred[Amount]:
        """The user's balance as this server sees it."""

        async def balance() -> Amount:
            return await self._amount(await self.gate.balance(identity))

        return self._call(balance)

    def offline(self) -> bool:
        """Whether offline policies govern credit now."""
        return self.gate.offline()

    def setConnections(self, count: int) -> None:
        """Record how many connections the connector has open."""
        count = max(0, int(count))
        if count != self.connections:
            self.connections = count
            self.changed(self)

    def reportProblem(self, problem: str | None) -> None:
        """Record what is wrong with the device now (None: nothing)."""
        if problem != self.problem:
            self.problem = problem
            self.changed(self)
