"""What a print job costs, from a printer's prices; pure integer arithmetic.

A site prices a job itself and sends the amount to the primary, which never re-prices,
so this one function is the whole pricing rule.
"""

from __future__ import annotations

from typing import Any

import attrs


def _not_negative(_instance: object, attribute: attrs.Attribute[Any], value: int) -> None:
    if value < 0:
        raise ValueError(f"the {attribute.name} price must not be negative, not {value}")


def _percent(_instance: object, attribute: attrs.Attribute[Any], value: int) -> None:
    if not 0 <= value <= 100:
        raise ValueError(f"the duplex discount must be between 0 and 100 percent, not {value}")


@attrs.frozen
class Prices:
    """A printer's prices: minor units per page, and the percent taken off duplex jobs."""

    mono: int = attrs.field(validator=_not_negative)
    colour: int = attrs.field(validator=_not_negative)
    duplex_discount: int = attrs.field(default=0, validator=_percent)


def job_cost(
    prices: Prices, pages: int, copies: int = 1, colour: bool = False, duplex: bool = False
) -> int:
    """Cost in minor units: page price x pages x copies, less the duplex discount if duplex.

    The discount is taken off the job's total and rounded half up once, so 3 pages at 15
    with 10% off cost ``(45 * 90 + 50) // 100 = 41`` (40.5 rounded up).
    """
    # Prices validates itself, but it is a plain class that a caller could have bypassed
    # (object.__setattr__, or a future non-validating constructor); a negative charge
    # would credit the user, so check again here where it matters.
    _not_negative(prices, attrs.fields(Prices).mono, prices.mono)
    _not_negative(prices, attrs.fields(Prices).colour, prices.colour)
    _percent(prices, attrs.fields(Prices).duplex_discount, prices.duplex_discount)
    if pages < 0:
        raise ValueError(f"a job cannot have a negative number of pages ({pages})")
    if copies < 1:
        raise ValueError(f"a job needs at least one copy, not {copies}")
    base = (prices.colour if colour else prices.mono) * pages * copies
    if not duplex:
        return base
    return (base * (100 - prices.duplex_discount) + 50) // 100
