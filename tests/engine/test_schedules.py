"""Schedules vs. independent re-derivations of the ComfyUI / diffusers formulas.

The expected values below are written out again in float64 NumPy from the sources (not from our module):
  * comfy/model_sampling.py: time_snr_shift, ModelSamplingDiscreteFlow.set_parameters/sigma/timestep
    (ModelSamplingAuraFlow => multiplier 1.0)
  * comfy/samplers.py: simple_scheduler, normal_scheduler (sgm flag => "sgm_uniform"), ddim_scheduler,
    beta_scheduler, linear_quadratic_schedule, calculate_sigmas (karras/exponential get sigma_min/max of the table)
  * comfy/k_diffusion/sampling.py: get_sigmas_karras, get_sigmas_exponential
  * diffusers/pipelines/qwenimage/pipeline_qwenimage.py: calculate_shift and the set_timesteps call
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from qwenstudio.engine.sampling import COMFY_SCHEDULERS, SCHEDULERS, build_sigmas, comfy_sigmas, reference_sigmas
from qwenstudio.engine.sampling.schedules import beta_ppf as engine_beta_ppf
from qwenstudio.engine.specs import QWEN_IMAGE_SCHEDULER_CONFIG
from qwenstudio.errors import InvalidRequest

QWEN_SCHEDULER_CONFIG = dict(QWEN_IMAGE_SCHEDULER_CONFIG)  # the real Qwen/Qwen-Image scheduler config


# ------------------------------------------------------------------ independent float64 ComfyUI formulas


def shift_fn(alpha, t):
    # comfy/model_sampling.py: time_snr_shift
    return t if alpha == 1.0 else alpha * t / (1 + (alpha - 1) * t)


def table(shift):
    # ModelSamplingDiscreteFlow.set_parameters(shift, timesteps=1000, multiplier=1.0): sigma((1..1000)/1000)
    return shift_fn(shift, np.arange(1, 1001) / 1000.0)


def beta_cdf(x, a, b):
    """I_x(a, b) from the hypergeometric series B(x; a, b) = sum_n (1-b)_n / n! * x^(a+n) / (a+n)
    (a different method from the module's continued fraction), reflected for x > 1/2."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    if x > 0.5:
        return 1.0 - beta_cdf(1.0 - x, b, a)
    total, coef, n = 0.0, 1.0, 0
    while True:
        term = coef * x ** (a + n) / (a + n)
        total += term
        if abs(term) < 1e-18 * abs(total) or n > 2000:
            break
        coef *= (n + 1 - b) / (n + 1)
        n += 1
    return total / math.exp(math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b))


def beta_ppf(q, a, b):
    if q >= 1:
        return 1.0
    if a == b and q == 0.5:  # exact median of a symmetric beta (np.rint then rounds 499.5 to 500, like scipy)
        return 0.5
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if beta_cdf(mid, a, b) < q else (lo, mid)
    return (lo + hi) / 2


