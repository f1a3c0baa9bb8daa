"""Web service: ``create_app`` (FastAPI) and ``serve`` (uvicorn)."""

from .app import create_app, serve

__all__ = ["create_app", "serve"]
