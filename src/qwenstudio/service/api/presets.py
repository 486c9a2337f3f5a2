"""Presets CRUD and SwarmUI import."""

from __future__ import annotations

import asyncio
import sqlite3
import uuid

from fastapi import APIRouter, Request

from ..errors import Conflict, NotFound
from ..presets import from_swarmui, validate_preset
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
    try:
        store.insert_preset(preset_id, name, params, description, author)
    except sqlite3.IntegrityError:
        raise Conflict(f"a preset named '{name}' exists", code="preset_exists") from None
    return store.get_preset(preset_id)


@router.get("")
async def list_presets(request: Request):
    return {"presets": await asyncio.to_thread(request.app.state.store.list_presets)}


@router.post("", status_code=201)
async def create_preset(request: Request):
    body = await json_body(request)
    name, params, description, author = validate_preset(body, served_spec(request, body))
    return await asyncio.to_thread(_insert, request.app.state.store, name, params, description, author)


@router.post("/import/swarmui", status_code=201, summary="Import a SwarmUI preset; reports what did not map")
async def import_swarmui(request: Request):
    body, unmapped = from_swarmui(await json_body(request))
    name, params, description, author = validate_preset(body, served_spec(request))
    preset = await asyncio.to_thread(_insert, request.app.state.store, name, params, description, author)
    return {"preset": preset, "unmapped": unmapped}


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
    try:
        ok = await asyncio.to_thread(store.update_preset, preset_id, name, params, description, author)
    except sqlite3.IntegrityError:
        raise Conflict(f"a preset named '{name}' exists", code="preset_exists") from None
    if not ok:
        raise NotFound(f"no preset '{preset_id}'", code="preset_not_found")
    return store.get_preset(preset_id)


@router.delete("/{preset_id}")
async def delete_preset(request: Request, preset_id: str):
    if not await asyncio.to_thread(request.app.state.store.delete_preset, preset_id):
        raise NotFound(f"no preset '{preset_id}'", code="preset_not_found")
    return {"id": preset_id, "deleted": True}
