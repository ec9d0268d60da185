"""Consistent snapshots of the authoritative tables, for a site's initial sync.

A snapshot holds one read transaction open on its own connection (SQLite: a WAL read
snapshot; PostgreSQL: REPEATABLE READ), reads the change-log head first and then pages
through each replicated table by id, so every page reflects exactly position ``head``
and the stream can replay from there. Only rows for the given site and never secret
columns are included.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from sqlalchemy import Connection, Engine, select

from sitesrv.store.schema import REPLICATED, Replicated, replication_state, sites

#: Rows fetched per query while filling a page.
FETCH_ROWS = 2000


class Snapshot:
    """Pages of a consistent snapshot for one site. Not thread-safe: call serially."""

    def __init__(
        self, engine: Engine, site: str, exclude_tables: frozenset[str] = frozenset()
    ) -> None:
        self._engine = engine
        self.site = site
        self.exclude_tables = exclude_tables
        self._conn: Connection | None = None
        self._pages: Iterator[tuple[str, list[str], list[list[Any]]]] | None = None
        self.epoch = ""
        self.position = 0

    def open(self) -> None:
        """Begin the read transaction and fix the snapshot's position."""
        conn = self._engine.connect()
        if conn.dialect.name == "postgresql":
            conn = conn.execution_options(isolation_level="REPEATABLE READ")
        conn.begin()
        self._conn = conn
        row = conn.execute(select(replication_state.c.epoch, replication_state.c.head)).one()
        self.epoch, self.position = row.epoch, row.head
        site_id = conn.execute(select(sites.c.id).where(sites.c.name == self.site)).scalar()
        self._pages = self._generate(conn, site_id)

    def _generate(
        self, conn: Connection, site_id: int | None
    ) -> Iterator[tuple[str, list[str], list[list[Any]]]]:
        for replicated in REPLICATED:
            if replicated.table.name in self.exclude_tables:
                continue
            yield from self._table_rows(conn, replicated, site_id)

    def _table_rows(
        self, conn: Connection, replicated: Replicated, site_id: int | None
    ) -> Iterator[tuple[str, list[str], list[list[Any]]]]:
        table = replicated.table
        columns = [c for c in table.columns if c.name not in replicated.secret_columns]
        names = [c.name for c in columns]
        after = None
        while True:
            q = select(*columns).order_by(table.c.id).limit(FETCH_ROWS)
            if after is not None:
                q = q.where(table.c.id > after)
            if replicated.scope_column is not None:
                q = q.where(table.c[replicated.scope_column] == site_id)
            rows = [list(r) for r in conn.execute(q)]
            if not rows:
                return
            yield table.name, names, rows
            after = rows[-1][names.index("id")]
            if len(rows) < FETCH_ROWS:
                return

    def next_rows(self) -> tuple[str, list[str], list[list[Any]]] | None:
        """The next chunk of rows ``(table, columns, rows)``, or None at the end."""
        assert self._pages is not None, "open() first"
        return next(self._pages, None)

    def close(self) -> None:
        """End the read transaction and return the connection."""
        if self._conn is not None:
            self._conn.rollback()
            self._conn.close()
            self._conn = None
