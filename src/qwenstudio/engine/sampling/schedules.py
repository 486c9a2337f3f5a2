"""Sigma schedules for Qwen-Image (rectified flow, sigma in [0, 1]).

Every schedule is a plain function returning a float32 CPU tensor of descending sigmas that ends in 0.

* ``reference``: exactly what diffusers' ``QwenImagePipeline`` feeds its ``FlowMatchEulerDiscreteScheduler``
  (resolution-dependent ``mu``), or, with a constant ``shift``, the Qwen-Image-Lightning recipe.
* the ComfyUI names (``simple``, ``normal``, ...): ComfyUI's ``comfy/samplers.py`` schedulers evaluated on the
  sigma table of ``ModelSamplingDiscreteFlow`` as patched by the ``ModelSamplingAuraFlow`` node (multiplier 1.0),
  which is how ComfyUI runs Qwen-Image.  They replicate ComfyUI's float32 arithmetic op for op, so a given
  ``(scheduler, steps, shift)`` yields the same sigmas ComfyUI would.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch

from qwenstudio.errors import InvalidRequest

COMFY_SCHEDULERS: tuple[str, ...] = (
    "simple",
    "normal",
    "karras",
    "exponential",
    "sgm_uniform",
    "beta",
    "ddim_uniform",
    "linear_quadratic",
    "kl_optimal",
)
SCHEDULERS: tuple[str, ...] = ("reference", *COMFY_SCHEDULERS)
DEFAULT_COMFY_SHIFT = 3.1  # the shift ComfyUI's Qwen-Image template puts in ModelSamplingAuraFlow

_TIMESTEPS = 1000  # ModelSamplingDiscreteFlow.set_parameters(timesteps=1000)
_MULTIPLIER = 1.0  # ModelSamplingAuraFlow -> ModelSamplingSD3.patch(multiplier=1.0); also QwenImage's own setting


# ---------------------------------------------------------------------------------------------- validation


def _check_steps(steps: int) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise InvalidRequest(f"steps must be an integer >= 1, got {steps!r}")


def _check_shift(shift: float) -> None:
    if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not math.isfinite(shift) or shift <= 0:
        raise InvalidRequest(f"shift must be a finite number > 0, got {shift!r}")


def _unknown(kind: str, name: object, valid: tuple[str, ...]) -> InvalidRequest:
    return InvalidRequest(f"unknown {kind} {name!r}; valid: {', '.join(valid)}")


# ---------------------------------------------------------------------------------------------- reference


def _calculate_shift(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """diffusers/pipelines/qwenimage/pipeline_qwenimage.py: calculate_shift (linear in sequence length)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


def reference_sigmas(steps: int, image_seq_len: int, scheduler_config: Mapping) -> torch.Tensor:
    """Sigmas of diffusers' QwenImagePipeline for ``steps`` (length steps+1, ending in 0).

    Reuses diffusers' scheduler so the exponential time shift and the ``shift_terminal`` stretch stay bit-exact
    with the reference implementation.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler  # lazy: importing diffusers costs seconds

    _check_steps(steps)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(dict(scheduler_config))
    cfg = scheduler.config
    mu = _calculate_shift(
        image_seq_len,
        cfg.get("base_image_seq_len", 256),
        cfg.get("max_image_seq_len", 4096),
        cfg.get("base_shift", 0.5),
        cfg.get("max_shift", 1.15),
    )
    with np.errstate(invalid="ignore", divide="ignore"):
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    sigmas = scheduler.sigmas.detach().to(device="cpu", dtype=torch.float32)
    if steps == 1 and not bool(torch.isfinite(sigmas).all()):
        # diffusers' shift_terminal stretch divides 0/0 for a single sigma; the shift and the stretch both
        # map sigma=1 to 1, so the well-defined answer is one step from pure noise to 0.
        sigmas = torch.tensor([1.0, 0.0], dtype=torch.float32)
    return sigmas


def _constant_shift_config(scheduler_config: Mapping, shift: float) -> dict:
    """Lightning recipe: base_shift = max_shift = ln(shift), no terminal stretch => sigma' = shift*t/(1+(shift-1)*t)."""
    log_shift = math.log(shift)
    return {
        **dict(scheduler_config),
        "base_shift": log_shift,
        "max_shift": log_shift,
        "shift_terminal": None,
        "use_dynamic_shifting": True,
        "time_shift_type": "exponential",
    }


