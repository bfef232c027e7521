"""Life after deployment: the prediction record, clinicians' feedback and drift monitoring.

Nothing here is imported by training, evaluation or prediction: the record needs the `serve`
extra (SQLAlchemy, Alembic).
"""

DATA_DIR_ENV = "MEDLENS_DATA_DIR"
"""The folder of the default prediction record (``records.db``)."""
