"""An app under test without a socket: httpx's ASGI transport, with the app's lifespan (the job worker) running."""

from __future__ import annotations

from contextlib import asynccontextmanager


@asynccontextmanager
async def asgi_client(app, base_url: str = "http://127.0.0.1", **kw):
    """``async with asgi_client(app) as http:`` — requests go straight into ``app`` (no uvicorn, no port); the
    lifespan starts the worker on entry and stops it on exit, as ``qwenstudio serve`` does."""
    import httpx

    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=base_url, timeout=60, **kw) as http:
            yield http
