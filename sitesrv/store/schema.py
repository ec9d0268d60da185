"""The database schema, as SQLAlchemy Core tables.

Three kinds of table live here:

* **authoritative** tables (users, cards, accounts, printers, ...): written only at the
  primary, where every write also appends a full row image to ``changelog``; a site holds
  a read-only replica of them. ``REPLICATED`` says which, and to whom they go.
* **primary-only** tables (transactions, job log, audit log, changelog itself): never
  replicated.
* **site-owned** tables are added by the replication and failover modules.
* **per-server** tables (``web_admins``, ``provider_jobs``) belong to the server that
  holds them and are never replicated.

Money is always an integer number of minor units (cents); never a float.
The alembic migrations in ``migrations/versions`` must produce exactly this schema
(``tests/test_migrations.py`` checks it).
"""

from __future__ import annotations

import enum

import attrs
from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Double,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = MetaData(naming_convention=NAMING)

# Ids are never reused (SQLite reuses the highest rowid after a delete without
# AUTOINCREMENT): site outbox records name users, accounts and printers by id, and a
# reused id would charge the wrong user. Hence sqlite_autoincrement on id tables.

#: Times are stored as float seconds since the epoch (UTC); expiries are absolute.
Time = Double

settings = Table(
    "settings",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("key", String(100), nullable=False, unique=True),
    Column("value", Text, nullable=False),
    sqlite_autoincrement=True,
)

sites = Table(
    "sites",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(100), nullable=False, unique=True),
    # True for the primary's own site row (its local printers, providers and devices).
    Column("is_primary", Boolean, nullable=False, default=False),
    # Hash of the enrolment token (never the token); NULL for the primary's own row.
    Column("token_hash", String(200), nullable=True),
    Column("revoked", Boolean, nullable=False, default=False),
    # Highest outbox sequence number of this site applied at the primary.
    Column("applied_seq", BigInteger, nullable=False, default=0),
    Column("created_at", Time, nullable=False),
    sqlite_autoincrement=True,
)

users = Table(
    "users",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("username", String(200), nullable=False, unique=True),
    Column("full_name", String(200), nullable=False, default=""),
    Column("email", String(200), nullable=False, default=""),
    Column("disabled", Boolean, nullable=False, default=False),
    # scrypt verifier of the PIN, or NULL when the user has none.
    Column("pin_verifier", String(200), nullable=True),
    Column("created_at", Time, nullable=False),
    sqlite_autoincrement=True,
)

# Password verifiers are a table of their own so that replication can leave them out
# for sites whose policy refuses password login.
passwords = Table(
    "passwords",
    metadata,
    Column("id", Integer, primary_key=True),
    Column(
        "user_id",
        Integer,
        ForeignKey("users.id", ondelete="CASCADE"),
        nullable=False,
        unique=True,
    ),
    Column("verifier", String(200), nullable=False),
    sqlite_autoincrement=True,
)

cards = Table(
    "cards",
    metadata,
    Column("id", Integer, primary_key=True),
    # The normalised card number.
    Column("number", String(200), nullable=False, unique=True),
    Column(
        "user_id", Integer, ForeignKey("users.id", ondelete="CASCADE"), nullable=False, index=True
    ),
    Column("created_at", Time, nullable=False),
    sqlite_autoincrement=True,
)


class AccountType(enum.StrEnum):
    """What an account belongs to."""

    PERSONAL = "personal"
    SHARED = "shared"


accounts = Table(
    "accounts",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(200), nullable=False, unique=True),
    Column("type", String(20), nullable=False),
    # Set for a personal account: its owner. One personal account per user.
    Column(
        "user_id",
        Integer,
        ForeignKey("users.id", ondelete="SET NULL"),
        nullable=True,
        unique=True,
    ),
    Column("balance", BigInteger, nullable=False, default=0),
    # Restricted accounts may not go below -credit_limit; unrestricted ones may.
    Column("restricted", Boolean, nullable=False, default=True),
    Column("credit_limit", BigInteger, nullable=False, default=0),
    Column("created_at", Time, nullable=False),
    sqlite_autoincrement=True,
)

groups = Table(
    "groups",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(200), nullable=False, unique=True),
    sqlite_autoincrement=True,
)