# ---------------------------------------------------------------------------------------------- ComfyUI


def _time_snr_shift(alpha: float, t):
    """comfy/model_sampling.py: time_snr_shift."""
    if alpha == 1.0:
        return t
    return alpha * t / (1 + (alpha - 1) * t)


class _FlowSampling:
    """Just enough of comfy ``ModelSamplingDiscreteFlow`` (CONST, multiplier 1.0) for the schedulers.

    Kept in float32 torch ops in ComfyUI's order so results match ComfyUI to the last bit.
    """

    def __init__(self, shift: float) -> None:
        self.shift = shift
        ts = (torch.arange(1, _TIMESTEPS + 1, 1) / _TIMESTEPS) * _MULTIPLIER
        self.sigmas = self.sigma(ts).to(torch.float32)  # ascending: sigmas[0] = sigma_min, sigmas[-1] = sigma_max

    @property
    def sigma_min(self) -> torch.Tensor:
        return self.sigmas[0]

    @property
    def sigma_max(self) -> torch.Tensor:
        return self.sigmas[-1]

    def timestep(self, sigma):
        return sigma * _MULTIPLIER

    def sigma(self, timestep):
        return _time_snr_shift(self.shift, timestep / _MULTIPLIER)


def _simple(ms: _FlowSampling, steps: int) -> torch.Tensor:
    """comfy/samplers.py: simple_scheduler (evenly strided walk down the 1000-entry sigma table)."""
    ss = len(ms.sigmas) / steps
    sigs = [float(ms.sigmas[-(1 + int(x * ss))]) for x in range(steps)]
    return torch.FloatTensor(sigs + [0.0])


def _normal(ms: _FlowSampling, steps: int, sgm: bool = False) -> torch.Tensor:
    """comfy/samplers.py: normal_scheduler (linear in model timestep; ``sgm`` drops the endpoint instead)."""
    start = ms.timestep(ms.sigma_max)
    end = ms.timestep(ms.sigma_min)
    append_zero = True
    if sgm:
        timesteps = torch.linspace(start, end, steps + 1)[:-1]
    else:
        if math.isclose(float(ms.sigma(end)), 0, abs_tol=0.00001):
            steps += 1
            append_zero = False
        timesteps = torch.linspace(start, end, steps)
    sigs = [float(ms.sigma(ts)) for ts in timesteps]
    if append_zero:
        sigs.append(0.0)
    return torch.FloatTensor(sigs)


def _karras(ms: _FlowSampling, steps: int, rho: float = 7.0) -> torch.Tensor:
    """comfy/k_diffusion/sampling.py: get_sigmas_karras with the table's sigma_min/sigma_max."""
    sigma_min, sigma_max = float(ms.sigma_min), float(ms.sigma_max)
    ramp = torch.linspace(0, 1, steps)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros([1])])


def _exponential(ms: _FlowSampling, steps: int) -> torch.Tensor:
    """comfy/k_diffusion/sampling.py: get_sigmas_exponential with the table's sigma_min/sigma_max."""
    sigma_min, sigma_max = float(ms.sigma_min), float(ms.sigma_max)
    sigmas = torch.linspace(math.log(sigma_max), math.log(sigma_min), steps).exp()
    return torch.cat([sigmas, sigmas.new_zeros([1])])


