"""Cancel, deadline and client disconnect reach the running job inside its long stages (SECURITY 19, 20, 31): a
one-step 1024x1024 job spends most of its time in VAE decode, after the last step callback."""

from __future__ import annotations

import socket
import time

from svc_helpers import wait_status

BIG = {"prompt": "big decode", "seed": 5, "steps": 1, "width": 1024, "height": 1024}


def _wait_step(http, job_id, step=1, timeout=30):
    deadline = time.monotonic() + timeout
    while http.get(f"/api/jobs/{job_id}").json()["progress"]["step"] < step:
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_cancel_after_the_last_step_stops_the_decode(serve):
    with serve() as s, s.client() as http:
        job = http.post("/api/jobs", json=BIG).json()["id"]
        _wait_step(http, job)  # denoising is over: only decode and output writing are left
        assert http.post(f"/api/jobs/{job}/cancel").json()["status"] == "cancelling"
        row = wait_status(http, job, ("cancelled", "done", "failed"))
        assert row["status"] == "cancelled" and row["outputs"] == []
        assert not list(s.state.outputs_dir.glob("*.png"))
        assert http.post("/api/jobs?wait=true", json={"prompt": "next", "steps": 1}).json()["status"] == "done"


def test_deadline_reaches_the_decode(serve):
    with serve(job_deadline_s=1.0) as s, s.client() as http:
        job = http.post("/api/jobs", json=BIG).json()["id"]
        row = wait_status(http, job, ("cancelled", "done", "failed"))
        assert row["status"] == "failed" and row["error"]["code"] == "deadline_exceeded", row
        assert row["finished_at"] - row["started_at"] < 2.5  # stopped mid-decode, not after it (about 3 s here)
        assert not list(s.state.outputs_dir.glob("*.png"))


def test_client_disconnect_stops_the_job_it_waited_for(serve):
    with serve() as s, s.client() as http:
        host, port = s.url.rsplit("//", 1)[1].split(":")
        body = b'{"prompt": "disconnect", "seed": 5, "steps": 1, "width": 1024, "height": 1024}'
        sock = socket.create_connection((host, int(port)), timeout=10)
        sock.sendall(b"POST /api/jobs?wait=true HTTP/1.1\r\nHost: " + f"{host}:{port}".encode()
                     + b"\r\nContent-Type: application/json\r\nContent-Length: " + str(len(body)).encode()
                     + b"\r\n\r\n" + body)
        deadline = time.monotonic() + 30
        while not (jobs := http.get("/api/jobs").json()["jobs"]) or jobs[0]["progress"]["step"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        sock.close()  # the client goes away during decode
        row = wait_status(http, jobs[0]["id"], ("cancelled", "done", "failed"))
        assert row["status"] == "cancelled" and row["error"]["message"] == "cancelled (disconnect)"
