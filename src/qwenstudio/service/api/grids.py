"""Grid jobs: one request per cell of an XYZ grid (the same axes as ``qwenstudio grid``), queued as ordinary jobs.

Each cell is a normal job — progress, previews, cancel and history work as for any job — and the grid is a small JSON
record under ``<home>/grids/`` that ties the cells together, so it outlives a restart like the jobs do. The server
runs one model, so a model (or variant) axis is refused here; ``qwenstudio grid`` loads models in turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from ...compare.grid import AXIS_NAMES, GridSpec, plan_cells
from ...compare.values import axis_from_values, jsonable, parse_axis
from ...errors import InvalidRequest, QwenStudioError
from ..errors import NotFound
from .jobs import job_view
from .schemas import json_body, parse_job_body

router = APIRouter(prefix="/api", tags=["grids"])
_ID = re.compile(r"^[0-9a-f]{32}$")
_TERMINAL = ("done", "failed", "cancelled")


def _grids_dir(state) -> Path:
    return Path(state.settings.home) / "grids"


def _axes(raw: Any) -> tuple:
    if not isinstance(raw, list) or not 1 <= len(raw) <= 3:
        raise InvalidRequest("'axes' must be a list of one to three axes", code="invalid_axis")
    axes = []
    for a in raw:
        if isinstance(a, str):
            axes.append(parse_axis(a))
        elif isinstance(a, dict) and isinstance(a.get("name"), str):
            axes.append(axis_from_values(a["name"], a.get("values")))
        else:
            raise InvalidRequest("an axis is 'name=v1,v2' or {\"name\": ..., \"values\": [...]}", code="invalid_axis")
    if any(a.loads for a in axes):
        raise InvalidRequest("the server runs one model: a model/variant axis needs `qwenstudio grid`",
                             code="invalid_axis")
    return tuple(axes)


def submit_grid(state, body: Any) -> dict[str, Any]:
    """Validate every cell first (nothing is queued if one is bad), then queue them all; on a full queue the cells
    already queued are cancelled again and the 429 stands."""
    if not isinstance(body, dict) or not isinstance(body.get("prompt"), str):
        raise InvalidRequest("a grid needs 'prompt' (string) and 'axes'")
    unknown = sorted(set(body) - {"prompt", "axes", "base", "model", "preview_every"})
    if unknown:
        raise InvalidRequest(f"unknown grid field(s): {', '.join(unknown)}")
    base = body.get("base") or {}
    if not isinstance(base, dict) or "prompt" in base or "model" in base:
        raise InvalidRequest("'base' is an object of request fields (no prompt or model)")
    axes = _axes(body.get("axes"))
    cells = plan_cells(GridSpec(prompt=body["prompt"], axes=axes, base=dict(base)))
    if len(cells) > state.config.queue_size:
        raise InvalidRequest(f"the grid has {len(cells)} cells; the queue holds {state.config.queue_size}",
                             code="grid_too_large")
    parsed = []
    for c in cells:
        job_body = {**jsonable(c.fields), **({"model": body["model"]} if body.get("model") else {})}
        if "preview_every" in body:
            job_body["preview_every"] = body["preview_every"]
        try:
            parsed.append(parse_job_body(state.client, job_body, state.config.preview_every, state.uploads))
        except QwenStudioError as e:
            raise type(e)(f"cell {c.name} ({' · '.join(c.labels)}): {e.message}", code=e.code) from None
    jobs = []
    try:
        for model, req, preview_every in parsed:
            jobs.append(state.jobs.submit(model, req, preview_every))
    except QwenStudioError:
        for j in jobs:
            with contextlib.suppress(QwenStudioError):
                state.jobs.cancel(j.id, reason="grid not queued whole")
        raise
    record = {"id": uuid.uuid4().hex, "prompt": body["prompt"], "created_at": time.time(),
              "axes": [{"axis": n, "name": a.name, "labels": list(a.labels)} for n, a in zip(AXIS_NAMES, axes)],
              "cells": [{"index": list(c.index), "labels": list(c.labels), "job_id": j.id}
                        for c, j in zip(cells, jobs)]}
    _write_json(_grids_dir(state) / f"{record['id']}.json", record)
    return record


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False)
    os.replace(tmp, path)


def _record(state, grid_id: str) -> dict[str, Any]:
    path = _grids_dir(state) / f"{grid_id}.json"
    if not _ID.match(grid_id) or not path.is_file():
        raise NotFound(f"no grid '{grid_id}'", code="grid_not_found")
    return json.loads(path.read_text("utf-8"))


def grid_view(state, record: dict[str, Any]) -> dict[str, Any]:
    cells, statuses, step, total = [], [], 0, 0
    for c in record["cells"]:
        try:
            job = job_view(state, c["job_id"])
        except NotFound:  # deleted from history
            job = {"id": c["job_id"], "status": "deleted", "progress": {"step": 0, "total": 0}, "outputs": []}
        cells.append({**c, "job": job})
        statuses.append(job["status"])
        step += job["progress"]["step"] or 0
        total += job["progress"]["total"] or 0
    if all(s in (*_TERMINAL, "deleted") for s in statuses):
        status = "done" if all(s == "done" for s in statuses) else \
            "cancelled" if "cancelled" in statuses else "failed" if "failed" in statuses else "done"
    else:
        status = "running" if any(s == "running" for s in statuses) or any(s in _TERMINAL for s in statuses) \
            else "queued"
    return {"id": record["id"], "prompt": record["prompt"], "created_at": record["created_at"], "axes": record["axes"],
            "status": status, "progress": {"cells_done": sum(s in _TERMINAL for s in statuses),
                                           "cells": len(statuses), "step": step, "total": total},
            "cells": cells}


@router.post("/grids", status_code=202, summary="Queue an XYZ grid: one job per cell (axes as in `qwenstudio grid`)")
async def create_grid(request: Request):
    state = request.app.state
    body = await json_body(request)
    record = await asyncio.to_thread(submit_grid, state, body)
    return JSONResponse(await asyncio.to_thread(grid_view, state, record), status_code=202)


@router.get("/grids", summary="Recent grids, newest first")
async def list_grids(request: Request, limit: int = 20):
    state = request.app.state
    folder = _grids_dir(state)
    paths = sorted(folder.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True) if folder.is_dir() else []
    out = []
    for p in paths[: max(1, min(limit, 100))]:
        rec = json.loads(p.read_text("utf-8"))
        out.append({"id": rec["id"], "prompt": rec["prompt"], "created_at": rec["created_at"], "axes": rec["axes"],
                    "cells": len(rec["cells"])})
    return {"grids": out}


@router.get("/grids/{grid_id}", summary="A grid with every cell's job (status, progress, outputs)")
async def get_grid(grid_id: str, request: Request):
    state = request.app.state
    return await asyncio.to_thread(lambda: grid_view(state, _record(state, grid_id)))


@router.post("/grids/{grid_id}/cancel", summary="Cancel every cell that has not finished")
async def cancel_grid(grid_id: str, request: Request):
    state = request.app.state

    def cancel():
        record = _record(state, grid_id)
        for c in record["cells"]:
            with contextlib.suppress(QwenStudioError):
                state.jobs.cancel(c["job_id"], reason="user")
        return grid_view(state, record)

    return await asyncio.to_thread(cancel)