group_members = Table(
    "group_members",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("group_id", Integer, ForeignKey("groups.id", ondelete="CASCADE"), nullable=False),
    Column(
        "user_id", Integer, ForeignKey("users.id", ondelete="CASCADE"), nullable=False, index=True
    ),
    UniqueConstraint("group_id", "user_id"),
    sqlite_autoincrement=True,
)

printers = Table(
    "printers",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(200), nullable=False, unique=True),
    # No foreign key to sites: a site replica holds only its own site row.
    Column("site_id", Integer, nullable=False, index=True),
    Column("price_mono", BigInteger, nullable=False),
    Column("price_colour", BigInteger, nullable=False),
    # Percentage taken off the price of duplex pages (0-100).
    Column("duplex_discount", Integer, nullable=False, default=0),
    # Where the print provider delivers released jobs (ipp://..., socket://host:9100).
    Column("uri", String(500), nullable=False, default=""),
    # A hold/release (Find-Me) queue: jobs wait until released.
    Column("hold", Boolean, nullable=False, default=False),
    Column("created_at", Time, nullable=False),
    sqlite_autoincrement=True,
)

devices = Table(
    "devices",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(200), nullable=False, unique=True),
    # No foreign key to sites: a site replica holds only its own site row.
    Column("site_id", Integer, nullable=False, index=True),
    # Name of the connector plugin that drives this device.
    Column("connector", String(100), nullable=False),
    # JSON object of connector options.
    Column("options", Text, nullable=False, default="{}"),
    Column("printer_id", Integer, ForeignKey("printers.id", ondelete="SET NULL"), nullable=True),
    Column("api_key_hash", String(200), nullable=False),
    Column("created_at", Time, nullable=False),
    sqlite_autoincrement=True,
)

providers = Table(
    "providers",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(200), nullable=False, unique=True),
    # No foreign key to sites: a site replica holds only its own site row.
    Column("site_id", Integer, nullable=False, index=True),
    Column("key_hash", String(200), nullable=False),
    Column("created_at", Time, nullable=False),
    sqlite_autoincrement=True,
)

policies = Table(
    "policies",
    metadata,
    Column("id", Integer, primary_key=True),
    # "" for the global policy, else the name of the site it overrides.
    Column("site", String(100), nullable=False, default=""),
    Column("key", String(100), nullable=False),
    Column("value", String(200), nullable=False),
    UniqueConstraint("site", "key"),
    sqlite_autoincrement=True,
)

# --- primary-only tables -------------------------------------------------------------

transactions = Table(
    "transactions",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("uuid", String(36), nullable=False, unique=True),
    Column("account_id", Integer, nullable=False, index=True),
    # Name of the account at the time, so the ledger reads well after a removal.
    Column("account_name", String(200), nullable=False),
    Column("amount", BigInteger, nullable=False),
    Column("balance_after", BigInteger, nullable=False),
    Column("reason", String(50), nullable=False),
    Column("comment", Text, nullable=False, default=""),
    Column("job_uuid", String(36), nullable=True),
    # The site that recorded the transaction (the primary's own name for local ones).
    Column("site", String(100), nullable=False),
    Column("created_at", Time, nullable=False),
    # A charge recorded offline that took a restricted account past its credit limit
    # (applied anyway; listed by `sitesrv-admin report offline-overdraft`).
    Column("overdraft", Boolean, nullable=False, default=False),
    sqlite_autoincrement=True,
)

jobs = Table(
    "jobs",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("uuid", String(36), nullable=False, unique=True),
    # print, copy, scan or fax
    Column("kind", String(10), nullable=False),
    Column("user_id", Integer, nullable=True),
    Column("username", String(200), nullable=False),
    Column("account_id", Integer, nullable=True),
    Column("printer_id", Integer, nullable=True),
    Column("printer_name", String(200), nullable=False, default=""),
    Column("site", String(100), nullable=False),
    Column("document", String(500), nullable=False, default=""),
    Column("pages", Integer, nullable=False),
    Column("copies", Integer, nullable=False, default=1),
    Column("colour", Boolean, nullable=False, default=False),
    Column("duplex", Boolean, nullable=False, default=False),
    Column("cost", BigInteger, nullable=False),
    Column("status", String(20), nullable=False),
    Column("created_at", Time, nullable=False),
    sqlite_autoincrement=True,
)

audit_log = Table(
    "audit_log",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("at", Time, nullable=False),
    Column("actor", String(200), nullable=False),
    Column("action", String(100), nullable=False),
    Column("target", String(200), nullable=False, default=""),
    # JSON object with the details (never secrets).
    Column("details", Text, nullable=False, default="{}"),
    sqlite_autoincrement=True,
)

