"""The replication protocol's wire commands (AMP over TLS, port 9192).

Documented in ``docs/protocols/replication.rst``. The site opens the connection and
starts with ``Hello``; until it succeeds the primary answers nothing else. Batches of
rows travel as one ``String`` value holding JSON, zlib-compressed from protocol version
2 on; every value stays below AMP's 64 KiB limit (see ``codec.py``).
"""

from __future__ import annotations

from typing import ClassVar

from twisted.protocols import amp


class VersionRefused(Exception):
    """The peer speaks a protocol version this side does not accept."""


class UnknownSite(Exception):
    """No enrolled site has this name."""


class BadToken(Exception):
    """The enrolment token does not match the site's."""


class SiteRevoked(Exception):
    """The site has been revoked by the primary."""


class NotAuthenticated(Exception):
    """A command arrived before a successful Hello."""


class ProtocolViolation(Exception):
    """The peer sent something it must not (bad batch, unknown snapshot, ...)."""


HELLO_ERRORS: dict[type[Exception], bytes] = {
    VersionRefused: b"VERSION_REFUSED",
    UnknownSite: b"UNKNOWN_SITE",
    BadToken: b"BAD_TOKEN",
    SiteRevoked: b"SITE_REVOKED",
}

COMMON_ERRORS: dict[type[Exception], bytes] = {
    NotAuthenticated: b"NOT_AUTHENTICATED",
    ProtocolViolation: b"PROTOCOL_VIOLATION",
}


class Hello(amp.Command):
    """Site → primary: who I am, my versions, clock and replica position."""

    arguments = [
        (b"site", amp.Unicode()),
        (b"token", amp.Unicode()),
        (b"software_version", amp.Unicode()),
        (b"protocol_version", amp.Integer()),
        (b"site_time", amp.Float()),
        (b"epoch", amp.Unicode()),
        (b"position", amp.Integer()),
        (b"complete", amp.Boolean()),
    ]
    response = [
        (b"primary", amp.Unicode()),
        (b"software_version", amp.Unicode()),
        (b"protocol_version", amp.Integer()),
        (b"primary_time", amp.Float()),
        (b"epoch", amp.Unicode()),
        (b"head", amp.Integer()),
        (b"heartbeat", amp.Float()),
        # Why the site must load a new snapshot ("" when its position is usable).
        (b"resnapshot", amp.Unicode()),
    ]
    # The primary answers with the error, then closes the connection.
    fatalErrors = {**HELLO_ERRORS, **COMMON_ERRORS}


class Heartbeat(amp.Command):
    """Either way: proof of life every interval; a site's also carries its position and
    how many outbox records it holds that the primary has not applied (peers that predate
    ``outbox_pending`` ignore it)."""

    arguments = [
        (b"position", amp.Integer(optional=True)),
        (b"outbox_pending", amp.Integer(optional=True)),
    ]
    response: ClassVar[list[tuple[bytes, amp.Argument]]] = []
    requiresAnswer = False


class Poke(amp.Command):
    """Primary → site: the change log's head moved; pull with GetChanges."""

    arguments = [(b"head", amp.Integer())]
    response: ClassVar[list[tuple[bytes, amp.Argument]]] = []
    requiresAnswer = False


class GetChanges(amp.Command):
    """Site → primary: changes after ``after`` (which also tells the primary where I am).

    Returns the changes for this site (``batch``), the position the site has now seen
    through (``upto``), whether more remain (``limited``) and whether the last change's
    transaction continues in the next batch (``partial``: the site then holds the batch
    and applies it together with the rest of that transaction).
    """

    arguments = [(b"after", amp.Integer())]
    response = [
        (b"batch", amp.String()),
        (b"upto", amp.Integer()),
        (b"limited", amp.Boolean()),
        (b"partial", amp.Boolean(optional=True)),
        (b"head", amp.Integer()),
    ]
    fatalErrors = COMMON_ERRORS


class BeginSnapshot(amp.Command):
    """Site → primary: send me a snapshot; the primary then pushes SnapshotPage."""

    arguments: ClassVar[list[tuple[bytes, amp.Argument]]] = []
    response = [
        (b"snapshot", amp.Unicode()),
        (b"epoch", amp.Unicode()),
        (b"position", amp.Integer()),
    ]
    fatalErrors = COMMON_ERRORS


class SnapshotPage(amp.Command):
    """Primary → site: one page of one table; the answer acknowledges it (flow control).

    ``last`` marks the final page, after which the site swaps the snapshot in.
    """

    arguments = [
        (b"snapshot", amp.Unicode()),
        (b"seq", amp.Integer()),
        (b"table", amp.Unicode()),
        (b"columns", amp.ListOf(amp.Unicode())),
        (b"page", amp.String()),
        (b"last", amp.Boolean()),
    ]
    response: ClassVar[list[tuple[bytes, amp.Argument]]] = []
    fatalErrors = COMMON_ERRORS


class Revoke(amp.Command):
    """Primary → site: this site has been revoked; the primary closes the link next."""

    arguments = [(b"reason", amp.Unicode())]
    response: ClassVar[list[tuple[bytes, amp.Argument]]] = []
    requiresAnswer = False


class SubmitOutbox(amp.Command):
    """Site → primary: a batch of outbox records, in sequence order.

    The primary applies a site's batches in the order they arrive, each in one
    transaction (de-duplicating by UUID) together with any that queued behind the one
    before, and answers with the site's ``applied_seq``; the same transaction updates the
    replicated site row, so the stream carries the new balances and ``applied_seq``
    together. After a batch failed, the session's later batches are refused with its
    error. The site sends its records' stored JSON text as it is, packed like row batches.
    """

    arguments = [(b"records", amp.String())]
    response = [(b"applied_seq", amp.Integer())]
    fatalErrors = COMMON_ERRORS


class CheckPassword(amp.Command):
    """Site → primary: is this the user's password? For sites holding no verifiers.

    The primary checks it with its own throttling (per user and per site) and answers
    only yes or no.
    """

    arguments = [(b"username", amp.Unicode()), (b"password", amp.Unicode())]
    response = [(b"ok", amp.Boolean())]
    fatalErrors = COMMON_ERRORS
