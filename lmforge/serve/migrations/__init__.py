"""Alembic migrations of lmforge's database (run programmatically by `Database.upgrade()`; no alembic.ini)."""
