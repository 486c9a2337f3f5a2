"""Sampler and scheduler names as other tools write them -> ours (ComfyUI's names).

A1111/Forge write display names (``Euler a``, ``DPM++ 2M Karras``, ``Schedule type: Simple``); ComfyUI and SwarmUI
write ComfyUI's names (``euler_ancestral``, ``karras``).  Older A1111 versions fold the scheduler into the sampler
name (``DPM++ 2M Karras``); that suffix is returned as the scheduler.  A name we do not run maps to ``None``: the
caller lists it as unmapped, it is never replaced by a near match.
"""

from __future__ import annotations

A1111_SAMPLERS: dict[str, str] = {
    "euler": "euler",
    "euler a": "euler_ancestral",
    "heun": "heun",
    "dpm++ 2m": "dpmpp_2m",
    "dpm++ 2m sde": "dpmpp_2m_sde",
    "dpm++ sde": "dpmpp_sde",
    "ddim": "ddim",
    "unipc": "uni_pc",
    "lcm": "lcm",
    "res multistep": "res_multistep",
}
A1111_SCHEDULERS: dict[str, str] = {
    "simple": "simple",
    "normal": "normal",
    "karras": "karras",
    "exponential": "exponential",
    "sgm uniform": "sgm_uniform",
    "beta": "beta",
    "kl optimal": "kl_optimal",
    "ddim": "ddim_uniform",
    "linear quadratic": "linear_quadratic",
}
# What A1111 writes (and its sd_samplers.all_samplers_map / sd_schedulers.schedulers_map look up: exact labels;
# any other name silently becomes its default "DPM++ 2M"), for the samplers and schedules it has.
A1111_SAMPLER_LABELS: dict[str, str] = {
    "euler": "Euler", "euler_ancestral": "Euler a", "heun": "Heun", "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_sde": "DPM++ 2M SDE", "dpmpp_sde": "DPM++ SDE", "ddim": "DDIM", "uni_pc": "UniPC", "lcm": "LCM",
}
A1111_SCHEDULE_LABELS: dict[str, str] = {
    "simple": "Simple", "normal": "Normal", "karras": "Karras", "exponential": "Exponential",
    "sgm_uniform": "SGM Uniform", "beta": "Beta", "kl_optimal": "KL Optimal", "ddim_uniform": "DDIM",
}
AUTOMATIC_SCHEDULE = "automatic"  # A1111: "the sampler's own default" -> left to our model default


def sampler_name(value: object) -> tuple[str | None, str | None]:
    """``(our sampler, scheduler folded into the name)`` for a sampler as any of the tools writes it; ``(None,
    None)`` if we do not have that sampler."""
    from ..engine.sampling import SAMPLERS

    if not isinstance(value, str):
        return None, None
    raw = value.strip()
    if raw in SAMPLERS:
        return raw, None
    low = " ".join(raw.lower().split())
    if low in A1111_SAMPLERS:
        return A1111_SAMPLERS[low], None
    for suffix, scheduler in (("karras", "karras"), ("exponential", "exponential")):
        if low.endswith(" " + suffix) and low[: -len(suffix) - 1] in A1111_SAMPLERS:
            return A1111_SAMPLERS[low[: -len(suffix) - 1]], scheduler
    return None, None


def scheduler_name(value: object) -> str | None:
    """Our scheduler for a ComfyUI name or an A1111 ``Schedule type``; ``None`` if we do not have it (the caller
    handles ``Automatic`` separately: it is a request for the default, not a scheduler)."""
    from ..engine.sampling import SCHEDULERS

    if not isinstance(value, str):
        return None
    raw = value.strip()
    if raw in SCHEDULERS:
        return raw
    return A1111_SCHEDULERS.get(" ".join(raw.lower().split()))


def a1111_sampler_label(sampler: str) -> str:
    """The name A1111 shows and writes for our sampler; ours where A1111 has no such sampler."""
    return A1111_SAMPLER_LABELS.get(sampler, sampler)


def a1111_schedule_label(scheduler: str) -> str:
    """A1111's ``Schedule type`` label for our scheduler; ours where A1111 has none (``reference``)."""
    return A1111_SCHEDULE_LABELS.get(scheduler, scheduler)


__all__ = ["A1111_SAMPLERS", "A1111_SAMPLER_LABELS", "A1111_SCHEDULERS", "A1111_SCHEDULE_LABELS", "AUTOMATIC_SCHEDULE",
           "a1111_sampler_label", "a1111_schedule_label", "sampler_name", "scheduler_name"]