def expected_comfy(name, steps, shift):
    s = table(shift)
    sigma_min, sigma_max = s[0], s[-1]
    if name == "simple":  # simple_scheduler
        ss = len(s) / steps
        return [s[-(1 + int(x * ss))] for x in range(steps)] + [0.0]
    if name in ("normal", "sgm_uniform"):  # normal_scheduler; timestep(sigma) = sigma * 1.0, sigma(t) = shift(t)
        start, end = sigma_max, sigma_min
        if name == "sgm_uniform":
            ts = np.linspace(start, end, steps + 1)[:-1]
        else:
            assert not math.isclose(shift_fn(shift, end), 0, abs_tol=1e-5)  # so a zero is appended
            ts = np.linspace(start, end, steps)
        return [shift_fn(shift, t) for t in ts] + [0.0]
    if name == "karras":  # get_sigmas_karras(n, sigma_min, sigma_max, rho=7)
        ramp = np.linspace(0, 1, steps)
        lo, hi = sigma_min ** (1 / 7), sigma_max ** (1 / 7)
        return list((hi + ramp * (lo - hi)) ** 7) + [0.0]
    if name == "exponential":  # get_sigmas_exponential
        return list(np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), steps))) + [0.0]
    if name == "beta":  # beta_scheduler(alpha=0.6, beta=0.6)
        ts = np.rint(np.array([beta_ppf(q, 0.6, 0.6) for q in 1 - np.linspace(0, 1, steps, endpoint=False)]) * 999)
        out, last = [], -1
        for t in ts:
            if t != last:
                out.append(s[int(t)])
            last = t
        return out + [0.0]
    if name == "ddim_uniform":  # ddim_scheduler (table[1] is not ~0 for these shifts)
        ss = max(1000 // steps, 1)
        return ([0.0] + [s[x] for x in range(1, 1000, ss)])[::-1]
    if name == "linear_quadratic":  # linear_quadratic_schedule(threshold_noise=0.025, linear_steps=steps // 2)
        if steps == 1:
            return [sigma_max, 0.0]
        lin, thr = steps // 2, 0.025
        diff = lin - thr * steps
        quad = steps - lin
        qc = diff / (lin * quad**2)
        lc = thr / lin - 2 * diff / quad**2
        sched = [i * thr / lin for i in range(lin)] + [qc * i**2 + lc * i + qc * lin**2 for i in range(lin, steps)]
        return [(1.0 - v) * sigma_max for v in sched + [1.0]]
    if name == "kl_optimal":  # kl_optimal_scheduler(n, sigma_min, sigma_max): uniform in arctan(sigma)
        w = np.arange(steps) / (steps - 1)
        return list(np.tan(w * math.atan(sigma_min) + (1 - w) * math.atan(sigma_max))) + [0.0]
    raise AssertionError(name)


# ------------------------------------------------------------------ ComfyUI schedules


@pytest.mark.parametrize("name", COMFY_SCHEDULERS)
@pytest.mark.parametrize("steps,shift", [(1, 3.1), (4, 3.1), (7, 3.1), (20, 3.1), (9, 1.0), (30, 2.5), (50, 6.0)])
def test_comfy_schedulers_match_comfy_formulas(name, steps, shift):
    if name == "kl_optimal" and steps == 1:  # ComfyUI divides by steps - 1 here (NaN sigmas): refused by name
        with pytest.raises(InvalidRequest, match="'kl_optimal' needs steps >= 2"):
            comfy_sigmas(name, steps, shift)
        return
    got = comfy_sigmas(name, steps, shift)
    want = np.array(expected_comfy(name, steps, shift))
    assert got.dtype == torch.float32 and got.device.type == "cpu" and got.ndim == 1
    assert got.shape[0] == want.shape[0]
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=2e-6)
    assert got[-1].item() == 0.0
    assert bool((got[:-1] >= got[1:]).all()), "sigmas must not increase"


@pytest.mark.parametrize(
    "name", ["simple", "normal", "karras", "exponential", "sgm_uniform", "beta", "linear_quadratic"]
)
@pytest.mark.parametrize("steps", [1, 2, 8, 33])
def test_comfy_schedulers_are_steps_plus_one_from_one(name, steps):
    s = comfy_sigmas(name, steps)
    assert s.shape == (steps + 1,)
    assert s[0].item() == pytest.approx(1.0, abs=1e-6)


