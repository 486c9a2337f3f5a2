"""Per-step noise for the stochastic samplers, as ComfyUI draws it.

ComfyUI's SDE samplers (``dpmpp_sde``, ``dpmpp_2m_sde``) take their noise from a Brownian tree (torchsde) seeded
with the job's seed, built on the CPU in the latent's own shape (``[B, 16, H/8, W/8]``) over the schedule's
``[min positive sigma, max sigma]``; each step asks for the increment between its two sigmas, scaled to unit
variance.  The same seed therefore gives the same noise at any step count that shares sigmas, and on any device.
``lcm`` and the ancestral samplers use ``seeded_noise`` (one ``torch.Generator`` stream, ``randn`` per call).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch

NoiseFn = Callable[[float, float], torch.Tensor]


class BrownianNoise:
    """ComfyUI's ``BrownianTreeNoiseSampler(x, sigma_min, sigma_max, seed=seed, cpu=True)`` for a latent of
    ``shape``: ``noise(sigma, sigma_next)`` is the tree's increment over that interval / sqrt(its length)."""

    def __init__(self, shape: Sequence[int], sigma_min: float, sigma_max: float, seed: int,
                 dtype: torch.dtype = torch.float32) -> None:
        import torchsde  # lazy: only the SDE samplers need it

        t0, t1 = sorted((torch.tensor(float(sigma_min)), torch.tensor(float(sigma_max))))
        self.dtype = dtype
        self.tree = torchsde.BrownianTree(t0, torch.zeros(tuple(shape), dtype=dtype), t1, entropy=int(seed))

    def __call__(self, sigma: float, sigma_next: float) -> torch.Tensor:
        a = torch.tensor(float(sigma), dtype=torch.float32)
        b = torch.tensor(float(sigma_next), dtype=torch.float32)
        lo, hi, sign = (a, b, 1.0) if a < b else (b, a, -1.0)
        with warnings.catch_warnings():
            # torchsde compares the float32 query with its float64 copy of t0 and warns at the (exact) lower end
            warnings.filterwarnings("ignore", message="Should have ta>=t0", category=UserWarning)
            w = self.tree(lo, hi).to(self.dtype) * sign
        return w / (b - a).abs().sqrt()


def brownian_noise_sampler(shape: Sequence[int], sigmas: torch.Tensor | Sequence[float], seed: int) -> BrownianNoise:
    """The tree ComfyUI builds for a run over ``sigmas`` (bounds from the schedule before any first-sigma offset)."""
    sig = torch.as_tensor(sigmas, dtype=torch.float32)
    return BrownianNoise(shape, float(sig[sig > 0].min()), float(sig.max()), seed)


def seeded_noise(shape: Sequence[int], seed: int, dtype: torch.dtype = torch.float32) -> NoiseFn:
    """ComfyUI's ``default_noise_sampler(x, seed)`` on the CPU: ``randn(shape)`` from one generator per run."""
    gen = torch.Generator().manual_seed(int(seed))
    return lambda sigma, sigma_next: torch.randn(tuple(shape), dtype=dtype, generator=gen)


def comfy_noise_sampler(sampler: str, shape: Sequence[int], sigmas: torch.Tensor | Sequence[float],
                        seed: int) -> NoiseFn | None:
    """The per-step noise ComfyUI's KSampler gives ``sampler`` for a job seeded ``seed`` (CPU tensors of ``shape``;
    ComfyUI's Qwen-Image latent is ``[B, 16, 1, H/8, W/8]``, and any layout with the same element order gives the
    same values): the Brownian tree for the SDE samplers, ``default_noise_sampler`` (a generator seeded with the
    job's seed itself) for ancestral/LCM, ``None`` for the deterministic ones.  ComfyUI draws the latter on the
    latent's device, so a GPU ComfyUI run's ancestral noise is not reproducible on the CPU (nor vice versa)."""
    if sampler in ("dpmpp_sde", "dpmpp_2m_sde"):
        return brownian_noise_sampler(shape, sigmas, seed)
    if sampler in ("euler_ancestral", "lcm"):
        return seeded_noise(shape, seed)
    return None


__all__ = ["BrownianNoise", "NoiseFn", "brownian_noise_sampler", "comfy_noise_sampler", "seeded_noise"]
