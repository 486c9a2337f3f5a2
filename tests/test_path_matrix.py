"""The path matrix: every entry point x every recipe source -> the effective settings recorded in the output.

Entry points: Python API, CLI generate, CLI edit, native job API, OpenAI API, preset (a job naming one),
``--from-image`` (the studio in the browser is in tests/ui/test_studio.py). Recipe sources: the model's defaults,
explicit user values, a Lightning LoRA (alone and under a user's CFG), a Lightning variant, Edit-2509 + its
Lightning LoRA. Each case asserts what lands in the PNG: steps/CFG/shift/scheduler/sampler/seed/LoRAs and where each
came from (``settings_from``). These are the paths that silently ran a Lightning LoRA at CFG 4 before.
"""

from __future__ import annotations

import base64
import json
import shutil

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from qwenstudio import Engine
from qwenstudio.cli.main import app as cli_app
from qwenstudio.outputs import read_png_metadata

LIGHT = "Qwen-Image-Lightning-8steps-V1.1"
EDIT_LIGHT = "Qwen-Image-Edit-2509-Lightning-8steps-V1.0"
KEYS = ("steps", "cfg", "shift", "scheduler", "sampler")
SIZE = {"width": 64, "height": 64}

# recipe source -> (request fields, expected effective settings, expected settings_from for some keys)
CASES = {
    "defaults": ({}, dict(steps=4, cfg=4.0, shift=None, scheduler="reference", sampler="euler"),
                 {"steps": "variant tiny", "cfg": "variant tiny", "seed": "user"}),
    "explicit": (dict(steps=3, cfg=2.5, shift=2.0, sampler="heun", scheduler="simple"),
                 dict(steps=3, cfg=2.5, shift=2.0, scheduler="simple", sampler="heun"),
                 {"steps": "user", "cfg": "user", "shift": "user", "sampler": "user"}),
    "lightning_lora": ({"loras": [{"name": LIGHT, "weight": 1.0}]},
                       dict(steps=8, cfg=1.0, shift=3.0, scheduler="reference", sampler="euler"),
                       {"steps": f"lora {LIGHT}", "cfg": f"lora {LIGHT}", "shift": f"lora {LIGHT}"}),
    "lightning_lora_user_cfg": ({"loras": [{"name": LIGHT, "weight": 1.0}], "cfg": 2.0},
                                dict(steps=8, cfg=2.0, shift=3.0, scheduler="reference", sampler="euler"),
                                {"steps": f"lora {LIGHT}", "cfg": "user"}),
}


def effective(meta: dict) -> dict:
    req = meta["request"]
    return {k: req[k] for k in KEYS}


def check(meta: dict, case: str, seed: int) -> None:
    _, want, sources = CASES[case]
    assert effective(meta) == want, case
    assert meta["request"]["seed"] == seed
    for k, v in sources.items():
        assert meta["settings_from"][k] == v, (case, k, meta["settings_from"])
    names = [lo["name"] for lo in meta["request"]["loras"]]
    assert names == [lo["name"] for lo in CASES[case][0].get("loras", [])]
    assert [lo["name"] for lo in meta["loras"]] == names  # what was applied is what was asked


@pytest.fixture(scope="module")
def home(tiny_folder, tmp_path_factory):
    from qwenstudio.testing.loras import write_lora

    root = tmp_path_factory.mktemp("matrix-models")
    dit = Engine.load(tiny_folder, variant="tiny", device="cpu").components.transformer
    for name in (LIGHT, EDIT_LIGHT):
        write_lora(root / "loras" / f"{name}.safetensors", dit, "diffusers", seed=1, rank=2)
    plus = root / "some-edit-model"  # an Edit-2509 folder under a name that says nothing
    shutil.copytree(tiny_folder, plus)
    index = json.loads((plus / "model_index.json").read_text())
    (plus / "model_index.json").write_text(json.dumps({**index, "_class_name": "QwenImageEditPlusPipeline"}))
    return root


