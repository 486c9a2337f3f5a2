"""Queue behaviour on the real tiny model: cancel (queued, running, disconnect), bounds, deadline, fault isolation,
concurrency, metrics vs store."""

from __future__ import annotations

import re
import threading
import time

import httpx
from svc_helpers import JOB, SLOW, read_sse, wait_status


def _running_with_progress(http, job_id):
    deadline = time.monotonic() + 30
    while True:
        job = http.get(f"/api/jobs/{job_id}").json()
        live = job["status"] == "running"
        if live and job["progress"]["step"] >= 1 or time.monotonic() > deadline:
            return job
        time.sleep(0.02)


def test_cancel_queued_and_running(serve, store_url):
    with serve(store_url=store_url) as s, s.client() as http:
        running = http.post("/api/jobs", json=SLOW).json()["id"]
        queued = http.post("/api/jobs", json=JOB).json()["id"]
        job = _running_with_progress(http, running)
        assert job["status"] == "running"
        assert http.get(f"/api/jobs/{queued}").json()["position"] == 1

        assert http.post(f"/api/jobs/{queued}/cancel").json()["status"] == "cancelled"
        assert http.get(f"/api/jobs/{queued}").json()["status"] == "cancelled"
        t0 = time.monotonic()
        assert http.post(f"/api/jobs/{running}/cancel").json()["status"] == "cancelling"
        job = wait_status(http, running, ("cancelled",))
        assert time.monotonic() - t0 < 5  # stopped at the next step, not after 200
        assert job["progress"]["step"] < 200 and job["outputs"] == []
        assert [n for n, _ in read_sse(http, running)][-1] == "cancelled"
        assert http.post(f"/api/jobs/{running}/cancel").status_code == 409
        assert http.post("/api/jobs/nope/cancel").status_code == 404
        # the worker goes on
        assert http.post("/api/jobs?wait=true", json=JOB).json()["status"] == "done"


def test_queue_full_is_429_with_retry_after(serve, store_url):
    with serve(queue_size=1, retry_after_s=7, store_url=store_url) as s, s.client() as http:
        running = http.post("/api/jobs", json=SLOW).json()["id"]
        wait_status(http, running, ("running",))
        queued = http.post("/api/jobs", json=JOB).json()["id"]
        r = http.post("/api/jobs", json=JOB)
        assert r.status_code == 429 and r.headers["retry-after"] == "7"
        assert r.json()["error"]["code"] == "queue_full"
        r = http.post("/v1/images/generations", json={"prompt": "x"})
        assert r.status_code == 429 and r.headers["retry-after"] == "7"
        assert r.json()["error"]["type"] == "rate_limit_error"
        for j in (queued, running):
            http.post(f"/api/jobs/{j}/cancel")
        wait_status(http, running, ("cancelled",))
        assert http.get("/api/jobs").json()["total"] == 2  # rejected ones never reached the store


def test_deadline_cancels_and_reports(serve):
    with serve(job_deadline_s=2.0) as s, s.client() as http:
        job = http.post("/api/jobs?wait=true", json=SLOW).json()
        assert job["status"] == "failed" and job["error"]["code"] == "deadline_exceeded"
        assert job["progress"]["step"] < 200
        nxt = http.post("/api/jobs?wait=true", json=JOB).json()
        assert nxt["status"] == "done", nxt["error"]
        assert 'qwenstudio_job_failures_total{code="deadline_exceeded"} 1' in http.get("/metrics").text


def test_failure_in_one_job_fails_only_that_job(serve):
    """A real fault (outputs dir not writable) fails the job with a typed error and no partial file."""
    with serve() as s, s.client() as http:
        out = s.state.outputs_dir
        out.rmdir()
        out.write_text("not a directory")  # every write into it fails
        job = http.post("/api/jobs?wait=true", json=JOB).json()
        assert job["status"] == "failed" and job["error"]["code"] == "output_write_failed"
        assert str(s.home) not in job["error"]["message"]  # no internals leak
        out.unlink()
        out.mkdir()
        job = http.post("/api/jobs?wait=true", json=JOB).json()
        assert job["status"] == "done"
        assert len(list(out.iterdir())) == 1


def test_client_disconnect_from_wait_cancels_its_job(serve):
    with serve() as s, s.client() as http:
        def waiting_call():
            try:
                httpx.post(s.url + "/api/jobs?wait=true", json=SLOW, timeout=0.5)
            except httpx.TimeoutException:
                pass  # we hang up

        t = threading.Thread(target=waiting_call)
        t.start()
        t.join()
        jobs = http.get("/api/jobs").json()["jobs"]
        assert len(jobs) == 1
        job = wait_status(http, jobs[0]["id"], ("cancelled",), timeout=10)
        assert job["progress"]["step"] < 200


def test_concurrent_submitters_and_metrics_agree_with_store(serve, store_url):
    with serve(queue_size=32, store_url=store_url) as s, s.client() as http:
        ids, errors = [], []
        lock = threading.Lock()

        def submit(i):
            try:
                with httpx.Client(base_url=s.url, timeout=60) as c:
                    r = c.post("/api/jobs", json={**JOB, "seed": i, "steps": 1})
                    assert r.status_code == 202, r.text
                    with lock:
                        ids.append(r.json()["id"])
            except Exception as e:  # noqa: BLE001 (surfaced below)
                errors.append(e)

        threads = [threading.Thread(target=submit, args=(i,)) for i in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors and len(ids) == 20 and len(set(ids)) == 20
        for j in ids:
            wait_status(http, j, ("done",))
        listed = http.get("/api/jobs", params={"limit": 200}).json()
        assert listed["total"] == 20 and {j["id"] for j in listed["jobs"]} == set(ids)
        seeds = sorted(j["request"]["seed"] for j in listed["jobs"])
        assert seeds == list(range(20))  # each ran exactly once, none lost
        assert all(len(j["outputs"]) == 1 for j in listed["jobs"])
        http.post("/api/jobs", json={**JOB, "steps": 0})  # a rejected request is not a job

        text = http.get("/metrics").text
        assert http.get("/metrics").headers["content-type"].startswith("text/plain")

        def metric(name):
            m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
            return float(m.group(1))

        store = s.state.store.count_by_status()
        assert metric("qwenstudio_jobs_submitted_total") == sum(store.values()) == 20
        assert metric('qwenstudio_jobs_finished_total{status="done"}') == store["done"] == 20
        assert metric("qwenstudio_job_duration_seconds_count") == 20
        assert metric('qwenstudio_job_duration_seconds_bucket{le="+Inf"}') == 20
        assert metric("qwenstudio_queue_depth") == 0
        assert metric("qwenstudio_steps_total") == 20
        assert metric("qwenstudio_steps_per_second") > 0
