"""One Ray Serve replica = one engine pool: any model of the catalog, loaded on demand, under the replica's own memory
plan (service/model_pool.py's ``ModelCatalog`` + ``MultiModelEngineClient``, built on the replica's node, so a GPU
replica plans for its GPU). Every replica gets the same ``LoadOptions`` — device, components, offload and the speed
options (compile, attention, quant, cache) — so ``serve --ray --compile on`` means the same on every node.

Routing by model uses Ray Serve's model multiplexing, the mechanism Serve supports for "send the request to a
replica that has this model": the client calls ``handle.options(multiplexed_model_id=model)``, and the replica loads
through a ``serve.multiplexed`` function whose LRU bound is the pool's ``max_resident``; the deployment's router
(ray_routing.py) ranks replicas that report the model loaded first, those with the same LoRA stack before the others
(from ``record_routing_stats``), then the replica with the fewest models, then any.
Ray's LRU and the pool's stay one: Ray evicts first (calling the ``ResidentModel`` token's ``__del__``, its
documented unload hook), which evicts the engine from the pool; the pool then never holds more than Ray counts.

``ReplicaBoard`` is a small Ray actor each replica reports its state to (models resident, their LoRA stacks and
acceleration, the job running, run outcomes): what ``RayServeEngineClient.replica_info()`` shows, and how a test
finds the replica that runs a job. A dead replica's last report stays on the board, marked not alive.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from typing import Any

from ..engine.job import EngineJob, MemoryImageStore
from ..errors import Cancelled, GenerationFailed, InvalidRequest, QwenStudioError
from .engine_client import LoadEvent, StepEvent
from .ray_wire import error_payload

log = logging.getLogger("qwenstudio.service")

DEPLOYMENT_NAME = "EngineReplica"


class ReplicaBoard:
    """Last state reported by each replica, by its actor name (a Ray actor: ``ray.remote(ReplicaBoard)``)."""

    def __init__(self) -> None:
        self.states: dict[str, dict] = {}

    def report(self, state: dict) -> None:
        self.states[state["replica"]] = state

    def all(self) -> dict[str, dict]:
        return self.states


class ResidentModel:
    """What the ``serve.multiplexed`` loader returns for a model: Ray keeps it while the model counts as loaded on
    this replica and calls ``__del__`` when its LRU unloads it (then the pool drops the engine)."""

    def __init__(self, replica: EngineReplica, model: str):
        self.replica, self.model, self.released = replica, model, False

    def __del__(self) -> None:
        if not self.released:  # Ray calls it explicitly, the garbage collector once more later
            self.released = True
            self.replica.unloaded(self.model)


class EngineReplica:
    """The Serve deployment class. ``default`` is the operator's ``--model`` (a path is allowed for it)."""

    def __init__(self, default: str, settings: Any, options: Any, max_resident: int | None = None,
                 board: Any = None):
        import ray
        from ray import serve

        from .model_pool import ModelCatalog, MultiModelEngineClient

        self.options, self.board = options, board
        self.pool = MultiModelEngineClient(ModelCatalog(settings, default, options), max_resident=max_resident,
                                           preload=False)
        # the replica's own LRU bound, from its own memory plan (or --max-resident): what Ray's multiplexer keeps

        async def load_model(model: str) -> ResidentModel:  # a plain function: Ray keeps its LRU on it
            return await self.load(model)

        self.load_model = serve.multiplexed(max_num_models_per_replica=self.pool.max_resident)(load_model)
        context = serve.get_replica_context()
        self.name = ray.get_runtime_context().get_actor_name() or context.replica_id.unique_id
        self.replica_id = context.replica_id.unique_id
        self.runs = {"done": 0, "failed": 0, "cancelled": 0}
        self.completed: list[str] = []  # job ids this replica ran to a result (bounded)
        self.running: str | None = None
        self.evicted: list[str] = []
        self.stacks: dict[str, str] = {}  # model -> the LoRA stack key its last job asked for (ray_routing.py)
        self.load_listener: Any = None  # the running call's sink for the loader's progress (``generate``)
        self._lock = threading.Lock()
        self.report(wait=False)

    # ---- state ---------------------------------------------------------------------------------------------
    def state(self) -> dict:
        models = {}
        for name in self.pool.resident_models():
            engine = self.pool.engine(name)
            if engine is None:
                continue
            models[name] = {"loras": [m.get("name") for m in engine.lora_metadata()],
                            "lora_stack": self.stacks.get(name, ""), "acceleration": _jsonable(engine.acceleration)}
        return {"replica": self.name, "replica_id": self.replica_id, "pid": os.getpid(), "alive": True,
                "models": list(models), "resident": models, "max_resident": self.pool.max_resident,
                "speed": _jsonable(self.options.speed), "device": self.options.device, "running": self.running,
                "runs": dict(self.runs), "completed": list(self.completed),
                "loads": [[m, round(s, 4)] for m, s in self.pool.loads]}

    def report(self, wait: bool = True) -> None:
        """Send the state to the board; ``wait`` (off the event loop only) until it is there, so what a caller
        reads after this replica's answer is never older than the answer."""
        if self.board is None:
            return
        try:
            ref = self.board.report.remote(self.state())
            if wait:
                import ray

                ray.get(ref, timeout=10)
        except Exception:  # noqa: BLE001 (the board is an aid; a replica never fails for it)
            log.warning("could not report to the replica board", exc_info=True)

    async def info(self) -> dict:
        return self.state()

    def record_routing_stats(self) -> dict:
        """What ``ModelLoraRouter`` reads (Serve calls this every ROUTING_STATS_PERIOD_S): each resident model's
        LoRA stack."""
        resident = set(self.pool.resident_models())
        return {"loras": {m: k for m, k in self.stacks.items() if m in resident}}

    # ---- models --------------------------------------------------------------------------------------------
    async def load(self, model: str) -> ResidentModel:
        """What the ``serve.multiplexed`` loader runs: load into the pool off the event loop."""
        await asyncio.to_thread(self.pool.load, model, self.relay_load)
        await asyncio.to_thread(self.report)
        return ResidentModel(self, model)

    def relay_load(self, ev: Any) -> None:
        """The pool's ``LoadEvent``s of a multiplexed load (engine thread): the loader's progress fractions go to
        the call waiting for that load (start and done it says itself, with what Ray evicted)."""
        listener = self.load_listener
        if listener is not None and isinstance(ev, LoadEvent) and ev.phase == "progress":
            listener(ev)

    def unloaded(self, model: str) -> None:
        try:
            self.pool.evict(model)
        except RuntimeError:  # the replica is shutting down: its pool (and every engine) goes anyway
            return
        with self._lock:
            self.evicted.append(model)

    async def warm(self) -> dict:
        """Load the request's multiplexed model (the client's readiness check: the --model loads somewhere)."""
        from ray import serve

        try:
            await self.load_model(serve.get_multiplexed_model_id())
        except QwenStudioError as e:
            return {"loaded": False, "error": error_payload(e)}
        except Exception:
            log.exception("loading the model failed")
            return {"loaded": False, "error": error_payload(
                QwenStudioError("the model failed to load; see the replica log", code="model_load_failed"))}
        return {"loaded": True, **self.state()}

    # ---- jobs ----------------------------------------------------------------------------------------------
    def use_presets(self, presets: dict | None) -> None:
        """The presets the client sent with this call (its store is the service's): what a request's ``preset``
        resolves to here. One call at a time per replica (``max_ongoing_requests=1``), so one set at a time."""
        from ..errors import ModelNotFound

        known = dict(presets or {})

        def lookup(name: str) -> dict:
            if name not in known:
                raise ModelNotFound(f"no preset named '{name}'", code="preset_not_found")
            return known[name]

        self.pool.preset_lookup = lookup

    async def prepare(self, request: Any, lora_stack: str = "", presets: dict | None = None) -> tuple[str, Any]:
        """The pool's prepare for the request's multiplexed model: the engine's full prepare when it is resident
        here, else its bounds and the memory check on this replica (the model is not loaded for it)."""
        from ray import serve

        self.use_presets(presets)
        try:
            return "ok", await asyncio.to_thread(self.pool.prepare, serve.get_multiplexed_model_id(), request)
        except QwenStudioError as e:
            return "error", error_payload(e)

    async def generate(self, job_data: dict, blobs: dict, preview_every: int = 0, lora_stack: str = "",
                       presets: dict | None = None):
        """Run ``EngineJob.from_dict(job_data)``, its input images read (verified against their content ids) from
        ``blobs`` (content id -> bytes, shipped with the call) through a ``MemoryImageStore`` of its own.

        Stream ``("replica", name)``, ``("loading", {...})`` when the model is loaded for this job (start, the
        loader's progress fractions, done), ``("progress", (step, total, elapsed, preview))`` per step, then one
        ``("result", EngineResult.to_wire()) | ("error", payload)``.
        ``lora_stack``: the request's LoRA stack key (``ray_routing.lora_stack_key``), for the router's preference;
        ``presets``: the preset the request names, from the service's store.
        A Serve cancel of this call raises CancelledError here; the ``finally`` stops the engine at its next step."""
        from ray import serve

        model = serve.get_multiplexed_model_id()
        yield "replica", self.name
        try:
            job = EngineJob.from_dict(job_data)
            if job.model != model:
                raise InvalidRequest(f"job for model '{job.model}' routed as '{model}'", code="wrong_model")
        except QwenStudioError as e:
            yield "error", error_payload(e)
            return
        job_id = job.id
        images = MemoryImageStore(blobs)
        self.use_presets(presets)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        stop = threading.Event()

        def put(item) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the replica's loop is gone (shutting down): nobody is listening
                pass

        def loading_data(ev: LoadEvent) -> dict:
            return {"model": ev.model, "phase": ev.phase, "seconds": ev.seconds, "evicted": list(ev.evicted),
                    "fraction": ev.fraction}

        loading = model not in self.pool.resident_models()
        if loading:
            yield "loading", {"model": model, "phase": "start"}
        started = time.perf_counter()
        with self._lock:
            self.evicted = []
        self.load_listener = lambda ev: put(("loading", loading_data(ev)))
        load = asyncio.ensure_future(self.load_model(model))
        try:
            while not load.done():  # the loader's progress, as it comes
                getter = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({load, getter}, return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    yield getter.result()
                else:
                    getter.cancel()
            while not queue.empty():
                yield queue.get_nowait()
            load.result()
        except QwenStudioError as e:
            yield "error", error_payload(e)
            return
        finally:
            self.load_listener = None
        if loading:
            with self._lock:
                evicted = list(self.evicted)
            yield "loading", {"model": model, "phase": "done", "seconds": round(time.perf_counter() - started, 4),
                              "evicted": evicted}

        def on_event(ev) -> bool:
            if stop.is_set():
                return False
            if isinstance(ev, StepEvent):
                put(("progress", (ev.step, ev.total, ev.elapsed, ev.preview)))
            elif isinstance(ev, LoadEvent):  # evicted meanwhile and loaded again by the pool
                put(("loading", loading_data(ev)))
            return True

        def run() -> None:
            if stop.is_set():
                put(("error", error_payload(Cancelled("cancelled before it started"))))
                return
            self.running = job_id
            self.stacks[model] = lora_stack  # the engine sets this stack now (whatever the job's outcome)
            self.report()
            try:
                result = self.pool.submit(job, on_event, preview_every, images=images)
                self.runs["done"] += 1
                self.completed = [*self.completed[-255:], job_id]
                outcome = ("result", result.to_wire())
            except QwenStudioError as e:
                self.runs["cancelled" if isinstance(e, Cancelled) else "failed"] += 1
                outcome = ("error", error_payload(e))
            except Exception:
                self.runs["failed"] += 1
                log.exception("job %s failed on the replica", job_id)
                outcome = ("error", error_payload(GenerationFailed(
                    "the job failed with an internal error; see the replica log", code="internal_error")))
            self.running = None
            self.report()  # before the outcome leaves: the board never lags behind what the caller saw
            put(outcome)

        worker = threading.Thread(target=run, name=f"qwenstudio-job-{job_id[:8]}", daemon=True)
        worker.start()
        try:
            while True:
                kind, data = await queue.get()
                yield kind, data
                if kind not in ("progress", "loading"):
                    return
        finally:
            stop.set()
            self.pool.cancel(job_id)


def _jsonable(value: Any) -> Any:
    """Speed options and acceleration reports as JSON-able data (a step-cache config becomes its fields)."""
    import dataclasses

    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: _jsonable(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def replica_counts(num_replicas: int = 1, min_replicas: int | None = None,
                   max_replicas: int | None = None) -> dict[str, Any]:
    """``serve.deployment`` keywords for the replica count: ``num_replicas`` fixed, or (either bound given) Serve's
    ``autoscaling_config`` between the bounds (the floor defaults to ``num_replicas``), starting at ``num_replicas``
    clamped into them, one job in flight per replica as the target. Bad bounds are a typed error, raised before Ray
    is touched."""
    if num_replicas < 1:
        raise InvalidRequest(f"--replicas must be at least 1, not {num_replicas}", code="invalid_config")
    if min_replicas is None and max_replicas is None:
        return {"num_replicas": num_replicas}
    if min_replicas is not None:
        low = min_replicas
    else:  # --replicas is the floor unless it is above the ceiling
        low = num_replicas if max_replicas is None else min(num_replicas, max_replicas)
    high = max(low, num_replicas) if max_replicas is None else max_replicas
    if not 0 <= low <= high or high < 1:
        raise InvalidRequest(f"replica bounds must satisfy 0 <= min ({low}) <= max ({high}) and max >= 1",
                             code="invalid_config")
    return {"num_replicas": "auto",
            "autoscaling_config": {"min_replicas": low, "max_replicas": high,
                                   "initial_replicas": min(max(num_replicas, low), high),
                                   "target_ongoing_requests": 1}}


def build_deployment(num_replicas: int = 1, num_gpus: float = 0, num_cpus: float | None = None,
                     max_ongoing_requests: int = 1, ray_actor_options: dict | None = None,
                     min_replicas: int | None = None, max_replicas: int | None = None):
    """The Serve deployment of ``EngineReplica`` (counts: ``replica_counts``; routing: ray_routing.py).

    ``max_ongoing_requests=1``: a replica running a job counts as busy, so Serve's router sends the next job for
    the same model to an idle replica (which loads it) instead of queueing it behind the running one; it waits only
    when every replica is busy. ``prepare`` shares that slot, so the client bounds its wait for it."""
    from ray import serve

    options = dict(ray_actor_options or {})
    options.setdefault("num_gpus", num_gpus)
    if num_cpus is not None:
        options.setdefault("num_cpus", num_cpus)
    from .ray_routing import request_router_config

    return serve.deployment(EngineReplica, name=DEPLOYMENT_NAME, max_ongoing_requests=max_ongoing_requests,
                            ray_actor_options=options, request_router_config=request_router_config(),
                            **replica_counts(num_replicas, min_replicas, max_replicas))