@pytest.fixture(scope="module")
def engine(tiny_folder, home):
    e = Engine.load(tiny_folder, device="cpu", models_dirs=(home,))
    assert e.spec.name == "tiny"  # identity: model_index + the tiny marker
    return e


def _cli(*args):
    r = CliRunner().invoke(cli_app, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return r


def _cli_fields(fields: dict) -> list:
    out = []
    for k, v in fields.items():
        if k == "loras":
            for lo in v:
                out += ["--lora", f"{lo['name']}:{lo['weight']}"]
        else:
            out += [f"--{k}", v]
    return out


# ---- Python API, CLI generate, --from-image ---------------------------------------------------------------------
@pytest.mark.parametrize("case", sorted(CASES))
def test_python_api(engine, case):
    fields = CASES[case][0]
    meta = engine.generate(prompt="a fox", seed=5, **SIZE, **fields).images[0].metadata
    check(meta, case, 5)


@pytest.mark.parametrize("case", sorted(CASES))
def test_cli_generate_and_from_image(tiny_folder, home, tmp_path, case):
    out = tmp_path / "a.png"
    _cli("generate", "a fox", "--model", tiny_folder, "--models-dir", home, "--seed", 5, "--width", 64,
         "--height", 64, *_cli_fields(CASES[case][0]), "--out", out, "--json")
    meta = read_png_metadata(out)
    check(meta, case, 5)
    again = tmp_path / "b.png"
    _cli("generate", "--from-image", out, "--model", tiny_folder, "--models-dir", home, "--out", again, "--json")
    check(read_png_metadata(again), case, 5)
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(again)))


def test_cli_variant_lightning(tiny_folder, home, tmp_path):
    out = tmp_path / "v.png"
    _cli("generate", "a fox", "--model", tiny_folder, "--variant", "qwen-image-lightning-8step", "--seed", 2,
         "--width", 64, "--height", 64, "--out", out)
    meta = read_png_metadata(out)
    assert effective(meta) == dict(steps=8, cfg=1.0, shift=3.0, scheduler="reference", sampler="euler")
    assert meta["settings_from"]["steps"] == "variant qwen-image-lightning-8step"
    assert meta["model"]["variant_reason"] == "chosen with --variant qwen-image-lightning-8step"


# ---- Edit-2509 + its Lightning LoRA: Python API and CLI edit ---------------------------------------------------
def _input(tmp_path):
    p = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(p)
    return p


def test_edit_2509_with_lightning_lora(home, tmp_path):
    want = dict(steps=8, cfg=1.0, shift=3.0, scheduler="reference", sampler="euler")
    plus = Engine.load(home / "some-edit-model", device="cpu", models_dirs=(home,))
    assert plus.spec.name == "tiny-edit-plus"
    meta = plus.edit(prompt="make it blue", images=[_input(tmp_path)], seed=3,
                     loras=[(EDIT_LIGHT, 1.0)]).images[0].metadata
    assert effective(meta) == want and meta["settings_from"]["cfg"] == f"lora {EDIT_LIGHT}"
    assert meta["mode"] == "edit"

    out = tmp_path / "e.png"
    _cli("edit", "make it blue", "--image", _input(tmp_path), "--model", home / "some-edit-model", "--models-dir",
         home, "--lora", f"{EDIT_LIGHT}:1", "--seed", 3, "--out", out)
    cli_meta = read_png_metadata(out)
    assert effective(cli_meta) == want and cli_meta["model"]["variant"] == "tiny-edit-plus"
    assert cli_meta["request"]["seed"] == 3 and cli_meta["loras"][0]["name"] == EDIT_LIGHT
    # edit takes generate's options: --aspect-free sizing, --no-cfg-norm, --loras text form
    out2 = tmp_path / "e2.png"
    _cli("edit", "make it blue", "--image", _input(tmp_path), "--model", home / "some-edit-model", "--models-dir",
         home, "--loras", f"{EDIT_LIGHT} : 0.5", "--cfg", 3, "--no-cfg-norm", "--seed", 3, "--out", out2)
    m2 = read_png_metadata(out2)["request"]
    assert m2["cfg"] == 3.0 and m2["cfg_norm"] is False and m2["loras"] == [{"name": EDIT_LIGHT, "weight": 0.5}]


