"""4-bit bases through the server, where a server user enters: a nunchaku SVDQuant file, a diffusers-written NF4
folder and a float file served with ``--quant int4``, each with a LoRA named per request (native jobs and the OpenAI
route). The output states the format and quantization, and its pixels equal a direct engine run of the same file and
LoRA; the next request without the LoRA gets the base's pixels back (the stack is swapped per request)."""

from __future__ import annotations

import base64
import io
import shutil

import httpx
import numpy as np
import pytest
from PIL import Image
from svc_helpers import run_app

from qwenstudio.testing.loras import write_lora
from qwenstudio.testing.svdquant_files import FIXTURES, INT4_FILE, build_source_dit, save_source_dit

REQ = {"prompt": "a red fox", "steps": 2, "width": 64, "height": 64, "seed": 3, "cfg": 1.0}
LORA = "Qwen-Image-Lightning-8steps-V1.1"
NUNCHAKU = INT4_FILE.removesuffix(".safetensors")
NF4 = "qwen-image-nf4"


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_folder):
    from qwenstudio.testing.formats import write_comfy_models_dir

    source = build_source_dit()
    root = tmp_path_factory.mktemp("four-bit-serving")
    write_comfy_models_dir(root, tiny_folder, variants=())
    (root / "diffusion_models").mkdir(exist_ok=True)
    shutil.copy(FIXTURES / INT4_FILE, root / "diffusion_models" / INT4_FILE)
    shutil.copytree(FIXTURES.parent / "bnb" / NF4, root / "diffusion_models" / NF4)
    save_source_dit(source, root / "diffusion_models" / "wide-fp32.safetensors")
    write_lora(root / "loras" / f"{LORA}.safetensors", source, "diffusers", seed=9)
    return root


@pytest.fixture(scope="module")
def direct(models):
    """model -> (pixels without LoRA, pixels with the LoRA) of a direct Engine run outside any server."""
    import torch

    from qwenstudio import Engine

    out = {}
    for name, kw in ((NUNCHAKU, {}), (NF4, {}), ("wide-fp32", {"quant": "int4"})):
        engine = Engine.load(name, models_dirs=(models,), device="cpu", variant="tiny", dtype=torch.float32, **kw)
        plain = np.asarray(engine.generate(**REQ).images[0].image)
        lora = np.asarray(engine.generate(**REQ, loras=[(LORA, 1.0)]).images[0].image)
        out[name] = (plain, lora)
        del engine
    return out


def _app(models, tmp_path, default: str, speed: dict | None = None):
    from qwenstudio.config import Settings
    from qwenstudio.service.app import create_app
    from qwenstudio.service.model_pool import LoadOptions, ModelCatalog, MultiModelEngineClient

    settings = Settings(home=tmp_path / "home", models_dirs=(models,), device="cpu", dtype="float32")
    catalog = ModelCatalog(settings, default, LoadOptions(device="cpu", variant="tiny", speed=speed or {}))
    client = MultiModelEngineClient(catalog, max_resident=1)
    assert client.wait_ready(120)
    return create_app(settings, client), client


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def _native(http: httpx.Client, body: dict) -> tuple[dict, np.ndarray]:
    r = http.post("/api/jobs", params={"wait": "true"}, json=body)
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["status"] == "done", job
    return job["outputs"][0]["metadata"], _pixels(http.get(job["outputs"][0]["url"]).content)


@pytest.mark.parametrize(("model", "fmt", "quant"), [(NUNCHAKU, "nunchaku", "svdq_int4_r16"),
                                                     (NF4, "bitsandbytes", "bnb_nf4")])
def test_served_4bit_file_with_a_lora_per_request(models, direct, tmp_path, model, fmt, quant):
    app, client = _app(models, tmp_path, model)
    try:
        with run_app(app) as url, httpx.Client(base_url=url, timeout=120) as http:
            listed = {m["id"] for m in http.get("/v1/models").json()["data"]}
            assert model in listed
            meta, with_lora = _native(http, {**REQ, "model": model, "loras": [{"name": LORA, "weight": 1.0}]})
            assert meta["model"]["format"] == fmt and meta["model"]["quant"] == quant
            assert [entry["name"] for entry in meta["loras"]] == [LORA]
            assert np.array_equal(with_lora, direct[model][1])
            meta, plain = _native(http, {**REQ, "model": model})
            assert not meta.get("loras") and np.array_equal(plain, direct[model][0])
            assert not np.array_equal(plain, with_lora)
            r = http.post("/v1/images/generations", json={"model": model, "prompt": REQ["prompt"], "size": "64x64",
                                                          "steps": 2, "seed": 3, "cfg": 1.0,
                                                          "loras": [{"name": LORA, "weight": 1.0}]})
            assert r.status_code == 200, r.text
            assert np.array_equal(_pixels(base64.b64decode(r.json()["data"][0]["b64_json"])), direct[model][1])
    finally:
        client.close()


def test_serve_quant_int4_on_a_float_file(models, direct, tmp_path):
    """``serve --quant int4``: the float file is quantized at load; outputs record it and equal a direct
    ``--quant int4`` run, with and without the LoRA."""
    app, client = _app(models, tmp_path, "wide-fp32", speed={"quant": "int4"})
    try:
        with run_app(app) as url, httpx.Client(base_url=url, timeout=120) as http:
            meta, with_lora = _native(http, {**REQ, "model": "wide-fp32", "loras": [{"name": LORA, "weight": 1.0}]})
            assert meta["model"]["acceleration"]["quant"] == "int4"
            assert meta["model"]["acceleration"]["int4_layers_quantized"] == 14
            assert np.array_equal(with_lora, direct["wide-fp32"][1])
            _, plain = _native(http, {**REQ, "model": "wide-fp32"})
            assert np.array_equal(plain, direct["wide-fp32"][0])
    finally:
        client.close()
