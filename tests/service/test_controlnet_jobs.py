"""An edit job naming a ControlNet from the models home (``"controlnet": "NAME"``), on a real loopback server whose
engine takes names only; an unknown name is a typed 404 before anything is queued."""

from __future__ import annotations

import io
from contextlib import contextmanager

import numpy as np
import pytest
from PIL import Image
from svc_helpers import run_app


def _png(seed, w=64, h=48) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def serve_cn(tiny_engine, tmp_path):
    from qwenstudio import Engine
    from qwenstudio.config import Settings
    from qwenstudio.engine.registry import ModelRegistry
    from qwenstudio.service.app import create_app
    from qwenstudio.service.config import ServiceConfig
    from qwenstudio.service.engine_client import InProcessEngineClient
    from qwenstudio.testing.tiny import write_controlnet_file, write_controlnet_folder

    models = tmp_path / "models"
    write_controlnet_file(models / "controlnet" / "union-single.safetensors")
    write_controlnet_folder(models / "controlnet" / "union-folder")
    engine = Engine(tiny_engine.components, tiny_engine.spec)  # shared weights, own registry and ControlNet
    engine.registry, engine.allow_paths = ModelRegistry([models]), False

    @contextmanager
    def start():
        client = InProcessEngineClient.from_engine(engine)
        client.wait_ready(30)
        app = create_app(Settings(home=tmp_path / "home"), client, ServiceConfig.with_keys(()))
        try:
            with run_app(app) as url:
                yield url
        finally:
            client.close()

    return start, models


def test_edit_job_names_a_controlnet(serve_cn):
    import httpx

    start, models = serve_cn
    with start() as url, httpx.Client(base_url=url, timeout=60) as http:
        ctrl = http.post("/api/uploads", files={"file": ("c.png", _png(1), "image/png")}).json()["id"]
        body = {"prompt": "a robot", "controls": [{"image": ctrl, "mode": "depth", "scale": 0.8}], "steps": 2,
                "seed": 3, "cfg": 1.0}
        outs = {}
        for name in ("union-single", "union-folder"):
            job = http.post("/api/jobs?wait=true", json={**body, "controlnet": name}).json()
            assert job["status"] == "done", job.get("error")
            meta = job["outputs"][0]["metadata"]
            assert meta["request"]["controlnet"] == name and meta["controlnet"] == name
            assert meta["mode"] == "controlnet"
            outs[name] = http.get(job["outputs"][0]["url"]).content
        # the same weights as a folder and as one file: the same image
        a, b = (np.asarray(Image.open(io.BytesIO(outs[n]))) for n in ("union-single", "union-folder"))
        assert np.array_equal(a, b)

        r = http.post("/api/jobs", json={**body, "controlnet": "nope"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "controlnet_not_found"
        assert "union-single" in r.json()["error"]["message"] and str(models) not in r.text  # names, no paths
        r = http.post("/api/jobs", json={**body, "controlnet": str(models / "controlnet" / "union-folder")})
        assert r.status_code == 404 and r.json()["error"]["code"] == "controlnet_not_found"  # no paths remotely
        r = http.post("/api/jobs", json={**body, "controlnet": 5})
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_type"
        r = http.post("/api/jobs", json={"prompt": "x", "steps": 2, "controlnet": "union-single",
                                         "images": [ctrl]})
        assert r.status_code == 422 and r.json()["error"]["code"] == "missing_control"