def _ddim_uniform(ms: _FlowSampling, steps: int) -> torch.Tensor:
    """comfy/samplers.py: ddim_scheduler.  As in ComfyUI the length can differ from steps+1 (stride rounding)."""
    x = 1
    if math.isclose(float(ms.sigmas[x]), 0, abs_tol=0.00001):
        steps += 1
        sigs: list[float] = []
    else:
        sigs = [0.0]
    ss = max(len(ms.sigmas) // steps, 1)
    while x < len(ms.sigmas):
        sigs.append(float(ms.sigmas[x]))
        x += ss
    return torch.FloatTensor(sigs[::-1])


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b) by Lentz's continued fraction (Numerical Recipes ``betacf``)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1.0) / (a + b + 2.0):  # the fraction converges fast only below the mean; use the symmetry
        return 1.0 - _betainc(b, a, 1.0 - x)
    tiny = 1e-300
    front = math.exp(a * math.log(x) + b * math.log1p(-x) + math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)) / a
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        for num in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-16:
            break
    return front * h


def beta_ppf(q: float, a: float, b: float) -> float:
    """Inverse of ``_betainc`` by bisection: stands in for scipy.stats.beta.ppf so scipy is not a dependency."""
    if q <= 0.0:
        return 0.0
    if q >= 1.0:
        return 1.0
    if a == b and q == 0.5:  # exact median of a symmetric beta; bisection could land one ulp either side
        return 0.5
    lo, hi = 0.0, 1.0
    for _ in range(64):
        mid = 0.5 * (lo + hi)
        if _betainc(a, b, mid) < q:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def _beta(ms: _FlowSampling, steps: int, alpha: float = 0.6, beta: float = 0.6) -> torch.Tensor:
    """comfy/samplers.py: beta_scheduler (arXiv 2407.12173).  Repeated table indices are dropped, as in
    ComfyUI, so very high step counts can yield fewer than steps+1 sigmas."""
    total_timesteps = len(ms.sigmas) - 1
    ts = 1 - np.linspace(0, 1, steps, endpoint=False)
    ts = np.rint(np.array([beta_ppf(float(q), alpha, beta) for q in ts]) * total_timesteps)
    sigs = []
    last_t = -1
    for t in ts:
        if t != last_t:
            sigs.append(float(ms.sigmas[int(t)]))
        last_t = t
    return torch.FloatTensor(sigs + [0.0])


def _linear_quadratic(ms: _FlowSampling, steps: int, threshold_noise: float = 0.025, linear_steps=None) -> torch.Tensor:
    """comfy/samplers.py: linear_quadratic_schedule (Mochi): linear to threshold_noise, then quadratic."""
    if steps == 1:
        sigma_schedule = [1.0, 0.0]
    else:
        if linear_steps is None:
            linear_steps = steps // 2
        linear_sigma_schedule = [i * threshold_noise / linear_steps for i in range(linear_steps)]
        threshold_noise_step_diff = linear_steps - threshold_noise * steps
        quadratic_steps = steps - linear_steps
        quadratic_coef = threshold_noise_step_diff / (linear_steps * quadratic_steps**2)
        linear_coef = threshold_noise / linear_steps - 2 * threshold_noise_step_diff / (quadratic_steps**2)
        const = quadratic_coef * (linear_steps**2)
        quadratic_sigma_schedule = [
            quadratic_coef * (i**2) + linear_coef * i + const for i in range(linear_steps, steps)
        ]
        sigma_schedule = linear_sigma_schedule + quadratic_sigma_schedule + [1.0]
        sigma_schedule = [1.0 - x for x in sigma_schedule]
    return torch.FloatTensor(sigma_schedule) * ms.sigma_max.cpu()


def _kl_optimal(ms: _FlowSampling, steps: int) -> torch.Tensor:
    """comfy/samplers.py: kl_optimal_scheduler (arXiv 2404.14507): uniform in arctan(sigma) between the table's
    sigma_max and sigma_min, then 0.  ComfyUI divides by ``steps - 1`` (NaN sigmas at 1 step): refused here."""
    if steps < 2:
        raise InvalidRequest("scheduler 'kl_optimal' needs steps >= 2 (ComfyUI's formula gives NaN for 1 step)")
    sigma_min, sigma_max = float(ms.sigma_min), float(ms.sigma_max)
    adj = torch.arange(steps, dtype=torch.float).div_(steps - 1)
    sigmas = adj.new_zeros(steps + 1)
    sigmas[:-1] = (adj * math.atan(sigma_min) + (1 - adj) * math.atan(sigma_max)).tan_()
    return sigmas


