"""Presets CRUD and SwarmUI import."""

from __future__ import annotations

import asyncio
import uuid

from fastapi import APIRouter, Request

from ..errors import Conflict, NotFound
from ..presets import from_swarmui_file, validate_preset
from .schemas import json_body

router = APIRouter(prefix="/api/presets", tags=["presets"])


def served_spec(request: Request, body=None):
    """The spec of the preset's ``model`` (a served one: 404 model_not_found otherwise), else of the default
    model: presets are checked with the bounds requests are checked with."""
    from ...engine.specs import get_spec
    from ...errors import ModelNotFound

    served = request.app.state.client.models()
    params = body.get("params") if isinstance(body, dict) else None
    name = params.get("model") if isinstance(params, dict) else None
    if name is None:
        return get_spec(served[0].variant)
    for m in served:
        if m.id == name:
            return get_spec(m.variant)
    raise ModelNotFound(f"the preset names model '{name}', which is not served here; available: "
                        f"{', '.join(m.id for m in served)}")


def _insert(store, name, params, description, author) -> dict:
    preset_id = uuid.uuid4().hex
    store.insert_preset(preset_id, name, params, description, author)  # Conflict "preset_exists" on a taken name
    return store.get_preset(preset_id)


@router.get("")
async def list_presets(request: Request):
    return {"presets": await asyncio.to_thread(request.app.state.store.list_presets)}


@router.post("", status_code=201)
async def create_preset(request: Request):
    body = await json_body(request)
    name, params, description, author = validate_preset(body, served_spec(request, body))
    return await asyncio.to_thread(_insert, request.app.state.store, name, params, description, author)


@router.post("/import/swarmui", status_code=201,
             summary="Import a SwarmUI preset or preset export file; reports what did not map")
async def import_swarmui(request: Request):
    parsed = [(validate_preset(body, served_spec(request)), unmapped, warnings)
              for body, unmapped, warnings in from_swarmui_file(await json_body(request))]
    store = request.app.state.store
    names = [v[0] for v, _, _ in parsed]
    existing = {p["name"] for p in await asyncio.to_thread(store.list_presets)} & set(names)
    if existing or len(set(names)) != len(names):
        taken = sorted(existing or {n for n in names if names.count(n) > 1})
        raise Conflict(f"preset name(s) already taken: {', '.join(taken)}", code="preset_exists")
    done = []
    for (name, params, description, author), unmapped, warnings in parsed:
        preset = await asyncio.to_thread(_insert, store, name, params, description, author)
        done.append({"preset": preset, "unmapped": unmapped, "warnings": warnings})
    return {**done[0], "presets": done}


@router.get("/export/swarmui", summary="All presets as a SwarmUI preset export file (its 'Import' reads it)")
async def export_swarmui(request: Request):
    from fastapi.responses import Response

    from ...interop import export_swarmui_presets

    presets = await asyncio.to_thread(request.app.state.store.list_presets)
    return Response(export_swarmui_presets(presets), media_type="application/json",
                    headers={"Content-Disposition": 'attachment; filename="presets.json"'})


@router.get("/{preset_id}")
async def get_preset(request: Request, preset_id: str):
    preset = await asyncio.to_thread(request.app.state.store.get_preset, preset_id)
    if preset is None:
        raise NotFound(f"no preset '{preset_id}'", code="preset_not_found")
    return preset


@router.put("/{preset_id}")
async def update_preset(request: Request, preset_id: str):
    body = await json_body(request)
    name, params, description, author = validate_preset(body, served_spec(request, body))
    store = request.app.state.store
    ok = await asyncio.to_thread(store.update_preset, preset_id, name, params, description, author)
    if not ok:
        raise NotFound(f"no preset '{preset_id}'", code="preset_not_found")
    return store.get_preset(preset_id)


@router.delete("/{preset_id}")
async def delete_preset(request: Request, preset_id: str):
    if not await asyncio.to_thread(request.app.state.store.delete_preset, preset_id):
        raise NotFound(f"no preset '{preset_id}'", code="preset_not_found")
    return {"id": preset_id, "deleted": True}
