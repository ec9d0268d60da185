"""alembic migrations for the sitesrv schema."""
