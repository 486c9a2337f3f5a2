"""The service on a Ray Serve deployment of the tiny model (``RayServeEngineClient``): a local Ray started here, one
CPU replica. Skipped without the optional extra (``pip install 'qwenstudio[ray]'``)."""

from __future__ import annotations

import time

import pytest
from svc_helpers import JOB, SLOW, read_sse, run_app, wait_status

ray = pytest.importorskip("ray")
pytest.importorskip("ray.serve")


@pytest.fixture(scope="module")
def ray_client(tiny_folder, tmp_path_factory):
    from qwenstudio.config import Settings
    from qwenstudio.service.ray_client import RayServeEngineClient

    started = time.monotonic()
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=80 * 1024 * 1024, log_to_driver=False)
    init_s = time.monotonic() - started
    client = RayServeEngineClient("tiny", "tiny", str(tiny_folder), device="cpu", num_replicas=1, num_cpus=1,
                                  settings=Settings(home=tmp_path_factory.mktemp("ray-engine-home")))
    try:
        assert client.wait_ready(120), client.load_error
        print(f"\nray.init {init_s:.1f} s; Serve deployment + model load {client.startup_s:.1f} s")
        yield client
    finally:
        client.close()
        ray.shutdown()


@pytest.fixture
def served(ray_client, tmp_path):
    import httpx

    from qwenstudio.config import Settings
    from qwenstudio.service.app import create_app
    from qwenstudio.service.config import ServiceConfig

    app = create_app(Settings(home=tmp_path / "home"), ray_client, ServiceConfig())
    with run_app(app) as url, httpx.Client(base_url=url, timeout=60) as http:
        yield http


def test_job_runs_on_a_replica_with_progress(served, ray_client):
    assert ray_client.ready and [m.id for m in ray_client.models()] == ["tiny"]
    assert served.get("/readyz").status_code == 200
    job = served.post("/api/jobs", json={**JOB, "steps": 3, "preview_every": 1}).json()
    events = read_sse(served, job["id"])
    names = [n for n, _ in events]
    assert names[-1] == "done", events
    progress = [d for n, d in events if n == "progress"]
    assert [p["step"] for p in progress] == [1, 2, 3] and all(p["total"] == 3 for p in progress)
    assert "preview" in names
    out = events[-1][1]["outputs"][0]
    assert out["metadata"]["seed"] == JOB["seed"]
    png = served.get(out["url"])
    assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n"


def test_cancel_reaches_the_replica_and_it_goes_on(served, ray_client):
    cancelled_before = ray_client.replica_info()["runs"]["cancelled"]
    job_id = served.post("/api/jobs", json=SLOW).json()["id"]
    deadline = time.monotonic() + 30
    while served.get(f"/api/jobs/{job_id}").json().get("progress", {}).get("step", 0) < 1:
        assert time.monotonic() < deadline, "the slow job never made progress"
        time.sleep(0.05)
    asked = time.monotonic()
    assert served.post(f"/api/jobs/{job_id}/cancel").json()["status"] == "cancelling"
    wait_status(served, job_id, ("cancelled",), timeout=15)
    assert time.monotonic() - asked < 10
    assert [n for n, _ in read_sse(served, job_id)][-1] == "cancelled"
    # the replica stopped the run and takes the next job
    ok = served.post("/api/jobs?wait=true", json=JOB).json()
    assert ok["status"] == "done", ok
    runs = ray_client.replica_info()["runs"]  # the engine on the replica stopped the run (not just the client)
    assert runs["cancelled"] == cancelled_before + 1, runs


def test_typed_errors_keep_their_class_and_code(served, ray_client):
    from qwenstudio.engine.job import EngineJob
    from qwenstudio.engine.requests import GenerateRequest
    from qwenstudio.errors import InvalidRequest, ModelNotFound

    # refused at prepare, which runs on a replica (tokenizer): 422 with the engine's code, nothing queued
    r = served.post("/api/jobs", json={"prompt": "word " * 1100, "steps": 1})
    assert r.status_code == 422 and r.json()["error"]["code"] == "prompt_too_long", r.text
    assert served.get("/api/jobs").json()["total"] == 0
    # raised inside a replica's run (an unvalidated request straight to submit): same class, same code
    with pytest.raises(InvalidRequest) as e:
        ray_client.submit(EngineJob("bad", "tiny", GenerateRequest(prompt="x", steps=0)), lambda ev: True)
    assert e.value.code == "invalid_steps" and e.value.status == 422
    with pytest.raises(ModelNotFound):
        ray_client.submit(EngineJob("other", "nope", GenerateRequest(prompt="x")), lambda ev: True)


def test_inpaint_edit_ships_its_inputs_and_comes_back_pixel_exact(served):
    import io

    import numpy as np
    from PIL import Image

    def png(im) -> bytes:
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return buf.getvalue()

    source = Image.new("RGB", (70, 50), (200, 30, 30))
    mask = Image.new("L", (70, 50), 0)
    mask.paste(255, (20, 10, 50, 40))
    img_id = served.post("/api/uploads", files={"file": ("a.png", png(source), "image/png")}).json()["id"]
    mask_id = served.post("/api/uploads", files={"file": ("m.png", png(mask), "image/png")}).json()["id"]
    job = served.post("/api/jobs?wait=true", json={"prompt": "a blue square", "images": [img_id], "mask": mask_id,
                                                   "steps": 2, "seed": 3}).json()
    assert job["status"] == "done", job.get("error")
    result = np.asarray(Image.open(io.BytesIO(served.get(job["outputs"][0]["url"]).content)).convert("RGB"))
    assert result.shape == (50, 70, 3)
    outside = np.asarray(mask) == 0
    assert np.array_equal(result[outside], np.asarray(source)[outside])  # lossless PNG transport, untouched pixels
