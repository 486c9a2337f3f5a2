"""Memory planning: measure free RAM/VRAM, work out from the file headers what each placement needs on the
accelerator (``engine/footprints.py``), pick the fastest placement that fits, and refuse *before loading* — with what
is needed and what is free — only when even the leanest cannot fit.

Placements, fastest first (GPU):
  resident       every component on the GPU
  model_offload  components live in RAM and visit the GPU one stage at a time (text encoder -> DiT -> VAE)
  group_offload  the DiT streams block by block (diffusers' group-offloading hooks, block level, the next block
                 prefetched on a side CUDA stream): on the GPU only what lies outside the blocks + 2 blocks + the
                 step's activations, so any DiT file runs in a few GB
  leaf_offload   the DiT streams layer by layer (group offloading at leaf level, prefetched): the leanest
  cpu            no GPU at all (a CPU device)
In every offloaded placement the text encoder (once per prompt; embeddings are cached) visits the GPU whole when it
fits, else streams layer by layer, and the VAE visits (decoding in tiles when the untiled peak does not fit).
``vram_budget`` (GiB; ``--vram-budget``) caps what the planner may use; on a CPU device it *simulates* an accelerator
of that size: the chosen placement's hooks run with the CPU on both sides (same arithmetic, for tests and for
checking a plan without the GPU).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Mapping

from ..errors import InsufficientMemory, InvalidRequest
from .footprints import WORKSPACE, Footprint, dit_activations, text_activations, vae_decode_peak

GiB = 2**30
STRATEGIES = ("resident", "model_offload", "group_offload", "leaf_offload", "cpu")
ACCELERATED = ("resident", "model_offload", "group_offload", "leaf_offload")
DIT_MODE = {"resident": "resident", "model_offload": "visit", "group_offload": "block", "leaf_offload": "leaf",
            "cpu": "cpu"}
COMPONENTS = ("text_encoder", "transformer", "vae")
VAE_TILING_PIXELS = 2048 * 2048  # decode above this many pixels in tiles at most (activation memory grows with area)


@dataclass(frozen=True)
class MemoryInfo:
    ram_free: int
    ram_total: int
    vram_free: int | None = None
    vram_total: int | None = None


@dataclass(frozen=True)
class Plan:
    """Where each component lives (``modes``: resident / visit / block / leaf / cpu), what that needs, and why."""

    strategy: str
    vram_needed: int
    ram_needed: int
    vae_tiling: bool = False
    notes: tuple[str, ...] = field(default_factory=tuple)
    modes: Mapping[str, str] = field(default_factory=dict)
    reason: str = ""
    vram_free: int | None = None  # what the plan was made for: free VRAM, capped by the budget
    vae_tile_above: int = VAE_TILING_PIXELS  # decode larger images (pixels) in tiles
    pin_memory: bool = True  # streamed weights in pinned RAM (faster copies; a transient second copy at load)
    simulated: bool = False  # a CPU run planned against a simulated accelerator (``vram_budget``)
    budget: float | None = None  # the ``vram_budget`` asked for (GiB)

    def mode(self, name: str) -> str:
        if name in self.modes:
            return self.modes[name]
        if name == "transformer":
            return DIT_MODE[self.strategy]
        return {"resident": "resident", "cpu": "cpu"}.get(self.strategy, "visit")

    def summary(self) -> str:
        """One line for the load log: the reason plus what was free."""
        if self.vram_free is None:
            return self.reason
        return f"{self.reason} (planned for {_gib(self.vram_free)} GPU{', simulated' if self.simulated else ''})"

    def as_metadata(self) -> dict:
        out = {"strategy": self.strategy, "components": {n: self.mode(n) for n in COMPONENTS},
               "vram_needed_gib": round(self.vram_needed / GiB, 2), "ram_needed_gib": round(self.ram_needed / GiB, 2)}
        if self.budget is not None:  # (free memory varies run to run: it is in the load warning, not here)
            out["vram_budget_gib"] = self.budget
        if self.reason:
            out["reason"] = self.reason
        if self.simulated:
            out["simulated"] = True
        return out


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


@dataclass(frozen=True)
class _Need:
    vram: int
    ram: int
    modes: dict
    detail: str
    tiled: bool
    tile_above: int
    pin: bool


def plan_memory(
    sizes: Mapping[str, int | Footprint],
    info: MemoryInfo,
    *,
    device: str,
    width: int,
    height: int,
    compute_itemsize: int,
    prefer: str | None = None,
    batch: int = 1,
    cfg_batched: bool = True,
    text_tokens: int = 1024,
    vram_budget: float | None = None,
    load_ram: int = 0,
) -> Plan:
    """Choose a placement for the components of ``sizes`` (bytes or ``Footprint``: transformer, text_encoder,
    vae) for images of ``width`` x ``height`` in batches of ``batch``, or raise InsufficientMemory naming what each
    placement needs, what is free and what would fit. ``vram_budget``: GiB the plan may use (see module doc).
    ``load_ram``: RAM the load itself passes through, whatever the placement (a quantize-on-load run holds the
    float DiT in RAM before it is quantized; ``sizes`` then give the quantized DiT, as it runs)."""
    if prefer is not None and prefer not in STRATEGIES + ("auto",):
        raise InvalidRequest(f"unknown offload strategy '{prefer}'; valid: auto, {', '.join(STRATEGIES)}")
    if vram_budget is not None and not vram_budget > 0:
        raise InvalidRequest(f"--vram-budget must be a positive number of GiB, got {vram_budget}",
                             code="invalid_vram_budget")
    fps = {n: _footprint(n, sizes.get(n, 0)) for n in COMPONENTS}
    cpu_device = not str(device).startswith(("cuda", "mps", "xpu"))
    simulated = cpu_device and vram_budget is not None
    free = info.vram_free
    if vram_budget is not None:
        cap = int(vram_budget * GiB)
        free = cap if free is None else min(free, cap)
    stream = str(device).startswith("cuda")  # side-stream prefetch and pinned RAM need CUDA
    run = {"width": width, "height": height, "batch": batch, "cfg_batched": cfg_batched, "text_tokens": text_tokens,
           "itemsize": compute_itemsize, "workspace": 0 if cpu_device else WORKSPACE}
    needs = {s: _with_load_ram(_needs(s, fps, free, info.ram_free, stream, run), load_ram) for s in STRATEGIES}
    order = list(ACCELERATED) if (not cpu_device or simulated) else ["cpu"]
    if prefer not in (None, "auto"):
        if prefer != "cpu" and cpu_device and not simulated:
            raise InvalidRequest(f"offload strategy '{prefer}' needs a CUDA device (or --vram-budget GB to simulate "
                                 f"one on the CPU); this run is on {device}")
        order = [prefer]

    def fits(s: str) -> bool:
        n = needs[s]
        return (s == "cpu" or free is None or n.vram <= free) and n.ram <= info.ram_free

    skipped = []
    for strategy in order:
        n = needs[strategy]
        if fits(strategy):
            why = "; ".join(skipped + [f"{strategy}: {n.detail}, needs {_gib(n.vram)} GPU + {_gib(n.ram)} RAM"
                                       if strategy != "cpu" else f"{strategy}: {n.detail}"])
            return Plan(strategy, n.vram, n.ram, vae_tiling=n.tiled, modes=n.modes, reason=why, vram_free=free,
                        vae_tile_above=n.tile_above, pin_memory=n.pin, simulated=simulated, budget=vram_budget)
        skipped.append(f"{strategy} needs {_gib(n.vram)} GPU + {_gib(n.ram)} RAM")
    candidates = list(ACCELERATED) if (not cpu_device or simulated) else ["cpu"]
    fitting = [s for s in candidates if fits(s)]
    tried = "; ".join(f"{s}: {_gib(needs[s].vram)} GPU + {_gib(needs[s].ram)} RAM" for s in order)
    free_text = (f"free: {_gib(free or 0)} GPU, {_gib(info.ram_free)} RAM" if not cpu_device or simulated
                 else f"free: {_gib(info.ram_free)} RAM")
    if fitting:
        hint = f"--offload {fitting[0]} would fit"
    elif not cpu_device and needs["cpu"].ram <= info.ram_free:
        hint = "--device cpu would fit (much slower); or use a smaller file (GGUF Q4_K_M DiT, fp8 text encoder)"
    else:
        hint = "use a smaller file (fp8 or GGUF Q4_K_M DiT, fp8 text encoder) or free memory"
    if load_ram > info.ram_free:  # the quantized run might fit; its load does not
        hint = (f"loading holds {_gib(load_ram)} in RAM (the float DiT before it is quantized): write the "
                "quantized file once (`qwenstudio convert SRC DST --to int4`, or an fp8/GGUF file) and load that")
    raise InsufficientMemory(f"not enough memory to load this model ({tried}; {free_text}); {hint}",
                             detail={"needed": {s: (needs[s].vram, needs[s].ram) for s in order},
                                     "free": {**info.__dict__, "vram_planned": free}})


def _footprint(name: str, v) -> Footprint:
    return v if isinstance(v, Footprint) else Footprint.estimate(name, int(v))


def _needs(strategy: str, fps: dict, free: int | None, ram_free: int, stream: bool, run: dict) -> _Need:
    """What ``strategy`` needs on the GPU (its largest stage; resident: the sum) and in RAM, per component."""
    dit, te, vae = fps["transformer"], fps["text_encoder"], fps["vae"]
    w, h, size, ws = run["width"], run["height"], run["itemsize"], run["workspace"]
    pixels = w * h
    act_dit = dit_activations(dit, w, h, batch=run["batch"], cfg_batched=run["cfg_batched"],
                              text_tokens=run["text_tokens"], itemsize=size, workspace=ws)
    act_te = text_activations(te, text_tokens=run["text_tokens"], itemsize=size, workspace=ws)

    def vae_peak(tiled: bool) -> int:
        return vae_decode_peak(vae, pixels, batch=run["batch"], tiled=tiled, itemsize=size, workspace=ws)

    def tile_above(room: int | None) -> int:
        """The largest image (pixels) whose untiled decode fits ``room`` bytes (capped at VAE_TILING_PIXELS)."""
        if room is None:
            return VAE_TILING_PIXELS
        fixed = vae_decode_peak(vae, 0, itemsize=size, workspace=ws)
        per_pixel = max(1, (vae_peak(False) - fixed) // max(pixels, 1))
        return max(0, min(VAE_TILING_PIXELS, (room - fixed) // per_pixel))

    total = dit.total + te.total + vae.total
    if strategy == "cpu":
        ram = total + max(act_dit, act_te, vae_peak(pixels > VAE_TILING_PIXELS))
        return _Need(0, ram, {n: "cpu" for n in COMPONENTS}, "everything on the CPU", pixels > VAE_TILING_PIXELS,
                     VAE_TILING_PIXELS, False)
    if strategy == "resident":
        room = None if free is None else free - total
        above = tile_above(room)
        tiled = pixels > above
        vram = total + max(act_dit, act_te, vae_peak(tiled))
        return _Need(vram, 0, {n: "resident" for n in COMPONENTS}, "every component stays on the GPU", tiled, above,
                     False)
    dit_mode = DIT_MODE[strategy]
    dit_bytes = dit.total if dit_mode == "visit" else dit.streamed(dit_mode)
    te_mode = "visit" if free is None or te.total + act_te <= free else "leaf"
    te_bytes = te.total if te_mode == "visit" else te.streamed("leaf")
    above = tile_above(None if free is None else free - vae.total)
    tiled = pixels > above
    stages = {"text_encoder": te_bytes + act_te, "transformer": dit_bytes + act_dit, "vae": vae.total + vae_peak(tiled)}
    streamed = (dit.total if dit_mode in ("block", "leaf") else 0) + (te.total if te_mode == "leaf" else 0)
    pin = stream and streamed > 0 and total + streamed <= ram_free
    ram = total + (streamed if pin else 0)  # pinned copies are made before the unpinned weights are released
    how = {"visit": "visits the GPU whole", "block": "streams block by block", "leaf": "streams layer by layer"}
    detail = (f"the DiT ({_gib(dit.total)}) {how[dit_mode]} ({_gib(dit_bytes)} on the GPU + {_gib(act_dit)} working), "
              f"the text encoder ({_gib(te.total)}) {how[te_mode]}, the VAE visits"
              f"{' and decodes in tiles' if tiled else ''}")
    return _Need(max(stages.values()), ram, {"text_encoder": te_mode, "transformer": dit_mode, "vae": "visit"},
                 detail, tiled, above, pin)


def _with_load_ram(need: _Need, load_ram: int) -> _Need:
    if load_ram <= need.ram:
        return need
    return replace(need, ram=load_ram, detail=f"{need.detail} (loading holds {_gib(load_ram)} in RAM: the float "
                                              "DiT before it is quantized)")


def _gib(n: int | None) -> str:
    return "unknown" if n is None else f"{n / GiB:.1f} GiB"


class StagePlacement:
    """Puts each component where the plan says: streamed ones get diffusers' group-offloading hooks at their first
    stage (after the load-time speed options — fp8 layer swaps, compile — have changed the modules), visiting ones
    move to the device for their stage (text encode, denoise, decode) and back."""

    def __init__(self, components, plan: Plan):
        self.components = components
        self.plan = plan
        self.streamed: set[str] = set()

    def on_device(self, name: str):
        from contextlib import contextmanager

        @contextmanager
        def placed():
            module = getattr(self.components, name)
            mode = self.plan.mode(name)
            if mode in ("block", "leaf") and module is not None and name not in self.streamed:
                stream_weights(module, self.components.device, mode, pin=self.plan.pin_memory)
                self.streamed.add(name)
            if mode != "visit" or module is None:
                yield
                return
            module.to(self.components.device)
            try:
                yield
            finally:
                module.to("cpu")

        return placed()

    def set_vae_tiling(self, pixels: int) -> None:
        """Tile the decode of images above the plan's threshold (what fits beside the VAE; at most 4 MP)."""
        vae = self.components.vae
        if pixels > min(self.plan.vae_tile_above, VAE_TILING_PIXELS):
            vae.enable_tiling()
        else:
            vae.disable_tiling()


def stream_weights(module, device, level: str, *, pin: bool = True) -> None:
    """Group offloading (diffusers' hooks): weights live in RAM and go to ``device`` a block (``level="block"``) or
    a layer (``"leaf"``) at a time; on CUDA the next group is prefetched on a side stream from pinned RAM (``pin``
    False: pinned on the fly, no second copy in RAM). On a CPU device (a simulated budget) the same hooks run
    CPU to CPU."""
    import torch
    from diffusers.hooks import apply_group_offloading

    device = torch.device(device)
    stream = device.type == "cuda"
    extra = {"num_blocks_per_group": 1} if level == "block" else {}
    apply_group_offloading(module, onload_device=device, offload_device=torch.device("cpu"),
                           offload_type=f"{level}_level", use_stream=stream, low_cpu_mem_usage=stream and not pin,
                           **extra)


def unstream_weights(module) -> None:
    """Undo ``stream_weights``: remove the group-offloading hooks; the weights stay where they are (in RAM)."""
    from diffusers.hooks import HookRegistry

    registry = HookRegistry.check_if_exists_or_initialize(module)
    for name in ("group_offloading", "lazy_prefetch_group_offloading", "layer_execution_tracker"):
        registry.remove_hook(name, recurse=True)
