"""Web service: ``create_app`` (FastAPI) and ``serve`` (uvicorn)."""

from .app import create_app, listen, serve

__all__ = ["create_app", "listen", "serve"]
