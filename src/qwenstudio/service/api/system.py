"""Liveness, readiness, metrics and the native model list."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse

router = APIRouter(tags=["system"])


@router.get("/healthz", summary="The process serves (no auth)")
async def healthz():
    return {"ok": True}


@router.get("/readyz", summary="Model loaded and worker taking jobs")
async def readyz(request: Request):
    state = request.app.state
    ready = bool(state.client.ready and state.jobs.accepting)
    return JSONResponse({"ready": ready}, status_code=200 if ready else 503)


@router.get("/metrics", response_class=PlainTextResponse, summary="Prometheus text format")
async def metrics(request: Request):
    state = request.app.state
    text = state.metrics.render(queue_depth=state.jobs.queue_depth, running=state.jobs.running_count,
                                ready=bool(state.client.ready))
    return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")


@router.get("/api/models", tags=["models"], summary="Models this server runs")
async def models(request: Request):
    from ...engine.specs import get_spec

    out = []
    for m in await asyncio.to_thread(request.app.state.client.models):
        d = get_spec(m.variant).defaults
        out.append({"id": m.id, "variant": m.variant, "ready": m.ready, "description": m.description,
                    "defaults": {"steps": d.steps, "cfg": d.cfg, "sampler": d.sampler, "scheduler": d.scheduler,
                                 "shift": d.shift}})
    return {"models": out}
