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

The update rules follow ComfyUI's ``comfy/k_diffusion/sampling.py`` (and ``comfy/extra_samplers/uni_pc.py``) as
ComfyUI applies them to a CONST (flow) model: the ancestral sampler has a flow variant there
(``sample_euler_ancestral_RF``), the SDE samplers switch to the flow's half log SNR, the rest run unchanged.
``tests/fixtures/peers/samplers`` holds ComfyUI's own outputs for each of them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType

import numpy as np
import torch
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


# ---------------------------------------------------------------------------------------------- SDE / LCM / UniPC
# ComfyUI runs Qwen-Image as a CONST (rectified-flow) model.  Its SDE samplers then work in the flow's half log
# SNR ``lambda = log((1 - sigma) / sigma)`` (``sigma_to_half_log_snr``) and, because that is -inf at sigma = 1,
# start from ``percent_to_sigma(1e-4)`` of the model's shift instead (``offset_first_sigma_for_snr``).


def _half_log_snr(sigma: float) -> float:
    return math.log((1.0 - sigma) / sigma)


def snr_start_sigmas(sigmas: Sequence[float], shift: float = 1.0) -> list[float]:
    """ComfyUI's ``offset_first_sigma_for_snr`` for a CONST model with ``shift``: a first sigma >= 1 (lambda -inf)
    becomes ``time_snr_shift(shift, 1 - 1e-4)``, rounded to float32 as ComfyUI stores it in its sigma tensor."""
    sig = list(sigmas)
    if len(sig) > 1 and sig[0] >= 1:
        t = 1.0 - 1e-4
        sig[0] = float(np.float32(shift * t / (1 + (shift - 1) * t)))
    return sig


