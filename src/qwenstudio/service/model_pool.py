"""Many models per server: every model of the models home (and the HF cache) is servable, loaded on demand.

``ModelCatalog`` is what may be served: the operator's ``--model`` first (``tiny`` by default; a path is fine for
the operator), then every diffusers folder, hub repo id and DiT file the registry finds, by the names
``qwenstudio models`` shows. ``MultiModelEngineClient`` is an ``EngineClient`` that keeps a *resident set* of loaded
engines, at most ``max_resident`` of them (default: ``ModelCatalog.plan_resident``, what the memory planner fits),
and evicts the least recently used one to load another; an evicted engine is dropped, collected and the CUDA cache
emptied, so its memory really goes back. One thread owns every engine (loads and runs), like the single-model client.

Safety (SECURITY 23): a job names its model at submit; the engine that runs it is looked up by that name on the
owning thread, and the result is checked to name the same model before it is returned — a job never runs on, or
comes back from, another model. A model that does not exist, or cannot fit even alone, is refused at submit
(``ModelNotFound`` 404 / ``ModelTooLarge`` 422), before anything is queued.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..config import Settings
from ..engine.job import EngineJob, EngineResult, ImageStore
from ..errors import InsufficientMemory, ModelNotFound, ModelTooLarge, QwenStudioError
from .engine_client import EventCallback, LoadEvent, ModelInfo, run_on_engine

log = logging.getLogger("qwenstudio.service")
MODEL_KINDS = ("diffusers", "dit")
REFRESH_S = 2.0  # the catalog re-reads the models dirs at most this often (the worker asks on every poll)


@dataclass(frozen=True)
class CatalogEntry:
    id: str  # what clients pass as "model"
    variant: str
    variant_reason: str
    format: str  # diffusers | safetensors | gguf
    source: str  # what Engine.load is given (the operator's --model as typed, else the registry name)
    size_bytes: int = 0

    def info(self, ready: bool, resident: bool) -> ModelInfo:
        return ModelInfo(self.id, self.variant, ready, self.variant_reason, format=self.format,
                         variant_reason=self.variant_reason, resident=resident)


@dataclass(frozen=True)
class LoadOptions:
    """How every model of the catalog is loaded (``qwenstudio serve`` options)."""

    device: str | None = None
    text_encoder: str | None = None  # single-file DiTs: named components (default: picked from the models dirs)
    vae: str | None = None
    offload: str | None = None
    variant: str | None = None  # --variant: applies to the --model model only
    speed: dict = field(default_factory=dict)  # Engine.load's speed options (compile, attention, quant, cache)


class ModelCatalog:
    """The servable models. ``memory`` measures free memory (default ``engine.memory.measure``; tests pass a fixed
    budget)."""

    def __init__(self, settings: Settings, default: str = "tiny", options: LoadOptions | None = None,
                 memory: Callable[[Any], Any] | None = None):
        self.settings, self.default, self.options = settings, default, options or LoadOptions()
        self._memory = memory
        self._entries: list[CatalogEntry] = []
        self._read_at = -1e9
        self._sizes: dict[tuple, dict[str, int]] = {}  # (model id, quant) -> bytes per component
        self._registry: Any = None
        self._snapshots: dict | None = None
        self._warned: set[str] = set()  # names hidden by --model, logged once
        self._lock = threading.Lock()
        self._default_entry = self._identify_default()

    def _identify_default(self) -> CatalogEntry:
        from ..engine.sources import identify_model

        model, path = self.default, Path(self.default)
        model_id = "tiny" if model == "tiny" else (path.stem if path.suffix in (".safetensors", ".gguf") else path.name)
        fmt = {".safetensors": "safetensors", ".gguf": "gguf"}.get(path.suffix, "diffusers")
        try:
            name, ident = identify_model(model, settings=self.settings, variant=self.options.variant)
            model_id = name
        except QwenStudioError:  # an unloadable --model fails with its own typed error when it is loaded
            return CatalogEntry(model_id, self.options.variant or "qwen-image", "not identified", fmt, model)
        return CatalogEntry(model_id, ident.variant, ident.reason, fmt, model)

    def entries(self) -> list[CatalogEntry]:
        """The --model model, then the registry's models (re-read at most every ``REFRESH_S``)."""
        with self._lock:
            if time.monotonic() - self._read_at < REFRESH_S:
                return self._entries
        first = self._default_entry
        out, seen = [first], {first.id}
        try:
            found = self.registry().scan()
        except OSError:
            log.exception("reading the models dirs failed")
            found = []
        for e in found:
            if e.kind not in MODEL_KINDS:
                continue
            if e.name in seen:
                if e.name == first.id and first.source == e.name:  # --model named a registry model
                    out[0] = replace(first, format=e.container, size_bytes=e.size_bytes)
                elif e.name == first.id and e.name not in self._warned:
                    self._warned.add(e.name)
                    log.warning("model '%s' of the models dirs is hidden by --model %s", e.name, first.source)
                continue
            seen.add(e.name)
            out.append(CatalogEntry(e.name, e.variant or "qwen-image", e.variant_reason, e.container, e.name,
                                    e.size_bytes))
        with self._lock:
            self._entries, self._read_at = out, time.monotonic()
        return out

    def registry(self):
        """One registry (its scan is cached until a models folder changes), rebuilt when the HF cache's set of
        snapshots changes (they are its folders)."""
        from ..engine.identity import hub_snapshots
        from ..engine.sources import registry_for

        snapshots = hub_snapshots()
        with self._lock:
            if self._registry is None or snapshots != self._snapshots:
                self._registry, self._snapshots = registry_for(self.settings), snapshots
            return self._registry

    def refresh(self) -> None:
        """Re-read the models dirs (and the HF cache) on the next ``entries`` call, not ``REFRESH_S`` later."""
        with self._lock:
            self._read_at = -1e9

    def is_default(self, entry: CatalogEntry) -> bool:
        """The operator's --model (a path is allowed for it, and --variant applies to it)."""
        return entry.source == self._default_entry.source

    def get(self, model: Any) -> CatalogEntry:
        entries = self.entries()
        for e in entries:
            if e.id == model:
                return e
        raise ModelNotFound(f"model '{model}' is not served here; available: {', '.join(e.id for e in entries)}")

    # ---- memory --------------------------------------------------------------------------------------------
    def device(self):
        from ..engine.engine import check_device
        from ..engine.loading import default_device

        return check_device(self.options.device or self.settings.device or default_device())

    def measure(self):
        from ..engine.memory import measure

        return (self._memory or measure)(self.device())

    def sizes(self, entry: CatalogEntry, *, as_stored: bool = False) -> dict[str, int]:
        """Resident bytes per component (file headers only; cached per model): the DiT as ``--quant`` runs it, or
        with ``as_stored`` as its file holds it (what a quantize-on-load passes through RAM)."""
        from ..engine.quant.load_time import LOAD_TIME_QUANTS

        quant = self.options.speed.get("quant")
        quant = quant if quant in LOAD_TIME_QUANTS and not as_stored else None
        key = (entry.id, quant)
        with self._lock:
            if key in self._sizes:
                return self._sizes[key]
        import torch

        from ..engine.precision import default_precision, stored_weight_kind
        from ..engine.sources import component_sizes, resolve

        device = self.device()
        source = resolve(entry.source, self.registry(), self.settings, text_encoder=self.options.text_encoder,
                         vae=self.options.vae, allow_paths=self.is_default(entry))
        if self.settings.dtype and self.settings.dtype.lower() != "auto":
            from ..engine.engine import parse_dtype

            dtype = parse_dtype(self.settings.dtype)
        else:  # the dtype Engine.load will pick for these files on this device (engine/precision.py)
            dtype = default_precision(device, stored_weight_kind(source)).dtype
        sizes = component_sizes(source, torch.empty(0, dtype=dtype).element_size(), quant)
        with self._lock:
            self._sizes[key] = sizes
        return sizes

    def _plan(self, sizes: dict[str, int], info, variant: str, load_ram: int = 0):
        import torch

        from ..engine.loading import default_dtype
        from ..engine.memory import plan_memory
        from ..engine.specs import get_spec

        device = self.device()
        spec = get_spec(variant)
        width, height = max(spec.resolutions.values(), key=lambda wh: wh[0] * wh[1])
        return plan_memory(sizes, info, device=str(device), width=width, height=height,
                           compute_itemsize=torch.empty(0, dtype=default_dtype(device)).element_size(),
                           prefer=self.options.offload, load_ram=load_ram)

    def check_fits(self, entry: CatalogEntry, freeable: int = 0) -> None:
        """Raise ModelTooLarge when ``entry`` cannot fit even once ``freeable`` bytes (the other resident models)
        are evicted; a typed ModelNotFound etc. when its files do not resolve."""
        info = self.measure()
        info = replace(info, ram_free=info.ram_free + freeable,
                       vram_free=None if info.vram_free is None else info.vram_free + freeable)
        try:
            stored = self.sizes(entry, as_stored=True)
            sizes = self.sizes(entry)
            load_ram = sum(stored.values()) if stored != sizes else 0
            self._plan(sizes, info, entry.variant, load_ram=load_ram)
        except InsufficientMemory as e:
            raise ModelTooLarge(f"model '{entry.id}' cannot be loaded on this server: {e.message}",
                                detail=e.detail) from None

    def plan_resident(self) -> int:
        """How many models may stay loaded at once: the most (largest first) whose summed components the memory
        planner fits with the strategy one model alone gets (no leaner placement just to keep more loaded);
        at least 1."""
        sized = []
        for e in self.entries():
            try:
                sized.append((e, self.sizes(e)))
            except QwenStudioError:
                continue
        sized.sort(key=lambda es: -sum(es[1].values()))
        info, fits, strategy = self.measure(), 0, None
        for k in range(1, len(sized) + 1):
            combined: dict[str, int] = {}
            for _, s in sized[:k]:
                for name, n in s.items():
                    combined[name] = combined.get(name, 0) + n
            try:
                plan = self._plan(combined, info, sized[0][0].variant)
            except InsufficientMemory:
                break
            if strategy is None:
                strategy = plan.strategy
            elif plan.strategy != strategy:
                break
            fits = k
        return max(1, fits)

    def load(self, entry: CatalogEntry, on_progress: Callable[[float], Any] | None = None):
        """Load ``entry``'s engine; ``on_progress`` gets the fraction of its weights' bytes loaded (the loader's)."""
        from ..engine.engine import Engine

        o = self.options
        is_default = self.is_default(entry)
        engine = Engine.load(entry.source, variant=o.variant if is_default else None, device=o.device,
                             settings=self.settings, text_encoder=o.text_encoder, vae=o.vae, offload=o.offload,
                             allow_paths=is_default, long_lived=True, on_load_progress=on_progress, **o.speed)
        engine.allow_paths = False  # LoRA (and ControlNet) names from clients resolve in the models dirs only
        return engine


