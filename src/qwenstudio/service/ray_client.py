"""``RayServeEngineClient``: the ``EngineClient`` seam with generations running on Ray Serve replicas.

For when one machine (or one GPU) is not enough: ``num_replicas`` copies of ``EngineDeployment`` each load the model
once (``ray_actor_options={"num_gpus": ...}`` places them), and the service talks to them through a Serve handle.

* ``submit(job, ...)`` opens a streaming call with the ``EngineJob`` as plain data (``job.to_dict()``) and the bytes
  of its input images by content id (read, verified, from the client's ``images`` store on the driver; the replica
  re-verifies them through a ``MemoryImageStore``); the replica runs the job (``engine.job.run_job``, the one
  edit-or-generate dispatch) on its own single worker thread and yields
  ``("progress", (step, total, elapsed, preview))`` per step, then ``("result", payload)`` or ``("error", payload)``.
  The client hands each step to ``on_event`` just like the in-process client, so SSE progress and previews work.
* Cancelling (``cancel(job_id)`` or ``on_event`` returning ``False``) cancels the Serve request; Serve routes that to
  the replica running it, whose generator then sets the run's stop flag, and the engine stops at its next step.
  Runs on one replica are serialised, so a new request waits until a cancelled run has really stopped.
* Results come back as ``EngineResult.to_wire()`` (PNG bytes + metadata, lossless) and are rebuilt with
  ``EngineResult.from_wire``. Errors come back as data and are re-raised as the same ``qwenstudio.errors`` class
  with ``code``, ``detail`` and ``status`` preserved; a replica that dies mid-run fails the job as ``replica_failed``.

The model path (and any models dirs) must exist on every node that runs a replica, and ``qwenstudio`` must be
importable there (a local Ray started here shares this environment). Needs the optional extra ``qwenstudio[ray]``.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .. import errors
from ..engine.job import EngineJob, EngineResult, ImageStore, MemoryImageStore, run_job
from ..errors import Cancelled, GenerationFailed, ModelNotFound, QwenStudioError
from .engine_client import EventCallback, ModelInfo, StepEvent

log = logging.getLogger("qwenstudio.service")

DEFAULT_APP_NAME = "qwenstudio"


# ---- wire format: results and errors as plain data ---------------------------------------------------------------
def error_payload(e: QwenStudioError) -> dict:
    cls = type(e)
    return {"module": cls.__module__, "type": cls.__name__, "message": e.message, "code": e.code,
            "detail": dict(e.detail), "status": e.status}


def error_from_payload(p: dict) -> QwenStudioError:
    """The same typed error the replica raised (its class when it is a qwenstudio error class, else the base class
    with the code and status kept)."""
    cls: Any = None
    if p.get("module", "").startswith("qwenstudio"):
        try:
            cls = getattr(importlib.import_module(p["module"]), p["type"], None)
        except ImportError:
            cls = None
    if not (isinstance(cls, type) and issubclass(cls, QwenStudioError)):
        cls = getattr(errors, p.get("type", ""), None)
    if not (isinstance(cls, type) and issubclass(cls, QwenStudioError)):
        cls = QwenStudioError
    try:
        err = cls(p["message"], code=p["code"], detail=p.get("detail") or None)
    except TypeError:  # a subclass with its own constructor
        err = QwenStudioError(p["message"], code=p["code"], detail=p.get("detail") or None)
    if err.status != p.get("status", err.status):
        err.status = p["status"]
    return err


def encode_result(result: EngineResult) -> dict:
    return result.to_wire()


def decode_result(payload: dict) -> EngineResult:
    return EngineResult.from_wire(payload)


# ---- the replica --------------------------------------------------------------------------------------------------
class EngineReplica:
    """One engine per replica, loaded in the constructor; every generation runs on one worker thread. A load error
    is kept and returned (typed) to every call, as the in-process client does, rather than crash-looping."""

    def __init__(self, model: str, variant: str | None = None, device: str | None = None, settings: Any = None,
                 text_encoder: str | None = None, vae: str | None = None, offload: str | None = None):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qwenstudio-engine")
        self._engine: Any = None
        self._load_error: dict | None = None
        self._runs = {"done": 0, "failed": 0, "cancelled": 0}  # outcomes on this replica's engine thread
        try:
            from ..engine.engine import Engine

            engine = Engine.load(model, variant=variant, device=device, settings=settings,
                                 text_encoder=text_encoder, vae=vae, offload=offload)
            engine.allow_paths = False  # LoRA (and ControlNet) names from clients resolve in the models dirs only
            self._engine = engine
        except QwenStudioError as e:
            log.exception("loading the model failed")
            self._load_error = error_payload(e)
        except Exception:
            log.exception("loading the model failed")
            self._load_error = error_payload(
                QwenStudioError("the model failed to load; see the replica log", code="model_load_failed"))

    def _unavailable(self) -> dict:
        return self._load_error or error_payload(
            QwenStudioError("the model failed to load; see the replica log", code="model_load_failed"))

    async def info(self) -> dict:
        if self._engine is None:
            return {"loaded": False, "error": self._unavailable()}
        spec = self._engine.spec
        return {"loaded": True, "variant": spec.name, "description": spec.description, "runs": dict(self._runs)}

    async def prepare(self, request: Any) -> tuple[str, Any]:
        if self._engine is None:
            return "error", self._unavailable()
        try:
            return "ok", await asyncio.to_thread(self._engine.prepare, request)
        except QwenStudioError as e:
            return "error", error_payload(e)

    async def generate(self, job_data: dict, blobs: dict, preview_every: int = 0):
        """Run ``EngineJob.from_dict(job_data)`` with its input ``blobs`` (content id -> bytes). Stream ``("progress", (step, total, elapsed, preview))`` then one ``("result" | "error", payload)``.
        A Serve cancel of this call raises CancelledError here; the ``finally`` stops the engine at its next step."""
        if self._engine is None:
            yield "error", self._unavailable()
            return
        job = EngineJob.from_dict(job_data)
        job_id = job.id
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        stop = threading.Event()

        def put(item) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the replica's loop is gone (shutting down): nobody is listening
                pass

        def on_progress(p) -> bool:
            if stop.is_set():
                return False
            put(("progress", (p.step, p.total, p.elapsed, p.preview)))
            return True

        def run() -> None:
            if stop.is_set():  # cancelled while it waited for the previous run on this replica
                put(("error", error_payload(Cancelled("cancelled before it started"))))
                return
            try:
                result = run_job(self._engine, job, MemoryImageStore(blobs), on_progress=on_progress,
                                 preview_every=preview_every)
                self._runs["done"] += 1
                put(("result", encode_result(result)))
            except QwenStudioError as e:
                self._runs["cancelled" if isinstance(e, Cancelled) else "failed"] += 1
                put(("error", error_payload(e)))
            except Exception:
                self._runs["failed"] += 1
                log.exception("job %s failed on the replica", job_id)
                put(("error", error_payload(GenerationFailed(
                    "the job failed with an internal error; see the replica log", code="internal_error"))))

        self._pool.submit(run)
        try:
            while True:
                kind, data = await queue.get()
                yield kind, data
                if kind != "progress":
                    return
        finally:
            stop.set()


def build_deployment(num_replicas: int = 1, num_gpus: float = 0, num_cpus: float | None = None,
                     max_ongoing_requests: int = 4, ray_actor_options: dict | None = None):
    """The Serve deployment of ``EngineReplica``. ``max_ongoing_requests`` > 1 lets ``prepare`` (cheap: tokenizer,
    LoRA headers) answer while the replica generates; generations themselves run one at a time per replica."""
    from ray import serve

    options = dict(ray_actor_options or {})
    options.setdefault("num_gpus", num_gpus)
    if num_cpus is not None:
        options.setdefault("num_cpus", num_cpus)
    return serve.deployment(EngineReplica, name="EngineReplica", num_replicas=num_replicas,
                            max_ongoing_requests=max_ongoing_requests, ray_actor_options=options)


# ---- the client ---------------------------------------------------------------------------------------------------
class RayServeEngineClient:
    """``EngineClient`` over a Ray Serve application. The constructor connects to Ray (``address``, else
    ``RAY_ADDRESS``, else a new local instance; an already initialised Ray is used as is) and deploys on a
    background thread; ``ready`` turns true once a replica has loaded the model (``wait_ready`` blocks for it).
    ``num_gpus`` is per replica (``None``: 1 when the cluster has GPUs, else 0)."""

    def __init__(self, model_id: str, variant: str, model: str, *, device: str | None = None, settings: Any = None,
                 text_encoder: str | None = None, vae: str | None = None, offload: str | None = None,
                 num_replicas: int = 1, num_gpus: float | None = 0, num_cpus: float | None = None,
                 ray_actor_options: dict | None = None, app_name: str = DEFAULT_APP_NAME,
                 address: str | None = None, ray_init_kwargs: dict | None = None, description: str = ""):
        import ray

        self._model_id, self._variant, self._description = model_id, variant, description
        self.images: ImageStore | None = None  # edit inputs, read here and shipped with the job (create_app sets it)
        self._app_name = app_name
        self._handle: Any = None
        self._load_error: QwenStudioError | None = None
        self._running: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._closed = False
        self.startup_s: float | None = None  # ray.init (when started here) + deploy + model load, in seconds
        started = time.monotonic()
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            ray.init(address=address, **(ray_init_kwargs or {}))
        if num_gpus is None:  # one GPU per replica when the cluster has any, else CPU replicas
            num_gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        deployment = build_deployment(num_replicas, num_gpus, num_cpus, ray_actor_options=ray_actor_options)
        app = deployment.bind(model, variant, device, settings, text_encoder, vae, offload)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._deploy, args=(app, started), name="qwenstudio-ray-deploy",
                                        daemon=True)
        self._thread.start()

    def _deploy(self, app: Any, started: float) -> None:
        from ray import serve

        try:
            serve.start(proxy_location="Disabled")  # handles only: the HTTP API stays the qwenstudio service's
            handle = serve.run(app, name=self._app_name, route_prefix=None)
            info = handle.info.remote().result()
            if info["loaded"]:
                if info.get("description") and not self._description:
                    self._description = info["description"]
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
        """Why the deployment or the model load failed (None while loading or when ready)."""
        return self._load_error

    def replica_info(self) -> dict:
        """What one replica reports: ``loaded``, ``variant``, ``description``, and its ``runs`` by outcome."""
        return self._require_handle().info.remote().result()

    def models(self) -> list[ModelInfo]:
        return [ModelInfo(self._model_id, self._variant, self.ready, self._description)]

    def _check_model(self, model: str) -> None:
        if model != self._model_id:
            raise ModelNotFound(f"model '{model}' is not served here; available: {self._model_id}")

    def _require_handle(self) -> Any:
        if self._handle is None:
            if not self._done.is_set():
                self._done.wait()
            if self._handle is None:
                raise self._load_error or QwenStudioError("the model failed to load; see the server log",
                                                          code="model_load_failed")
        return self._handle

    def prepare(self, model: str, request: Any) -> Any:
        """Full checks on a replica once one is up (token limits, LoRA names, recipes); until then the bounds of
        what the user set — the replica prepares the job when it runs it (filling the variant's defaults here would
        hide a Lightning LoRA's recipe)."""
        self._check_model(model)
        if self._handle is None:
            from ..engine.fields import check_bounds

            check_bounds(request.__dict__, [k for k, v in request.__dict__.items() if v is not None])
            return request
        from ray.exceptions import RayError

        try:
            status, value = self._handle.prepare.remote(request).result()
        except RayError as e:
            raise QwenStudioError(f"the Ray replica did not answer: {e}", code="replica_failed") from None
        if status == "error":
            raise error_from_payload(value)
        return value

    def submit(self, job: EngineJob, on_event: EventCallback, preview_every: int = 0) -> EngineResult:
        from ray.exceptions import RayError
        from ray.serve.exceptions import RequestCancelledError

        job_id = job.id
        self._check_model(job.model)
        blobs = job.fetch(self.images)
        handle = self._require_handle()
        stream = handle.options(stream=True).generate.remote(job.to_dict(), blobs, preview_every)
        with self._lock:
            self._running[job_id] = stream
        try:
            for kind, data in stream:
                if kind == "progress":
                    step, total, elapsed, preview = data
                    if on_event(StepEvent(step, total, elapsed, preview)) is False:
                        stream.cancel()
                        raise Cancelled(f"cancelled after step {step} of {total}")
                elif kind == "result":
                    return decode_result(data)
                else:
                    raise error_from_payload(data)
            raise GenerationFailed("the Ray replica ended the run without a result", code="replica_failed")
        except RequestCancelledError:
            raise Cancelled("cancelled") from None
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
        except Exception:
            log.warning("could not delete the Ray Serve application %r", self._app_name, exc_info=True)
        if self._owns_ray and ray.is_initialized():
            try:
                serve.shutdown()
            finally:
                ray.shutdown()
