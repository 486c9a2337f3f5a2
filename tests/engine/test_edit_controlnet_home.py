"""ControlNets from the models home (folder and single file, by name), fp32 retry and batches for edits (tiny)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from qwenstudio.errors import GenerationFailed, IncompatibleWeights, InvalidRequest, ModelNotFound


def _img(w, h, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A models dir in the ComfyUI layout with the tiny union ControlNet as a folder and as single files."""
    from qwenstudio.testing.tiny import write_controlnet_file, write_controlnet_folder

    root = tmp_path_factory.mktemp("cn-home")
    write_controlnet_folder(root / "controlnet" / "tiny-union")
    write_controlnet_file(root / "controlnet" / "tiny-union-single.safetensors")
    write_controlnet_file(root / "controlnet" / "prefixed.safetensors", prefix="control_model.",
                          dtype=torch.bfloat16)
    return root


@pytest.fixture
def engine(tiny_engine, home):
    """The session's tiny components behind an engine whose registry is ``home`` (nothing else shared)."""
    from qwenstudio import Engine
    from qwenstudio.engine.registry import ModelRegistry

    e = Engine(tiny_engine.components, tiny_engine.spec)
    e.registry = ModelRegistry([home])
    return e


def test_registry_finds_folder_and_single_file_controlnets(engine):
    found = {e.name: e for e in engine.registry.scan() if e.kind == "controlnet"}
    assert set(found) == {"tiny-union", "tiny-union-single", "prefixed"}
    assert found["tiny-union"].container == "diffusers" and found["tiny-union-single"].container == "safetensors"
    assert not engine.registry.problems  # the folder's own safetensors is not listed as a stray file


def test_single_file_loads_the_same_weights_and_config_as_the_folder(engine):
    engine.load_controlnet("tiny-union")
    folder = engine.controlnet
    def cfg(m):
        return {k: list(v) if isinstance(v, tuple) else v for k, v in m.config.items() if not k.startswith("_")}

    folder_cfg = cfg(folder)
    engine.load_controlnet("tiny-union-single")
    single = engine.controlnet
    assert single is not folder and engine.controlnet_name == "tiny-union-single"
    assert cfg(single) == folder_cfg
    a, b = folder.state_dict(), single.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    engine.load_controlnet("prefixed")  # bf16 file, keys behind a prefix: same tensors to bf16 precision
    c = engine.controlnet.state_dict()
    assert all(torch.equal(a[k].to(torch.bfloat16).float(), c[k]) for k in a)


def test_controlnet_by_name_is_recorded_and_recreated(engine):
    ctrl = _img(64, 64, 1)
    res = engine.edit(prompt="a robot", controls=[{"image": ctrl, "mode": "depth", "scale": 0.8}],
                      controlnet="tiny-union-single", steps=2, seed=4, cfg=1.0)
    meta = res.images[0].metadata
    assert meta["request"]["controlnet"] == "tiny-union-single" and meta["controlnet"] == "tiny-union-single"
    assert meta["mode"] == "controlnet"
    from qwenstudio import Engine
    from qwenstudio.engine.editing import EditRequest

    fresh = Engine(engine.components, engine.spec)  # nothing attached: the stored request names the ControlNet
    fresh.registry = engine.registry
    again = fresh.edit(EditRequest.from_dict(meta["request"]), controls=[ctrl])
    assert fresh.controlnet_name == "tiny-union-single"
    assert torch.equal(again.latents, res.latents)
    # attached by name beforehand (CLI --controlnet): the request records it too
    fresh.load_controlnet("tiny-union")
    r = fresh.edit(prompt="a robot", controls=[ctrl], steps=2, seed=4, cfg=1.0)
    assert r.images[0].metadata["request"]["controlnet"] == "tiny-union"


def test_unknown_controlnet_is_a_typed_404_before_any_work(engine, home, tiny_folder):
    with pytest.raises(ModelNotFound) as e:
        engine.load_controlnet("nope")
    assert e.value.code == "controlnet_not_found" and e.value.status == 404
    with pytest.raises(ModelNotFound) as e:  # prepare (what a server runs before queueing) already refuses it
        engine.edit(prompt="x", controls=[_img(64, 64, 2)], controlnet="nope", steps=2)
    assert e.value.code == "controlnet_not_found"
    engine.allow_paths = False  # the server: names only, never paths
    with pytest.raises(ModelNotFound):
        engine.load_controlnet(str(home / "controlnet" / "tiny-union"))
    engine.allow_paths = True
    engine.load_controlnet(str(home / "controlnet" / "tiny-union"))  # a local caller may give a path
    with pytest.raises(IncompatibleWeights):
        engine.load_controlnet(str(next((tiny_folder / "transformer").glob("*.safetensors"))))  # a DiT file


def test_controlnet_field_is_validated(engine):
    with pytest.raises(InvalidRequest) as e:
        engine.edit(prompt="x", images=[_img(64, 64, 3)], controlnet="tiny-union", steps=2)
    assert e.value.code == "missing_control"


def test_edit_retry_in_fp32_recovers_from_low_precision_overflow(tiny_folder, home):
    from qwenstudio import Engine

    engine = Engine.load(tiny_folder, variant="tiny", device="cpu", dtype="bfloat16", models_dirs=(home,))

    def overflow_in_bf16(module, args, kwargs, output):
        if output[0].dtype == torch.bfloat16:
            return (torch.full_like(output[0], float("inf")),)
        return output

    engine.components.transformer.register_forward_hook(overflow_in_bf16, with_kwargs=True)
    kw = dict(prompt="p", images=[_img(64, 48, 4)], controls=[_img(64, 48, 5)], controlnet="tiny-union",
              strength=0.7, steps=3, seed=0)
    with pytest.raises(GenerationFailed) as e:
        engine.edit(**kw)
    assert e.value.code == "non_finite"
    result = engine.edit(**kw, retry_fp32=True)
    assert result.images[0].metadata["retried_fp32"] is True and result.images[0].metadata["mode"] == \
        "img2img+controlnet"
    assert bool(torch.isfinite(result.latents).all())
    assert engine.components.transformer.proj_out.weight.dtype == torch.bfloat16  # restored
    assert engine.controlnet.controlnet_x_embedder.weight.dtype == torch.bfloat16
    assert engine.components.dtype == torch.bfloat16


@pytest.mark.parametrize("mode", ["img2img", "inpaint", "controlnet"])
def test_edit_batch_equals_single_runs_with_seed_plus_i(engine, mode):
    img, ctrl = _img(64, 48, 6), _img(64, 48, 7)
    mask = Image.new("L", (64, 48), 0)
    mask.paste(255, (16, 8, 48, 40))
    kw = {"img2img": dict(images=[img], strength=0.8),
          "inpaint": dict(images=[img], mask=mask, strength=0.9),
          "controlnet": dict(controls=[ctrl], controlnet="tiny-union")}[mode]
    common = dict(prompt="a lighthouse", negative_prompt=" ", cfg=3.0, steps=3)
    batch = engine.edit(**kw, **common, seed=20, batch=2)
    singles = [engine.edit(**kw, **common, seed=s) for s in (20, 21)]
    for i, single in enumerate(singles):
        diff = (batch.latents[i] - single.latents[0]).abs().max().item()
        print(f"batch parity {mode} image {i}: max |latent diff| = {diff:.3e}")
        assert diff <= 1e-5
        assert batch.images[i].metadata["seed"] == 20 + i
        assert batch.images[i].metadata["request"] == single.images[0].metadata["request"]
