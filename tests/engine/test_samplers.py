"""Samplers vs. diffusers' Euler step and literal ports of ComfyUI's comfy/k_diffusion/sampling.py.

The ports below keep ComfyUI's structure (tensor sigmas, its branch conditions) so a drift in our Python-float
rewrite shows up as a mismatch.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from qwenstudio.engine.sampling import (
    SAMPLERS,
    STOCHASTIC_SAMPLERS,
    comfy_sigmas,
    get_sampler,
    reference_sigmas,
    sample_ddim,
    sample_dpmpp_2m,
    sample_euler,
    sample_euler_ancestral,
    sample_heun,
    sample_res_multistep,
    sample_uni_pc,
)
from qwenstudio.engine.specs import QWEN_IMAGE_SCHEDULER_CONFIG
from qwenstudio.errors import InvalidRequest

QWEN_SCHEDULER_CONFIG = dict(QWEN_IMAGE_SCHEDULER_CONFIG)  # the real Qwen/Qwen-Image scheduler config
SHAPE = (2, 12, 16)  # (batch, tokens, channels) like packed Qwen-Image latents
DETERMINISTIC = sorted(set(SAMPLERS) - STOCHASTIC_SAMPLERS)
# ComfyUI's UniPC stops at sigma 0.001 and rescales (see sample_uni_pc): close to, not exactly on, x0
NOT_EXACT = {"uni_pc", "uni_pc_bh2"}


def tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(SHAPE, generator=g) for _ in range(3)]


X0, NOISE, C = tensors()


def velocity(x, sigma):
    """Toy transformer: an affine velocity field that is not the exact flow, so samplers actually differ."""
    return 0.5 * x + (1.0 - sigma) * C - 0.3 * X0


def linear_denoiser(x, sigma):
    return x - sigma * velocity(x, sigma)


def perfect_denoiser(x, sigma):
    return X0.clone()


def seeded_noise(seed):
    g = torch.Generator().manual_seed(seed)
    return lambda sigma, sigma_next: torch.randn(SHAPE, generator=g)


def start(sigmas):
    s0 = float(sigmas[0])
    return (1 - s0) * X0 + s0 * NOISE


def schedules():
    return {
        "reference": reference_sigmas(10, 4096, QWEN_SCHEDULER_CONFIG),
        "simple": comfy_sigmas("simple", 8),
        "karras": comfy_sigmas("karras", 9),
        "beta": comfy_sigmas("beta", 7, 2.0),
    }


# ------------------------------------------------------------------ literal ComfyUI ports (tensor sigmas)


def to_d(x, sigma, denoised):
    return (x - denoised) / sigma


def comfy_euler(model, x, sigmas):
    for i in range(len(sigmas) - 1):
        denoised = model(x, float(sigmas[i]))
        x = x + to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
    return x


def comfy_heun(model, x, sigmas):
    for i in range(len(sigmas) - 1):
        denoised = model(x, float(sigmas[i]))
        d = to_d(x, sigmas[i], denoised)
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = to_d(x_2, sigmas[i + 1], model(x_2, float(sigmas[i + 1])))
            x = x + (d + d_2) / 2 * dt
    return x


def comfy_dpmpp_2m(model, x, sigmas):
    sigma_fn = lambda t: t.neg().exp()
    t_fn = lambda sigma: sigma.log().neg()
    old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, float(sigmas[i]))
        t, t_next = t_fn(sigmas[i]), t_fn(sigmas[i + 1])
        h = t_next - t
        if old_denoised is None or sigmas[i + 1] == 0:
            x = (sigma_fn(t_next) / sigma_fn(t)) * x - (-h).expm1() * denoised
        else:
            h_last = t - t_fn(sigmas[i - 1])
            r = h_last / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigma_fn(t_next) / sigma_fn(t)) * x - (-h).expm1() * denoised_d
        old_denoised = denoised
    return x


def comfy_res_multistep(model, x, sigmas):
    # res_multistep(eta=0, cfg_pp=False): get_ancestral_step(eta=0) = (sigma_next, 0); the noise term is * 0
    sigma_fn = lambda t: t.neg().exp()
    t_fn = lambda sigma: sigma.log().neg()
    phi1_fn = lambda t: torch.expm1(t) / t
    phi2_fn = lambda t: (phi1_fn(t) - 1.0) / t
    old_sigma_down = old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, float(sigmas[i]))
        sigma_down = sigmas[i + 1]
        if sigma_down == 0 or old_denoised is None:
            x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        else:
            t, t_old, t_next, t_prev = t_fn(sigmas[i]), t_fn(old_sigma_down), t_fn(sigma_down), t_fn(sigmas[i - 1])
            h = t_next - t
            c2 = (t_prev - t_old) / h
            phi1_val, phi2_val = phi1_fn(-h), phi2_fn(-h)
            b1 = torch.nan_to_num(phi1_val - phi2_val / c2, nan=0.0)
            b2 = torch.nan_to_num(phi2_val / c2, nan=0.0)
            x = sigma_fn(h) * x + h * (b1 * denoised + b2 * old_denoised)
        old_denoised = denoised
        old_sigma_down = sigma_down
    return x


def comfy_euler_ancestral_rf(model, x, sigmas, noise_sampler, eta=1.0, s_noise=1.0):
    for i in range(len(sigmas) - 1):
        denoised = model(x, float(sigmas[i]))
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            downstep_ratio = 1 + (sigmas[i + 1] / sigmas[i] - 1) * eta
            sigma_down = sigmas[i + 1] * downstep_ratio
            alpha_ip1 = 1 - sigmas[i + 1]
            alpha_down = 1 - sigma_down
            renoise_coeff = (sigmas[i + 1] ** 2 - sigma_down**2 * alpha_ip1**2 / alpha_down**2) ** 0.5
            sigma_down_i_ratio = sigma_down / sigmas[i]
            x = sigma_down_i_ratio * x + (1 - sigma_down_i_ratio) * denoised
            if eta > 0:
                x = (alpha_ip1 / alpha_down) * x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * renoise_coeff
    return x


PORTS = {
    "euler": comfy_euler,
    "heun": comfy_heun,
    "dpmpp_2m": comfy_dpmpp_2m,
    "res_multistep": comfy_res_multistep,
}


# ------------------------------------------------------------------ tests


def test_euler_reproduces_diffusers_flow_match_euler_step():
    from diffusers import FlowMatchEulerDiscreteScheduler

    steps, seq = 12, 4096
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(QWEN_SCHEDULER_CONFIG)
    c = scheduler.config
    m = (c.max_shift - c.base_shift) / (c.max_image_seq_len - c.base_image_seq_len)
    scheduler.set_timesteps(
        sigmas=np.linspace(1.0, 1 / steps, steps), mu=seq * m + c.base_shift - m * c.base_image_seq_len
    )
    x = NOISE.clone()
    trajectory = []
    for i, t in enumerate(scheduler.timesteps):
        x = scheduler.step(velocity(x, float(scheduler.sigmas[i])), t, x, return_dict=False)[0]
        trajectory.append(x)

    ours = []
    out = sample_euler(
        linear_denoiser,
        NOISE.clone(),
        reference_sigmas(steps, seq, QWEN_SCHEDULER_CONFIG),
        callback=lambda i, x, *_: ours.append(x),
    )
    assert len(ours) == steps
    for a, b in zip(ours, trajectory):
        assert (a - b).abs().max().item() < 1e-6
    assert (out - trajectory[-1]).abs().max().item() < 1e-6


@pytest.mark.parametrize("name", sorted(PORTS))
@pytest.mark.parametrize("schedule", ["reference", "simple", "karras", "beta"])
def test_matches_comfy_port(name, schedule):
    sigmas = schedules()[schedule]
    x = start(sigmas)
    want = PORTS[name](linear_denoiser, x.clone(), sigmas)
    got = SAMPLERS[name](linear_denoiser, x.clone(), sigmas)
    assert (got - want).abs().max().item() < 5e-6


@pytest.mark.parametrize("name", sorted(set(DETERMINISTIC) - NOT_EXACT))
@pytest.mark.parametrize("schedule", ["reference", "simple", "karras", "beta"])
def test_perfect_denoiser_follows_the_flow_and_lands_on_x0(name, schedule):
    sigmas = schedules()[schedule]
    seen = []

    def check(i, x, denoised, sigma, sigma_next):
        seen.append(i)
        # with the true x0 every sampler here is exact: x stays on (1 - sigma) x0 + sigma noise
        assert torch.allclose(x, (1 - sigma_next) * X0 + sigma_next * NOISE, atol=1e-5)

    out = get_sampler(name)(perfect_denoiser, start(sigmas), sigmas, callback=check)
    assert seen == list(range(len(sigmas) - 1))
    assert torch.equal(out, X0)


def test_euler_ancestral_is_comfy_rf_and_deterministic():
    sigmas = schedules()["simple"]
    x = start(sigmas)
    a = sample_euler_ancestral(linear_denoiser, x.clone(), sigmas, noise_sampler=seeded_noise(7))
    b = sample_euler_ancestral(linear_denoiser, x.clone(), sigmas, noise_sampler=seeded_noise(7))
    c = sample_euler_ancestral(linear_denoiser, x.clone(), sigmas, noise_sampler=seeded_noise(8))
    want = comfy_euler_ancestral_rf(linear_denoiser, x.clone(), sigmas, seeded_noise(7))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert (a - want).abs().max().item() < 5e-6


def test_euler_ancestral_noise_calls():
    sigmas = schedules()["reference"]
    calls = []

    def noise(sigma, sigma_next):
        calls.append((sigma, sigma_next))
        return torch.randn(SHAPE)

    out = sample_euler_ancestral(perfect_denoiser, start(sigmas), sigmas, noise_sampler=noise)
    s = sigmas.tolist()
    assert calls == list(itertools.pairwise(s))[:-1]  # never asked for noise on the step to 0
    assert torch.equal(out, X0)
    with pytest.raises(ValueError, match="noise_sampler"):
        sample_euler_ancestral(perfect_denoiser, start(sigmas), sigmas)
    # deterministic samplers ignore the noise sampler entirely
    for name in DETERMINISTIC:
        get_sampler(name)(perfect_denoiser, start(sigmas), sigmas, noise_sampler=lambda *a: pytest.fail("called"))


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_callback_per_step_and_exceptions_propagate(name):
    sigmas = comfy_sigmas("simple", 6)
    s = sigmas.tolist()
    kwargs = {"noise_sampler": seeded_noise(0)} if name in STOCHASTIC_SAMPLERS else {}
    calls = []
    get_sampler(name)(
        linear_denoiser,
        start(sigmas),
        sigmas,
        callback=lambda i, x, d, sg, sn: calls.append((i, sg, sn, x.shape, d.shape)),
        **kwargs,
    )
    assert calls == [(i, s[i], s[i + 1], torch.Size(SHAPE), torch.Size(SHAPE)) for i in range(6)]
    assert all(isinstance(c[1], float) for c in calls)

    class Stop(Exception):
        pass

    sigmas_seen = []

    def denoise(x, sigma):
        sigmas_seen.append(sigma)
        return linear_denoiser(x, sigma)

    def cancel(i, *_):
        if i == 2:
            raise Stop

    with pytest.raises(Stop):
        get_sampler(name)(denoise, start(sigmas), sigmas, callback=cancel, **kwargs)
    assert min(sigmas_seen) >= s[3]  # nothing evaluated past step 2


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_dtype_follows_x(name):
    sigmas = comfy_sigmas("karras", 5)
    kwargs = (
        {"noise_sampler": lambda a, b: torch.randn(SHAPE, dtype=torch.float64)} if name in STOCHASTIC_SAMPLERS else {}
    )
    x = start(sigmas).double()
    out = get_sampler(name)(lambda x, s: linear_denoiser(x, s).float(), x, sigmas, **kwargs)
    assert out.dtype == torch.float64
    # a plain list of sigmas works too
    out_list = get_sampler(name)(perfect_denoiser, start(sigmas), sigmas.tolist(), **kwargs)
    if name in NOT_EXACT:
        assert torch.equal(out_list, get_sampler(name)(perfect_denoiser, start(sigmas), sigmas))
        assert (out_list - X0).abs().max().item() < 0.01
    else:
        assert torch.equal(out_list, X0)


def test_registry():
    assert get_sampler("euler") is sample_euler
    assert get_sampler("euler_ancestral") is sample_euler_ancestral
    assert get_sampler("heun") is sample_heun
    assert get_sampler("dpmpp_2m") is sample_dpmpp_2m
    assert get_sampler("res_multistep") is sample_res_multistep
    assert STOCHASTIC_SAMPLERS == {"euler_ancestral", "dpmpp_2m_sde", "dpmpp_sde", "lcm"}
    assert get_sampler("ddim") is sample_ddim and get_sampler("uni_pc") is sample_uni_pc
    with pytest.raises(TypeError):
        SAMPLERS["mine"] = sample_euler  # read-only registry: no global mutable state


def test_unknown_sampler_lists_choices():
    with pytest.raises(InvalidRequest) as err:
        get_sampler("foo")
    msg = str(err.value)
    assert msg.startswith("unknown sampler 'foo'; valid: euler, euler_ancestral")
    assert all(name in msg for name in SAMPLERS)