def test_hand_computed_values():
    # simple, 4 steps, shift 3.1 picks table entries 999, 749, 499, 249 = shift(1), shift(.75), shift(.5), shift(.25)
    want = [1.0, 3.1 * 0.75 / (1 + 2.1 * 0.75), 3.1 * 0.5 / (1 + 2.1 * 0.5), 3.1 * 0.25 / (1 + 2.1 * 0.25), 0.0]
    np.testing.assert_allclose(comfy_sigmas("simple", 4, 3.1).numpy(), want, atol=1e-7)
    np.testing.assert_allclose(want, [1.0, 0.902912621, 0.756097561, 0.508196721, 0.0], atol=1e-9)
    # karras/exponential end on the table minimum shift(0.001) = 0.0031 / 1.0021
    sigma_min = 3.1 * 0.001 / (1 + 2.1 * 0.001)
    assert comfy_sigmas("karras", 5)[-2].item() == pytest.approx(sigma_min, rel=1e-6)
    assert comfy_sigmas("exponential", 5)[-2].item() == pytest.approx(sigma_min, rel=1e-6)
    # normal applies the shift again to the (already shifted) table minimum, as ComfyUI does
    assert comfy_sigmas("normal", 4)[-2].item() == pytest.approx(shift_fn(3.1, sigma_min), rel=1e-6)
    # shift 1 => unshifted, sgm_uniform 4 steps = linspace(1, 0.001, 5)[:-1]
    np.testing.assert_allclose(
        comfy_sigmas("sgm_uniform", 4, 1.0).numpy(), [1.0, 0.75025, 0.5005, 0.25075, 0.0], atol=1e-6
    )


@pytest.mark.parametrize(
    "steps,indices",
    [  # np.rint(scipy.stats.beta.ppf(1 - np.linspace(0, 1, steps, endpoint=False), 0.6, 0.6) * 999), scipy 1.17.1
        (1, [999]),
        (2, [999, 500]),
        (4, [999, 823, 500, 176]),
        (7, [999, 928, 782, 598, 401, 217, 71]),
        (10, [999, 959, 876, 765, 637, 500, 362, 234, 123, 40]),
    ],
)
def test_beta_matches_scipy_indices(steps, indices):
    want = table(3.1)[indices].tolist() + [0.0]
    np.testing.assert_allclose(comfy_sigmas("beta", steps, 3.1).numpy(), want, atol=1e-6)


def test_beta_ppf_against_scipy_when_available():
    stats = pytest.importorskip("scipy.stats")
    for steps in (3, 16, 50):
        q = 1 - np.linspace(0, 1, steps, endpoint=False)
        np.testing.assert_allclose([engine_beta_ppf(float(v), 0.6, 0.6) for v in q], stats.beta.ppf(q, 0.6, 0.6), atol=1e-12)


def test_ddim_uniform_keeps_comfy_length():
    # ComfyUI's stride 1000 // 7 = 142 visits 1, 143, ..., 995: 8 sigmas + the final 0
    assert comfy_sigmas("ddim_uniform", 7).shape == (9,)


# ------------------------------------------------------------------ reference (diffusers)


def diffusers_pipeline_sigmas(steps, image_seq_len, config):
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
    c = scheduler.config
    # pipeline_qwenimage.py: calculate_shift(image_seq_len, base_seq_len, max_seq_len, base_shift, max_shift)
    m = (c.get("max_shift", 1.15) - c.get("base_shift", 0.5)) / (
        c.get("max_image_seq_len", 4096) - c.get("base_image_seq_len", 256)
    )
    mu = image_seq_len * m + (c.get("base_shift", 0.5) - m * c.get("base_image_seq_len", 256))
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    return scheduler.sigmas


@pytest.mark.parametrize("steps,seq", [(2, 256), (8, 1024), (20, 4096), (50, 6032), (30, 8192)])
def test_reference_matches_qwen_image_pipeline(steps, seq):
    got = reference_sigmas(steps, seq, QWEN_SCHEDULER_CONFIG)
    assert got.dtype == torch.float32 and got.device.type == "cpu" and got.shape == (steps + 1,)
    assert torch.equal(got, diffusers_pipeline_sigmas(steps, seq, QWEN_SCHEDULER_CONFIG))
    assert got[0].item() == 1.0 and got[-1].item() == 0.0
    assert got[-2].item() == pytest.approx(0.02, abs=1e-6)  # shift_terminal
    assert torch.equal(
        build_sigmas("reference", steps, image_seq_len=seq, scheduler_config=QWEN_SCHEDULER_CONFIG, shift=None), got
    )