class MultiModelEngineClient:
    """An ``EngineClient`` over a ``ModelCatalog``: loads on demand, keeps at most ``max_resident`` engines (LRU),
    preloads ``preload`` (the --model model) at start; ``ready`` once that load is done."""

    def __init__(self, catalog: ModelCatalog, *, max_resident: int | None = None, preload: bool = True,
                 images: ImageStore | None = None):
        self.catalog = catalog
        self.images = images  # edit inputs by content id (create_app gives the upload store)
        self.max_resident = max_resident if max_resident is not None else catalog.plan_resident()
        if self.max_resident < 1:
            raise QwenStudioError("--max-resident must be at least 1", code="invalid_request")
        self.preset_lookup: Callable[[str], dict] | None = None  # set by create_app
        self._resident: OrderedDict[str, Any] = OrderedDict()  # id -> Engine, least recently used first
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qwenstudio-engine")
        self._lock = threading.Lock()
        self._cancelled: set[str] = set()
        self._running: str | None = None
        self._ready = not preload
        self.loads: list[tuple[str, float]] = []  # (model, seconds) of every load, oldest first (bounded)
        self._preloaded = self._pool.submit(self._preload) if preload else None

    def _preload(self) -> None:
        try:
            self._engine_for(self.catalog.entries()[0], None)
            self._ready = True
        except Exception:
            log.exception("loading the model failed")

    @property
    def ready(self) -> bool:
        return self._ready

    def wait_ready(self, timeout: float | None = None) -> bool:
        if self._preloaded is not None:
            self._preloaded.result(timeout)
        return self.ready

    def models(self) -> list[ModelInfo]:
        with self._lock:
            resident = set(self._resident)
        return [e.info(self._ready, e.id in resident) for e in self.catalog.entries()]

    def engine(self, model: str):
        """The loaded engine of ``model``, or None (notebooks, tests; jobs go through ``submit``)."""
        with self._lock:
            return self._resident.get(model)

    def resident_models(self) -> list[str]:
        """Loaded models, most recently used first (the worker prefers their jobs; service/jobs.py)."""
        with self._lock:
            return list(reversed(self._resident))

    def load(self, model: str, on_event: EventCallback | None = None) -> float:
        """Make ``model`` resident now (on the engine thread, evicting the least recently used beyond
        ``max_resident``); the seconds the load took, 0 when it was resident. ``on_event`` gets its ``LoadEvent``s
        (start, progress fractions, done). A Ray replica loads through this (service/ray_replica.py)."""
        entry = self.catalog.get(model)
        if entry.id in self.resident_models():
            return 0.0
        started = time.perf_counter()
        self._pool.submit(self._engine_for, entry, on_event).result()
        return time.perf_counter() - started

    def evict(self, model: str) -> None:
        """Drop ``model`` from the resident set and give its memory back, on the engine thread (queued behind the
        running job, never waited for here: a caller on any thread may evict)."""
        self._pool.submit(self._evict_model, model)

    def _evict_model(self, model: str) -> None:
        with self._lock:
            engine = self._resident.pop(model, None)
        if engine is None:
            return
        del engine
        gc.collect()
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        log.info("evicted model %s", model)

    # ---- jobs ----------------------------------------------------------------------------------------------
    def prepare(self, model: str, request: Any) -> Any:
        """Before queueing: the model exists and fits (typed 404/422 otherwise); with the model loaded, the
        engine's full prepare, else the spec-level bounds (the worker prepares the job when it runs it)."""
        entry = self.catalog.get(model)
        with self._lock:
            engine = self._resident.get(entry.id)
            others = [e for m, e in self._resident.items() if m != entry.id]
        if engine is not None:
            engine.preset_lookup = self.preset_lookup
            return engine.prepare(request)
        self.catalog.check_fits(entry, freeable=sum(_engine_bytes(e) for e in others))
        from ..engine.fields import check_bounds
        from ..engine.specs import get_spec

        check_bounds(request.__dict__, [k for k, v in request.__dict__.items() if v is not None])
        get_spec(entry.variant)  # a variant this build knows
        return request

    def submit(self, job: EngineJob, on_event: EventCallback, preview_every: int = 0, *,
               images: ImageStore | None = None) -> EngineResult:
        """``images``: this job's own ImageStore instead of the client's (a Ray replica: the bytes shipped with the
        call, service/ray_replica.py), so concurrent callers never share one."""
        entry = self.catalog.get(job.model)
        store = images if images is not None else self.images
        return self._pool.submit(self._run, job, entry, on_event, preview_every, store).result()

    def _run(self, job: EngineJob, entry: CatalogEntry, on_event: EventCallback, preview_every: int,
             images: ImageStore | None) -> EngineResult:
        job_id = job.id

        def should_stop() -> bool:
            with self._lock:
                return job_id in self._cancelled

        with self._lock:
            self._running = job_id
        try:
            engine = self._engine_for(entry, on_event)
            if should_stop():
                from ..errors import Cancelled

                raise Cancelled("cancelled while the model loaded")
            engine.preset_lookup = self.preset_lookup
            result = run_on_engine(engine, job, images, on_event, preview_every, should_stop)
        finally:
            with self._lock:
                self._cancelled.discard(job_id)
                self._running = None
        for img in result.images:  # SECURITY 23: what comes back names the model the job asked for
            ran = (img.metadata.get("model") or {}).get("name")
            if ran != entry.id:
                log.error("job %s asked for model %s but its result names %s; discarded", job_id, entry.id, ran)
                raise QwenStudioError("internal error: the result came from another model", code="wrong_model")
        return result

    def _engine_for(self, entry: CatalogEntry, on_event: EventCallback | None):
        """The loaded engine of ``entry`` (marked most recently used), loading it — after evicting the least
        recently used ones down to ``max_resident - 1`` — when it is not. Runs on the engine thread only."""
        with self._lock:
            engine = self._resident.get(entry.id)
            if engine is not None:
                self._resident.move_to_end(entry.id)
                return engine
        if on_event is not None:
            on_event(LoadEvent(entry.id, "start"))
        evicted = self._evict(self.max_resident - 1)
        started = time.perf_counter()
        progress = None if on_event is None else (
            lambda fraction: on_event(LoadEvent(entry.id, "progress", fraction=fraction)))
        engine = self.catalog.load(entry, progress)
        seconds = time.perf_counter() - started
        with self._lock:
            self._resident[entry.id] = engine
            self.loads = [*self.loads[-99:], (entry.id, seconds)]
        log.info("loaded model %s in %.2f s (evicted: %s)", entry.id, seconds, ", ".join(evicted) or "none")
        if on_event is not None:
            on_event(LoadEvent(entry.id, "done", round(seconds, 4), tuple(evicted)))
        return engine

    def _evict(self, keep: int) -> list[str]:
        """Drop least recently used engines until ``keep`` remain, and give their memory back."""
        evicted = []
        while True:
            with self._lock:
                if len(self._resident) <= keep:
                    break
                name, engine = self._resident.popitem(last=False)
            evicted.append(name)
            del engine
        if evicted:
            gc.collect()  # engines hold reference cycles (hooks, LoRA managers): collect them now, not later
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        return evicted

    def cancel(self, job_id: str) -> None:
        with self._lock:
            if job_id == self._running:
                self._cancelled.add(job_id)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._evict(0)


def _engine_bytes(engine: Any) -> int:
    """Bytes of an engine's parameters and buffers (what evicting it frees)."""
    total = 0
    for name in ("transformer", "text_encoder", "vae"):
        module = getattr(engine.components, name, None)
        if module is None:
            continue
        for t in (*module.parameters(), *module.buffers()):
            total += t.numel() * t.element_size()
    return total