_COMFY_HANDLERS = {
    "simple": _simple,
    "normal": _normal,
    "karras": _karras,
    "exponential": _exponential,
    "sgm_uniform": lambda ms, steps: _normal(ms, steps, sgm=True),
    "beta": _beta,
    "ddim_uniform": _ddim_uniform,
    "linear_quadratic": _linear_quadratic,
    "kl_optimal": _kl_optimal,
}
# ComfyUI's KSampler.DISCARD_PENULTIMATE_SIGMA_SAMPLERS (of the samplers we have): scheduled for steps + 1, then the
# second-to-last sigma is dropped
DISCARD_PENULTIMATE_SAMPLERS: frozenset[str] = frozenset({"uni_pc", "uni_pc_bh2"})


def comfy_sigmas(
    scheduler: str, steps: int, shift: float = DEFAULT_COMFY_SHIFT, *, sampler: str | None = None
) -> torch.Tensor:
    """ComfyUI's ``calculate_sigmas(model_sampling, scheduler, steps)`` for Qwen-Image patched with
    ``ModelSamplingAuraFlow(shift)``.  Float32 CPU, descending, ending in 0; steps+1 long except where ComfyUI
    itself differs (``ddim_uniform`` stride rounding, ``beta`` de-duplication at very high step counts).
    With ``sampler`` in ``DISCARD_PENULTIMATE_SAMPLERS`` it is ``KSampler.calculate_sigmas`` (steps + 1 scheduled,
    the penultimate sigma dropped)."""
    handler = _COMFY_HANDLERS.get(scheduler) if isinstance(scheduler, str) else None
    if handler is None:
        raise _unknown("scheduler", scheduler, COMFY_SCHEDULERS)
    _check_steps(steps)
    _check_shift(shift)
    discard = sampler in DISCARD_PENULTIMATE_SAMPLERS
    sigmas = handler(_FlowSampling(float(shift)), steps + 1 if discard else steps)
    if discard:
        sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
    return sigmas.to(device="cpu", dtype=torch.float32)


# ---------------------------------------------------------------------------------------------- dispatcher


def build_sigmas(
    scheduler: str,
    steps: int,
    *,
    image_seq_len: int,
    scheduler_config: Mapping,
    shift: float | None = None,
    sampler: str | None = None,
) -> torch.Tensor:
    """One entry point for every schedule name in ``SCHEDULERS``.

    ``reference`` without ``shift`` is the diffusers pipeline schedule (shift from ``image_seq_len``); with
    ``shift`` it is a constant shift (Lightning: shift=3 <=> base_shift = max_shift = ln 3, no shift_terminal).
    ComfyUI schedules ignore ``image_seq_len``/``scheduler_config`` and default to shift 3.1; ``sampler`` applies
    ComfyUI's per-sampler schedule tweak (``DISCARD_PENULTIMATE_SAMPLERS``).
    """
    if not isinstance(scheduler, str) or scheduler not in SCHEDULERS:
        raise _unknown("scheduler", scheduler, SCHEDULERS)
    _check_steps(steps)
    if shift is not None:
        _check_shift(shift)
    if scheduler == "reference":
        config = scheduler_config if shift is None else _constant_shift_config(scheduler_config, float(shift))
        return reference_sigmas(steps, image_seq_len, config)
    return comfy_sigmas(scheduler, steps, DEFAULT_COMFY_SHIFT if shift is None else float(shift), sampler=sampler)


__all__ = [
    "COMFY_SCHEDULERS",
    "DEFAULT_COMFY_SHIFT",
    "DISCARD_PENULTIMATE_SAMPLERS",
    "SCHEDULERS",
    "build_sigmas",
    "comfy_sigmas",
    "reference_sigmas",
]
