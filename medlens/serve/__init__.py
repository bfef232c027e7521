"""The MedLens web app and REST API: ``medlens serve`` or ``create_app(model_dirs=[...])``."""

from medlens.serve.app import DEFAULT_MAX_UPLOAD_BYTES, create_app, serve

__all__ = ["create_app", "serve", "DEFAULT_MAX_UPLOAD_BYTES"]
