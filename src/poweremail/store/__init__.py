"""The data layer: SQLAlchemy tables, repositories with keyword-only functions, Alembic migrations.

The same code and migrations run on the embedded SQLite store and on PostgreSQL.
"""
