"""Sampling: sigma schedules (``schedules``) and k-diffusion-style samplers (``samplers``)."""

from qwenstudio.engine.sampling.samplers import (
    SAMPLERS,
    STOCHASTIC_SAMPLERS,
    Denoiser,
    NoiseSampler,
    Sampler,
    StepCallback,
    get_sampler,
    sample_dpmpp_2m,
    sample_euler,
    sample_euler_ancestral,
    sample_heun,
    sample_res_multistep,
)
from qwenstudio.engine.sampling.schedules import (
    COMFY_SCHEDULERS,
    DEFAULT_COMFY_SHIFT,
    SCHEDULERS,
    build_sigmas,
    comfy_sigmas,
    reference_sigmas,
)

__all__ = [
    "COMFY_SCHEDULERS",
    "DEFAULT_COMFY_SHIFT",
    "SAMPLERS",
    "SCHEDULERS",
    "STOCHASTIC_SAMPLERS",
    "Denoiser",
    "NoiseSampler",
    "Sampler",
    "StepCallback",
    "build_sigmas",
    "comfy_sigmas",
    "get_sampler",
    "reference_sigmas",
    "sample_dpmpp_2m",
    "sample_euler",
    "sample_euler_ancestral",
    "sample_heun",
    "sample_res_multistep",
]
