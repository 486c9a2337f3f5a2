"""ControlNet-inpaint (an image + a mask + an inpainting ControlNet) vs ``QwenImageControlNetInpaintPipeline`` (tiny,
fp32), plus how the mode is selected and that the other masked modes are unchanged.

Seed convention under test: the reference draws the masked image's VAE posterior sample with
``latent_dist.sample()`` from torch's *global* RNG (its seeded generator draws only the noise). Our engine draws it
from a fresh CPU generator seeded with the image's seed, so the comparison is exact when the test seeds the global
RNG with the same seed right before the reference call. (We keep the posterior *sample*, rather than patching the
reference to the posterior mode, so the reference pipeline runs unmodified and our default ``diffusers`` noise
convention keeps meaning "what diffusers draws".)
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from qwenstudio.engine import latents as L
from qwenstudio.errors import InvalidRequest
from qwenstudio.testing.parity import check_latent_parity

TOL = 1e-4
COMMON = dict(negative_prompt=" ", true_cfg_scale=4.0, num_inference_steps=4, output_type="latent")


def _img(w, h, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


def _mask(w, h):
    m = Image.new("L", (w, h), 0)
    m.paste(255, (w // 4, h // 4, 3 * w // 4, 3 * h // 4))
    return m


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    from qwenstudio.testing.tiny import (
        write_controlnet_folder,
        write_inpaint_controlnet_file,
        write_inpaint_controlnet_folder,
    )

    root = tmp_path_factory.mktemp("cn-inpaint-home")
    write_inpaint_controlnet_folder(root / "controlnet" / "tiny-inpaint")
    write_inpaint_controlnet_file(root / "controlnet" / "tiny-inpaint-single.safetensors")
    write_controlnet_folder(root / "controlnet" / "tiny-union")
    return root


@pytest.fixture
def engine(tiny_engine, home):
    """The session's tiny components behind a fresh engine (no ControlNet attached) whose models home is ``home``."""
    from qwenstudio import Engine
    from qwenstudio.engine.registry import ModelRegistry

    e = Engine(tiny_engine.components, tiny_engine.spec)
    e.registry = ModelRegistry([home])
    return e


@pytest.fixture(scope="module")
def inpaint_net():
    from qwenstudio.testing.tiny import build_inpaint_controlnet

    return build_inpaint_controlnet()


def _reference(reference_pipe, net, img, mask, global_seed, seed, w, h, **kw):
    from diffusers import QwenImageControlNetInpaintPipeline

    p = reference_pipe
    pipe = QwenImageControlNetInpaintPipeline(scheduler=p.scheduler, vae=p.vae, text_encoder=p.text_encoder,
                                              tokenizer=p.tokenizer, transformer=p.transformer, controlnet=net)
    pipe.set_progress_bar_config(disable=True)
    torch.manual_seed(global_seed)  # the reference's latent_dist.sample() draws from the global RNG
    return pipe("a red door", control_image=img, control_mask=mask, width=w, height=h,
                generator=torch.Generator().manual_seed(seed), **COMMON, **kw).images



def _ours(engine, img, mask, seed, **kw):
    return engine.edit(prompt="a red door", images=[img], mask=mask, negative_prompt=" ", cfg=4.0, steps=4,
                       seed=seed, scheduler="reference", sampler="euler", **kw)


def test_controlnet_inpaint_matches_reference(reference_pipe, engine, inpaint_net):
    """Attached as a module, selected by one control holding the same image (its scale/end apply)."""
    img, mask = _img(64, 48, 1), _mask(64, 48)
    engine.load_controlnet(inpaint_net)
    ref = _reference(reference_pipe, inpaint_net, img, mask, 5, 5, 64, 48, controlnet_conditioning_scale=0.8,
                     control_guidance_end=0.75)
    res = _ours(engine, img, mask, 5, controls=[{"image": img, "scale": 0.8, "end": 0.75}])
    meta = res.images[0].metadata
    assert meta["mode"] == "controlnet-inpaint"
    assert meta["controlnet"] == "QwenImageControlNetModel"
    assert res.request.strength == 1.0 and len(res.timings["steps"]) == 4  # pure noise, the whole schedule
    check_latent_parity("QwenImageControlNetInpaintPipeline (scale 0.8, end 0.75)", res.latents, ref, 64, 48)
    # the convention matters: another global seed gives the reference another posterior sample
    other = _reference(reference_pipe, inpaint_net, img, mask, 6, 5, 64, 48, controlnet_conditioning_scale=0.8,
                       control_guidance_end=0.75)
    assert (L.unpack(other, 6, 8) - res.latents).abs().max() > 1e-3


def test_controlnet_inpaint_by_name_matches_reference(reference_pipe, engine, inpaint_net):
    """Named from the models home with an image + a mask and no controls: scale 1 over the whole schedule."""
    img, mask = _img(64, 64, 2), _mask(64, 64)
    ref = _reference(reference_pipe, inpaint_net, img, mask, 9, 9, 64, 64)
    res = _ours(engine, img, mask, 9, controlnet="tiny-inpaint")
    meta = res.images[0].metadata
    assert meta["mode"] == "controlnet-inpaint" and meta["controlnet"] == "tiny-inpaint"
    assert meta["request"]["controlnet"] == "tiny-inpaint" and meta["request"]["strength"] == 1.0
    assert engine.controlnet.config.extra_condition_channels == 4
    check_latent_parity("QwenImageControlNetInpaintPipeline (by name, scale 1)", res.latents, ref, 64, 64)
    # the stored request re-creates the image
    again = engine.edit(res.images[0].metadata["request"], images=[img], mask=mask)
    assert torch.equal(again.latents, res.latents)