# The change log: one row per change to an authoritative table, in commit order.
changelog = Table(
    "changelog",
    metadata,
    Column("position", BigInteger, primary_key=True, autoincrement=False),
    Column("table_name", String(50), nullable=False),
    Column("row_id", BigInteger, nullable=False),
    # "upsert" (image holds the full row) or "delete" (image is NULL).
    Column("op", String(10), nullable=False),
    Column("image", Text, nullable=True),
    # NULL: goes to every site; else only to the named site.
    Column("scope", String(100), nullable=True),
    Column("format", Integer, nullable=False),
    Column("created_at", Time, nullable=False),
    # The first position written by the same database transaction: a site applies the
    # entries of one transaction together (a charge's balance and the site's
    # applied_seq must never be seen apart).
    Column("txn", BigInteger, nullable=False),
)
Index("ix_changelog_table_row", changelog.c.table_name, changelog.c.row_id)

# One row (id = 1): the change log's epoch and the last position handed out.
# Writers take the next position by updating this row inside their transaction, which
# serialises them, so positions become visible in commit order.
replication_state = Table(
    "replication_state",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("epoch", String(36), nullable=False),
    Column("head", BigInteger, nullable=False),
)


@attrs.frozen
class Replicated:
    """How an authoritative table replicates.

    ``scope_column`` names a ``site_id`` column for rows that go only to their own
    site; ``secret_columns`` are never put in a row image.
    """

    table: Table
    scope_column: str | None = None
    secret_columns: frozenset[str] = frozenset()


#: Authoritative tables in dependency order (parents first), which is also the order a
#: snapshot loads them in.
REPLICATED: tuple[Replicated, ...] = (
    Replicated(settings),
    Replicated(sites, scope_column="id", secret_columns=frozenset({"token_hash"})),
    Replicated(users),
    Replicated(passwords),
    Replicated(cards),
    Replicated(accounts),
    Replicated(groups),
    Replicated(group_members),
    Replicated(printers),
    Replicated(devices, scope_column="site_id"),
    Replicated(providers, scope_column="site_id"),
    Replicated(policies),
)

REPLICATED_BY_NAME = {r.table.name: r for r in REPLICATED}

#: Version of the row-image format in the change log and on the wire.
ROW_FORMAT = 1

# --- primary-only: what the primary knows of each site's link ------------------------

site_links = Table(
    "site_links",
    metadata,
    Column("site", String(100), primary_key=True),
    Column("connected", Boolean, nullable=False, default=False),
    # When the link last went up or down.
    Column("since", Time, nullable=False),
    Column("last_seen", Time, nullable=False),
    # The change-log position the site has applied.
    Column("position", BigInteger, nullable=False, default=0),
    # Site clock minus primary clock at the last hello, in seconds.
    Column("skew", Double, nullable=False, default=0.0),
    Column("software_version", String(50), nullable=False, default=""),
    Column("protocol_version", Integer, nullable=False, default=0),
    Column("address", String(100), nullable=False, default=""),
    # Whether the site's replica holds password verifiers (its password-login policy).
    Column("passwords_included", Boolean, nullable=False, default=False),
)

# --- site-owned: the replica's own state -------------------------------------------

# One row (id = 1) at a site: which epoch and position its replica reflects, and
# whether a complete snapshot has ever been loaded (the "complete replica" fact).
replica_state = Table(
    "replica_state",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("epoch", String(36), nullable=False, default=""),
    Column("position", BigInteger, nullable=False, default=0),
    Column("complete", Boolean, nullable=False, default=False),
    # When the replica last caught up with the primary's head.
    Column("last_sync", Time, nullable=True),
    # The last outbox sequence number handed out by this site.
    Column("outbox_seq", BigInteger, nullable=False, default=0),
)

# Everything a site records (job logs, usage, charges) waits here for the primary, in
# sequence order, written in the same transaction as the thing it records. Records stay
# after the primary applied them (for resubmission after a restore of the primary),
# until the retention time passes.
outbox = Table(
    "outbox",
    metadata,
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    Column("uuid", String(36), nullable=False, unique=True),
    Column("kind", String(20), nullable=False),
    # The personal or shared account the amount applies to, and the amount (negative
    # for a charge), so the site can show balances net of what is not yet applied.
    Column("account_id", Integer, nullable=True, index=True),
    Column("amount", BigInteger, nullable=False),
    # The whole record as JSON (see sitesrv/store/outbox.py).
    Column("payload", Text, nullable=False),
    Column("created_at", Time, nullable=False),
)

