"""Settings and offline policies (global, with per-site overrides).

Policies decide what a site may do while it cannot reach the primary; they are set at
the primary and replicated. Values are validated here so a bad value never replicates.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from sqlalchemy import Connection, bindparam, select

from sitesrv.errors import Invalid, NotFound
from sitesrv.money import AmountError, parse_amount
from sitesrv.store.changelog import thdDelete, thdInsert, thdUpdate
from sitesrv.store.schema import policies, settings, sites

# -- settings -------------------------------------------------------------------------

SETTING_DEFAULTS: Mapping[str, str] = {"currency": "USD", "decimals": "2"}


# Every charge and print-provider decision reads these, so they are built once: building
# a statement and its cache key costs more than SQLite takes to run it.
_SETTING = select(settings.c.value).where(settings.c.key == bindparam("key"))
_POLICIES_OF_SITE = select(policies.c.site, policies.c.key, policies.c.value).where(
    policies.c.site.in_(["", bindparam("site", type_=policies.c.site.type)])
)


def thdSetting(conn: Connection, key: str) -> str:
    """A setting's value, or its default."""
    value = conn.execute(_SETTING, {"key": key}).scalar()
    return SETTING_DEFAULTS[key] if value is None else value


def thdDecimals(conn: Connection) -> int:
    """The number of decimals of the currency."""
    return int(thdSetting(conn, "decimals"))


def thdSetSetting(conn: Connection, key: str, value: str, now: float) -> None:
    """Set a setting (replicated)."""
    if key not in SETTING_DEFAULTS:
        raise Invalid(f"unknown setting {key!r} (known: {', '.join(sorted(SETTING_DEFAULTS))})")
    row_id = conn.execute(select(settings.c.id).where(settings.c.key == key)).scalar()
    if row_id is None:
        thdInsert(conn, settings, {"key": key, "value": value}, now)
    elif thdSetting(conn, key) != value:
        thdUpdate(conn, settings, row_id, {"value": value}, now)


# -- policies -------------------------------------------------------------------------


def _choice(*allowed: str) -> Callable[[str, int], str]:
    def check(value: str, _decimals: int) -> str:
        if value not in allowed:
            raise Invalid(f"expected one of {', '.join(allowed)}, got {value!r}")
        return value

    return check


def _allowance(value: str, decimals: int) -> str:
    if value == "unlimited":
        return value
    try:
        amount = parse_amount(value, decimals)
    except AmountError as e:
        raise Invalid(f"expected an amount or 'unlimited': {e}") from None
    if amount < 0:
        raise Invalid("the allowance is how far below zero a balance may go; give it as >= 0")
    return str(amount)


#: Policy key -> (validator, default). Allowance values are stored in minor units.
POLICIES: Mapping[str, tuple[Callable[[str, int], str], str]] = {
    "offline.account": (_choice("personal", "offline-account", "refuse"), "personal"),
    "offline.allowance": (_allowance, "0"),
    "offline.unknown_card": (_choice("refuse", "offline-account"), "refuse"),
    "offline.password_login": (_choice("allow", "refuse"), "allow"),
    "offline.release": (_choice("allow", "refuse"), "allow"),
}


def thdSetPolicy(conn: Connection, key: str, value: str, now: float, site: str = "") -> str:
    """Set a policy globally (site "") or for one site; return the stored value."""
    if key not in POLICIES:
        raise Invalid(f"unknown policy {key!r} (known: {', '.join(sorted(POLICIES))})")
    if site and conn.execute(select(sites.c.id).where(sites.c.name == site)).first() is None:
        raise NotFound(f"no site named {site!r}")
    check, _default = POLICIES[key]
    try:
        stored = check(value.strip(), thdDecimals(conn))
    except Invalid as e:
        raise Invalid(f"policy {key}: {e}") from None
    row_id = conn.execute(
        select(policies.c.id).where(policies.c.site == site, policies.c.key == key)
    ).scalar()
    if row_id is None:
        thdInsert(conn, policies, {"site": site, "key": key, "value": stored}, now)
    else:
        thdUpdate(conn, policies, row_id, {"value": stored}, now)
    return stored


def thdClearPolicy(conn: Connection, key: str, site: str, now: float) -> bool:
    """Remove a site's override (or reset a global policy to its default)."""
    row_id = conn.execute(
        select(policies.c.id).where(policies.c.site == site, policies.c.key == key)
    ).scalar()
    if row_id is None:
        return False
    thdDelete(conn, policies, row_id, now)
    return True


def thdEffectivePolicies(conn: Connection, site: str = "") -> dict[str, tuple[str, str]]:
    """Each policy's effective value for ``site`` and where it comes from.

    Returns ``{key: (value, source)}`` with source "site", "global" or "default".
    """
    result = {key: (default, "default") for key, (_check, default) in POLICIES.items()}
    rows = conn.execute(_POLICIES_OF_SITE, {"site": site}).all()
    for row in sorted(rows, key=lambda r: r.site != ""):  # global first, then the site
        if row.key in result:
            result[row.key] = (row.value, "site" if row.site else "global")
    return result
