"""The print-provider protocol's wire commands (AMP over TCP or TLS, port 9191).

Documented in ``docs/protocols/providers.rst``. A print provider (``sitesrv-provider`` or
another implementation) opens the connection and starts with ``ProviderHello``; until
that succeeds the server answers nothing else. Then, in this order, the provider:

1. announces its queues (``AnnounceQueues``) and learns which printers they are;
2. resends every report it has not had acknowledged (``JobPrinted``, ``JobFailed``,
   ``JobCancelled``), oldest first;
3. re-announces the jobs it still holds for release (``AnnounceHeld``), in batches;
4. asks for a decision on each job it spooled while it could not reach the server
   (``SubmitJob``), and from then on on each new job.

The server pushes ``Release`` (print a held job on a printer) and ``DeleteJobs`` (held
jobs that expired or were cancelled) at any time after the hello. Both sides send
``Heartbeat`` every ``heartbeat`` seconds (from the hello's answer); a peer silent for
three intervals is dropped.

Jobs are named by a UUID the provider assigns. Every job a server decides to print
carries a *release id*; reports quote it. The server de-duplicates by job UUID and
release id, so a report or a submission sent twice has the effect of one: a job is
charged once, when printed, at the price of the printer it printed on.

Money is integer minor units of the server's currency (``decimals`` from the hello).
Every value fits AMP's 64 KiB limit; the field limits below are checked by the server,
which answers ``InvalidRequest`` naming the field.
"""

from __future__ import annotations

from typing import ClassVar

from twisted.protocols import amp

# The heartbeat is the replication protocol's own command (same name, same arguments):
# both protocols share ``sitesrv.replication.liveness.LivenessAMP``. A provider sends it
# without ``position``.
from sitesrv.replication.commands import Heartbeat

__all__ = [
    "DECISIONS",
    "HELD_ACTIONS",
    "JOB_STATES",
    "MAX_ANNOUNCE",
    "MAX_COPIES",
    "MAX_DELETE",
    "MAX_DOCUMENT",
    "MAX_KEY",
    "MAX_NAME",
    "MAX_PAGES",
    "MAX_QUEUES",
    "MAX_REASON",
    "PROVIDER_PROTOCOL_VERSION",
    "AnnounceHeld",
    "AnnounceQueues",
    "BadKey",
    "DeleteJobs",
    "Heartbeat",
    "InvalidRequest",
    "JobCancelled",
    "JobFailed",
    "JobPrinted",
    "NotAuthenticated",
    "NotServing",
    "ProviderHello",
    "Release",
    "SubmitJob",
    "UnknownJob",
    "UnknownProvider",
    "VersionRefused",
]

#: Version of this protocol. The server accepts exactly this version for now; it will
#: accept the previous one as well once there is one (as replication does).
PROVIDER_PROTOCOL_VERSION = 1

# -- field limits (characters for text, counts for lists) ------------------------------

#: Provider, queue, printer and user names.
MAX_NAME = 200
#: Provider key.
MAX_KEY = 200
#: Document names: longer ones are cut to this length by the server (not refused).
MAX_DOCUMENT = 500
#: Reasons in reports: longer ones are cut by the server.
MAX_REASON = 500
#: Pages of one copy of a job.
MAX_PAGES = 100_000
#: Copies of a job.
MAX_COPIES = 9_999
#: Queues in one ``AnnounceQueues``.
MAX_QUEUES = 200
#: Jobs in one ``AnnounceHeld`` (keeps the list below AMP's 64 KiB value limit even with
#: 500-character non-ASCII document names); send more in several calls.
MAX_ANNOUNCE = 16
#: Job UUIDs in one ``DeleteJobs``.
MAX_DELETE = 500

#: ``SubmitJob`` decisions.
DECISIONS = ("print", "hold", "deny")
#: ``AnnounceHeld`` actions.
HELD_ACTIONS = ("hold", "print", "delete")
#: States a job has at the server.
JOB_STATES = ("held", "releasing", "printed", "failed", "expired", "cancelled", "denied")


# -- errors ---------------------------------------------------------------------------


class VersionRefused(Exception):
    """The provider speaks a protocol version this server does not accept."""


class UnknownProvider(Exception):
    """No provider of this name belongs to this server's site (never added, or removed)."""


class BadKey(Exception):
    """The key does not match the provider's (mistyped, or replaced by ``rotate-key``)."""


class NotServing(Exception):
    """The server cannot decide or record anything now (site not synchronised with the
    primary, revoked, or charging refused offline). The provider keeps what it sent and
    applies its own offline policy until it tries again."""


class NotAuthenticated(Exception):
    """A command arrived before a successful ``ProviderHello``."""


class InvalidRequest(Exception):
    """A field is missing, malformed or over its limit; the message names it. Resending
    the same request cannot succeed: the provider logs it and drops that request."""