# ---- native job API, OpenAI API, presets -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(engine, tmp_path_factory):
    from qwenstudio.config import Settings
    from qwenstudio.service.app import create_app
    from qwenstudio.service.config import ServiceConfig
    from qwenstudio.service.engine_client import InProcessEngineClient
    from qwenstudio.testing.serving import run_app

    client = InProcessEngineClient.from_engine(engine, model_id="tiny")
    client.wait_ready(30)
    app = create_app(Settings(home=tmp_path_factory.mktemp("matrix-home")), client, ServiceConfig())
    with run_app(app) as url:
        import httpx

        with httpx.Client(base_url=url, timeout=120) as http:
            yield http
    client.close()


def _job_meta(http, body: dict) -> dict:
    r = http.post("/api/jobs?wait=true", json=body)
    assert r.status_code in (200, 201, 202), r.text
    job = r.json()
    assert job["status"] == "done", job
    return job["outputs"][0]["metadata"]


@pytest.mark.parametrize("case", sorted(CASES))
def test_native_job_api(server, case):
    meta = _job_meta(server, {"prompt": "a fox", "seed": 5, **SIZE, **CASES[case][0]})
    check(meta, case, 5)


@pytest.mark.parametrize("case", sorted(CASES))
def test_openai_api(server, tmp_path, case):
    r = server.post("/v1/images/generations", json={"prompt": "a fox", "size": "64x64", "seed": 5,
                                                    **CASES[case][0]})
    assert r.status_code == 200, r.text
    png = tmp_path / "o.png"
    png.write_bytes(base64.b64decode(r.json()["data"][0]["b64_json"]))
    check(read_png_metadata(png), case, 5)


