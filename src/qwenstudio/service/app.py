"""``create_app(settings, engine_client)``: every piece of state is built here and hung on ``app.state``; nothing
global, so tests (and several apps in one process) never share anything but what they pass in."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI

from .. import __version__
from ..config import Settings
from .api import files, grids, jobs, openai, openapi_bodies, presets, system, ui, uploads
from .api.errors import install_error_handlers
from .auth import GuardMiddleware
from .config import ServiceConfig
from .engine_client import EngineClient
from .jobs import JobManager
from .metrics import Metrics
from .ratelimit import RateLimitMiddleware
from .store import Store
from .uploads import UploadStore

log = logging.getLogger("qwenstudio.service")
DB_NAME = "service.db"


def preset_lookup(store: Store):
    from ..errors import ModelNotFound

    def lookup(name: str) -> dict:
        preset = store.find_preset(name)
        if preset is None:
            raise ModelNotFound(f"no preset named '{name}'", code="preset_not_found")
        return preset["params"]

    return lookup


def create_app(settings: Settings, engine_client: EngineClient, config: ServiceConfig | None = None) -> FastAPI:
    """Build the app. The store opens (and recovers jobs a crash left active) now; the job worker starts with the
    app's lifespan and stops, cancelling what runs, when the server shuts down."""
    config = config or ServiceConfig()
    store = Store(config.store_url or settings.home / DB_NAME)
    metrics = Metrics()
    upload_store = UploadStore(settings.home / "uploads", quota_bytes=config.upload_quota_bytes,
                               ttl_s=config.upload_ttl_s)
    manager = JobManager(store, engine_client, settings.outputs_dir, config, metrics, upload_store,
                         worker=config.run_worker)
    recovered = manager.register()  # several processes may share this store; see JobManager / SECURITY 26
    extra = [JobManager(store, engine_client, settings.outputs_dir, config, metrics, upload_store)
             for _ in range(config.workers - 1 if config.run_worker else 0)]  # Ray replicas run jobs in parallel
    for m in extra:
        m.register()
    if recovered:
        log.warning("marked %d job(s) left queued/running by a stopped server as failed (interrupted)", recovered)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        for m in (manager, *extra):
            m.start()
        try:
            yield
        finally:
            for m in (*extra, manager):
                m.stop()
            store.close()

    engine_client.images = upload_store  # edit inputs by content id: this app's uploads are the ImageStore
    if hasattr(engine_client, "preset_lookup"):  # jobs may name a preset: its fields fill what they leave unset
        engine_client.preset_lookup = preset_lookup(store)

    app = FastAPI(title="qwenstudio", version=__version__, lifespan=lifespan)
    app.router.redirect_slashes = False  # a slash redirect would echo the client's Host into Location (SECURITY 29)
    app.state.settings = settings
    app.state.config = config
    app.state.client = engine_client
    app.state.store = store
    app.state.jobs = manager
    app.state.extra_workers = extra
    app.state.metrics = metrics
    app.state.outputs_dir = settings.outputs_dir
    app.state.uploads = upload_store

    install_error_handlers(app)
    openapi_bodies.install(app)
    for module in (system, jobs, grids, uploads, files, presets, openai, ui):
        app.include_router(module.router)
    if config.rate_limit_per_min:  # added first = runs after the guard: only valid keys get a bucket
        app.add_middleware(RateLimitMiddleware, per_min=config.rate_limit_per_min, auth_enabled=config.auth_enabled,
                           metrics=metrics)
    app.add_middleware(GuardMiddleware, config=config)
    if config.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_origins),
                           allow_methods=["GET", "POST", "PUT", "DELETE"],
                           allow_headers=["Authorization", "Content-Type", "X-API-Key", "Last-Event-ID"])
    return app
