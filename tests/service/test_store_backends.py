"""What differs between the two store backends is hidden behind one interface; these pin the parts a second
backend could get wrong: the queue bound under concurrent submitters, preset names, and ``serve --store`` errors."""

from __future__ import annotations

import socket
import threading

from typer.testing import CliRunner


def test_queue_bound_holds_under_concurrent_submitters(tmp_path, store_url):
    """16 submitters on their own connections race for 5 places (and, on a new database, to create the schema):
    exactly 5 get in, with positions 1..5."""
    from qwenstudio.service.store import Store

    location = store_url or tmp_path / "q.db"
    positions, lock = [], threading.Lock()

    def submit(i):
        store = Store(location)
        try:
            pos = store.insert_job(f"{i:032x}", "tiny", {"prompt": str(i)}, max_queued=5)
        finally:
            store.close()
        with lock:
            positions.append(pos)

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(p for p in positions if p is not None) == [1, 2, 3, 4, 5]
    assert positions.count(None) == 11
    store = Store(location)
    rows, total = store.list_jobs()
    assert total == 5 and sorted(r["seq"] for r in rows) == [1, 2, 3, 4, 5]  # no seq handed out twice
    store.close()


def test_preset_name_taken_is_409_on_both_backends(serve, store_url):
    with serve(store_url=store_url) as s, s.client() as http:
        first = http.post("/api/presets", json={"name": "fox", "params": {"steps": 2}})
        assert first.status_code == 201
        again = http.post("/api/presets", json={"name": "fox", "params": {"steps": 3}})
        assert again.status_code == 409 and again.json()["error"]["code"] == "preset_exists"
        other = http.post("/api/presets", json={"name": "owl", "params": {}}).json()
        r = http.put(f"/api/presets/{other['id']}", json={"name": "fox", "params": {}})
        assert r.status_code == 409 and r.json()["error"]["code"] == "preset_exists"
        assert [p["name"] for p in http.get("/api/presets").json()["presets"]] == ["fox", "owl"]
        assert http.get("/api/jobs", params={"q": "FOX"}).json()["total"] == 0
        http.post("/api/jobs?wait=true", json={"prompt": "A Red Fox_50%", "seed": 1, "steps": 1})
        for q, n in (("red fox", 1), ("_50%", 1), ("r_d fox", 0), ("a%fox", 0)):  # any case; % and _ literal
            assert http.get("/api/jobs", params={"q": q}).json()["total"] == n, q


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_serve_store_errors_are_one_line(monkeypatch):
    from qwenstudio.cli.main import app

    runner = CliRunner()
    r = runner.invoke(app, ["serve", "--store", "mysql://db.lan/jobs"])
    assert r.exit_code == 2 and r.output.strip().count("\n") == 0 and "unknown store 'mysql://'" in r.output
    url = f"postgresql://qs:s3cret-pw@127.0.0.1:{_closed_port()}/jobs"
    monkeypatch.setenv("QWENSTUDIO_STORE", url)  # the env var serves as --store
    r = runner.invoke(app, ["serve"])
    assert r.exit_code == 2 and r.output.strip().count("\n") == 0, r.output
    assert r.output.startswith("error: cannot open the PostgreSQL store postgresql://qs:***@127.0.0.1:")
    assert "s3cret-pw" not in r.output and "Traceback" not in r.output


def test_lease_lost_records_nothing_on_both_backends(tmp_path, store_url):
    """The store half of SECURITY 32 (the process half is test_shutdown_and_leases): a lease that ran out is never
    renewed, its owner's result is refused, and a reaper marks the job failed "interrupted" once."""
    import time

    from qwenstudio.service.store import LEASE_LOST, Store

    store = Store(store_url or tmp_path / "lease.db")
    try:
        assert store.register_worker("w1", "this-host", 1, stale_s=10) == 0  # pid 1 exists: a live worker
        store.insert_job("a" * 32, "tiny", {"prompt": "held"})
        store.insert_job("b" * 32, "tiny", {"prompt": "lost"})
        held = store.claim_next("w1", ["tiny"], lease_s=30)
        lost = store.claim_next("w1", ["tiny"], lease_s=0.2)
        assert (held["id"], lost["id"]) == ("a" * 32, "b" * 32) and store.claim_next("w2", ["tiny"]) is None
        time.sleep(0.3)
        assert store.renew_lease(held["id"], "w1", 30) and not store.renew_lease(lost["id"], "w1", 30)
        assert not store.renew_lease(held["id"], "w2", 30)  # only the owner renews
        outputs = [("o" * 32, 0, "x.png", {"seed": 1})]
        assert not store.finish_owned(lost["id"], "w1", "done", outputs=outputs)
        assert store.reap_dead("this-host", stale_s=10) == 1
        row = store.get_job(lost["id"])
        assert row["status"] == "failed" and row["error_message"] == LEASE_LOST and row["outputs"] == []
        assert store.reap_dead("this-host", stale_s=10) == 0
        assert store.finish_owned(held["id"], "w1", "done", outputs=outputs)
        assert store.get_job(held["id"])["outputs"][0]["metadata"] == {"seed": 1}
        assert store.count_by_status() == {"done": 1, "failed": 1}
    finally:
        store.close()


def test_postgres_connection_lost_is_a_typed_503_then_reconnects(postgres_server):
    """The server drops our connection (restart, failover): that call is StoreUnavailable (503, code
    store_unavailable), and the store carries on with a new connection."""
    import psycopg
    import pytest

    from qwenstudio.service.errors import StoreUnavailable
    from qwenstudio.service.store import Store

    url = postgres_server.create_database()
    store = Store(url)
    try:
        store.insert_job("a" * 32, "tiny", {"prompt": "before"})
        with psycopg.connect(postgres_server.url(), autocommit=True) as admin:
            killed = admin.execute("SELECT pg_terminate_backend(pid) AS ok FROM pg_stat_activity WHERE datname=%s "
                                   "AND pid <> pg_backend_pid()", (url.rsplit("/", 1)[1],)).fetchall()
        assert killed and all(r[0] for r in killed)
        with pytest.raises(StoreUnavailable) as lost:
            store.count_queued()
        assert lost.value.status == 503 and lost.value.code == "store_unavailable"
        assert store.count_queued() == 1 and store.claim_next("w", ["tiny"])["id"] == "a" * 32
    finally:
        store.close()
