"""HTTP service: FastAPI app, job queue, SQLite/PostgreSQL store. Knows nothing about tensors; talks to the engine only through
``EngineClient`` so an in-process engine, a worker process or Ray replicas are interchangeable."""

from __future__ import annotations

__all__ = ["EngineClient", "InProcessEngineClient", "ServiceConfig", "create_app"]


def __getattr__(name: str):  # lazy: importing the package must not import FastAPI or torch
    if name == "create_app":
        from .app import create_app

        return create_app
    if name == "ServiceConfig":
        from .config import ServiceConfig

        return ServiceConfig
    if name in ("EngineClient", "InProcessEngineClient"):
        from . import engine_client

        return getattr(engine_client, name)
    raise AttributeError(name)