def test_presets_fill_what_the_job_leaves_unset(server):
    r = server.post("/api/presets", json={"name": "fast look", "params": {"steps": 5, "cfg": 3.0, "sampler": "heun"}})
    assert r.status_code in (200, 201), r.text
    meta = _job_meta(server, {"prompt": "a fox", "seed": 1, **SIZE, "preset": "fast look", "cfg": 2.0})
    assert effective(meta) == dict(steps=5, cfg=2.0, shift=None, scheduler="reference", sampler="heun")
    assert meta["settings_from"]["steps"] == "preset fast look" and meta["settings_from"]["cfg"] == "user"
    # a preset with a Lightning LoRA: its recipe fills what neither the job nor the preset set
    server.post("/api/presets", json={"name": "lightning", "params": {"loras": [{"name": LIGHT, "weight": 1.0}]}})
    meta = _job_meta(server, {"prompt": "a fox", "seed": 1, **SIZE, "preset": "lightning"})
    assert effective(meta)["steps"] == 8 and effective(meta)["cfg"] == 1.0
    assert meta["settings_from"]["loras"] == "preset lightning" and meta["settings_from"]["steps"] == f"lora {LIGHT}"
    r = server.post("/api/jobs", json={"prompt": "a fox", "preset": "no such preset"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "preset_not_found"


def test_engine_record_is_not_a_client_field(server):
    r = server.post("/api/jobs", json={"prompt": "a fox", "settings_from": {"steps": "user"}})
    assert r.status_code == 422 and "settings_from" in r.json()["error"]["message"]


# ---- the model is called at the sigmas the sampler means ---------------------------------------------------------
def _all_samplers():
    from qwenstudio.engine.sampling import SAMPLERS

    return sorted(SAMPLERS)


@pytest.mark.parametrize("sampler", _all_samplers())
def test_model_timesteps_follow_the_sigmas_for_every_sampler(engine, sampler):
    """Record the timestep of every transformer call and compare with the sigmas the sampler evaluates (a toy
    denoiser that records its sigma): heun's corrector must run at sigma_next, not at the step's first sigma."""
    import torch

    from qwenstudio.engine.pipeline import model_timesteps
    from qwenstudio.engine.sampling import (
        DEFAULT_COMFY_SHIFT,
        SHIFT_AWARE_SAMPLERS,
        STOCHASTIC_SAMPLERS,
        build_sigmas,
        get_sampler,
    )

    seen = []
    hook = engine.components.transformer.register_forward_pre_hook(
        lambda m, a, kw: seen.append(float(kw["timestep"][0])), with_kwargs=True)
    try:
        engine.generate(prompt="x", steps=5, seed=1, sampler=sampler, scheduler="simple", cfg=1.0, **SIZE)
    finally:
        hook.remove()
    sigmas = build_sigmas("simple", 5, image_seq_len=16, scheduler_config={}, shift=None, sampler=sampler)
    expected = []

    def toy(x, sigma):
        expected.append(float(model_timesteps([sigma])[0]))
        return x * 0.5

    kw = {"noise_sampler": lambda s, n: torch.zeros(1, 4)} if sampler in STOCHASTIC_SAMPLERS else {}
    if sampler in SHIFT_AWARE_SAMPLERS:
        kw["shift"] = DEFAULT_COMFY_SHIFT
    get_sampler(sampler)(toy, torch.ones(1, 4), sigmas, **kw)
    assert seen == pytest.approx(expected, abs=1e-6)
    if sampler == "heun":
        s = [float(v) for v in model_timesteps(sigmas[:-1])]
        assert seen[:3] == [s[0], s[1], s[1]]  # step 0 at sigma_0, its corrector at sigma_1


def test_cli_preset_from_the_local_store(tiny_folder, home, tmp_path):
    from qwenstudio.config import Settings
    from qwenstudio.service.app import DB_NAME
    from qwenstudio.service.store import Store

    store = Store(Settings.from_env().home / DB_NAME)
    store.insert_preset("cli-preset-1", "cli look", {"steps": 6, "sampler": "heun", "prompt": "{value}, watercolor"})
    store.close()
    out = tmp_path / "p.png"
    _cli("generate", "a fox", "--model", tiny_folder, "--preset", "cli look", "--seed", 1, "--width", 64,
         "--height", 64, "--out", out)
    meta = read_png_metadata(out)
    assert meta["request"]["prompt"] == "a fox, watercolor" and meta["request"]["steps"] == 6
    assert meta["settings_from"]["sampler"] == "preset cli look"
    r = CliRunner().invoke(cli_app, ["generate", "a fox", "--model", str(tiny_folder), "--preset", "nope"])
    assert r.exit_code == 2 and r.output.strip() == "error: no preset named 'nope'"


def test_openapi_bodies_state_the_engines_limits(server):
    """The schemas come from the same field table as the engine's checks (they said 2000 chars / n <= 4)."""
    from qwenstudio.engine.requests import LIMITS

    spec = server.get("/openapi.json").json()["paths"]

    def body(path, ctype="application/json"):
        return spec[path]["post"]["requestBody"]["content"][ctype]["schema"]["properties"]

    job, gen = body("/api/jobs"), body("/v1/images/generations")
    edit = body("/v1/images/edits", "multipart/form-data")
    for props in (job, gen, edit):
        assert props["prompt"]["maxLength"] == LIMITS["prompt_chars"]
    assert gen["n"]["maximum"] == edit["n"]["maximum"] == job["batch"]["maximum"] == LIMITS["batch"][1]
    assert job["steps"]["maximum"] == LIMITS["steps"][1] and job["width"]["multipleOf"] == 16
    assert "settings_from" not in job and job["preset"]["type"] == ["string", "null"]
