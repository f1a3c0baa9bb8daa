"""Web service: ``create_app`` (FastAPI) and ``serve`` (uvicorn)."""

from .app import addresses, create_app, listen, serve

__all__ = ["addresses", "create_app", "listen", "serve"]
