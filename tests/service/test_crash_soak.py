"""kill -9 mid-job then restart on the same home (SECURITY 25), and a bounded soak: RSS, file descriptors and
threads stay flat and /metrics agrees with the store (27)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
from svc_helpers import JOB, SLOW, wait_status


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start(home) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = {**os.environ, "QWENSTUDIO_HOME": str(home)}
    proc = subprocess.Popen([sys.executable, "-m", "qwenstudio.cli.serve", "--port", str(port), "--model", "tiny"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        assert proc.poll() is None, "server exited"
        assert time.monotonic() < deadline, "server did not become ready"
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.05)


def test_kill_9_mid_job_then_restart(tmp_path):
    home = tmp_path / "home"
    proc, url = _start(home)
    try:
        with httpx.Client(base_url=url, timeout=60) as http:
            done = http.post("/api/jobs?wait=true", json=JOB).json()
            assert done["status"] == "done"
            png = http.get(done["outputs"][0]["url"]).content
            slow = http.post("/api/jobs", json=SLOW).json()["id"]
            queued = http.post("/api/jobs", json=JOB).json()["id"]
            deadline = time.monotonic() + 30
            while http.get(f"/api/jobs/{slow}").json()["progress"]["step"] < 1:
                assert time.monotonic() < deadline
                time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(10) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
    proc, url = _start(home)  # same home, right away: the dead pid is recognised as dead at once
    try:
        with httpx.Client(base_url=url, timeout=60) as http:
            for jid in (slow, queued):
                job = http.get(f"/api/jobs/{jid}").json()
                assert job["status"] == "failed" and job["error"]["code"] == "interrupted", job
                assert [n for n, _ in __import__("svc_helpers").read_sse(http, jid)] == ["failed"]
            for status in ("running", "queued"):
                assert http.get("/api/jobs", params={"status": status}).json()["total"] == 0
            again = http.get(f"/api/jobs/{done['id']}").json()
            assert again["status"] == "done" and again["outputs"] == done["outputs"]
            assert http.get(done["outputs"][0]["url"]).content == png
            history = http.get("/api/history").json()
            assert [i["id"] for i in history["items"]] == [done["outputs"][0]["id"]]
            assert not [p for p in (home / "outputs").iterdir() if not p.name.endswith(".png")]  # no temp files
            assert http.post("/api/jobs?wait=true", json=JOB).json()["status"] == "done"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_soak_flat_rss_fds_threads_and_metrics_agree(serve):
    with serve(queue_size=64) as s, s.client() as http:
        def batch(n, seed0):
            ids = []
            for i in range(n):
                r = http.post("/api/jobs", json={**JOB, "seed": seed0 + i, "steps": 1})
                assert r.status_code == 202, r.text
                ids.append(r.json()["id"])
            for j in ids[::3]:  # some are followed over SSE, like a UI would
                with http.stream("GET", f"/api/jobs/{j}/events") as r:
                    for _ in r.iter_lines():
                        pass
            for j in ids:
                wait_status(http, j, ("done",))
            http.get("/api/history")

        batch(20, 0)  # warm-up: caches, thread pools, the first of everything
        time.sleep(0.3)
        rss0, fds0, threads0 = _rss_kb(), _fds(), threading.active_count()
        batch(60, 100)
        time.sleep(0.3)
        rss1, fds1, threads1 = _rss_kb(), _fds(), threading.active_count()
        assert fds1 - fds0 <= 4, (fds0, fds1)
        assert threads1 - threads0 <= 2, (threads0, threads1)
        assert rss1 - rss0 < 64 * 1024, f"RSS grew {rss1 - rss0} kB over 60 jobs"

        text = http.get("/metrics").text

        def metric(name):
            return float(re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE).group(1))

        store = s.state.store.count_by_status()
        assert store == {"done": 80}
        assert metric("qwenstudio_jobs_submitted_total") == 80
        assert metric('qwenstudio_jobs_finished_total{status="done"}') == store["done"]
        assert metric("qwenstudio_job_duration_seconds_count") == 80
        assert metric("qwenstudio_queue_depth") == 0 and metric("qwenstudio_jobs_running") == 0
        assert len(list(s.state.outputs_dir.iterdir())) == 80
