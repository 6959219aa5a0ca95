"""Alembic revisions: frozen history, one file per schema change, never edited once released."""
