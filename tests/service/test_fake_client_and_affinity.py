"""Service behaviour without a model: the fake EngineClient (qwenstudio.testing.fake_client) over httpx's ASGI
transport — the OpenAI job-id header, presets naming a model — and the worker's model-affinity order (bounded)."""

from __future__ import annotations

import asyncio
import base64
import io
import time

import numpy as np
from PIL import Image

from qwenstudio.testing.asgi import asgi_client
from qwenstudio.testing.fake_client import FakeEngineClient, fake_colour


def make_app(tmp_path, client, **config):
    from qwenstudio.config import Settings
    from qwenstudio.service.app import create_app
    from qwenstudio.service.config import ServiceConfig

    return create_app(Settings(home=tmp_path / "home"), client, ServiceConfig(**config))


def test_openai_responses_carry_the_job_id_to_follow_events_and_history(tmp_path):
    client = FakeEngineClient(("a", "b"), load_s=0.01)
    app = make_app(tmp_path, client)

    async def scenario():
        async with asgi_client(app) as http:
            r = await http.post("/v1/images/generations", json={"model": "b", "prompt": "fox", "size": "64x64",
                                                                "seed": 3, "steps": 3})
            assert r.status_code == 200
            job_id = r.headers["X-Qwenstudio-Job-Id"]
            png = base64.b64decode(r.json()["data"][0]["b64_json"])
            job = (await http.get(f"/api/jobs/{job_id}")).json()
            events = (await http.get(f"/api/jobs/{job_id}/events")).text
            history = (await http.get("/api/history")).json()
            failed = await http.post("/v1/images/generations", json={"model": "a", "prompt": "fox", "size": "64x64",
                                                                     "steps": 10**6})
            return png, job, events, history, failed

    png, job, events, history, failed = asyncio.run(scenario())
    assert job["model"] == "b" and job["status"] == "done" and job["request"]["seed"] == 3
    assert job["outputs"][0]["metadata"]["model"]["name"] == "b"
    assert "event: loading" in events and "event: done" in events
    assert history["items"][0]["job_id"] == job["id"]
    img = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    assert img.shape == (64, 64, 3) and tuple(img[0, 0]) == fake_colour("b", "fox", 3)
    assert failed.status_code == 400 and "X-Qwenstudio-Job-Id" not in failed.headers  # refused before queueing


def test_a_preset_naming_a_model_runs_on_that_model(tmp_path):
    client = FakeEngineClient(("a", "b"))
    app = make_app(tmp_path, client)

    async def scenario():
        async with asgi_client(app) as http:
            r = await http.post("/api/presets", json={"name": "on-b", "params": {"model": "b", "steps": 3}})
            assert r.status_code == 201, r.text
            bad = await http.post("/api/presets", json={"name": "x", "params": {"model": "nope"}})
            job = (await http.post("/api/jobs", params={"wait": "true"},
                                   json={"prompt": "fox", "seed": 1, "preset": "on-b"})).json()
            plain = (await http.post("/api/jobs", params={"wait": "true"}, json={"prompt": "fox", "seed": 1})).json()
            return bad, job, plain

    bad, job, plain = asyncio.run(scenario())
    assert bad.status_code == 404 and bad.json()["error"]["code"] == "model_not_found"
    assert job["model"] == "b" and job["outputs"][0]["metadata"]["model"]["name"] == "b"
    assert job["request"]["steps"] == 3
    assert plain["model"] == "a"  # no preset, no model: the default (first) one


def test_model_affinity_prefers_the_loaded_model_within_its_bound(tmp_path):
    """Queue a, b, a, a, a, a with 'a' loaded and K = 2: two 'a' jobs may pass the older 'b', then 'b' is taken;
    a 'b' job that already waited T is taken at once."""
    from qwenstudio.service.scheduling import ModelAffinity
    from qwenstudio.service.store import Store

    store = Store(tmp_path / "s.db")
    ids = []
    for i, model in enumerate("abaaaa"):
        ids.append(f"j{i}{model}")
        store.insert_job(ids[-1], model, {"prompt": "x"})
    policy = ModelAffinity(max_consecutive=2, max_wait_s=60)
    order = []
    resident = ["a"]
    while (row := policy.claim(store, "w", ["a", "b"], resident)) is not None:
        order.append(row["id"])
        resident = [row["model"]]  # the worker now has this model loaded
    assert order == ["j0a", "j2a", "j3a", "j1b", "j4a", "j5a"]

    store.insert_job("old-b", "b", {"prompt": "x"})
    store.insert_job("new-a", "a", {"prompt": "x"})
    policy = ModelAffinity(max_consecutive=100, max_wait_s=0.05)
    time.sleep(0.1)
    assert policy.claim(store, "w", ["a", "b"], ["a"])["id"] == "old-b"  # waited past T: FIFO
    store.close()


def test_schedulers_and_samplers_that_need_two_steps_are_refused_before_queueing(tmp_path):
    """Found by the fuzz test: ``kl_optimal`` (and UniPC) at 1 step failed inside the run and answered 500."""
    client = FakeEngineClient(("a",))
    app = make_app(tmp_path, client)

    async def scenario():
        async with asgi_client(app) as http:
            out = []
            for extra in ({"scheduler": "kl_optimal"}, {"sampler": "uni_pc"}, {"sampler": "uni_pc_bh2"}):
                body = {"model": "a", "prompt": "fox", "size": "64x64", "steps": 1, **extra}
                out.append(await http.post("/v1/images/generations", json=body))
                out.append(await http.post("/api/jobs", json={k: v for k, v in body.items() if k != "size"}))
            return out

    for r in asyncio.run(scenario()):
        assert r.status_code in (400, 422), r.text
        assert r.json()["error"]["code"] == "invalid_steps"
        assert "X-Qwenstudio-Job-Id" not in r.headers