class UnknownJob(Exception):
    """Provider → server answer to ``Release``: the provider does not have this job."""


HELLO_ERRORS: dict[type[Exception], bytes] = {
    VersionRefused: b"VERSION_REFUSED",
    UnknownProvider: b"UNKNOWN_PROVIDER",
    BadKey: b"BAD_KEY",
    NotServing: b"NOT_SERVING",
    InvalidRequest: b"INVALID_REQUEST",
}

COMMON_ERRORS: dict[type[Exception], bytes] = {
    NotAuthenticated: b"NOT_AUTHENTICATED",
    InvalidRequest: b"INVALID_REQUEST",
    NotServing: b"NOT_SERVING",
}


# -- hello and queues -----------------------------------------------------------------


class ProviderHello(amp.Command):
    """Provider → server: who I am (name and key), my versions and clock.

    The answer names the server, its site, its versions, the heartbeat interval, its
    clock and its currency. Refused (and the connection closed) for a version mismatch,
    an unknown or removed provider, a wrong key, a provider of another site, or a server
    that is not serving (``NOT_SERVING``: try again later).
    """

    arguments = [
        (b"provider", amp.Unicode()),
        (b"key", amp.Unicode()),
        (b"software_version", amp.Unicode()),
        (b"protocol_version", amp.Integer()),
        (b"provider_time", amp.Float()),
    ]
    response = [
        (b"server", amp.Unicode()),
        (b"site", amp.Unicode()),
        (b"software_version", amp.Unicode()),
        (b"protocol_version", amp.Integer()),
        (b"heartbeat", amp.Float()),
        (b"server_time", amp.Float()),
        (b"currency", amp.Unicode()),
        (b"decimals", amp.Integer()),
    ]
    fatalErrors = {**HELLO_ERRORS, NotAuthenticated: b"NOT_AUTHENTICATED"}


class AnnounceQueues(amp.Command):
    """Provider → server: the names of the queues I serve (at most ``MAX_QUEUES``).

    ``known``: the queues that are printers at this server's site, each with whether
    it is a hold/release queue, the URI the provider delivers to and its prices.
    ``unknown``: the others, each with the reason in words ("no printer named 'x'",
    "printer 'x' is at site 'b', not 'a'"). Jobs sent to an unknown queue are denied.
    May be sent again at any time (the provider's configuration changed).
    """

    arguments = [(b"queues", amp.ListOf(amp.Unicode()))]
    response = [
        (
            b"known",
            amp.AmpList(
                [
                    (b"name", amp.Unicode()),
                    (b"hold", amp.Boolean()),
                    (b"uri", amp.Unicode()),
                    (b"price_mono", amp.Integer()),
                    (b"price_colour", amp.Integer()),
                    (b"duplex_discount", amp.Integer()),
                ]
            ),
        ),
        (b"unknown", amp.AmpList([(b"name", amp.Unicode()), (b"reason", amp.Unicode())])),
    ]
    errors = COMMON_ERRORS


# -- jobs -----------------------------------------------------------------------------

#: What a provider knows of a job when it asks about it: the same fields in
#: ``SubmitJob`` and in each ``AnnounceHeld`` item.
JOB_FIELDS: list[tuple[bytes, amp.Argument]] = [
    # The provider-assigned UUID (canonical lower-case 8-4-4-4-12 form).
    (b"job", amp.Unicode()),
    # The queue (printer name) the job was submitted to.
    (b"queue", amp.Unicode()),
    # The owner's username (IPP requesting-user-name).
    (b"user", amp.Unicode()),
    (b"document", amp.Unicode()),
    # Pages of one copy, as the provider counted them.
    (b"pages", amp.Integer()),
    (b"copies", amp.Integer()),
    (b"colour", amp.Boolean()),
    (b"duplex", amp.Boolean()),
    # Spooled size in bytes (for logs and the web release page).
    (b"size", amp.Integer()),
    # When the provider received the job (provider's clock, seconds since the epoch).
    (b"submitted_at", amp.Float()),
]


class SubmitJob(amp.Command):
    """Provider → server: what should happen to this job?

    ``decision`` is ``print`` (deliver now to ``printer`` at ``uri``, then report with
    ``release_id``), ``hold`` (keep it spooled until a ``Release`` or ``DeleteJobs``;
    ``expires_at`` is the server's absolute expiry time) or ``deny`` (do not print;
    delete it). ``reason`` says why in words, for the user and the log, e.g.
    "insufficient balance: 0.40 available, job costs 1.20". ``cost`` is the estimate at
    the queue's prices (minor units). Asking again about the same job UUID gets the
    answer for the job's current state (the same release id), never a second job.
    """

    arguments = JOB_FIELDS
    response = [
        (b"decision", amp.Unicode()),
        (b"reason", amp.Unicode()),
        (b"cost", amp.Integer()),
        (b"release_id", amp.Unicode()),
        (b"printer", amp.Unicode()),
        (b"uri", amp.Unicode()),
        (b"expires_at", amp.Float()),
    ]
    errors = COMMON_ERRORS


