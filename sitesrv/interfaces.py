"""The zope interfaces of sitesrv, in one place.

Each says who calls it and what it promises. Front-ends and plugins depend on these,
never on the store.
"""

from __future__ import annotations

from zope.interface import Attribute, Interface


class IConnectorFactory(Interface):
    """A device connector plugin, found with ``getPlugins(IConnectorFactory, connectors)``.

    Provided by a module-level object in a module of the ``connectors`` plugin package.
    The site's connector manager calls ``makeService`` for each device record whose
    ``connector`` equals ``name``.
    """

    name = Attribute("The connector name device records refer to, e.g. 'card-reader'.")
    description = Attribute("One line for administrators.")
    options = Attribute(
        "Mapping of option name to a one-line description; any other option in a device "
        "record is an error."
    )

    def makeService(device, session_factory):
        """Return an ``IService`` that drives ``device`` until stopped.

        ``device`` is the device record (name, site, options, printer); the service uses
        ``session_factory`` for everything it asks of the core.
        """


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
