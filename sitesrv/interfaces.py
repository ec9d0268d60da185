"""The zope interfaces of sitesrv, in one place.

Each says who calls it and what it promises. Front-ends and plugins depend on these,
never on the store.
"""

from __future__ import annotations

from zope.interface import Attribute, Interface


class IConnectorFactory(Interface):
    """A device connector plugin, found with ``getPlugins(IConnectorFactory, connectors)``.

    Provided by a module-level object (which also provides ``twisted.plugin.IPlugin``) in
    a module of the ``connectors`` plugin package. The connector manager
    (``sitesrv.connectormanager``) checks a device record's option names against
    ``options``, then calls ``makeService`` for each device record of its own site whose
    ``connector`` equals ``name``; it starts that service, and stops it when the record is
    removed or changed (a changed record gets a new service).
    """

    name = Attribute("The connector name device records refer to, e.g. 'card-reader'.")
    description = Attribute("One line for administrators.")
    options = Attribute(
        "The option schema: a mapping of option name to a one-line description. A device "
        "record with any other option is refused before ``makeService`` is called; "
        "``makeService`` checks the values."
    )

    def makeService(device, core):
        """Return an ``IService`` (not started) that drives ``device`` until stopped.

        ``device`` is the device record (``name``, ``site``, ``connector``, ``options``:
        a dict of strings, ``printer``: a printer name or None). ``core`` provides
        ``IDeviceCore`` for this device: the service uses it for everything it asks of
        the server, and its ``reactor`` for every endpoint and timer. Raises
        ``sitesrv.core.devicecore.InvalidOptions`` (or ``ValueError``) with a sentence for
        the administrator when the options are wrong; the manager reports it and skips
        the device.
        """


class IDeviceCore(Interface):
    """The narrow core API one device's connector gets; implemented by
    ``sitesrv.core.devicecore.DeviceCore``, one per device, made by the connector manager.

    Every call goes through the gate, so offline policies apply at a site and an
    unsynced or revoked site refuses. Calls return Deferreds; a refusal fails with
    ``sitesrv.core.devicecore.DeviceRefused``, whose ``reason`` is a sentence safe to show
    on the device and whose ``kind`` says why ("auth", "policy", "funds", "unavailable",
    "invalid"). Nothing here writes to the store except through the gate and the Find-Me
    queue.
    """

    device = Attribute("The device record this core serves (name, site, options, printer).")
    reactor = Attribute("The reactor for the connector's endpoints and timers (a clock in tests).")

    def authenticateCard(number, pin=None):
        """Authenticate a card number (already normalised by the connector), with a PIN
        when given; fires with an ``Identity`` (``.user.username``, ``.method``).

        Repeated failures at this device are slowed down.
        """

    def authenticatePassword(username, password):
        """Authenticate by username and password; fires with an ``Identity``."""

    def heldJobs(identity):
        """Fires with the user's held (Find-Me) jobs at this server, oldest first; each
        has ``uuid``, ``document``, ``pages``, ``copies``, ``colour``, ``duplex``, ``cost``."""

    def release(identity, job_uuids=None):
        """Release the user's held jobs (all, or those named) to the device's printer.

        Fires with one outcome per job (``job``, ``released``, ``reason``, ``cost``); a
        job the user cannot afford, or whose print provider is away, stays held.
        """

    def cancel(identity, job_uuids=None):
        """Cancel the user's held jobs (all, or those named); fires with how many."""

    def recordUsage(identity, kind, pages, copies=1, colour=False, duplex=False, uuid=None):
        """Record and charge copy, scan or fax usage (``kind``) at the device's printer's
        prices; fires with a ``UsageResult`` (cost, balance, account, offline).

        ``uuid`` identifies the usage: recording it again charges once.
        """

    def balance(identity):
        """Fires with the user's balance as this server sees it, as an ``Amount``."""

    def offline():
        """Whether offline policies govern this server now (a device may say so)."""

    def setConnections(count):
        """The connector has ``count`` connections open now (for the metrics gauge)."""

    def reportProblem(problem):
        """Show ``problem`` (a sentence) for this device on ``/health``; None clears it."""


class IStatusSource(Interface):
    """Something that reports this server's health; called by ``/health``."""

    def status():
        """A Deferred firing with a JSON-serialisable dict (role, name, mode, version...)."""

    def serving():
        """Whether the server answers requests now (``/health`` then returns 200)."""


class IReplicationObserver(Interface):
    """Told by the site's replication client what happens on the link to the primary.

    Implemented by the failover machine; every method returns quickly and never raises.
    """

    def connected(skew):
        """The primary accepted our hello; ``skew`` is site clock minus primary clock (s)."""

    def syncing(reason):
        """A (re-)snapshot is being loaded, for ``reason``; the old replica still serves."""

    def snapshotLoaded():
        """A complete snapshot has been swapped in."""

    def changesApplied(count, position):
        """A batch of ``count`` changes was applied; the replica is at ``position``."""

    def caughtUp(position):
        """The replica has reached the primary's head."""

    def outboxSubmitted(count, applied_seq):
        """``count`` records were submitted; the primary has applied up to ``applied_seq``."""

    def outboxDrained():
        """Everything the site recorded has been applied at the primary."""

    def heartbeatMissed(reason):
        """The primary was silent for three heartbeat intervals; the link is being dropped."""

    def lost(reason):
        """The link closed, or was dropped after missed heartbeats."""

    def refused(reason):
        """The primary refused us (unknown site, bad token, version); we retry."""

    def revoked(reason):
        """The primary revoked this site: stop serving."""


class IFindMe(Interface):
    """The Find-Me (hold/release) queue of one server: held jobs per user.

    Implemented by ``sitesrv.core.findme``; called by device connectors, the device API
    and the web release station (never by the store). Every call goes through the gate,
    so offline policies apply at a site. Jobs are identified by the UUID their print
    provider assigned.
    """

    def held(identity):
        """A Deferred list of the user's held jobs at this server (oldest first)."""

    def release(identity, printer, job_uuids=None):
        """Release the user's held jobs (all, or those named) to ``printer``.

        The balance is checked again for each job, at the price of ``printer``; a job
        the user cannot afford stays held. Fires with a list of per-job outcomes.
        """

    def cancel(identity, job_uuids=None):
        """Cancel the user's held jobs (all, or those named); fires with how many."""