class AnnounceHeld(amp.Command):
    """Provider → server, after each hello: the jobs I still hold for release.

    Each item is a job's ``JOB_FIELDS`` plus what the server last told the provider
    about it: ``expires_at`` (0 if not known) and ``release_id`` ("" unless a
    ``Release`` was received and not yet reported on). At most ``MAX_ANNOUNCE`` items
    per call. The server reconciles each with its own record and answers, per job,
    ``action``: ``hold`` (keep holding until ``expires_at``), ``print`` (a release was
    pushed that may not have arrived: deliver to ``printer`` at ``uri`` and report with
    ``release_id``; a provider that already acted on this release id does nothing) or
    ``delete`` (expired, cancelled or finished: delete it; ``reason`` says why). A job
    the server has no record of is recorded as held again (none lost); a job announced
    twice is recorded once.
    """

    arguments = [
        (
            b"jobs",
            amp.AmpList(
                [
                    *JOB_FIELDS,
                    (b"expires_at", amp.Float()),
                    (b"release_id", amp.Unicode()),
                ]
            ),
        )
    ]
    response = [
        (
            b"jobs",
            amp.AmpList(
                [
                    (b"job", amp.Unicode()),
                    (b"action", amp.Unicode()),
                    (b"reason", amp.Unicode()),
                    (b"release_id", amp.Unicode()),
                    (b"printer", amp.Unicode()),
                    (b"uri", amp.Unicode()),
                    (b"expires_at", amp.Float()),
                ]
            ),
        )
    ]
    errors = COMMON_ERRORS


# -- server pushes ----------------------------------------------------------------------


class Release(amp.Command):
    """Server → provider: print held job ``job`` on ``printer`` (deliver to ``uri``).

    The provider answers once it has stored the release on disk (before delivering),
    then delivers and reports ``JobPrinted`` or ``JobFailed`` with this ``release_id``.
    A release id it has already acted on is answered and otherwise ignored (the server
    may push the same release again after a reconnect). ``UNKNOWN_JOB`` if the provider
    no longer has the job (the server then records it as failed).
    """

    arguments = [
        (b"job", amp.Unicode()),
        (b"release_id", amp.Unicode()),
        (b"printer", amp.Unicode()),
        (b"uri", amp.Unicode()),
    ]
    response: ClassVar[list[tuple[bytes, amp.Argument]]] = []
    errors = {UnknownJob: b"UNKNOWN_JOB"}


class DeleteJobs(amp.Command):
    """Server → provider: delete these held jobs from the spool (expired, cancelled).

    Sent when it happens and again after each hello until answered. Deleting a job the
    provider does not have is not an error.
    """

    arguments = [(b"jobs", amp.ListOf(amp.Unicode())), (b"reason", amp.Unicode())]
    response: ClassVar[list[tuple[bytes, amp.Argument]]] = []


# -- reports (the provider keeps each on disk until it is answered) ---------------------


class JobPrinted(amp.Command):
    """Provider → server: the job was delivered to ``printer``; record and charge it.

    ``release_id`` is the one from the ``print`` decision, the ``Release`` or the
    ``AnnounceHeld`` answer; "" for a job printed while the server could not be reached
    (the provider's "print and report later" policy), which is why the report carries
    the job's details in full. ``pages`` are the pages actually printed per copy. The
    server logs the job and charges it once at ``printer``'s prices; a resent report is
    answered the same way without a second charge (``recorded`` false). ``charged`` is
    the amount charged (minor units).
    """

    arguments = [
        *JOB_FIELDS,
        (b"release_id", amp.Unicode()),
        (b"printer", amp.Unicode()),
        (b"printed_at", amp.Float()),
    ]
    response = [(b"charged", amp.Integer()), (b"recorded", amp.Boolean())]
    errors = COMMON_ERRORS


class JobFailed(amp.Command):
    """Provider → server: delivery of the job failed for good (after the provider's
    retries); it is not charged. ``release_id`` as for ``JobPrinted``."""

    arguments = [
        (b"job", amp.Unicode()),
        (b"release_id", amp.Unicode()),
        (b"reason", amp.Unicode()),
    ]
    response: ClassVar[list[tuple[bytes, amp.Argument]]] = []
    errors = COMMON_ERRORS


class JobCancelled(amp.Command):
    """Provider → server: the job was cancelled at the provider (by its owner or an
    administrator) and deleted from the spool; it is not charged."""

    arguments = [
        (b"job", amp.Unicode()),
        (b"release_id", amp.Unicode()),
        (b"reason", amp.Unicode()),
    ]
    response: ClassVar[list[tuple[bytes, amp.Argument]]] = []
    errors = COMMON_ERRORS
