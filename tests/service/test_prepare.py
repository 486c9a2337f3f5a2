"""Checks that need the model run before queueing: token limits, LoRA names, Lightning recipes (SECURITY 2, 11)."""

from __future__ import annotations

import pytest


@pytest.fixture
def lora_engine(tiny_folder, tmp_path):
    """An engine whose registry has a Lightning LoRA, served with registry names only."""
    from qwenstudio import Engine
    from qwenstudio.config import Settings
    from qwenstudio.testing.loras import write_lora

    home = tmp_path / "engine-home"
    engine = Engine.load(tiny_folder, variant="tiny", device="cpu", settings=Settings(home=home))
    write_lora(home / "models" / "loras" / "Qwen-Image-Lightning-4steps-V1.0.safetensors",
               engine.components.transformer, "comfy", seed=1)
    engine.allow_paths = False
    return engine


def test_prompt_over_token_limit_is_refused_before_queueing(serve):
    with serve() as s, s.client() as http:
        r = http.post("/api/jobs", json={"prompt": "word " * 1100, "steps": 1})
        assert r.status_code == 422
        assert r.json()["error"]["code"] == "prompt_too_long" and "1024" in r.json()["error"]["message"]
        assert http.get("/api/jobs").json()["total"] == 0
        r = http.post("/v1/images/generations", json={"prompt": "word " * 1100, "size": "64x64"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "prompt_too_long"


def test_lightning_lora_recipe_applies_through_the_api(lora_engine, tmp_path):
    import httpx
    from svc_helpers import run_app

    from qwenstudio.config import Settings
    from qwenstudio.service.app import create_app
    from qwenstudio.service.config import ServiceConfig
    from qwenstudio.service.engine_client import InProcessEngineClient

    client = InProcessEngineClient.from_engine(lora_engine)
    client.wait_ready(30)
    app = create_app(Settings(home=tmp_path / "svc"), client, ServiceConfig.with_keys(()))
    try:
        with run_app(app) as url, httpx.Client(base_url=url, timeout=60) as http:
            body = {"prompt": "x", "seed": 1, "loras": [{"name": "Qwen-Image-Lightning-4steps-V1.0", "weight": 1}]}
            job = http.post("/api/jobs?wait=true", json=body).json()
            assert job["status"] == "done", job
            assert (job["request"]["steps"], job["request"]["cfg"], job["request"]["shift"]) == (4, 1.0, 3.0)
            r = http.post("/api/jobs", json={"prompt": "x", "loras": [{"name": "/etc/passwd", "weight": 1}]})
            assert r.status_code == 404 and r.json()["error"]["code"] in ("model_not_found", "lora_not_found")
            assert str(tmp_path) not in r.text  # server paths never reach the client
    finally:
        client.close()


def test_openai_routes_take_loras_in_extra_body(lora_engine, tmp_path):
    import io

    import httpx
    import openai
    from PIL import Image
    from svc_helpers import run_app

    from qwenstudio.config import Settings
    from qwenstudio.service.app import create_app
    from qwenstudio.service.config import ServiceConfig
    from qwenstudio.service.engine_client import InProcessEngineClient

    client = InProcessEngineClient.from_engine(lora_engine)
    client.wait_ready(30)
    app = create_app(Settings(home=tmp_path / "svc"), client, ServiceConfig.with_keys(()))
    lora = [{"name": "Qwen-Image-Lightning-4steps-V1.0", "weight": 1.0}]
    try:
        with run_app(app) as url:
            oa = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
            oa.images.generate(model="tiny", prompt="x", size="64x64", extra_body={"loras": lora, "seed": 2})
            buf = io.BytesIO()
            Image.new("RGB", (64, 64), (9, 9, 9)).save(buf, format="PNG")
            oa.images.edit(model="tiny", image=("a.png", buf.getvalue(), "image/png"), prompt="x",
                           extra_body={"loras": __import__("json").dumps(lora)})
            jobs = httpx.get(url + "/api/jobs").json()["jobs"]
            assert len(jobs) == 2
            for job in jobs:
                assert job["request"]["loras"] == lora and job["request"]["steps"] == 4  # Lightning recipe
    finally:
        client.close()


def test_nan_or_oom_in_one_job_fails_only_that_job(serve, tiny_engine):
    """SECURITY 21: a numerical blow-up or an out-of-memory in one job is that job's typed failure; the worker
    goes on with the next job."""
    import torch

    with serve() as s, s.client() as http:
        for make_error, code in (
            (lambda out: torch.full_like(out[0], float("nan")), "non_finite"),
            (lambda out: (_ for _ in ()).throw(torch.OutOfMemoryError("CUDA out of memory")), "out_of_memory"),
        ):
            hook = tiny_engine.components.transformer.register_forward_hook(
                lambda m, a, out, f=make_error: (f(out),))
            try:
                job = http.post("/api/jobs?wait=true", json={"prompt": "x", "steps": 2, "seed": 1}).json()
            finally:
                hook.remove()
            assert job["status"] == "failed" and job["error"]["code"] == code, job
            ok = http.post("/api/jobs?wait=true", json={"prompt": "x", "steps": 2, "seed": 1}).json()
            assert ok["status"] == "done"
        metrics = http.get("/metrics").text
        assert 'code="non_finite"' in metrics and 'code="out_of_memory"' in metrics