def _ancestral_step(sigma_from: Tensor, sigma_to: Tensor, eta: float) -> tuple[Tensor, Tensor]:
    """k-diffusion ``get_ancestral_step`` on float32 scalars (``sigma_to**2 - sigma_up**2`` cancels, and ComfyUI's
    result carries that float32 rounding): the sigma to step down to and the noise to add back."""
    if not eta:
        return sigma_to, torch.zeros_like(sigma_to)
    sigma_up = min(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    return (sigma_to**2 - sigma_up**2) ** 0.5, sigma_up


def sample_dpmpp_2m_sde(
    denoise: Denoiser,
    x: Tensor,
    sigmas: Tensor | Sequence[float],
    *,
    callback: StepCallback | None = None,
    noise_sampler: NoiseSampler | None = None,
    shift: float = 1.0,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> Tensor:
    """ComfyUI ``sample_dpmpp_2m_sde`` (midpoint) on a CONST model: DPM-Solver++(2M) in the flow's half log SNR
    with fresh noise every step.  ``shift`` is the model's sigma shift (ModelSamplingAuraFlow), used only to offset
    a first sigma of 1 as ComfyUI does; ComfyUI's own noise is ``brownian_noise_sampler`` seeded with the seed."""
    noise = _require_noise(noise_sampler, "dpmpp_2m_sde")
    given = _floats(sigmas)
    sig = snr_start_sigmas(given, shift)
    old_denoised: Tensor | None = None
    h = h_last = 0.0
    for i in range(len(sig) - 1):
        sigma, sigma_next = sig[i], sig[i + 1]
        denoised = _denoise(denoise, x, sigma)
        if sigma_next == 0:
            x = denoised
        else:
            lam_s, lam_t = _half_log_snr(sigma), _half_log_snr(sigma_next)
            h = lam_t - lam_s
            h_eta = h * (eta + 1)
            alpha_t = sigma_next * math.exp(lam_t)
            x = (sigma_next / sigma * math.exp(-h * eta)) * x + (alpha_t * -math.expm1(-h_eta)) * denoised
            if old_denoised is not None:
                x = x + (0.5 * alpha_t * -math.expm1(-h_eta) * (h / h_last)) * (denoised - old_denoised)
            if eta > 0 and s_noise > 0:
                scale = sigma_next * math.sqrt(-math.expm1(-2 * h * eta)) * s_noise
                x = x + noise(sigma, sigma_next).to(x.dtype) * scale
        old_denoised = denoised
        h_last = h
        if callback is not None:
            callback(i, x, denoised, given[i], sigma_next)
    return x


def sample_dpmpp_sde(
    denoise: Denoiser,
    x: Tensor,
    sigmas: Tensor | Sequence[float],
    *,
    callback: StepCallback | None = None,
    noise_sampler: NoiseSampler | None = None,
    shift: float = 1.0,
    eta: float = 1.0,
    s_noise: float = 1.0,
    r: float = 0.5,
) -> Tensor:
    """ComfyUI ``sample_dpmpp_sde`` on a CONST model: stochastic DPM-Solver++ with a midpoint at ``lambda_s +
    r*h``; two model calls per step (the second at the midpoint sigma, same step index).  ``shift``: as
    ``sample_dpmpp_2m_sde``."""
    noise = _require_noise(noise_sampler, "dpmpp_sde")
    given = _floats(sigmas)
    sig = snr_start_sigmas(given, shift)
    fac = 1 / (2 * r)
    for i in range(len(sig) - 1):
        sigma, sigma_next = sig[i], sig[i + 1]
        denoised = _denoise(denoise, x, sigma)
        if sigma_next == 0:
            x = denoised
        else:
            # float32 scalars in ComfyUI's order: at small sigmas the midpoint's float32 rounding is visible (1e-5)
            s, t = torch.tensor(sigma, dtype=torch.float32), torch.tensor(sigma_next, dtype=torch.float32)
            lam_s, lam_t = s.logit().neg(), t.logit().neg()
            h = lam_t - lam_s
            lam_s1 = lam_s + r * h
            sigma_s1 = lam_s1.neg().sigmoid()
            alpha_s, alpha_s1, alpha_t = s * lam_s.exp(), sigma_s1 * lam_s1.exp(), t * lam_t.exp()

            sd, su = _ancestral_step(lam_s.neg().exp(), lam_s1.neg().exp(), eta)
            h_ = sd.log().neg() - lam_s
            x_2 = float(alpha_s1 / alpha_s * (-h_).exp()) * x - float(alpha_s1 * (-h_).expm1()) * denoised
            if eta > 0 and s_noise > 0:
                x_2 = x_2 + noise(sigma, float(sigma_s1)).to(x.dtype) * float(alpha_s1 * s_noise * su)
            denoised_2 = _denoise(denoise, x_2, float(sigma_s1))

            sd, su = _ancestral_step(lam_s.neg().exp(), lam_t.neg().exp(), eta)
            h_ = sd.log().neg() - lam_s
            denoised_d = (1 - fac) * denoised + fac * denoised_2
            x = float(alpha_t / alpha_s * (-h_).exp()) * x - float(alpha_t * (-h_).expm1()) * denoised_d
            if eta > 0 and s_noise > 0:
                x = x + noise(sigma, sigma_next).to(x.dtype) * float(alpha_t * s_noise * su)
        if callback is not None:
            callback(i, x, denoised, given[i], sigma_next)
    return x


def sample_lcm(
    denoise: Denoiser,
    x: Tensor,
    sigmas: Tensor | Sequence[float],
    *,
    callback: StepCallback | None = None,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """ComfyUI ``sample_lcm`` on a CONST model: jump to the denoised estimate, then re-noise it to ``sigma_next``
    with fresh noise (``noise_scaling``: ``sigma_next * noise + (1 - sigma_next) * denoised``)."""
    noise = _require_noise(noise_sampler, "lcm")
    sig = _floats(sigmas)
    for i in range(len(sig) - 1):
        sigma, sigma_next = sig[i], sig[i + 1]
        denoised = _denoise(denoise, x, sigma)
        x = denoised
        if sigma_next > 0:
            x = sigma_next * noise(sigma, sigma_next).to(x.dtype) + (1.0 - sigma_next) * denoised
        if callback is not None:
            callback(i, x, denoised, sigma, sigma_next)
    return x


def sample_ddim(
    denoise: Denoiser,
    x: Tensor,
    sigmas: Tensor | Sequence[float],
    *,
    callback: StepCallback | None = None,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """ComfyUI's ``ddim`` is ``ksampler("euler")`` (its only extra, fresh noise for inpainting masks, does not
    touch the update): deterministic DDIM is the Euler step of the flow ODE."""
    return sample_euler(denoise, x, sigmas, callback=callback)


_UNIPC_FINAL_SIGMA = 0.001  # sample_unipc replaces a final sigma of 0 with this (and keeps it in the schedule)


def _vp(sigma: float) -> tuple[float, float, float]:
    """``SigmaConvert`` (VE sigma -> VP alpha, std, lambda) in float32, op for op as ComfyUI computes it: at
    sigma = 0.001 ``1 - alpha**2`` cancels to a few significant bits, and the result depends on those bits."""
    s = torch.tensor(sigma, dtype=torch.float32)
    log_mean = 0.5 * torch.log(1 / ((s * s) + 1))
    alpha = torch.exp(log_mean)
    one_minus = 1.0 - torch.exp(2.0 * log_mean)
    std = torch.sqrt(one_minus)
    lam = log_mean - 0.5 * torch.log(one_minus)
    return float(alpha), float(std), float(lam)


def _unipc_update(
    model_fn: Callable[[Tensor, float], Tensor],
    x: Tensor,
    history: list[tuple[float, Tensor]],
    t: float,
    order: int,
    bh2: bool,
    use_corrector: bool,
) -> tuple[Tensor, Tensor | None]:
    """One UniPC-bh predictor(-corrector) step in VP space from ``history[-1]`` to ``t`` (data prediction)."""
    t_prev0, m0 = history[-1]
    _, std_prev0, lam_prev0 = _vp(t_prev0)
    alpha_t, std_t, lam_t = _vp(t)
    h = float(torch.tensor(lam_t, dtype=torch.float32) - torch.tensor(lam_prev0, dtype=torch.float32))
    rks: list[float] = []
    d1s: list[Tensor] = []
    for k in range(1, order):
        t_k, m_k = history[-(k + 1)]
        rk = float(np.float32((np.float32(_vp(t_k)[2]) - np.float32(lam_prev0)) / np.float32(h)))
        rks.append(rk)
        d1s.append((m_k - m0) / rk)
    rks.append(1.0)
    rks_t = torch.tensor(rks, dtype=torch.float32)
    hh = torch.tensor(-h, dtype=torch.float32)
    h_phi_1 = torch.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    b_h = torch.expm1(hh) if bh2 else hh
    rows, b = [], []
    factorial = 1
    for k in range(1, order + 1):
        rows.append(torch.pow(rks_t, k - 1))
        b.append(float(h_phi_k * factorial / b_h))
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    big_r = torch.stack(rows)
    b_t = torch.tensor(b, dtype=torch.float32)
    coef_b = float(alpha_t * b_h)
    x_base = float(np.float32(std_t) / np.float32(std_prev0)) * x - float(alpha_t * h_phi_1) * m0
    if d1s:
        rhos_p = [0.5] if order == 2 else torch.linalg.solve(big_r[:-1, :-1], b_t[:-1]).tolist()
        x_t = x_base - coef_b * sum(rho * d for rho, d in zip(rhos_p, d1s))
    else:
        x_t = x_base
    if not use_corrector:
        return x_t, None
    rhos_c = [0.5] if order == 1 else torch.linalg.solve(big_r, b_t).tolist()
    model_t = model_fn(x_t, t)
    corr = sum((rho * d for rho, d in zip(rhos_c[:-1], d1s)), torch.zeros_like(x))
    return x_base - coef_b * (corr + rhos_c[-1] * (model_t - m0)), model_t


def _sample_unipc(
    denoise: Denoiser,
    x: Tensor,
    sigmas: Tensor | Sequence[float],
    callback: StepCallback | None,
    bh2: bool,
) -> Tensor:
    """ComfyUI ``sample_unipc`` + its KSAMPLER wrapper on a CONST model.

    ComfyUI treats the sigmas as VE sigmas (``x_vp = x / sqrt(1 + sigma**2)``), runs UniPC multistep (order
    ``min(3, steps - 1)``, lower order for the last steps) down to sigma 0.001 instead of 0 and divides by that
    sigma's VP alpha; that 0.001 is written into the schedule it was given, so the KSAMPLER's
    ``inverse_noise_scaling`` then divides the latents by ``1 - 0.001``.  All kept, so a render matches ComfyUI.
    """
    orig = _floats(sigmas)
    ts = list(orig)
    if ts[-1] == 0:
        ts[-1] = float(np.float32(_UNIPC_FINAL_SIGMA))
    steps = len(ts) - 1
    if steps < 2:  # ComfyUI's UniPC (order min(3, steps - 1) = 0) makes no update at all and returns scaled noise
        raise InvalidRequest("sampler 'uni_pc' needs at least 2 steps", code="invalid_steps")
    order = min(3, steps - 1)

    def model_fn(x_vp: Tensor, t: float) -> Tensor:
        s = torch.tensor(t, dtype=torch.float32)
        x_ve = x_vp * float((s**2 + 1.0) ** 0.5)
        eps = (x_ve - _denoise(denoise, x_ve, t)) / t
        alpha, std, _ = _vp(t)
        return (x_vp - std * eps) / alpha

    x = x / float(torch.sqrt(1.0 + torch.tensor(ts[0], dtype=torch.float32) ** 2.0))
    history: list[tuple[float, Tensor]] = [(ts[0], model_fn(x, ts[0]))]
    for j in range(1, steps + 1):
        k = min(order, j, steps + 1 - j)
        x, model_x = _unipc_update(model_fn, x, history[-k:], ts[j], k, bh2, j < steps)
        if j < steps:
            history.append((ts[j], model_x))
            history = history[-max(order, 1):]
        if callback is not None:
            callback(j - 1, x, history[-1][1], orig[j - 1], orig[j])
    x = x / _vp(ts[-1])[0]
    return x / (1.0 - ts[-1]) if orig[-1] == 0 else x


def sample_uni_pc(
    denoise: Denoiser,
    x: Tensor,
    sigmas: Tensor | Sequence[float],
    *,
    callback: StepCallback | None = None,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """ComfyUI ``uni_pc`` (UniPC-bh1, arXiv 2302.04867) as ComfyUI runs it on flow models; one model call per
    step.  ComfyUI schedules it with ``steps + 1`` sigmas minus the penultimate one (``comfy_sampler_sigmas``)."""
    return _sample_unipc(denoise, x, sigmas, callback, bh2=False)


def sample_uni_pc_bh2(
    denoise: Denoiser,
    x: Tensor,
    sigmas: Tensor | Sequence[float],
    *,
    callback: StepCallback | None = None,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """ComfyUI ``uni_pc_bh2``: as ``sample_uni_pc`` with the bh2 coefficients (``B(h) = e^h - 1``)."""
    return _sample_unipc(denoise, x, sigmas, callback, bh2=True)


SAMPLERS: Mapping[str, Sampler] = MappingProxyType(
    {
        "euler": sample_euler,
        "euler_ancestral": sample_euler_ancestral,
        "heun": sample_heun,
        "dpmpp_2m": sample_dpmpp_2m,
        "res_multistep": sample_res_multistep,
        "dpmpp_2m_sde": sample_dpmpp_2m_sde,
        "dpmpp_sde": sample_dpmpp_sde,
        "lcm": sample_lcm,
        "ddim": sample_ddim,
        "uni_pc": sample_uni_pc,
        "uni_pc_bh2": sample_uni_pc_bh2,
    }
)
STOCHASTIC_SAMPLERS: frozenset[str] = frozenset({"euler_ancestral", "dpmpp_2m_sde", "dpmpp_sde", "lcm"})
# samplers whose first sigma of 1 is moved (ComfyUI offset_first_sigma_for_snr): pass them the model's ``shift=``
SHIFT_AWARE_SAMPLERS: frozenset[str] = frozenset({"dpmpp_2m_sde", "dpmpp_sde"})


def get_sampler(name: str) -> Sampler:
    """Look a sampler up by its ComfyUI name."""
    fn = SAMPLERS.get(name) if isinstance(name, str) else None
    if fn is None:
        raise InvalidRequest(f"unknown sampler {name!r}; valid: {', '.join(SAMPLERS)}")
    return fn


__all__ = [
    "SAMPLERS",
    "SHIFT_AWARE_SAMPLERS",
    "STOCHASTIC_SAMPLERS",
    "Denoiser",
    "NoiseSampler",
    "Sampler",
    "StepCallback",
    "get_sampler",
    "sample_ddim",
    "sample_dpmpp_2m",
    "sample_dpmpp_2m_sde",
    "sample_dpmpp_sde",
    "sample_euler",
    "sample_euler_ancestral",
    "sample_heun",
    "sample_lcm",
    "sample_res_multistep",
    "sample_uni_pc",
    "sample_uni_pc_bh2",
    "snr_start_sigmas",
]
