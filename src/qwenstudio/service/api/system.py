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


@router.get("/api/models", tags=["models"], summary="Models this server runs (variant, format, loaded or not), their "
            "spec defaults, and LoRAs")
async def models(request: Request):
    """Each served model with the defaults and recommended sizes of its spec (so a client can show and reset them),
    the valid samplers/schedulers and request bounds, and the LoRAs found in the models dirs (by name, no paths)."""
    from ...engine.requests import LIMITS
    from ...engine.sampling import SAMPLERS, SCHEDULERS

    state = request.app.state
    served = await asyncio.to_thread(state.client.models)
    loras = await asyncio.to_thread(_loras, state.settings)
    return {"models": [_model_view(m) for m in served], "loras": loras, "samplers": list(SAMPLERS),
            "schedulers": list(SCHEDULERS), "limits": {k: list(v) if isinstance(v, tuple) else v
                                                       for k, v in LIMITS.items()}}


def _model_view(m) -> dict:
    from ...engine.specs import get_spec

    spec = get_spec(m.variant)
    d = spec.defaults
    width, height = spec.default_size
    return {"id": m.id, "kind": "model", "variant": m.variant, "ready": m.ready, "description": m.description,
            "variant_reason": getattr(m, "variant_reason", "") or None, "format": getattr(m, "format", "") or None,
            "resident": getattr(m, "resident", None),
            "defaults": {"steps": d.steps, "cfg": d.cfg, "sampler": d.sampler, "scheduler": d.scheduler,
                         "shift": d.shift, "negative_prompt": d.negative, "cfg_norm": d.cfg_norm,
                         "aspect": spec.default_aspect, "width": width, "height": height},
            "resolutions": {name: list(size) for name, size in spec.resolutions.items()},
            "max_input_images": spec.max_input_images}


def _loras(settings) -> list[dict]:
    """LoRA files in the models dirs the engine looks in (settings' dirs and ~/.qwenstudio/models), as the registry
    names them (public fields only, no paths)."""
    from ...engine.sources import registry_for

    return [{**e.public(), "id": e.name} for e in registry_for(settings).scan() if e.kind == "lora"]
