"""Errors the core raises for callers to show to people: one clear sentence each."""

from __future__ import annotations


class SitesrvError(Exception):
    """Base class: ``str(error)`` is a complete, user-facing sentence."""


class NotFound(SitesrvError):
    """A named thing (user, card, printer, ...) does not exist."""


class AlreadyExists(SitesrvError):
    """A thing with that name or number already exists."""


class Invalid(SitesrvError):
    """A value is not acceptable (bad amount, unknown policy key, ...)."""


class InsufficientFunds(SitesrvError):
    """A charge would take a restricted account below its credit limit."""


class ReadOnly(SitesrvError):
    """A write was attempted on a site, whose data is a replica of the primary's."""

    def __init__(self) -> None:
        super().__init__("make changes on the primary")
