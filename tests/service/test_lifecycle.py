"""Restart after a crash (SECURITY.md 25), graceful SIGTERM (24), readiness (22)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
from svc_helpers import JOB, SLOW, wait_status


def test_restart_marks_interrupted_jobs_failed_and_keeps_outputs(serve, tmp_path, store_url):
    home = tmp_path / "crashy"
    with serve(home=home, store_url=store_url) as s, s.client() as http:
        done = http.post("/api/jobs?wait=true", json=JOB).json()
        png = http.get(done["outputs"][0]["url"]).content
    # simulate kill -9 mid-job: rows left active, as a dead process would leave them
    from qwenstudio.service.store import Store

    store = Store(store_url or home / "service.db")
    store.insert_job("a" * 32, "tiny", {"prompt": "was running"})
    store.mark_running("a" * 32)
    store.insert_job("b" * 32, "tiny", {"prompt": "was queued"})
    store.close()
    with serve(home=home, store_url=store_url) as s, s.client() as http:
        for jid in ("a" * 32, "b" * 32):
            job = http.get(f"/api/jobs/{jid}").json()
            assert job["status"] == "failed" and job["error"]["code"] == "interrupted"
        assert http.get("/api/jobs", params={"status": "running"}).json()["total"] == 0
        again = http.get(f"/api/jobs/{done['id']}").json()
        assert again["status"] == "done" and again["outputs"][0]["metadata"] == done["outputs"][0]["metadata"]
        assert http.get(done["outputs"][0]["url"]).content == png
        events = [line for line in http.get(f"/api/jobs/{'a' * 32}/events").text.splitlines() if line]
        assert events[0] == "event: failed" and json.loads(events[1][6:])["error"]["code"] == "interrupted"
        assert http.post("/api/jobs?wait=true", json=JOB).json()["status"] == "done"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_sigterm_cancels_running_job_persists_and_exits_zero(tmp_path):
    port = _free_port()
    env = {**os.environ, "QWENSTUDIO_HOME": os.environ["QWENSTUDIO_HOME"]}
    code = ("from qwenstudio.cli.serve import serve; "
            f"serve('127.0.0.1', {port}, 'tiny', None, log_level='warning')")
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                r = httpx.get(url + "/readyz", timeout=2)
                if r.status_code == 200:
                    break
                assert r.status_code == 503
                assert httpx.get(url + "/healthz").status_code == 200  # alive while loading
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        with httpx.Client(base_url=url, timeout=30) as http:
            job = http.post("/api/jobs", json=SLOW).json()["id"]
            wait_status(http, job, ("running",))
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
            assert time.monotonic() - t0 < 15
    finally:
        if proc.poll() is None:
            proc.kill()
    from qwenstudio.service.store import Store

    store = Store(__import__("pathlib").Path(os.environ["QWENSTUDIO_HOME"]) / "service.db")
    row = store.get_job(job)
    store.close()
    assert row["status"] == "cancelled" and "shutdown" in row["error_message"]


def test_readyz_false_until_model_loaded_healthz_always(tiny_engine, tmp_path):
    import threading

    from svc_helpers import run_app

    from qwenstudio.config import Settings
    from qwenstudio.service.app import create_app
    from qwenstudio.service.engine_client import InProcessEngineClient

    gate = threading.Event()

    def slow_load():  # the real engine, handed over only when the test says the "load" is finished
        gate.wait(30)
        return tiny_engine

    client = InProcessEngineClient("tiny", "tiny", slow_load)
    app = create_app(Settings(home=tmp_path / "h"), client)
    try:
        with run_app(app) as url, httpx.Client(base_url=url, timeout=30) as http:
            assert http.get("/healthz").status_code == 200
            r = http.get("/readyz")
            assert r.status_code == 503 and r.json() == {"ready": False}
            job = http.post("/api/jobs", json=JOB).json()["id"]  # accepted, waits for the model
            assert http.get(f"/api/jobs/{job}").json()["status"] in ("queued", "running")
            gate.set()
            assert wait_status(http, job, ("done",))["status"] == "done"
            assert http.get("/readyz").json() == {"ready": True}
    finally:
        gate.set()
        client.close()