# --- owned by each server: its print providers' jobs (the Find-Me queue) ---------------

# Every job a print provider asked about, with its state (held, releasing, printed,
# failed, expired, cancelled, denied). Owned by the server the provider talks to (a site,
# or the primary for its own providers); never replicated. The spool file stays at the
# provider. Users and printers are referred to by id and name, without foreign keys
# (replicated rows may be replaced by a snapshot).
provider_jobs = Table(
    "provider_jobs",
    metadata,
    Column("id", Integer, primary_key=True),
    # Assigned by the provider; the key every message uses.
    Column("uuid", String(36), nullable=False, unique=True),
    Column("provider", String(200), nullable=False),
    # The queue (printer) the job was submitted to.
    Column("queue", String(200), nullable=False),
    Column("queue_id", Integer, nullable=True),
    Column("username", String(200), nullable=False),
    Column("user_id", Integer, nullable=True),
    Column("document", String(500), nullable=False, default=""),
    Column("pages", Integer, nullable=False),
    Column("copies", Integer, nullable=False, default=1),
    Column("colour", Boolean, nullable=False, default=False),
    Column("duplex", Boolean, nullable=False, default=False),
    Column("size", BigInteger, nullable=False, default=0),
    # Estimated cost at the queue's prices, then at the release target's.
    Column("cost", BigInteger, nullable=False),
    Column("state", String(20), nullable=False, index=True),
    # Why the job is in its state (the decision's or the report's reason).
    Column("reason", String(500), nullable=False, default=""),
    # Set when the job is released (or printed at once): reports quote it.
    Column("release_id", String(36), nullable=True),
    Column("target", String(200), nullable=True),
    Column("target_id", Integer, nullable=True),
    # What was charged when printed (minor units).
    Column("charged", BigInteger, nullable=True),
    # False while the provider still has to be told to delete the job (expired or
    # cancelled here); True once it answered DeleteJobs, or when there is nothing to say.
    Column("provider_told", Boolean, nullable=False, default=True),
    Column("created_at", Time, nullable=False),
    # Absolute time (not a duration), so a clock step neither stalls nor mass-fires it.
    Column("expires_at", Time, nullable=False, index=True),
    Column("updated_at", Time, nullable=False),
    # A user's jobs in a state: the Find-Me list and the releasing total every decision
    # and release counts against the balance.
    Index("ix_provider_jobs_user_id_state", "user_id", "state"),
    sqlite_autoincrement=True,
)

# --- primary-only: records from sites that can never be applied ------------------------

dead_letters = Table(
    "dead_letters",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("site", String(100), nullable=False),
    Column("seq", BigInteger, nullable=False),
    Column("uuid", String(100), nullable=False),
    Column("payload", Text, nullable=False),
    Column("error", Text, nullable=False),
    Column("created_at", Time, nullable=False),
    Column("resolved_at", Time, nullable=True),
    Column("resolution", Text, nullable=False, default=""),
    UniqueConstraint("site", "uuid"),
    sqlite_autoincrement=True,
)


# --- per-server: web administrators --------------------------------------------------

# Who may log in to the primary's admin pages. Written without the change log, so never
# replicated or snapshotted: a site's admin pages use the [web.admins] table of its own
# config instead (see sitesrv/store/admins.py).
web_admins = Table(
    "web_admins",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(64), nullable=False, unique=True),
    # scrypt verifier of the password (sitesrv.secrets.make_verifier).
    Column("password_verifier", String, nullable=False),
    Column("created_at", Time, nullable=False),
    Column("updated_at", Time, nullable=False),
    sqlite_autoincrement=True,
)


def _shadow(table: Table) -> Table:
    # Same columns, no constraints but the primary key: a snapshot is loaded here page
    # by page, then swapped into the real table in one transaction.
    return Table(
        f"shadow_{table.name}",
        metadata,
        *(
            Column(c.name, c.type, primary_key=c.primary_key, autoincrement=False)
            for c in table.columns
        ),
    )


#: Shadow tables for snapshot loading, by replicated table name.
SHADOW: dict[str, Table] = {r.table.name: _shadow(r.table) for r in REPLICATED}