def test_prepare_reads_the_net_config_cheaply_and_is_idempotent(engine):
    from qwenstudio.engine.editing import EditRequest
    from qwenstudio.engine.images import load_image

    ref, mref = load_image(_img(64, 64, 3)).ref, load_image(_mask(64, 64), mask=True).ref
    for name in ("tiny-inpaint", "tiny-inpaint-single"):  # folder config / single-file header shapes
        req = engine.prepare(EditRequest(prompt="x", images=(ref,), mask=mref, controlnet=name))
        assert req.strength == 1.0 and engine.controlnet is None  # nothing loaded by prepare
        assert engine.prepare(req) == req
    with pytest.raises(InvalidRequest) as e:  # strength does not apply (pure noise)
        engine.prepare(EditRequest(prompt="x", images=(ref,), mask=mref, controlnet="tiny-inpaint", strength=0.5))
    assert e.value.code == "invalid_strength"
    with pytest.raises(InvalidRequest) as e:  # a union net still needs control images
        engine.prepare(EditRequest(prompt="x", images=(ref,), mask=mref, controlnet="tiny-union"))
    assert e.value.code == "missing_control"


def test_controlnet_inpaint_rejects_other_inputs(engine, inpaint_net):
    img, mask, other = _img(64, 64, 4), _mask(64, 64), _img(64, 64, 5)
    engine.load_controlnet(inpaint_net)
    with pytest.raises(InvalidRequest) as e:  # the control image is the inpainted image itself
        engine.edit(prompt="x", images=[img], mask=mask, controls=[other], steps=1)
    assert e.value.code == "invalid_control"
    with pytest.raises(InvalidRequest) as e:  # an inpainting net needs a mask
        engine.edit(prompt="x", images=[img], controls=[img], steps=1)
    assert e.value.code == "missing_image"


def test_controlnet_inpaint_keep_size_outside_mask_exact(engine):
    img = _img(70, 50, 6)  # off the 16-pixel grid: padded to 80x64, cropped back
    mask = Image.new("L", (70, 50), 0)
    mask.paste(255, (20, 10, 52, 40))
    res = engine.edit(prompt="a red door", images=[img], mask=mask, controlnet="tiny-inpaint", steps=3, cfg=2.0,
                      seed=1, feather=6)
    out = res.images[0]
    assert out.metadata["mode"] == "controlnet-inpaint"
    assert out.image.size == (70, 50) and (res.request.width, res.request.height) == (80, 64)
    a, src, m = np.asarray(out.image), np.asarray(img), np.asarray(mask)
    assert (a[m < 128] == src[m < 128]).all()
    assert (a[m >= 128] != src[m >= 128]).any()


def test_controlnet_inpaint_batch_equals_single_runs_with_seed_plus_i(engine):
    img, mask = _img(64, 48, 7), _mask(64, 48)
    kw = dict(prompt="a red door", images=[img], mask=mask, controlnet="tiny-inpaint", steps=2, cfg=3.0,
              negative_prompt=" ")
    batch = engine.edit(**kw, seed=20, batch=2)
    for i in range(2):
        single = engine.edit(**kw, seed=20 + i)
        diff = (batch.latents[i] - single.latents[0]).abs().max().item()
        print(f"batch parity controlnet-inpaint image {i}: max |latent diff| = {diff:.3e}")
        assert diff <= 1e-5


def test_controlnet_inpaint_comfy_noise_uses_the_posterior_mode(engine):
    img, mask = _img(64, 48, 8), _mask(64, 48)
    kw = dict(prompt="a red door", images=[img], mask=mask, controlnet="tiny-inpaint", steps=2, noise="comfy")
    a, b = engine.edit(**kw, seed=1), engine.edit(**kw, seed=1)
    assert a.images[0].metadata["mode"] == "controlnet-inpaint" and torch.equal(a.latents, b.latents)


def test_non_inpainting_controlnet_with_a_mask_keeps_inpaint(engine, tiny_engine):
    """A union ControlNet with an image + mask + controls is still inpaint (init latents, strength, blend) with
    residuals; an attached ControlNet the request does not use (no name, no controls) changes nothing."""
    from qwenstudio import Engine
    from qwenstudio.testing.tiny import build_controlnet, build_inpaint_controlnet

    img, ctrl, mask = _img(64, 48, 9), _img(64, 48, 10), _mask(64, 48)
    plain = _ours(Engine(tiny_engine.components, tiny_engine.spec), img, mask, 3)
    assert plain.images[0].metadata["mode"] == "inpaint" and plain.request.strength == 0.6

    engine.load_controlnet(build_controlnet())
    res = _ours(engine, img, mask, 3, controls=[{"image": ctrl, "scale": 0.8}])
    meta = res.images[0].metadata
    assert meta["mode"] == "inpaint" and meta["controlnet"] == "QwenImageControlNetModel"
    assert res.request.strength == 0.6 and len(res.timings["steps"]) == 3  # 4 steps at 0.6: the last 3
    assert (res.latents - plain.latents).abs().max() > 1e-4  # the residuals act
    out, src, m = np.asarray(res.images[0].image), np.asarray(img), np.asarray(mask)
    assert (out[m < 128] == src[m < 128]).all()
    assert torch.equal(_ours(engine, img, mask, 3).latents, plain.latents)  # attached, not used

    engine.load_controlnet(build_inpaint_controlnet())
    unused = _ours(engine, img, mask, 3)
    assert unused.images[0].metadata["mode"] == "inpaint" and "controlnet" not in unused.images[0].metadata
    assert torch.equal(unused.latents, plain.latents)
