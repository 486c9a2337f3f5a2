"""A job's in-memory event log, what SSE readers and waiting callers follow: ``queued`` (position), ``loading``
(model start / progress fraction / done), ``started``, ``progress``, ``preview``, and one terminal event (``done``,
``failed``, ``cancelled``). The worker publishes into it from its thread; readers wait on it from asyncio through
``subscribe``. ``terminal_event`` rebuilds the outcome of a job from its store row (same shapes)."""

from __future__ import annotations

import asyncio
import base64
import io
import threading
from dataclasses import dataclass, field
from typing import Any

TERMINAL_EVENTS = ("done", "failed", "cancelled")


@dataclass
class Job:
    """In-memory state of a live (or recently finished) job; the store holds the durable record."""

    id: str
    model: str
    request: Any  # resolved GenerateRequest (an EditRequest, inputs by content id, for edits); None for a job
    # followed from the store; the typed error when a stored job cannot be rebuilt
    preview_every: int
    events: list[dict] = field(default_factory=list)
    cancel_reason: str | None = None  # user | disconnect | shutdown | deadline
    finished: threading.Event = field(default_factory=threading.Event)
    position: int | None = None  # last published queue position
    seen: tuple = ()  # (status, step) last published by the watcher for a job another worker runs
    deadline: float | None = None  # monotonic; set when the job starts running here
    lease_renewed: float | None = None  # monotonic time of this worker's last lease renewal
    _subscribers: set = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def publish(self, event: str, data: dict) -> bool:
        """Append an event and wake readers. Nothing is appended after a terminal event (the worker and the
        watcher may both report an outcome; the first one wins)."""
        with self._lock:
            if self.events and self.events[-1]["event"] in TERMINAL_EVENTS:
                return False
            self.events.append({"event": event, "data": data})
            subs = list(self._subscribers)
        for loop, flag in subs:
            try:
                loop.call_soon_threadsafe(flag.set)
            except RuntimeError:  # that event loop is gone
                pass
        return True

    def subscribe(self) -> asyncio.Event:
        flag = asyncio.Event()
        with self._lock:
            self._subscribers.add((asyncio.get_running_loop(), flag))
        return flag

    def unsubscribe(self, flag: asyncio.Event) -> None:
        with self._lock:
            self._subscribers = {s for s in self._subscribers if s[1] is not flag}

    @property
    def terminal(self) -> dict | None:
        with self._lock:
            return self.events[-1] if self.events and self.events[-1]["event"] in TERMINAL_EVENTS else None

    def drop_previews(self) -> None:
        """Drop preview payloads from the event log, in place (readers hold indexes into it)."""
        with self._lock:
            for e in self.events:
                if e["event"] == "preview":
                    e["data"] = {"step": e["data"]["step"], "images": []}


def terminal_event(row: dict) -> tuple[str, dict]:
    """The outcome event of a finished job, from its store row (same shapes the worker publishes)."""
    status, job_id = row["status"], row["id"]
    if status == "done":
        return "done", {"job_id": job_id, "outputs": [
            {"id": o["id"], "url": f"/api/outputs/{o['id']}", "metadata": o["metadata"]} for o in row["outputs"]]}
    if status == "cancelled":
        msg = row.get("error_message") or ""
        reason = msg[len("cancelled ("):-1] if msg.startswith("cancelled (") and msg.endswith(")") else msg
        return "cancelled", {"job_id": job_id, "reason": reason or "user"}
    return "failed", {"job_id": job_id, "error": {"code": row.get("error_code") or "unknown",
                                                  "message": row.get("error_message") or f"job is {status}"}}


def loading_event(ev: Any) -> dict:
    """The ``loading`` event data of a client's ``LoadEvent``."""
    data = {"model": ev.model, "phase": ev.phase}
    if ev.phase == "done":
        data.update(seconds=ev.seconds, evicted=list(ev.evicted))
    elif ev.fraction is not None:  # "progress": the loader's fraction of the model's bytes filled in
        data["fraction"] = round(ev.fraction, 4)
    return data


def png_b64(array: Any) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")
