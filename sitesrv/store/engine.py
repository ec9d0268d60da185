"""Database engines, set up the way the store rules in DESIGN.md ask.

SQLite: WAL journal, ``synchronous=FULL`` (a site's power can fail), foreign keys on, a
busy timeout so that ``sitesrv-admin`` in another process can write while the server runs.
The *writer* engine opens every transaction with ``BEGIN IMMEDIATE`` so that a write
transaction takes the write lock up front instead of failing half-way with "database is
locked"; the *reader* engine uses plain deferred ``BEGIN``.

PostgreSQL (psycopg 3): one ordinary pooled engine serves reads and writes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import Column, Connection, Engine, Table, create_engine, event, insert, text
from sqlalchemy.engine import make_url
from sqlalchemy.sql.schema import ScalarElementColumnDefault

BUSY_TIMEOUT_MS = 30_000


def is_sqlite(url: str) -> bool:
    """Whether a SQLAlchemy URL names a SQLite database."""
    return make_url(url).get_backend_name() == "sqlite"


def normalise_url(url: str) -> str:
    """Use psycopg 3 for plain ``postgresql://`` URLs."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def _sqlite_engine(url: str, begin: str, pool_size: int) -> Engine:
    parsed = make_url(url)
    if parsed.database in (None, "", ":memory:"):
        raise ValueError("sitesrv needs a SQLite file, not an in-memory database")
    engine = create_engine(
        url,
        pool_size=pool_size,
        max_overflow=0,
        connect_args={"check_same_thread": False, "timeout": BUSY_TIMEOUT_MS / 1000},
    )

    @event.listens_for(engine, "connect")
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let us issue BEGIN ourselves (pysqlite's own transaction handling is off).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def on_begin(conn: Any) -> None:
        conn.exec_driver_sql(begin)

    return engine


def make_engines(url: str, readers: int = 4) -> tuple[Engine, Engine]:
    """Return ``(writer, reader)`` engines for ``url``.

    On PostgreSQL both are the same pooled engine.
    """
    url = normalise_url(url)
    if is_sqlite(url):
        writer = _sqlite_engine(url, "BEGIN IMMEDIATE", pool_size=1)
        reader = _sqlite_engine(url, "BEGIN", pool_size=readers)
        return writer, reader
    engine = create_engine(url, pool_size=readers + 1, max_overflow=4, pool_pre_ping=True)
    return engine, engine


# -- bulk inserts ---------------------------------------------------------------------

#: Parameter markers of the DB-API paramstyles of sqlite3 and psycopg.
_MARKERS = {"qmark": "?", "format": "%s", "pyformat": "%s"}


def thdInsertMany(
    conn: Connection,
    table: Table,
    columns: Sequence[str],
    rows: Iterable[Sequence[Any]],
    *,
    key: str | None = None,
) -> dict[Any, int]:
    """Insert many rows of plain values (``columns``, in each row's order), in this order.

    With ``key`` (a column whose values are distinct among ``rows``), return the new
    rows' ids by their ``key`` value. The ids are taken in row order, as inserting the
    rows one by one would take them. Without ``key``, return ``{}``; ``rows`` may then be
    an iterator, which on PostgreSQL is consumed while the server stores the rows sent
    so far. Columns left out get their (scalar) defaults.

    SQLite: a multi-row ``INSERT … RETURNING`` (with ``key``) or the driver's
    ``executemany``. PostgreSQL: ``COPY``, after taking the ids from the table's
    sequence when ``key`` is given. On PostgreSQL a multi-row ``INSERT`` is a statement
    of thousands of parameters, which psycopg parses anew each time (it caches only
    statements of at most 50 parameters) and the server plans; and ``executemany``
    runs one statement a row. ``COPY`` does neither (see ``thdImportUsers``).
    """
    missing = [c for c in table.c if c.key not in columns and c.key != "id"]
    if missing:
        defaults = tuple(_default(c) for c in missing)
        columns = [*columns, *(c.key for c in missing)]
        rows = ((*row, *defaults) for row in rows)
    if conn.dialect.name == "postgresql":
        return _thdCopy(conn, table, columns, rows, key)
    rows = list(rows)
    if not rows:
        return {}
    if key is not None:
        returning = insert(table).returning(table.c[key], table.c.id)
        params = [dict(zip(columns, row, strict=True)) for row in rows]
        return dict(conn.execute(returning, params).tuples().all())
    marker = _MARKERS.get(str(conn.dialect.paramstyle))
    if marker is None:
        conn.execute(insert(table), [dict(zip(columns, row, strict=True)) for row in rows])
        return {}
    # Straight to the driver's executemany, which spares SQLAlchemy's per-row parameter
    # processing (none is needed for plain values).
    quote = conn.dialect.identifier_preparer
    names = ", ".join(quote.format_column(table.c[name]) for name in columns)
    conn.exec_driver_sql(
        f"INSERT INTO {quote.format_table(table)} ({names}) "
        f"VALUES ({', '.join([marker] * len(columns))})",
        rows,
    )
    return {}


def _default(column: Column[Any]) -> Any:
    default = column.default
    if default is None:
        if column.server_default is not None or not column.nullable:
            raise ValueError(f"thdInsertMany: give a value for {column}")
        return None
    if not isinstance(default, ScalarElementColumnDefault):
        raise ValueError(f"thdInsertMany: give a value for {column} (its default is not a value)")
    return default.arg


#: Ids for ``count`` new rows from ``table``'s sequence, as its ``id`` default takes them.
_NEXTVALS = text(
    "SELECT nextval(seq) FROM generate_series(1, :count),"
    " (SELECT CAST(pg_get_serial_sequence(:table, 'id') AS regclass) AS seq) AS s"
)


def _thdCopy(
    conn: Connection,
    table: Table,
    columns: Sequence[str],
    rows: Iterable[Sequence[Any]],
    key: str | None,
) -> dict[Any, int]:
    quote = conn.dialect.identifier_preparer
    name = quote.format_table(table)
    names = ", ".join(quote.format_column(table.c[c]) for c in columns)
    ids: list[int] = []
    if key is not None:
        rows = list(rows)
        if not rows:
            return {}
        ids = sorted(conn.execute(_NEXTVALS, {"table": name, "count": len(rows)}).scalars())
        names = f"{quote.format_column(table.c.id)}, {names}"
    cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
    try:
        with cursor.copy(f"COPY {name} ({names}) FROM STDIN") as copy:
            if key is None:
                for row in rows:
                    copy.write_row(row)
            else:
                for row_id, row in zip(ids, rows, strict=True):
                    copy.write_row((row_id, *row))
    finally:
        cursor.close()
    if key is None:
        return {}
    where = list(columns).index(key)
    return {row[where]: row_id for row_id, row in zip(ids, rows, strict=True)}
