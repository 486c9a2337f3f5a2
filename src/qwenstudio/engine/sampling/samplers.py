"""Samplers for Qwen-Image as pure k-diffusion-style functions.

Conventions (rectified flow): ``x_t = (1 - sigma) * x0 + sigma * noise``; a *denoiser* maps ``(x, sigma)`` to its
estimate of ``x0`` — only the sigma, as k-diffusion and ComfyUI models take it, so a sampler that evaluates the
model between schedule points (heun's corrector at ``sigma_next``) gets the model at that noise level (for the transformer's velocity ``v``: ``x0 = x - sigma * v``).

Every sampler has the signature ``sample_NAME(denoise, x, sigmas, *, callback=None, noise_sampler=None)``:

* ``sigmas`` is read into Python floats once, so the loop never waits on the GPU: all branching is on floats
  and the tensors only see Python scalars.
* ``callback(i, x, denoised, sigma, sigma_next)`` runs after step ``i`` with the new ``x``; an exception it
  raises (e.g. cancellation) propagates unchanged.
* ``noise_sampler(sigma, sigma_next)`` supplies fresh noise shaped like ``x`` to the samplers listed in
  ``STOCHASTIC_SAMPLERS``; they raise ``ValueError`` without one.  The others never call it.
* Arithmetic stays in ``x.dtype`` (the denoiser output is cast to it).

The update rules follow ComfyUI's ``comfy/k_diffusion/sampling.py`` as ComfyUI applies them to a CONST (flow)
model; only the ancestral sampler has a flow-specific variant there (``sample_euler_ancestral_RF``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType

from torch import Tensor

from qwenstudio.errors import InvalidRequest

Denoiser = Callable[[Tensor, float], Tensor]
StepCallback = Callable[[int, Tensor, Tensor, float, float], object]
NoiseSampler = Callable[[float, float], Tensor]
Sampler = Callable[..., Tensor]


def _floats(sigmas: Tensor | Sequence[float]) -> list[float]:
    """The one host read of the schedule (a single sync even if ``sigmas`` lives on a GPU)."""
    if isinstance(sigmas, Tensor):
        if sigmas.ndim != 1:
            raise ValueError(f"sigmas must be 1-D, got shape {tuple(sigmas.shape)}")
        return [float(s) for s in sigmas.detach().cpu().tolist()]
    return [float(s) for s in sigmas]


def _denoise(denoise: Denoiser, x: Tensor, sigma: float) -> Tensor:
    return denoise(x, sigma).to(x.dtype)


def _euler_step(x: Tensor, denoised: Tensor, sigma: float, sigma_next: float) -> Tensor:
    """Flow ODE step ``x + (sigma_next - sigma) * v`` with ``v = (x - denoised) / sigma``; the step to 0 returns
    ``denoised`` itself (what the arithmetic gives up to rounding, and diffusers' last step exactly)."""
    if sigma_next == 0:
        return denoised
    return x + (sigma_next - sigma) * ((x - denoised) / sigma)


def _require_noise(noise_sampler: NoiseSampler | None, name: str) -> NoiseSampler:
    if noise_sampler is None:
        raise ValueError(f"sampler {name!r} is stochastic and needs a noise_sampler(sigma, sigma_next)")
    return noise_sampler


def sample_euler(
    denoise: Denoiser,
    x: Tensor,
    sigmas: Tensor | Sequence[float],
    *,
    callback: StepCallback | None = None,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """k-diffusion ``sample_euler`` (no churn); with the reference sigmas this is diffusers'
    ``FlowMatchEulerDiscreteScheduler.step`` (``x + (sigma_next - sigma) * v``)."""
    sig = _floats(sigmas)
    for i in range(len(sig) - 1):
        sigma, sigma_next = sig[i], sig[i + 1]
        denoised = _denoise(denoise, x, sigma)
        x = _euler_step(x, denoised, sigma, sigma_next)
        if callback is not None:
            callback(i, x, denoised, sigma, sigma_next)
    return x


def sample_euler_ancestral(
    denoise: Denoiser,
    x: Tensor,
    sigmas: Tensor | Sequence[float],
    *,
    callback: StepCallback | None = None,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """ComfyUI ``sample_euler_ancestral_RF`` (what ``euler_ancestral`` runs for flow models), eta = s_noise = 1.

    Steps deterministically down to ``sigma_down = sigma_next**2 / sigma``, rescales to the flow's signal level
    at ``sigma_next`` and adds just enough fresh noise to land back on the ``sigma_next`` marginal.
    """
    noise = _require_noise(noise_sampler, "euler_ancestral")
    eta, s_noise = 1.0, 1.0
    sig = _floats(sigmas)
    for i in range(len(sig) - 1):
        sigma, sigma_next = sig[i], sig[i + 1]
        denoised = _denoise(denoise, x, sigma)
        if sigma_next == 0:
            x = denoised
        else:
            downstep_ratio = 1 + (sigma_next / sigma - 1) * eta
            sigma_down = sigma_next * downstep_ratio
            alpha_ip1 = 1 - sigma_next
            alpha_down = 1 - sigma_down
            # max(): the radicand is >= 0 analytically (sigma_down <= sigma_next) but can round below 0
            renoise_coeff = max(sigma_next**2 - sigma_down**2 * alpha_ip1**2 / alpha_down**2, 0.0) ** 0.5
            ratio = sigma_down / sigma
            x = ratio * x + (1 - ratio) * denoised
            x = (alpha_ip1 / alpha_down) * x + noise(sigma, sigma_next).to(x.dtype) * (s_noise * renoise_coeff)
        if callback is not None:
            callback(i, x, denoised, sigma, sigma_next)
    return x


def sample_heun(
    denoise: Denoiser,
    x: Tensor,
    sigmas: Tensor | Sequence[float],
    *,
    callback: StepCallback | None = None,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """k-diffusion ``sample_heun`` (no churn): trapezoidal correction with a second denoiser call at
    ``sigma_next`` (same ``step_index``); the Euler step to 0 returns ``denoised``.  Two model calls per step."""
    sig = _floats(sigmas)
    for i in range(len(sig) - 1):
        sigma, sigma_next = sig[i], sig[i + 1]
        denoised = _denoise(denoise, x, sigma)
        if sigma_next == 0:
            x = denoised
        else:
            dt = sigma_next - sigma
            d = (x - denoised) / sigma
            x_2 = x + d * dt
            d_2 = (x_2 - _denoise(denoise, x_2, sigma_next)) / sigma_next
            x = x + ((d + d_2) / 2) * dt
        if callback is not None:
            callback(i, x, denoised, sigma, sigma_next)
    return x


def sample_dpmpp_2m(
    denoise: Denoiser,
    x: Tensor,
    sigmas: Tensor | Sequence[float],
    *,
    callback: StepCallback | None = None,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """k-diffusion ``sample_dpmpp_2m`` with ``t = -log(sigma)``, exactly as ComfyUI applies it to flow models
    (no CONST-specific variant there).  First step and the step to 0 are first order (the latter is ``denoised``)."""
    sig = _floats(sigmas)
    old_denoised: Tensor | None = None
    h_last = 0.0
    for i in range(len(sig) - 1):
        sigma, sigma_next = sig[i], sig[i + 1]
        denoised = _denoise(denoise, x, sigma)
        if sigma_next == 0:
            x = denoised  # k-diffusion: exp(-inf) * x - expm1(-inf) * denoised
        else:
            h = math.log(sigma) - math.log(sigma_next)  # t_next - t
            if old_denoised is None:
                denoised_d = denoised
            else:
                r = h_last / h
                denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigma_next / sigma) * x - math.expm1(-h) * denoised_d
            h_last = h
        old_denoised = denoised
        if callback is not None:
            callback(i, x, denoised, sigma, sigma_next)
    return x


def sample_res_multistep(
    denoise: Denoiser,
    x: Tensor,
    sigmas: Tensor | Sequence[float],
    *,
    callback: StepCallback | None = None,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """ComfyUI ``sample_res_multistep`` (``res_multistep`` with eta=0, no CFG++): second-order exponential
    multistep (arXiv 2308.02157) in ``t = -log(sigma)``; Euler for the first step and the step to 0."""
    sig = _floats(sigmas)
    old_denoised: Tensor | None = None
    for i in range(len(sig) - 1):
        sigma, sigma_next = sig[i], sig[i + 1]
        denoised = _denoise(denoise, x, sigma)
        if sigma_next == 0 or old_denoised is None:
            x = _euler_step(x, denoised, sigma, sigma_next)
        else:
            # eta=0 => sigma_down == sigma_next and the previous sigma_down == sigma
            t, t_next, t_prev = -math.log(sigma), -math.log(sigma_next), -math.log(sig[i - 1])
            h = t_next - t
            c2 = (t_prev - t) / h
            phi1 = math.expm1(-h) / -h
            phi2 = (phi1 - 1.0) / -h
            b1, b2 = phi1 - phi2 / c2, phi2 / c2
            if not math.isfinite(b1) or not math.isfinite(b2):  # ComfyUI: torch.nan_to_num(..., nan=0.0)
                b1 = b1 if math.isfinite(b1) else 0.0
                b2 = b2 if math.isfinite(b2) else 0.0
            x = math.exp(-h) * x + h * (b1 * denoised + b2 * old_denoised)
        old_denoised = denoised
        if callback is not None:
            callback(i, x, denoised, sigma, sigma_next)
    return x


SAMPLERS: Mapping[str, Sampler] = MappingProxyType(
    {
        "euler": sample_euler,
        "euler_ancestral": sample_euler_ancestral,
        "heun": sample_heun,
        "dpmpp_2m": sample_dpmpp_2m,
        "res_multistep": sample_res_multistep,
    }
)
STOCHASTIC_SAMPLERS: frozenset[str] = frozenset({"euler_ancestral"})


def get_sampler(name: str) -> Sampler:
    """Look a sampler up by its ComfyUI name."""
    fn = SAMPLERS.get(name) if isinstance(name, str) else None
    if fn is None:
        raise InvalidRequest(f"unknown sampler {name!r}; valid: {', '.join(SAMPLERS)}")
    return fn


__all__ = [
    "SAMPLERS",
    "STOCHASTIC_SAMPLERS",
    "Denoiser",
    "NoiseSampler",
    "Sampler",
    "StepCallback",
    "get_sampler",
    "sample_dpmpp_2m",
    "sample_euler",
    "sample_euler_ancestral",
    "sample_heun",
    "sample_res_multistep",
]
