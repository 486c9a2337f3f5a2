"""Helpers shared by the service tests (plain functions, not fixtures)."""

from __future__ import annotations

import socket
import time

import httpx

from qwenstudio.testing.serving import run_app  # noqa: F401  (re-exported for the service tests)


def wait_status(http: httpx.Client, job_id: str, statuses: tuple[str, ...], timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = http.get(f"/api/jobs/{job_id}").json()
        if job["status"] in statuses:
            return job
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} stayed {job['status']}, wanted {statuses}")
        time.sleep(0.02)


def read_sse(http: httpx.Client, job_id: str) -> list[tuple[str, dict]]:
    import json

    events, name = [], None
    with http.stream("GET", f"/api/jobs/{job_id}/events") as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[6:])))
    return events


def raw_request(url: str, request_line: bytes, headers: bytes = b"") -> tuple[int, bytes]:
    """Send bytes exactly as given (no client-side path normalisation): status and body."""
    host, port = url.rsplit("//", 1)[1].split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request_line + b"\r\nHost: " + f"{host}:{port}".encode() + b"\r\n" + headers
                     + b"Connection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


JOB = {"prompt": "a red fox", "seed": 1, "steps": 2}
SLOW = {"prompt": "slow", "seed": 2, "steps": 200, "width": 512, "height": 512}


