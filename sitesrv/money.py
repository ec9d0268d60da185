"""Amounts of money as integer minor units, and their text and float forms.

Money is never a float inside sitesrv: floats cannot hold 0.10 exactly, and a ledger must
add up to the cent. Floats appear only at the edge, for APIs that insist on them.
"""

from __future__ import annotations

import re
from decimal import ROUND_HALF_UP, Context, Decimal

#: Amounts whose absolute value exceeds this many minor units are refused: no print job
#: costs that much, so such a number is a typo or an attack, and refusing it keeps every
#: amount well inside a 64-bit column and exactly representable as a float.
MAX_MINOR = 10**15

MIN_DECIMALS = 0
MAX_DECIMALS = 4

# Plain decimal notation only: Decimal() itself would also take "1e3", "NaN", "Infinity",
# "1_000" and non-ASCII digits, none of which a person means when typing an amount.
_AMOUNT = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)")

# Enough precision for any float's shortest repr scaled by 10**MAX_DECIMALS, so the only
# rounding from_float does is the one it asks for.
_CONTEXT = Context(prec=60)

# Long input is cut in error messages so that one bad paste cannot flood a log or a page.
_SHOWN = 40


class AmountError(ValueError):
    """A text or number that is not an acceptable amount; the message is for the user."""


def _check_decimals(decimals: int) -> None:
    if not MIN_DECIMALS <= decimals <= MAX_DECIMALS:
        raise ValueError(
            f"decimals must be between {MIN_DECIMALS} and {MAX_DECIMALS}, not {decimals}"
        )


def _shown(text: str) -> str:
    if len(text) > _SHOWN:
        text = text[: _SHOWN - 3] + "..."
    return repr(text)


def _too_large(shown: str, decimals: int) -> AmountError:
    return AmountError(f"{shown} is too large (the limit is {format_amount(MAX_MINOR, decimals)})")


def parse_amount(text: str, decimals: int = 2) -> int:
    """Parse a typed amount such as ``"1.50"`` or ``"-3"`` into minor units.

    Raises `AmountError` for anything else, including more decimal places than allowed.
    """
    _check_decimals(decimals)
    stripped = text.strip()
    shown = _shown(stripped)
    if not stripped:
        raise AmountError("an amount is required")
    if not _AMOUNT.fullmatch(stripped):
        raise AmountError(f"{shown} is not an amount")
    # Precision to hold every digit typed, so that scaling is exact, however long the text.
    exact = Context(prec=len(stripped) + MAX_DECIMALS)
    scaled = Decimal(stripped).scaleb(decimals, exact)
    # Trailing zeros ("1.500") are fine: only places that carry a value are refused.
    if scaled != scaled.to_integral_value(context=exact):
        if decimals == 0:
            raise AmountError(f"{shown} must be a whole amount")
        places = "place" if decimals == 1 else "places"
        raise AmountError(f"{shown} has more than {decimals} decimal {places}")
    # Compared as a Decimal: int() of thousands of digits would raise ValueError.
    if abs(scaled) > MAX_MINOR:
        raise _too_large(shown, decimals)
    return int(scaled)


def format_amount(minor: int, decimals: int = 2) -> str:
    """Format minor units as plain decimal text: ``150 -> "1.50"``, ``-5 -> "-0.05"``."""
    _check_decimals(decimals)
    sign = "-" if minor < 0 else ""
    if decimals == 0:
        return f"{sign}{abs(minor)}"
    whole, fraction = divmod(abs(minor), 10**decimals)
    return f"{sign}{whole}.{fraction:0{decimals}d}"


def from_float(value: float, decimals: int = 2) -> int:
    """Convert a float amount from an external API to minor units, half away from zero.

    The float goes through its shortest text form first, so 1.005 (stored in binary as
    1.00499...) becomes 101, as the person who typed 1.005 expects.
    """
    _check_decimals(decimals)
    shown = _shown(repr(value))
    exact = Decimal(repr(value))
    if not exact.is_finite():
        raise AmountError(f"{shown} is not an amount")
    scaled = exact.scaleb(decimals, _CONTEXT).to_integral_value(ROUND_HALF_UP, _CONTEXT)
    if abs(scaled) > MAX_MINOR:
        raise _too_large(shown, decimals)
    return int(scaled)


def to_float(minor: int, decimals: int = 2) -> float:
    """Convert minor units to the nearest float, for external APIs that want floats."""
    _check_decimals(decimals)
    # int / int is correctly rounded in Python, unlike minor * 0.01.
    return minor / 10**decimals
