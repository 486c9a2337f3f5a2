"""Our engine vs the diffusers reference QwenImagePipeline on the same tiny files, seed and settings (fp32 CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qwenstudio.engine import latents as L
from qwenstudio.engine.requests import GenerateRequest

PARITY_LATENT_TOL = 1e-4


def _reference(pipe, *, prompt, negative, cfg, steps, width, height, seed, output_type):
    out = pipe(
        prompt, negative_prompt=negative, true_cfg_scale=cfg, height=height, width=width, num_inference_steps=steps,
        generator=torch.Generator().manual_seed(seed), output_type=output_type,
    ).images
    return out


@pytest.mark.parametrize(
    "cfg,negative,width,height,steps",
    [(1.0, None, 64, 64, 4), (4.0, "blurry, bad quality", 64, 64, 4), (4.0, " ", 96, 48, 6)],
)
def test_latents_and_pixels_match_reference(tiny_engine, reference_pipe, cfg, negative, width, height, steps):
    prompt = "a red fox sitting in fresh snow"
    kw = dict(prompt=prompt, negative=negative, cfg=cfg, steps=steps, width=width, height=height, seed=42)
    ref_packed = _reference(reference_pipe, output_type="latent", **kw)
    ref_latents = L.unpack(ref_packed, height // 8, width // 8)
    ref_pixels = _reference(reference_pipe, output_type="np", **kw)

    req = GenerateRequest(prompt=prompt, negative_prompt=negative if negative is not None else " ", cfg=cfg,
                          steps=steps, width=width, height=height, seed=42, scheduler="reference", sampler="euler")
    result = tiny_engine.generate(req)
    diff = (result.latents.float() - ref_latents.float()).abs().max().item()
    print(f"parity cfg={cfg} {width}x{height} steps={steps}: max |latent diff| = {diff:.3e}")
    assert diff <= PARITY_LATENT_TOL
    assert torch.isfinite(result.latents).all() and result.latents.abs().max() > 0.1  # non-trivial output
    ours = np.asarray(result.images[0].image, dtype=np.int16)
    theirs = (ref_pixels[0] * 255).round().astype(np.int16)
    assert ours.shape == theirs.shape == (height, width, 3)
    assert np.abs(ours - theirs).max() <= 1


def test_cfg_one_skips_negative_pass(tiny_engine):
    rows = []  # model rows evaluated per call: CFG's two passes run as one batched forward (or two)

    def count(module, args, kwargs):
        rows.append(kwargs["hidden_states"].shape[0])

    hook = tiny_engine.components.transformer.register_forward_pre_hook(count, with_kwargs=True)
    try:
        tiny_engine.generate(prompt="x", cfg=1.0, steps=3, seed=1)
        assert rows == [1, 1, 1]
        rows.clear()
        tiny_engine.generate(prompt="x", cfg=2.0, steps=3, seed=1)
        assert rows == [2, 2, 2]  # batched CFG: one forward of [cond; uncond] per step
        rows.clear()
        tiny_engine.batch_cfg = False
        tiny_engine.generate(prompt="x", cfg=2.0, steps=3, seed=1)
        assert rows == [1] * 6
    finally:
        tiny_engine.batch_cfg = True
        hook.remove()


def test_batched_cfg_equals_two_forwards_with_unequal_prompt_lengths(tiny_engine):
    """The pair is padded to one length and masked: exact up to float rounding vs two separate forwards."""
    kw = dict(prompt="a red fox sitting in fresh snow under the moon", negative_prompt="blurry", cfg=4.0, steps=3,
              seed=5)
    a = tiny_engine.generate(**kw).latents
    tiny_engine.batch_cfg = False
    try:
        b = tiny_engine.generate(**kw).latents
    finally:
        tiny_engine.batch_cfg = True
    assert (a - b).abs().max() < 1e-5


def test_cfg_norm_off_differs_and_matches_plain_cfg_formula(tiny_engine):
    a = tiny_engine.generate(prompt="a house", cfg=4.0, cfg_norm=True, steps=3, seed=3).latents
    b = tiny_engine.generate(prompt="a house", cfg=4.0, cfg_norm=False, steps=3, seed=3).latents
    assert (a - b).abs().max() > 1e-4
