"""Several workers on one store (SECURITY 26): each job runs exactly once, none lost, whichever process queued it;
cross-process waiting, events and cancel; a per-key rate limit (17). The store tests run on both backends (SQLite
in the home, and a real PostgreSQL server: the ``store_url`` fixture)."""

from __future__ import annotations

import threading
import time
from contextlib import ExitStack

import httpx
import pytest
from svc_helpers import JOB, SLOW, read_sse, run_app, wait_status


@pytest.fixture
def second_engine(tiny_folder):
    """A second tiny engine: two workers in one test process must not share one engine's state."""
    from qwenstudio import Engine

    return Engine.load(tiny_folder, variant="tiny", device="cpu")


def _app(home, engine, **config):
    from qwenstudio.config import Settings
    from qwenstudio.service.app import create_app
    from qwenstudio.service.config import ServiceConfig
    from qwenstudio.service.engine_client import InProcessEngineClient

    client = InProcessEngineClient.from_engine(engine)
    client.wait_ready(30)
    return create_app(Settings(home=home), client, ServiceConfig.with_keys((), **config)), client


def test_two_workers_one_store_each_job_exactly_once(tiny_engine, second_engine, tmp_path, store_url):
    home = tmp_path / "shared"
    app_a, client_a = _app(home, tiny_engine, queue_size=64, store_url=store_url)
    app_b, client_b = _app(home, second_engine, queue_size=64, store_url=store_url)
    assert app_a.state.store.backend == ("postgresql" if store_url else "sqlite")
    try:
        with ExitStack() as stack:
            urls = [stack.enter_context(run_app(app_a)), stack.enter_context(run_app(app_b))]
            results, errors = {}, []
            lock = threading.Lock()

            def submit(i):
                try:  # submitters alternate between the two servers; they wait through whichever server queued
                    r = httpx.post(urls[i % 2] + "/api/jobs?wait=true", json={**JOB, "seed": i, "steps": 1},
                                   timeout=120)
                    assert r.status_code == 200, r.text
                    with lock:
                        results[i] = r.json()
                except Exception as e:  # noqa: BLE001 (surfaced below)
                    errors.append(e)

            threads = [threading.Thread(target=submit, args=(i,)) for i in range(30)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(180)
            assert not errors, errors[:3]
            assert len(results) == 30 and all(j["status"] == "done" for j in results.values())
            assert len({j["id"] for j in results.values()}) == 30

            store = app_a.state.store
            rows, total = store.list_jobs(limit=200)
            assert total == 30 and sorted(r["request"]["seed"] for r in rows) == list(range(30))
            assert all(r["status"] == "done" and len(r["outputs"]) == 1 for r in rows)
            owners = {r["worker_id"] for r in rows}
            assert owners <= {app_a.state.jobs.worker_id, app_b.state.jobs.worker_id}
            ran = app_a.state.metrics.finished["done"] + app_b.state.metrics.finished["done"]
            assert ran == 30  # every engine run is counted where it happened: 30 runs for 30 jobs
            assert app_a.state.metrics.submitted + app_b.state.metrics.submitted == 30
            assert len(list(app_a.state.outputs_dir.iterdir())) == 30  # no job ran twice (one file per run)
            with httpx.Client(base_url=urls[1]) as http:  # a job is visible (and its file served) from either server
                any_job = results[0]
                assert http.get(any_job["outputs"][0]["url"]).status_code == 200
    finally:
        client_a.close()
        client_b.close()


def test_api_only_process_queues_for_a_worker_elsewhere(tiny_engine, tmp_path, store_url):
    """An API-only app (no worker) and a worker app on one store: the worker runs what the API queued; the API
    process follows it (wait, SSE) and cancels it across processes."""
    home = tmp_path / "split"
    api, api_client = _app(home, tiny_engine, run_worker=False, queue_size=8, store_url=store_url)
    worker, worker_client = _app(home, tiny_engine, queue_size=8, store_url=store_url)
    try:
        with ExitStack() as stack:
            api_url = stack.enter_context(run_app(api))
            stack.enter_context(run_app(worker))
            with httpx.Client(base_url=api_url, timeout=60) as http:
                done = http.post("/api/jobs?wait=true", json=JOB).json()
                assert done["status"] == "done" and http.get(done["outputs"][0]["url"]).status_code == 200
                row = api.state.store.get_job(done["id"])
                assert row["worker_id"] == worker.state.jobs.worker_id
                events = [n for n, _ in read_sse(http, done["id"])]
                assert events[-1] == "done"

                slow = http.post("/api/jobs", json=SLOW).json()["id"]
                deadline = time.monotonic() + 30
                while http.get(f"/api/jobs/{slow}").json()["progress"]["step"] < 1:
                    assert time.monotonic() < deadline
                    time.sleep(0.02)
                t0 = time.monotonic()
                assert http.post(f"/api/jobs/{slow}/cancel").json()["status"] == "cancelling"
                job = wait_status(http, slow, ("cancelled",), timeout=10)
                assert time.monotonic() - t0 < 5 and job["progress"]["step"] < 200
                assert [n for n, _ in read_sse(http, slow)][-1] == "cancelled"
    finally:
        api_client.close()
        worker_client.close()


def test_claim_is_atomic_across_store_connections(tmp_path, store_url):
    """Many claimers on separate connections (as separate processes have): every queued row claimed once."""
    from qwenstudio.service.store import Store

    path = store_url or tmp_path / "q.db"
    seed_store = Store(path)
    for i in range(60):
        assert seed_store.insert_job(f"{i:032x}", "tiny", {"prompt": str(i)}) == i + 1
    claimed: list[tuple[str, str]] = []
    lock = threading.Lock()

    def claimer(n):
        store = Store(path)
        while (row := store.claim_next(f"w{n}", ["tiny"])) is not None:
            with lock:
                claimed.append((row["id"], f"w{n}"))
        store.close()

    threads = [threading.Thread(target=claimer, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    ids = [c[0] for c in claimed]
    assert len(ids) == 60 and len(set(ids)) == 60
    assert seed_store.count_by_status() == {"running": 60}
    assert seed_store.insert_job("f" * 32, "tiny", {"prompt": "x"}, max_queued=0) is None  # bound, atomically
    seed_store.close()


def test_rate_limit_per_key_is_429_with_retry_after(serve):
    with serve(keys=("key-a", "key-b"), rate_limit_per_min=3) as s, s.client() as http:
        a = {"Authorization": "Bearer key-a"}
        codes = [http.post("/api/presets", json={"name": f"p{i}", "params": {}}, headers=a).status_code
                 for i in range(3)]
        assert codes == [201, 201, 201]
        r = http.post("/api/presets", json={"name": "p9", "params": {}}, headers=a)
        assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limited"
        assert 1 <= int(r.headers["retry-after"]) <= 20
        r = http.post("/v1/images/generations", json={"prompt": "x"}, headers=a)
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
        assert http.get("/api/presets", headers=a).status_code == 200  # reads are not limited
        b = {"X-API-Key": "key-b"}  # another key has its own bucket
        assert http.post("/api/presets", json={"name": "b1", "params": {}}, headers=b).status_code == 201
        assert http.post("/api/presets", json={"name": "x", "params": {}}, headers={"Authorization": "Bearer no"}
                         ).status_code == 401  # an unknown key is refused before it can drain anything
        assert 'qwenstudio_requests_rejected_total{code="rate_limited"} 2' in http.get("/metrics", headers=b).text
