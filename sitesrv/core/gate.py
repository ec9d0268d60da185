"""The gate: what a request may do now, and charging under the credit rules.

Front-ends (providers, device connectors, the web) call the gate for every
authentication, release and charge; nothing else looks at connection state. At a site
the gate consults the failover machine and the replicated offline policies; at the
primary (which never goes offline from itself) normal rules always apply.

Charging at a site writes the charge (and its job log) to the outbox in one transaction,
before the caller is answered; at the primary it goes straight to the ledger. Either way
the amount is computed here and never re-priced later.
"""

from __future__ import annotations

import uuid as uuidlib
from collections.abc import Callable
from typing import Any

import attrs
from sqlalchemy import Connection
from twisted.internet.defer import Deferred

from sitesrv.core.auth import Authenticator, AuthFailed, Identity
from sitesrv.errors import InsufficientFunds, SitesrvError
from sitesrv.failover import Failover
from sitesrv.money import format_amount
from sitesrv.store import jobs, ledger, outbox
from sitesrv.store.policies import thdDecimals, thdEffectivePolicies
from sitesrv.store.users import User, thdUserById


class Refused(SitesrvError):
    """The request is not allowed in the current mode or by policy."""


@attrs.frozen
class JobInfo:
    """What was printed, copied, scanned or faxed, for the job log."""

    kind: str
    printer_id: int | None
    printer_name: str
    pages: int
    copies: int = 1
    colour: bool = False
    duplex: bool = False
    document: str = ""
    status: str = "printed"
    uuid: str = attrs.field(factory=lambda: str(uuidlib.uuid4()))


@attrs.frozen
class ChargeResult:
    """A recorded charge and the balance the user now has (as this server sees it)."""

    txn_uuid: str
    account_id: int
    account_name: str
    amount: int
    balance: int
    offline: bool
    #: False when the same transaction UUID had already been recorded.
    recorded: bool = True


def account_user(account: ledger.Account, label: str) -> User:
    """A stand-in user whose charges a shared account pays (no personal account).

    Used when an unknown card is accepted offline (the Offline Account pays) and for a
    printed job whose owner cannot pay (the Suspense account does).
    """
    return User(
        id=0,
        username=label,
        full_name="",
        email="",
        disabled=False,
        has_pin=False,
        account_id=account.id,
        balance=account.balance,
        restricted=account.restricted,
        credit_limit=account.credit_limit,
    )


def thdCharge(
    conn: Connection,
    *,
    role: str,
    site: str,
    user: User,
    amount: int,
    reason: str,
    job: JobInfo | None,
    offline: bool,
    now: float,
    txn_uuid: str,
) -> ChargeResult:
    """Charge ``amount`` (negative) for ``user`` by the rules in force; one transaction.

    A charge resent with a ``txn_uuid`` already recorded is answered as it was recorded
    (``recorded`` False), without checking the balance it already took.
    """
    previous = _thdPrevious(conn, role, txn_uuid)
    if previous is not None:
        return previous
    decimals = thdDecimals(conn)
    policies = {k: v for k, (v, _src) in thdEffectivePolicies(conn, site).items()}
    if user.id:
        current = thdUserById(conn, user.id)
        if current is None:
            raise Refused(f"user {user.username!r} no longer exists")
        user = current
    account = ledger.thdAccountById(conn, user.account_id)
    if account is None:
        raise Refused(f"no account for {user.username!r}")
    if offline and user.id:
        choice = policies["offline.account"]
        if choice == "refuse":
            raise Refused("charging is not available while the site is offline")
        if choice == "offline-account":
            account = ledger.thdAccount(conn, ledger.OFFLINE_ACCOUNT)
    pending = outbox.thdPendingAmount(conn, account.id) if role == "site" else 0
    view = account.balance + pending
    if amount < 0 and account.restricted:
        if offline:
            allowance = policies["offline.allowance"]
            floor = None if allowance == "unlimited" else -int(allowance)
            what = "offline allowance"
        else:
            floor = -account.credit_limit
            what = "balance"
        if floor is not None and view + amount < floor:
            available = max(view - floor, 0)
            raise InsufficientFunds(
                f"insufficient {what}: {format_amount(available, decimals)} available, "
                f"{reason} costs {format_amount(-amount, decimals)}"
            )
    if role == "primary":
        if job is not None:
            _thdLogJob(conn, site, user, account, job, -amount, now)
        txn = ledger.thdPost(
            conn,
            account.id,
            amount,
            reason,
            now,
            site=site,
            job_uuid=None if job is None else job.uuid,
            txn_uuid=txn_uuid,
            # Checked again under the account's row lock: a concurrent charge for the
            # same user (PostgreSQL runs several writers) may have committed since.
            enforce_limit=True,
            decimals=decimals,
        )
        return ChargeResult(
            txn.uuid, account.id, account.name, amount, txn.balance_after, False, txn.applied
        )
    outbox.thdRecord(
        conn,
        {
            "uuid": txn_uuid,
            "kind": "charge",
            "site_time": now,
            "user_id": user.id or None,
            "username": user.username,
            "account_id": account.id,
            "account_name": account.name,
            "amount": amount,
            "reason": reason,
            "comment": "",
            "offline": offline,
            "job": None if job is None else attrs.asdict(job),
        },
        now,
    )
    return ChargeResult(txn_uuid, account.id, account.name, amount, view + amount, offline)


