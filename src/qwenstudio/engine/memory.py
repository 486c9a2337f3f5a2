"""Memory planning: measure free RAM/VRAM, estimate each component's resident size from file headers, pick the
cheapest placement that fits, and refuse *before loading* when nothing does.

Strategies, from fastest to leanest on a GPU:
  resident       every component on the GPU
  model_offload  components live in RAM and visit the GPU one stage at a time (text encoder → DiT → VAE)
  group_offload  like model_offload, but the DiT itself streams block by block with prefetch on a side stream
                 (diffusers' group-offloading hooks), so only a few blocks are on the GPU at once
  cpu            no GPU at all
Sizes are estimates (weights at their in-memory dtype plus a working margin for activations); the point of the
preflight is a clear message naming what is needed, what is free and which option would fit, instead of an OOM
40 GB into a load.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InsufficientMemory, InvalidRequest

GiB = 2**30
STRATEGIES = ("resident", "model_offload", "group_offload", "cpu")
_FLOAT_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1}
VAE_TILING_PIXELS = 2048 * 2048  # decode above this many pixels in tiles (activation memory grows with area)


@dataclass(frozen=True)
class MemoryInfo:
    ram_free: int
    ram_total: int
    vram_free: int | None = None
    vram_total: int | None = None


@dataclass(frozen=True)
class Plan:
    strategy: str
    vram_needed: int
    ram_needed: int
    vae_tiling: bool = False
    notes: tuple[str, ...] = field(default_factory=tuple)


def measure(device) -> MemoryInfo:
    """Free/total RAM from /proc/meminfo (MemAvailable) or sysconf; free/total VRAM from the CUDA driver."""
    ram_free, ram_total = _ram()
    vram_free = vram_total = None
    if str(device).startswith("cuda"):
        import torch

        vram_free, vram_total = torch.cuda.mem_get_info(torch.device(device))
    return MemoryInfo(ram_free, ram_total, vram_free, vram_total)


def _ram() -> tuple[int, int]:
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        return int(fields["MemAvailable"].split()[0]) * 1024, int(fields["MemTotal"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        page = os.sysconf("SC_PAGE_SIZE")
        return os.sysconf("SC_AVPHYS_PAGES") * page, os.sysconf("SC_PHYS_PAGES") * page


def safetensors_resident_bytes(files: list[Path], compute_itemsize: int, skip_prefixes: tuple[str, ...] = ()) -> int:
    """Bytes a component takes once loaded: float tensors at the compute dtype, fp8/int tensors as stored."""
    from .loading import read_safetensors_header

    total = 0
    for f in files:
        for key, info in read_safetensors_header(f).items():
            if key == "__metadata__" or key.startswith(skip_prefixes):
                continue
            numel = 1
            for d in info["shape"]:
                numel *= d
            dt = info["dtype"]
            size = compute_itemsize if dt in ("F64", "F32", "F16", "BF16") else _FLOAT_ITEMSIZE.get(dt, 1)
            total += numel * size
    return total


def activation_margin(width: int, height: int, compute_itemsize: int) -> int:
    """A generous working margin for one denoise step: image tokens x hidden width x layers of live buffers,
    plus 1 GiB for kernels' workspace. Real Qwen-Image at 1328² and bf16 lands near 3 GiB."""
    tokens = (width // 16) * (height // 16) + 1024
    return tokens * 3072 * compute_itemsize * 64 + GiB


def plan_memory(
    sizes: dict[str, int],
    info: MemoryInfo,
    *,
    device: str,
    width: int,
    height: int,
    compute_itemsize: int,
    prefer: str | None = None,
    dit_block_fraction: float = 0.05,
) -> Plan:
    """Choose a strategy for components of ``sizes`` (bytes: transformer, text_encoder, vae) or raise
    InsufficientMemory naming what is needed, what is free and what would fit."""
    if prefer is not None and prefer not in STRATEGIES + ("auto",):
        raise InvalidRequest(f"unknown offload strategy '{prefer}'; valid: auto, {', '.join(STRATEGIES)}")
    margin = activation_margin(width, height, compute_itemsize)
    total = sum(sizes.values())
    largest = max(sizes.values())
    dit = sizes.get("transformer", 0)
    streamed_dit = int(dit * dit_block_fraction)
    needs = {
        "resident": (total + margin, 0),
        "model_offload": (largest + margin, total),
        "group_offload": (max(sizes.get("text_encoder", 0), sizes.get("vae", 0), streamed_dit) + margin, total),
        "cpu": (0, total + margin),
    }
    tiling = width * height > VAE_TILING_PIXELS
    on_gpu = str(device).startswith("cuda")
    order = ["resident", "model_offload", "group_offload"] if on_gpu else ["cpu"]
    if prefer not in (None, "auto"):
        if prefer != "cpu" and not on_gpu:
            raise InvalidRequest(f"offload strategy '{prefer}' needs a CUDA device; this run is on {device}")
        order = [prefer]
    for strategy in order:
        vram, ram = needs[strategy]
        if (not on_gpu or info.vram_free is None or vram <= info.vram_free) and ram <= info.ram_free:
            return Plan(strategy, vram, ram, vae_tiling=tiling)
    fits = [s for s in (["resident", "model_offload", "group_offload"] if on_gpu else ["cpu"])
            if (info.vram_free is None or needs[s][0] <= info.vram_free) and needs[s][1] <= info.ram_free]
    tried = "; ".join(f"{s}: {_gib(needs[s][0])} GPU + {_gib(needs[s][1])} RAM" for s in order)
    free = f"free: {_gib(info.vram_free or 0)} GPU, {_gib(info.ram_free)} RAM" if on_gpu else f"free: {_gib(info.ram_free)} RAM"
    hint = (f"--offload {fits[0]} would fit" if fits else
            "use a smaller file (fp8 or GGUF Q4_K_M DiT, fp8 text encoder) or free memory")
    raise InsufficientMemory(f"not enough memory to load this model ({tried}; {free}); {hint}",
                             detail={"needed": {s: needs[s] for s in order}, "free": info.__dict__})


def _gib(n: int) -> str:
    return f"{n / GiB:.1f} GiB"


class StagePlacement:
    """Puts each component where the plan says, for the duration of its stage (text encode, denoise, decode)."""

    def __init__(self, components, plan: Plan):
        self.components = components
        self.plan = plan
        if plan.strategy == "group_offload":
            from diffusers.hooks import apply_group_offloading

            # Block-level streaming of the DiT with prefetch on a side CUDA stream (diffusers' hook).
            apply_group_offloading(components.transformer, onload_device=components.device,
                                   offload_device="cpu", offload_type="block_level", num_blocks_per_group=1,
                                   use_stream=True)

    def _visits(self, name: str) -> bool:
        s = self.plan.strategy
        return s == "model_offload" or (s == "group_offload" and name != "transformer")

    def on_device(self, name: str):
        from contextlib import contextmanager

        @contextmanager
        def placed():
            if not self._visits(name):
                yield
                return
            module = getattr(self.components, name)
            module.to(self.components.device)
            try:
                yield
            finally:
                module.to("cpu")

        return placed()

    def set_vae_tiling(self, pixels: int) -> None:
        vae = self.components.vae
        if pixels > VAE_TILING_PIXELS:
            vae.enable_tiling()
        else:
            vae.disable_tiling()
