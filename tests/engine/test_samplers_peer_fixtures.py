"""Our samplers and schedules vs ComfyUI's own outputs (tests/fixtures/peers/samplers, made by running ComfyUI's
KSAMPLER code on a toy denoiser: see make_sampler_fixtures.py and SOURCES.md there)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from qwenstudio.engine.sampling import (
    SHIFT_AWARE_SAMPLERS,
    STOCHASTIC_SAMPLERS,
    brownian_noise_sampler,
    comfy_noise_sampler,
    comfy_sigmas,
    get_sampler,
    seeded_noise,
)

HERE = Path(__file__).parents[1] / "fixtures" / "peers" / "samplers"
OUTPUTS = load_file(HERE / "outputs.safetensors")
TOY = load_file(HERE / "toy.safetensors")
with safe_open(HERE / "toy.safetensors", "pt") as f:
    META = f.metadata()
SHAPE, SHIFT, SEED = tuple(json.loads(META["shape"])), float(META["shift"]), int(META["seed"])
CASES = sorted({k.rsplit(".", 1)[0] for k in OUTPUTS})


def toy_denoiser(calls):
    x0, c = TOY["x0"], TOY["c"]

    def denoise(x, sigma):
        calls.append(sigma)
        return x - sigma * (0.5 * x + (1.0 - sigma) * c - 0.3 * x0)

    return denoise


def test_every_new_sampler_has_a_comfy_case():
    names = {case.split(".")[0] for case in CASES}
    assert {"dpmpp_2m_sde", "dpmpp_sde", "lcm", "ddim", "uni_pc", "uni_pc_bh2"} <= names
    assert any(".kl_optimal." in case for case in CASES)


@pytest.mark.parametrize("case", CASES)
def test_matches_comfyui_ksampler(case):
    sampler, scheduler, steps, noise_kind = case.split(".")
    want_sigmas = OUTPUTS[f"{case}.sigmas"]
    sigmas = comfy_sigmas(scheduler, int(steps), SHIFT, sampler=sampler)
    assert sigmas.shape == want_sigmas.shape
    assert (sigmas - want_sigmas).abs().max().item() <= 1e-7

    if noise_kind == "injected":  # ComfyUI run with default_noise_sampler(x, SEED) passed in
        noise = seeded_noise(SHAPE, SEED)
    else:  # what ComfyUI's KSampler picks itself (BrownianTree for the SDE samplers, cpu=True)
        noise = comfy_noise_sampler(sampler, SHAPE, sigmas, SEED)
    assert (noise is not None) == (sampler in STOCHASTIC_SAMPLERS)
    kwargs = {"shift": SHIFT} if sampler in SHIFT_AWARE_SAMPLERS else {}

    calls: list[float] = []
    x = float(sigmas[0]) * TOY["noise"]  # CONST noise_scaling over an empty latent
    out = get_sampler(sampler)(toy_denoiser(calls), x, sigmas, noise_sampler=noise, **kwargs)

    want_calls = OUTPUTS[f"{case}.calls"].tolist()
    assert len(calls) == len(want_calls)
    assert max(abs(a - b) for a, b in zip(calls, want_calls)) <= 1e-6  # the model sees the sigmas ComfyUI's sees
    diff = (out - OUTPUTS[f"{case}.out"]).abs().max().item()
    assert diff <= 1e-5, f"{case}: max abs diff {diff:.2e}"


def test_brownian_noise_depends_on_values_not_layout():
    """ComfyUI's Qwen-Image latent is [B, 16, 1, H, W]; the engine may draw in [B, 16, H, W] and pack: same noise."""
    a = brownian_noise_sampler((2, 16, 1, 2, 4), [1.0, 0.5, 0.0], SEED)
    b = brownian_noise_sampler((2, 16, 2, 4), [1.0, 0.5, 0.0], SEED)
    assert torch.equal(a(1.0, 0.5).reshape(2, 16, 2, 4), b(1.0, 0.5))
    assert not torch.equal(b(1.0, 0.5), brownian_noise_sampler((2, 16, 2, 4), [1.0, 0.5, 0.0], SEED + 1)(1.0, 0.5))


def test_uni_pc_refuses_one_step():
    from qwenstudio.errors import InvalidRequest

    with pytest.raises(InvalidRequest, match="at least 2 steps"):
        get_sampler("uni_pc")(toy_denoiser([]), TOY["noise"].clone(), [1.0, 0.0])
