"""Alembic migrations of the prediction record (``alembic upgrade head`` runs at open)."""
