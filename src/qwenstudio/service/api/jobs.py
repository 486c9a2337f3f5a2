"""Native job API: create (optionally waiting), get, list, cancel, delete, and the SSE event stream."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse

from ...errors import QwenStudioError
from ..errors import NotFound
from ..events import TERMINAL_EVENTS, Job
from .schemas import json_body, parse_job_body

router = APIRouter(prefix="/api", tags=["jobs"])
KEEPALIVE_S = 15.0


def job_view(state, job_id: str) -> dict[str, Any]:
    row = state.store.get_job(job_id)
    if row is None:
        raise NotFound(f"no job '{job_id}'", code="job_not_found")
    view = {
        "id": row["id"], "status": row["status"], "model": row["model"], "request": row["request"],
        "created_at": row["created_at"], "started_at": row["started_at"], "finished_at": row["finished_at"],
        "progress": {"step": row["step"], "total": row["total"]},
        "error": {"code": row["error_code"], "message": row["error_message"]} if row["error_code"] else None,
        "outputs": [{**o, "url": f"/api/outputs/{o['id']}"} for o in row["outputs"]],
    }
    live = state.jobs.get(job_id)
    if live is not None and row["status"] == "queued":
        positions = [e["data"]["position"] for e in live.events if e["event"] == "queued"]
        view["position"] = positions[-1] if positions else None
    return view


async def wait_finished(job: Job, request: Request) -> bool:
    """Wait for the job's outcome; False when the client went away first (the caller cancels the job)."""
    flag = job.subscribe()
    disconnect = asyncio.ensure_future(request.receive())  # body already read: the next message is the disconnect
    try:
        while job.terminal is None:
            flag.clear()
            if job.terminal is not None:
                break
            waiter = asyncio.ensure_future(flag.wait())
            done, _ = await asyncio.wait({waiter, disconnect}, return_when=asyncio.FIRST_COMPLETED)
            if disconnect in done and disconnect.result().get("type") == "http.disconnect":
                waiter.cancel()
                return False
            waiter.cancel()
        return True
    finally:
        job.unsubscribe(flag)
        disconnect.cancel()


@router.post("/jobs", status_code=202, summary="Create a generation job (same fields as GenerateRequest + model)")
async def create_job(request: Request, wait: bool = Query(False, description="block until the job finishes")):
    state = request.app.state
    body = await json_body(request)
    model, req, preview_every = await asyncio.to_thread(
        parse_job_body, state.client, body, state.config.preview_every, state.uploads)
    job = await asyncio.to_thread(state.jobs.submit, model, req, preview_every)
    if wait:
        if not await wait_finished(job, request):
            await asyncio.to_thread(cancel_quietly, state, job.id)
            return JSONResponse({"error": {"code": "cancelled", "message": "client disconnected"}}, status_code=499)
        return JSONResponse(job_view(state, job.id), status_code=200)
    return JSONResponse(job_view(state, job.id), status_code=202)


def cancel_quietly(state, job_id: str) -> None:
    with contextlib.suppress(QwenStudioError):  # already finished: nothing to cancel
        state.jobs.cancel(job_id, reason="disconnect")


@router.get("/jobs", summary="List jobs, newest first")
async def list_jobs(
    request: Request,
    status: str | None = Query(None, pattern="^(queued|running|done|failed|cancelled)$"),
    model: str | None = Query(None, max_length=200),
    q: str | None = Query(None, max_length=500, description="text in the prompt"),
    limit: int = Query(50, ge=1, le=200),
    offset: int = Query(0, ge=0, le=10**9),
):
    state = request.app.state
    rows, total = await asyncio.to_thread(state.store.list_jobs, status=status, model=model, text=q,
                                          limit=limit, offset=offset)
    ids = [r["id"] for r in rows]
    return {"jobs": [job_view(state, i) for i in ids], "total": total, "limit": limit, "offset": offset}


@router.get("/jobs/{job_id}", summary="One job with its outputs")
async def get_job(request: Request, job_id: str):
    return job_view(request.app.state, job_id)


@router.post("/jobs/{job_id}/cancel", status_code=202, summary="Cancel a queued or running job")
async def cancel_job(request: Request, job_id: str):
    state = request.app.state
    status = await asyncio.to_thread(state.jobs.cancel, job_id)
    return {"id": job_id, "status": status}


@router.delete("/jobs/{job_id}", summary="Delete a finished job and its files")
async def delete_job(request: Request, job_id: str):
    await asyncio.to_thread(request.app.state.jobs.delete, job_id)
    return {"id": job_id, "deleted": True}


@router.get("/jobs/{job_id}/events", summary="Server-Sent Events: queued, started, progress, preview, outcome")
async def job_events(request: Request, job_id: str):
    state = request.app.state
    job = await asyncio.to_thread(state.jobs.follow, job_id)  # this process's job, or one another worker runs
    if job is None:
        view = job_view(state, job_id)  # 404 when unknown
        return StreamingResponse(_replay_finished(view), media_type="text/event-stream", headers=_SSE_HEADERS)
    start = request.headers.get("last-event-id", "")
    first = int(start) + 1 if start.isdigit() else 0
    return StreamingResponse(_follow(job, first), media_type="text/event-stream", headers=_SSE_HEADERS)


_SSE_HEADERS = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}


def _sse(idx: int | None, event: str, data: dict) -> bytes:
    head = f"id: {idx}\n" if idx is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def _follow(job: Job, idx: int):
    flag = job.subscribe()
    try:
        while True:
            flag.clear()
            events = job.events[idx:]
            for e in events:
                yield _sse(idx, e["event"], e["data"])
                idx += 1
                if e["event"] in TERMINAL_EVENTS:
                    return
            if not events:
                try:
                    await asyncio.wait_for(flag.wait(), KEEPALIVE_S)
                except TimeoutError:
                    yield b": keepalive\n\n"
    finally:
        job.unsubscribe(flag)


async def _replay_finished(view: dict):
    """A job no longer in memory (older, or from before a restart): its outcome from the store."""
    status = view["status"]
    if status == "done":
        yield _sse(None, "done", {"job_id": view["id"], "outputs": view["outputs"]})
    elif status == "cancelled":
        yield _sse(None, "cancelled", {"job_id": view["id"], "reason": (view["error"] or {}).get("message")})
    else:
        yield _sse(None, "failed", {"job_id": view["id"], "error": view["error"] or
                                    {"code": "unknown", "message": f"job is {status} on another server"}})