def test_reference_depends_on_resolution():
    small = reference_sigmas(10, 1024, QWEN_SCHEDULER_CONFIG)
    large = reference_sigmas(10, 4096, QWEN_SCHEDULER_CONFIG)
    assert bool((large[1:-2] > small[1:-2]).all())  # more tokens => larger mu => more time at high noise


def test_reference_single_step_is_noise_to_zero():
    # diffusers' shift_terminal stretch divides 0/0 for one sigma; we return the well-defined [1, 0]
    assert reference_sigmas(1, 4096, QWEN_SCHEDULER_CONFIG).tolist() == [1.0, 0.0]


@pytest.mark.parametrize("steps", [4, 8])
def test_reference_with_shift_is_lightning(steps):
    lightning = {**QWEN_SCHEDULER_CONFIG, "base_shift": math.log(3), "max_shift": math.log(3), "shift_terminal": None}
    got = build_sigmas("reference", steps, image_seq_len=4096, scheduler_config=QWEN_SCHEDULER_CONFIG, shift=3)
    assert torch.equal(got, diffusers_pipeline_sigmas(steps, 4096, lightning))
    # constant shift: independent of resolution and equal to 3t / (1 + 2t)
    assert torch.equal(
        got, build_sigmas("reference", steps, image_seq_len=256, scheduler_config=QWEN_SCHEDULER_CONFIG, shift=3.0)
    )
    t = np.linspace(1.0, 1 / steps, steps)
    np.testing.assert_allclose(got.numpy(), list(3 * t / (1 + 2 * t)) + [0.0], atol=1e-6)


def test_build_sigmas_comfy_default_shift():
    for name in COMFY_SCHEDULERS:
        got = build_sigmas(name, 6, image_seq_len=4096, scheduler_config=QWEN_SCHEDULER_CONFIG, shift=None)
        assert torch.equal(got, comfy_sigmas(name, 6, 3.1))
    got = build_sigmas("karras", 6, image_seq_len=4096, scheduler_config=QWEN_SCHEDULER_CONFIG, shift=2.0)
    assert torch.equal(got, comfy_sigmas("karras", 6, 2.0))


def test_scheduler_names():
    assert SCHEDULERS[:7] == ("reference", "simple", "normal", "karras", "exponential", "sgm_uniform", "beta")
    assert set(COMFY_SCHEDULERS) == set(SCHEDULERS) - {"reference"}


# ------------------------------------------------------------------ invalid input


def test_unknown_scheduler_lists_choices():
    with pytest.raises(InvalidRequest) as err:
        build_sigmas("foo", 4, image_seq_len=4096, scheduler_config=QWEN_SCHEDULER_CONFIG, shift=None)
    assert "unknown scheduler 'foo'" in str(err.value)
    assert all(name in str(err.value) for name in SCHEDULERS)
    with pytest.raises(InvalidRequest) as err:
        comfy_sigmas("reference", 4)
    assert all(name in str(err.value) for name in COMFY_SCHEDULERS)


@pytest.mark.parametrize("steps", [0, -3, 2.5, True, "4"])
def test_bad_steps(steps):
    with pytest.raises(InvalidRequest):
        build_sigmas("simple", steps, image_seq_len=4096, scheduler_config=QWEN_SCHEDULER_CONFIG, shift=None)
    with pytest.raises(InvalidRequest):
        build_sigmas("reference", steps, image_seq_len=4096, scheduler_config=QWEN_SCHEDULER_CONFIG, shift=None)


@pytest.mark.parametrize("shift", [0.0, -1.0, float("nan"), float("inf")])
@pytest.mark.parametrize("name", ["reference", "simple"])
def test_bad_shift(name, shift):
    with pytest.raises(InvalidRequest):
        build_sigmas(name, 4, image_seq_len=4096, scheduler_config=QWEN_SCHEDULER_CONFIG, shift=shift)
