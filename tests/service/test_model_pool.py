"""Many models per server (service/model_pool.py): two tiny models with different weights in one models dir, served
by one app; every job runs on the model it named (SECURITY 23), an LRU resident set under a budget, typed refusals
at submit, the ``loading`` event."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import shutil
import threading
import weakref

import httpx
import numpy as np
import pytest
from PIL import Image
from svc_helpers import run_app

from qwenstudio.testing.asgi import asgi_client

REQ = {"prompt": "a red fox", "steps": 2, "width": 64, "height": 64}
SEEDS = (1, 2)


@pytest.fixture(scope="session")
def models_dir(tiny_folder, tmp_path_factory):
    """tiny-a = TinySpec(seed=0) (the session's folder, copied), tiny-b = TinySpec(seed=1): same architecture,
    different weights."""
    from qwenstudio.testing.tiny import TinySpec, write_diffusers_folder

    root = tmp_path_factory.mktemp("pool-models")
    shutil.copytree(tiny_folder, root / "tiny-a")
    write_diffusers_folder(root / "tiny-b", TinySpec(seed=1))
    return root


@pytest.fixture(scope="session")
def references(models_dir):
    """(model, seed) -> (pixels, fingerprint) of a direct Engine run of that model, outside any server."""
    from qwenstudio import Engine

    out = {}
    for name in ("tiny-a", "tiny-b"):
        engine = Engine.load(models_dir / name, device="cpu")
        for seed in SEEDS:
            img = engine.generate(**REQ, seed=seed).images[0]
            out[name, seed] = (np.asarray(img.image), img.metadata["model"]["fingerprint"])
        del engine
    return out


@pytest.fixture
def pool(models_dir, tmp_path, monkeypatch):
    """Factory: an app whose client serves both models, ``tiny-a`` (the --model) preloaded."""
    from qwenstudio.config import Settings
    from qwenstudio.service.app import create_app
    from qwenstudio.service.model_pool import LoadOptions, ModelCatalog, MultiModelEngineClient

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-empty"))  # nothing from the machine's HF cache
    made = []

    def make(max_resident: int | None = None, memory=None):
        settings = Settings(home=tmp_path / "home", models_dirs=(models_dir,), device="cpu")
        catalog = ModelCatalog(settings, "tiny-a", LoadOptions(device="cpu"), memory=memory)
        client = MultiModelEngineClient(catalog, max_resident=max_resident)
        made.append(client)
        assert client.wait_ready(120)
        return create_app(settings, client)

    yield make
    for c in made:
        c.close()


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def sse_events(text: str) -> list[tuple[str, dict]]:
    events, name = [], None
    for line in text.splitlines():
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            events.append((name, json.loads(line[6:])))
    return events


def test_mixed_models_under_concurrent_load_never_run_on_the_wrong_model(pool, references):
    """40 jobs from 4 client threads (native and OpenAI routes), alternating two models with different weights:
    each output's metadata names the model its job asked for, and its pixels equal a direct run of that model."""
    app = pool(max_resident=2)
    results, errors = [], []

    def client_thread(k: int) -> None:
        try:
            with run_app_url() as http:
                for i in range(10):
                    model, seed = ("tiny-a", "tiny-b")[(k + i) % 2], SEEDS[i % 2]
                    if k % 2:  # OpenAI route: the job id comes back in a header
                        r = http.post("/v1/images/generations", json={"model": model, "prompt": REQ["prompt"],
                                                                      "size": "64x64", "steps": 2, "seed": seed})
                        assert r.status_code == 200, r.text
                        job = http.get(f"/api/jobs/{r.headers['X-Qwenstudio-Job-Id']}").json()
                        png = base64.b64decode(r.json()["data"][0]["b64_json"])
                    else:
                        r = http.post("/api/jobs", params={"wait": "true"}, json={**REQ, "model": model, "seed": seed})
                        assert r.status_code == 200, r.text
                        job = r.json()
                        png = http.get(job["outputs"][0]["url"]).content
                    results.append((model, seed, job, png))
        except BaseException as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    with run_app(app) as url:
        def run_app_url():
            return httpx.Client(base_url=url, timeout=120)

        threads = [threading.Thread(target=client_thread, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
    assert not errors, errors
    assert len(results) == 40
    for model, seed, job, png in results:
        assert job["status"] == "done" and job["model"] == model
        meta = job["outputs"][0]["metadata"]
        want_pixels, want_fingerprint = references[model, seed]
        assert meta["model"]["name"] == model and meta["model"]["fingerprint"] == want_fingerprint
        assert meta["seed"] == seed
        assert np.array_equal(pixels(png), want_pixels), (model, seed)
    assert {m for m, *_ in results} == {"tiny-a", "tiny-b"}


def test_eviction_under_a_budget_of_one_model_frees_it_and_shows_loading(pool, references):
    """--max-resident 1: a job for the other model evicts the loaded one (its engine is collected), the switch
    shows as ``loading`` events over SSE (start, the loader's progress fractions, done), and switching back loads
    again — with the right pixels each time."""
    app = pool(max_resident=1)
    client = app.state.client
    assert client.resident_models() == ["tiny-a"]
    engine_a = weakref.ref(client.engine("tiny-a"))

    async def scenario():
        async with asgi_client(app) as http:
            listed = {m["id"]: m for m in (await http.get("/api/models")).json()["models"]}
            assert listed["tiny-a"]["resident"] is True and listed["tiny-b"]["resident"] is False
            assert listed["tiny-b"]["variant"] == "tiny" and listed["tiny-b"]["format"] == "diffusers"
            assert "model_index" in listed["tiny-b"]["variant_reason"]
            v1 = {m["id"]: m for m in (await http.get("/v1/models")).json()["data"]}
            assert set(v1) >= {"tiny-a", "tiny-b"} and v1["tiny-b"]["variant"] == "tiny"

            out = []
            for model in ("tiny-b", "tiny-a"):
                r = await http.post("/api/jobs", json={**REQ, "model": model, "seed": 1})
                assert r.status_code == 202, r.text
                job_id = r.json()["id"]
                events = sse_events((await http.get(f"/api/jobs/{job_id}/events")).text)
                job = (await http.get(f"/api/jobs/{job_id}")).json()
                png = (await http.get(job["outputs"][0]["url"])).content
                out.append((model, events, job, png))
                listed = {m["id"]: m for m in (await http.get("/api/models")).json()["models"]}
                assert [m for m, v in listed.items() if v["resident"]] == [model]
            return out

    for model, events, job, png in asyncio.run(scenario()):
        names = [e for e, _ in events]
        assert names.index("loading") < names.index("progress") < names.index("done")
        loading = [d for e, d in events if e == "loading"]
        assert loading[0] == {"model": model, "phase": "start"}
        other = "tiny-a" if model == "tiny-b" else "tiny-b"
        assert loading[-1]["phase"] == "done" and loading[-1]["evicted"] == [other] and loading[-1]["seconds"] > 0
        # between start and done, the loader's progress: several rising fractions of the weights' bytes, ending at 1
        fractions = [d["fraction"] for d in loading[1:-1]]
        assert [d["phase"] for d in loading[1:-1]] == ["progress"] * len(fractions)
        assert len(fractions) >= 5 and fractions == sorted(fractions) and 0 < fractions[0] < 0.5, fractions
        assert fractions[-1] == 1.0
        assert job["outputs"][0]["metadata"]["model"]["name"] == model
        assert np.array_equal(pixels(png), references[model, 1][0])
    assert engine_a() is None  # the evicted engine is gone, not just unlisted
    assert [m for m, _ in client.loads] == ["tiny-a", "tiny-b", "tiny-a"]


def test_unknown_or_too_large_model_is_refused_at_submit(pool):
    """An unknown model: 404 model_not_found on both APIs; a model that cannot fit even alone: 422
    model_too_large. Neither is queued."""
    from qwenstudio.engine.memory import MemoryInfo

    tight = MemoryInfo(ram_free=64 << 20, ram_total=64 << 20)  # below any model's working margin
    app = pool(max_resident=1, memory=lambda device: tight)

    async def scenario():
        async with asgi_client(app) as http:
            r = await http.post("/api/jobs", json={**REQ, "model": "no-such-model"})
            assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
            assert "tiny-a" in r.json()["error"]["message"] and "tiny-b" in r.json()["error"]["message"]
            r = await http.post("/v1/images/generations", json={"model": "no-such-model", "prompt": "x"})
            assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
            r = await http.post("/api/jobs", json={**REQ, "model": "tiny-b"})
            assert r.status_code == 422 and r.json()["error"]["code"] == "model_too_large"
            assert "tiny-b" in r.json()["error"]["message"]
            r = await http.post("/api/jobs", params={"wait": "true"}, json={**REQ, "model": "tiny-a", "seed": 1})
            assert r.status_code == 200 and r.json()["status"] == "done"  # the resident one still runs
            return (await http.get("/api/jobs")).json()

    listing = asyncio.run(scenario())
    assert listing["total"] == 1 and listing["jobs"][0]["model"] == "tiny-a"


def test_models_of_the_hf_cache_are_served_by_repo_id(pool, models_dir, tmp_path, monkeypatch):
    """A hub cache snapshot (models--Org--Name/snapshots/<rev>, refs/main) is listed and runs as ``Org/Name``."""
    hub = tmp_path / "hf-hub"
    repo = hub / "models--Acme--Tiny-Image"
    shutil.copytree(models_dir / "tiny-b", repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    app = pool(max_resident=2)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))  # after the pool fixture pointed it at an empty one
    app.state.client.catalog.refresh()

    async def scenario():
        async with asgi_client(app) as http:
            listed = {m["id"]: m for m in (await http.get("/api/models")).json()["models"]}
            r = await http.post("/api/jobs", params={"wait": "true"},
                                json={**REQ, "model": "Acme/Tiny-Image", "seed": 1})
            return listed, r

    listed, r = asyncio.run(scenario())
    assert listed["Acme/Tiny-Image"]["format"] == "diffusers" and listed["Acme/Tiny-Image"]["variant"] == "tiny"
    assert r.status_code == 200, r.text
    meta = r.json()["outputs"][0]["metadata"]
    assert r.json()["model"] == "Acme/Tiny-Image" and meta["model"]["name"] == "Acme/Tiny-Image"
