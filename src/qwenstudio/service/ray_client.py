"""``RayServeEngineClient``: the ``EngineClient`` seam with generations running on Ray Serve replicas.

For when one machine (or one GPU) is not enough: ``num_replicas`` replicas of ``EngineReplica`` (one per GPU, or per
CPU slot; or autoscaled between ``min_replicas`` and ``max_replicas``), each an engine pool that loads any model of
the catalog on demand under its own memory plan (service/ray_replica.py). The service talks to them through a Serve
handle.

* **Routing by model, then LoRA stack**: every job call is ``handle.options(multiplexed_model_id=model)`` with its
  LoRA stack key; the deployment's ``ModelLoraRouter`` (ray_routing.py: Serve multiplexing's ranks, the holders of
  the model split by LoRA stack) sends it to a free replica holding the model (the same stack first), else to the
  one with the fewest models (which loads it).
* ``submit(job, on_event, preview_every)`` opens a streaming call with the ``EngineJob`` as plain data
  (``job.to_dict()``: its request names input images by content id, never by path) and the bytes of those images
  (``job.fetch(images)``: read and verified here, from the client's ``images`` store, which ``create_app`` sets to
  the upload store); the replica rebuilds the job (``EngineJob.from_dict``) and runs it through its pool with a
  ``MemoryImageStore`` of those bytes, which verifies them against their ids again. It yields ``("loading", ...)``
  while it loads the model (start, the loader's progress fractions, done), ``("progress", (step, total, elapsed,
  preview))`` per step, then ``("result", EngineResult.to_wire())`` or ``("error", payload)``. The client hands each
  to ``on_event`` just like the in-process clients, so SSE progress, ``loading`` events and previews work.
* **A replica that dies mid-job** (its actor is gone: node lost, OOM-killed, ``ray.kill``): the job is sent again
  once (the same ``(job_data, blobs)``), inside this ``submit`` call, and Serve routes it to a live replica. The dead replica never returned a
  result, so the job still completes at most once; a second death fails it ``replica_failed`` (``ReplicaFailed``,
  503). The store's claim is untouched: the worker claimed the job once and is still running it. A cancelled job
  is never retried.
* Cancelling (``cancel(job_id)`` or ``on_event`` returning ``False``) cancels the Serve request; Serve routes that to
  the replica running it, whose generator then stops the engine at its next step.
* Results come back as ``EngineResult.to_wire()`` (PNG bytes + metadata, lossless) and are rebuilt with
  ``EngineResult.from_wire``. Errors come back as data (ray_wire.py) and are re-raised as the same
  ``qwenstudio.errors`` class with ``code``, ``detail`` and ``status`` preserved.

The models home (QWENSTUDIO_HOME, or the same models dirs) must be the same on every node that runs a replica, and
``qwenstudio`` importable there (a local Ray started here shares this environment). Needs ``qwenstudio[ray]``.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Any

from ..engine.job import EngineJob, EngineResult, ImageStore
from ..errors import Cancelled, GenerationFailed, QwenStudioError
from .engine_client import EventCallback, LoadEvent, ModelInfo, StepEvent
from .errors import ReplicaFailed
from .ray_replica import DEPLOYMENT_NAME, EngineReplica, ReplicaBoard, build_deployment
from .ray_routing import lora_stack_key
from .ray_wire import error_from_payload, error_payload

__all__ = ["DEPLOYMENT_NAME", "EngineReplica", "RayServeEngineClient", "ReplicaFailed", "build_deployment",
           "error_from_payload", "error_payload"]

log = logging.getLogger("qwenstudio.service")

DEFAULT_APP_NAME = "qwenstudio"
PREPARE_WAIT_S = 3.0  # prepare shares a replica's one slot with its job: when all are busy, check here instead
RETRIES = 1  # a job whose replica died is sent once more; a second death fails it
RESIDENT_TTL_S = 1.0


class ReplicaDied(Exception):
    """The replica running a call is gone (internal to this module: becomes a retry or ``ReplicaFailed``)."""


class RayServeEngineClient:
    """``EngineClient`` over a Ray Serve application. The constructor connects to Ray (``address``, else
    ``RAY_ADDRESS``, else a new local instance; an already initialised Ray is used as is) and deploys on a
    background thread; ``ready`` turns true once a replica has loaded the default model (``wait_ready`` blocks for
    it). ``catalog`` is a ``ModelCatalog`` (built here too, for listing and 404s; every replica builds its own from
    the same settings and ``LoadOptions``). ``num_gpus`` is per replica (``None``: 1 when the cluster has GPUs)."""

    def __init__(self, catalog: Any, *, num_replicas: int = 1, min_replicas: int | None = None,
                 max_replicas: int | None = None, max_resident: int | None = None, num_gpus: float | None = 0,
                 num_cpus: float | None = None, ray_actor_options: dict | None = None,
                 app_name: str = DEFAULT_APP_NAME, address: str | None = None, ray_init_kwargs: dict | None = None,
                 retries: int = RETRIES):
        import ray

        self.catalog = catalog
        self.retries = retries
        self._app_name = app_name
        self._handle: Any = None
        self._load_error: QwenStudioError | None = None
        self._running: dict[str, Any] = {}
        self._cancelled: set[str] = set()
        self._lock = threading.Lock()
        self._resident_cache: tuple[list[str], float] = ([], -1e9)
        self._closed = False
        self.preset_lookup: Any = None  # set by create_app: presets by name, from the store (sent with each job)
        self.images: ImageStore | None = None  # edit inputs, read here and shipped with the job (create_app sets it)
        self.retried: list[tuple[str, str]] = []  # (job id, dead replica) of every retry, oldest first (bounded)
        self.startup_s: float | None = None  # ray.init (when started here) + deploy + default model load, seconds
        started = time.monotonic()
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            ray.init(address=address, **(ray_init_kwargs or {}))
        if num_gpus is None:  # one GPU per replica when the cluster has any, else CPU replicas
            num_gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        if num_gpus == 0 and num_cpus is None:
            num_cpus = 1  # one CPU slot per replica
        deployment = build_deployment(num_replicas, num_gpus, num_cpus, ray_actor_options=ray_actor_options,
                                      min_replicas=min_replicas, max_replicas=max_replicas)
        self._board = ray.remote(num_cpus=0)(ReplicaBoard).remote()
        app = deployment.bind(catalog.default, catalog.settings, catalog.options, max_resident, self._board)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._deploy, args=(app, started), name="qwenstudio-ray-deploy",
                                        daemon=True)
        self._thread.start()

    @property
    def default_model(self) -> str:
        return self.catalog.entries()[0].id

    def _deploy(self, app: Any, started: float) -> None:
        from ray import serve

        try:
            serve.start(proxy_location="Disabled")  # handles only: the HTTP API stays the qwenstudio service's
            handle = serve.run(app, name=self._app_name, route_prefix=None)
            info = handle.options(multiplexed_model_id=self.default_model).warm.remote().result()
            if info["loaded"]:
                self._handle = handle
            else:
                self._load_error = error_from_payload(info["error"])
        except Exception as e:
            log.exception("deploying the Ray Serve application failed")
            self._load_error = QwenStudioError(f"the Ray Serve deployment failed: {e}", code="model_load_failed")
        finally:
            self.startup_s = time.monotonic() - started
            self._done.set()

    @property
    def ready(self) -> bool:
        return self._handle is not None and not self._closed

    def wait_ready(self, timeout: float | None = None) -> bool:
        self._done.wait(timeout)
        return self.ready

    @property
    def load_error(self) -> QwenStudioError | None:
        """Why the deployment or the default model's load failed (None while loading or when ready)."""
        return self._load_error

    # ---- replica state -------------------------------------------------------------------------------------
    def replica_info(self) -> dict[str, dict]:
        """Each replica's last report, by its actor name: ``models`` resident (most recently used first),
        ``resident`` (per model: its LoRA stack and acceleration), ``speed`` (the load options every replica got),
        ``max_resident``, ``running`` (job id), ``runs`` by outcome, ``completed`` job ids, ``loads``, and
        ``alive`` (False once its actor is gone; its last report is kept)."""
        import ray

        states = ray.get(self._board.all.remote())
        for name, state in states.items():
            try:
                ray.get_actor(name, namespace="serve")
            except ValueError:
                state["alive"] = False
        return states

    def resident_models(self) -> list[str]:
        """Models loaded on some live replica (the worker prefers their jobs: service/scheduling.py). Asked on every
        worker poll, so read from the board at most every RESIDENT_TTL_S."""
        with self._lock:
            cached, read_at = self._resident_cache
        if time.monotonic() - read_at < RESIDENT_TTL_S:
            return list(cached)
        try:
            states = self.replica_info().values()
        except Exception:  # noqa: BLE001 (an affinity hint only)
            return []
        seen: list[str] = []
        for state in states:
            if state.get("alive"):
                seen.extend(m for m in state.get("models", []) if m not in seen)
        with self._lock:
            self._resident_cache = (seen, time.monotonic())
        return list(seen)

    def models(self) -> list[ModelInfo]:
        resident = set(self.resident_models()) if self.ready else set()
        return [e.info(self.ready, e.id in resident) for e in self.catalog.entries()]

    def _require_handle(self) -> Any:
        if self._handle is None:
            if not self._done.is_set():
                self._done.wait()
            if self._handle is None:
                raise self._load_error or QwenStudioError("the model failed to load; see the server log",
                                                          code="model_load_failed")
        return self._handle

    # ---- jobs ----------------------------------------------------------------------------------------------
    def prepare(self, model: str, request: Any) -> Any:
        """Full checks on a replica that holds ``model`` (token limits, LoRA names, recipes; the memory check of
        a replica otherwise). When none answers within ``PREPARE_WAIT_S`` (all busy, or still deploying) the
        bounds of what the user set are checked here and the replica prepares the job when it runs it (filling the
        variant's defaults here would hide a Lightning LoRA's recipe)."""
        entry = self.catalog.get(model)  # 404 for a model the catalog does not have
        if self._handle is not None:
            from ray.exceptions import RayError

            response = self._handle.options(multiplexed_model_id=entry.id).prepare.remote(
                request, lora_stack=lora_stack_key(getattr(request, "loras", ())),
                presets=self._presets(getattr(request, "preset", None)))
            try:
                status, value = response.result(timeout_s=PREPARE_WAIT_S)
            except TimeoutError:
                response.cancel()
                log.info("no replica free to prepare a %s job within %.0f s; it is prepared when it runs",
                         entry.id, PREPARE_WAIT_S)
            except RayError as e:
                log.warning("a replica failed to prepare a job (%s); it is prepared when it runs", type(e).__name__)
            else:
                if status == "error":
                    raise error_from_payload(value)
                return value
        from ..engine.fields import check_bounds
        from ..engine.specs import get_spec

        check_bounds(request.__dict__, [k for k, v in request.__dict__.items() if v is not None])
        get_spec(entry.variant)
        return request

    def _presets(self, name: str | None) -> dict:
        """The preset a request names, looked up here (the store is the service's) and sent along: ``{name:
        params}``; a missing one is the typed ``preset_not_found``."""
        if not name or self.preset_lookup is None:
            return {}
        return {name: self.preset_lookup(name)}

    def submit(self, job: EngineJob, on_event: EventCallback, preview_every: int = 0) -> EngineResult:
        entry = self.catalog.get(job.model)
        handle = self._require_handle()
        job_id = job.id
        blobs = job.fetch(self.images)  # the input bytes by content id, verified here (no path leaves this node)
        job_data = dataclasses.replace(job, model=entry.id).to_dict()
        dead: list[str] = []
        try:
            while True:
                try:
                    result = self._run_once(handle, job_data, blobs, on_event, preview_every)
                except ReplicaDied as e:
                    dead.append(str(e))
                    with self._lock:
                        cancelled = job_id in self._cancelled
                    if cancelled:
                        raise Cancelled("cancelled (its replica died)") from None
                    if len(dead) > self.retries:
                        raise ReplicaFailed(f"the Ray replicas running this job died ({', '.join(dead)}); "
                                            "submit it again", detail={"replicas": dead}) from None
                    log.warning("job %s: replica %s died mid-job; sending it to another replica", job_id, dead[-1])
                    self.retried = [*self.retried[-99:], (job_id, dead[-1])]
                    continue  # the same (job_data, blobs) again
                if dead:
                    result.timings["replica_retries"] = len(dead)
                return result
        finally:
            with self._lock:
                self._cancelled.discard(job_id)

    def _run_once(self, handle: Any, job_data: dict, blobs: dict[str, bytes], on_event: EventCallback,
                  preview_every: int) -> EngineResult:
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayError
        from ray.serve.exceptions import RequestCancelledError

        job_id, request = job_data["id"], job_data["request"]
        stream = handle.options(stream=True, multiplexed_model_id=job_data["model"]).generate.remote(
            job_data, blobs, preview_every, lora_stack=lora_stack_key(request.get("loras") or ()),
            presets=self._presets(request.get("preset")))
        with self._lock:
            self._running[job_id] = stream
        replica = "unknown"
        try:
            for kind, data in stream:
                if kind == "progress":
                    step, total, elapsed, preview = data
                    if on_event(StepEvent(step, total, elapsed, preview)) is False:
                        stream.cancel()
                        raise Cancelled(f"cancelled after step {step} of {total}")
                elif kind == "loading":
                    on_event(LoadEvent(data["model"], data["phase"], data.get("seconds"),
                                       tuple(data.get("evicted") or ()), data.get("fraction")))
                elif kind == "replica":
                    replica = data
                elif kind == "result":
                    return EngineResult.from_wire(data)
                else:
                    raise error_from_payload(data)
            raise ReplicaDied(replica)  # the stream ended without an outcome: the replica went away
        except RequestCancelledError:
            raise Cancelled("cancelled") from None
        except (ActorDiedError, ActorUnavailableError, RayActorError):
            raise ReplicaDied(replica) from None
        except RayError as e:
            log.exception("job %s: the Ray replica failed", job_id)
            raise GenerationFailed(f"the Ray replica failed: {type(e).__name__}", code="replica_failed") from None
        finally:
            with self._lock:
                self._running.pop(job_id, None)

    def cancel(self, job_id: str) -> None:
        with self._lock:
            stream = self._running.get(job_id)
            if stream is not None:
                self._cancelled.add(job_id)
        if stream is not None:
            stream.cancel()

    def close(self) -> None:
        """Cancel what runs, delete the Serve application, and stop Ray when this client started it."""
        if self._closed:
            return
        self._closed = True
        import ray
        from ray import serve

        with self._lock:
            streams = list(self._running.values())
        for stream in streams:
            stream.cancel()
        self._done.wait(60)
        try:
            if ray.is_initialized():
                serve.delete(self._app_name)
                ray.kill(self._board)
        except Exception:
            log.warning("could not delete the Ray Serve application %r", self._app_name, exc_info=True)
        if self._owns_ray and ray.is_initialized():
            try:
                serve.shutdown()
            finally:
                ray.shutdown()
