"""The alembic migrations build exactly the schema the models describe."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, inspect
from twisted.trial.unittest import SynchronousTestCase

from sitesrv.store import Store
from sitesrv.store.bootstrap import thdInitPrimary
from sitesrv.store.migrate import head_revision, thdCurrentRevision, upgrade
from sitesrv.store.schema import metadata
from sitesrv.store.sites import thdListSites
from tests.support import NOW, POSTGRES_ENV, StoreMixin, postgres_url

# Mixins are test cases to the type checker only; the concrete classes add the real base.
if TYPE_CHECKING:
    _TestCase = SynchronousTestCase
else:
    _TestCase = object

#: Why the PostgreSQL variants skip (``None``: they run).
POSTGRES_SKIP = (
    None if postgres_url() else f"PostgreSQL not configured: set {POSTGRES_ENV} (CI does)"
)


def thdDifferences(conn: Connection) -> list[Any]:
    """What alembic would change to make the database match the models."""
    context = MigrationContext.configure(conn, opts={"compare_type": True})
    return compare_metadata(context, metadata)


class MigrationsMixin(StoreMixin, _TestCase):
    """A fresh database, migrated, is the models' schema."""

    def setUp(self) -> None:
        super().setUp()
        self.store = Store(self.database_url())
        self.addCleanup(self.store.stop)

    def test_fresh_database_matches_models(self) -> None:
        """Upgrading an empty database gives every table, column, type and index."""
        self.assertIsNone(self.store.read(thdCurrentRevision))
        self.assertEqual(upgrade(self.store), (None, head_revision()))
        self.assertEqual(self.store.read(thdDifferences), [])
        tables = set(self.store.read(lambda conn: inspect(conn).get_table_names()))
        self.assertTrue(set(metadata.tables) <= tables)

    def test_upgrade_twice_is_a_no_op(self) -> None:
        """A second upgrade changes nothing and keeps the data."""
        upgrade(self.store)
        self.store.write(thdInitPrimary, "hq", "USD", 2, NOW)
        head = head_revision()
        self.assertEqual(upgrade(self.store), (head, head))
        self.assertEqual(self.store.read(thdDifferences), [])
        self.assertEqual([s.name for s in self.store.read(thdListSites)], ["hq"])

    def test_head_revision(self) -> None:
        """After an upgrade the database is at the newest revision this software knows."""
        head = head_revision()
        self.assertIsNotNone(head)
        upgrade(self.store)
        self.assertEqual(self.store.read(thdCurrentRevision), head)

    def test_comparison_notices_drift(self) -> None:
        """The comparison is not vacuous: a missing index is reported."""
        upgrade(self.store)

        def thdDropIndex(conn: Connection) -> None:
            conn.exec_driver_sql("DROP INDEX ix_changelog_table_row")

        self.store.write(thdDropIndex)
        differences = self.store.read(thdDifferences)
        self.assertEqual(len(differences), 1, differences)
        self.assertEqual(differences[0][0], "add_index")
        self.assertEqual(differences[0][1].name, "ix_changelog_table_row")


class MigrationsSQLiteTests(MigrationsMixin, SynchronousTestCase):
    backend = "sqlite"


class MigrationsPostgresTests(MigrationsMixin, SynchronousTestCase):
    backend = "postgres"
    skip = POSTGRES_SKIP