def _thdPrevious(conn: Connection, role: str, txn_uuid: str) -> ChargeResult | None:
    """The charge already recorded under ``txn_uuid`` (a resend), or None."""
    if role == "primary":
        txn = ledger.thdTransactionByUUID(conn, txn_uuid)
        if txn is None:
            return None
        account = ledger.thdAccountById(conn, txn.account_id)
        current = txn.balance_after if account is None else account.balance
        return ChargeResult(
            txn.uuid, txn.account_id, txn.account_name, txn.amount, current, False, False
        )
    record = outbox.thdRecordByUUID(conn, txn_uuid)
    if record is None:
        return None
    payload = record.payload
    account_id = payload["account_id"]
    return ChargeResult(
        txn_uuid,
        account_id,
        payload["account_name"],
        payload["amount"],
        thdViewBalance(conn, role, account_id),
        payload["offline"],
        False,
    )


def _thdLogJob(
    conn: Connection,
    site: str,
    user: User,
    account: ledger.Account,
    job: JobInfo,
    cost: int,
    now: float,
) -> None:
    jobs.thdLogJob(
        conn,
        now,
        uuid=job.uuid,
        kind=job.kind,
        user_id=user.id or None,
        username=user.username,
        account_id=account.id,
        printer_id=job.printer_id,
        printer_name=job.printer_name,
        site=site,
        document=job.document[:500],
        pages=job.pages,
        copies=job.copies,
        colour=job.colour,
        duplex=job.duplex,
        cost=cost,
        status=job.status,
    )


@attrs.define
class Gate:
    """Decides and records, for one server (primary or site)."""

    role: str
    site: str
    authenticator: Authenticator
    read: Callable[..., Deferred[Any]]
    write: Callable[..., Deferred[Any]]
    clock: Any
    failover: Failover | None = None
    #: Called after a charge was recorded at a site (to drain the outbox at once).
    recorded: Callable[[], None] = lambda: None

    def check(self) -> None:
        """Refuse everything when the site is unsynced or revoked."""
        if self.failover is not None:
            refusal = self.failover.refusal()
            if refusal is not None:
                raise Refused(refusal)

    def offline(self) -> bool:
        """Whether offline policies govern credit now (offline and reconciling)."""
        return self.failover is not None and self.failover.offline_credit()

    def disconnected(self) -> bool:
        """Whether the primary is unreachable: offline policies govern logins and release.

        While reconciling the link is up, so logins and releases follow the normal rules;
        only credit waits for the outbox to drain.
        """
        return self.failover is not None and self.failover.mode == "offline"

    async def _policy(self, key: str) -> str:
        policies = await self.read(thdEffectivePolicies, self.site)
        return str(policies[key][0])

    async def card(self, number: str, device: str = "", pin: str | None = None) -> Identity:
        """Authenticate by card (and PIN); offline, unknown cards follow the policy."""
        self.check()
        try:
            return await self.authenticator.card(number, device, pin)
        except AuthFailed as e:
            if e.reason != "unknown card" or not self.disconnected():
                raise
            if await self._policy("offline.unknown_card") != "offline-account":
                raise
            account = await self.read(ledger.thdAccount, ledger.OFFLINE_ACCOUNT)
            return Identity(account_user(account, f"card:{number[:40]}"), "card")

    async def password(self, username: str, password: str, device: str = "") -> Identity:
        """Authenticate by username and password; offline only if the policy allows."""
        self.check()
        if self.disconnected() and await self._policy("offline.password_login") == "refuse":
            raise AuthFailed("password login is not available while the site is offline")
        return await self.authenticator.password(username, password, device)

    async def may_release(self) -> None:
        """Refuse a Find-Me release when offline and the policy says so."""
        self.check()
        if self.disconnected() and await self._policy("offline.release") == "refuse":
            raise Refused("release is not available while the site is offline")

    async def charge(
        self,
        identity: Identity,
        amount: int,
        reason: str,
        job: JobInfo | None = None,
        txn_uuid: str | None = None,
    ) -> ChargeResult:
        """Charge ``amount`` minor units (positive number = cost) to the user."""
        self.check()
        if amount < 0:
            raise ValueError("give the cost as a positive amount")
        result: ChargeResult = await self.write(
            thdCharge,
            role=self.role,
            site=self.site,
            user=identity.user,
            amount=-amount,
            reason=reason,
            job=job,
            offline=self.offline(),
            now=self.clock.seconds(),
            txn_uuid=txn_uuid or str(uuidlib.uuid4()),
        )
        if self.role == "site":
            self.recorded()
        return result

    async def balance(self, identity: Identity) -> int:
        """The user's balance as this server sees it (net of unapplied site charges)."""
        return int(await self.read(thdViewBalance, self.role, identity.user.account_id))


def thdViewBalance(conn: Connection, role: str, account_id: int) -> int:
    """An account's balance as this server sees it."""
    account = ledger.thdAccountById(conn, account_id)
    if account is None:
        raise Refused("no such account")
    pending = outbox.thdPendingAmount(conn, account_id) if role == "site" else 0
    return account.balance + pending
