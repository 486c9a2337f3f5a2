"""Presets CRUD and SwarmUI import."""

from __future__ import annotations

import asyncio
import uuid

from fastapi import APIRouter, Request

from ..errors import NotFound
from ..presets import from_swarmui, validate_preset
from .schemas import json_body

router = APIRouter(prefix="/api/presets", tags=["presets"])


def served_spec(request: Request):
    """The default served model's spec: presets are checked with the bounds requests are checked with."""
    from ...engine.specs import get_spec

    return get_spec(request.app.state.client.models()[0].variant)


def _insert(store, name, params, description, author) -> dict:
    preset_id = uuid.uuid4().hex
    store.insert_preset(preset_id, name, params, description, author)  # Conflict "preset_exists" on a taken name
    return store.get_preset(preset_id)


@router.get("")
async def list_presets(request: Request):
    return {"presets": await asyncio.to_thread(request.app.state.store.list_presets)}


@router.post("", status_code=201)
async def create_preset(request: Request):
    name, params, description, author = validate_preset(await json_body(request), served_spec(request))
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
    name, params, description, author = validate_preset(await json_body(request), served_spec(request))
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
