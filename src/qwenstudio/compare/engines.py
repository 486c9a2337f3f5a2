"""Loading one model at a time for grids and comparisons, and measuring what each image cost (time, peak memory).

Only the public API is used (``Engine.load`` / ``engine.generate``), so a comparison runs exactly what a user's own
``generate`` would. A model axis loads each model in turn and frees the previous one first: two 20B models never
share the GPU.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class LoadOptions:
    device: str | None = None
    dtype: str | None = None
    offload: str | None = None
    text_encoder: str | None = None
    vae: str | None = None
    models_dirs: tuple[Path, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"device": self.device, "dtype": self.dtype, "offload": self.offload,
                "text_encoder": self.text_encoder, "vae": self.vae, "models_dirs": [str(p) for p in self.models_dirs]}


@dataclass
class EngineSlot:
    """Holds at most one loaded engine; ``get`` swaps models only when the (model, variant) pair changes."""

    options: LoadOptions = field(default_factory=LoadOptions)
    key: tuple | None = None
    engine: Any = None
    load_seconds: dict[tuple, float] = field(default_factory=dict)

    def get(self, model: str, variant: str | None):
        if self.key != (model, variant):
            self.release()
            from ..engine.engine import Engine

            t = time.perf_counter()
            o = self.options
            self.engine = Engine.load(model, variant=variant, device=o.device, dtype=o.dtype,
                                      offload=None if o.offload in (None, "auto") else o.offload,
                                      text_encoder=o.text_encoder, vae=o.vae, models_dirs=tuple(o.models_dirs))
            self.key = (model, variant)
            self.load_seconds[self.key] = time.perf_counter() - t
        return self.engine

    def release(self) -> None:
        if self.engine is None:
            return
        self.engine, self.key = None, None
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:  # pragma: no cover - torch is a dependency
            pass


def generate_measured(engine, request) -> tuple[Any, dict[str, Any]]:
    """Run ``request``; return (result, cost) with wall seconds and the peak memory of this run: CUDA's allocator
    peak on a GPU, else the process's peak RSS so far (the OS keeps only a high-water mark, so on a CPU it is an
    upper bound for this image, labelled as such)."""
    import torch

    cuda = str(engine.device).startswith("cuda")
    if cuda:
        torch.cuda.synchronize(engine.device)
        torch.cuda.reset_peak_memory_stats(engine.device)
    t0 = time.perf_counter()
    result = engine.generate(request)
    if cuda:
        torch.cuda.synchronize(engine.device)
    seconds = time.perf_counter() - t0
    if cuda:
        peak = {"bytes": int(torch.cuda.max_memory_allocated(engine.device)), "kind": "cuda_allocated"}
    else:
        peak = {"bytes": _peak_rss(), "kind": "process_peak_rss"}
    return result, {"seconds": round(seconds, 4), "peak_memory": peak}


def _peak_rss() -> int:
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def nfe(steps: int, cfg: float) -> int:
    """Model evaluations per image: one per step, two with true CFG (CFG <= 1 skips the negative pass)."""
    return int(steps) * (2 if float(cfg) > 1.0 else 1)
