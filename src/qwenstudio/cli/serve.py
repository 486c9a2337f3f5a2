# ruff: noqa: B008  (typer declares options as argument defaults)
"""``qwenstudio serve``: serve every model of the models home (``--model`` first, preloaded; the others loaded on
demand, at most ``--max-resident`` at once; service/model_pool.py) and the HTTP API with uvicorn.

Safe by default: 127.0.0.1; any other bind needs an API key, checked before anything is loaded or bound. SIGTERM /
Ctrl-C go through uvicorn's graceful shutdown (stop taking jobs, cancel the running one, persist) and exit 0.
"""

from __future__ import annotations

import os
from pathlib import Path

import typer


def _model_identity(model: str, variant: str | None, settings=None) -> tuple[str, str]:
    """The id clients pass as "model", and the spec (recipe) name, decided like ``Engine.load`` does."""
    from ..engine.sources import identify_model
    from ..errors import QwenStudioError

    path = Path(model)
    model_id = "tiny" if model == "tiny" else (path.stem if path.suffix in (".safetensors", ".gguf") else path.name)
    try:
        _, ident = identify_model(model, settings=settings, variant=variant)
    except QwenStudioError:  # an unloadable model fails with its own typed error when the worker loads it
        return model_id, variant or "qwen-image"
    return model_id, ident.variant


def build_client(model: str, variant: str | None = None, device: str | None = None,
                 settings=None, *, text_encoder: str | None = None, vae: str | None = None,
                 offload: str | None = None, speed: dict | None = None):
    """An in-process engine client whose worker thread loads ``model`` (``/readyz`` is false until it has).
    The operator names the model (a path is fine here); clients then name LoRAs by registry name only.
    ``speed``: Engine.load's speed options (compile, attention, quant, cache); a server is long-lived, so
    ``compile="auto"`` compiles (engine/acceleration.py)."""
    from ..config import Settings
    from ..service.engine_client import InProcessEngineClient

    settings = settings or Settings.from_env()
    model_id, spec_name = _model_identity(model, variant, settings)

    def load():
        from ..engine.engine import Engine

        engine = Engine.load(model, variant=spec_name, device=device, settings=settings,
                             text_encoder=text_encoder, vae=vae, offload=offload, long_lived=True, **(speed or {}))
        engine.allow_paths = False  # LoRA (and ControlNet) names from clients resolve in the models dirs only
        return engine

    return InProcessEngineClient(model_id, spec_name, load)


def build_pool_client(model: str, variant: str | None = None, device: str | None = None, settings=None, *,
                      text_encoder: str | None = None, vae: str | None = None, offload: str | None = None,
                      max_resident: int | None = None, speed: dict | None = None):
    """A client serving ``model`` (preloaded) and every model of the models home, loaded on demand; ``speed``:
    Engine.load's speed options (a server is long-lived, so ``compile="auto"`` compiles)."""
    from ..config import Settings
    from ..service.model_pool import LoadOptions, ModelCatalog, MultiModelEngineClient

    settings = settings or Settings.from_env()
    options = LoadOptions(device=device, text_encoder=text_encoder, vae=vae, offload=offload, variant=variant,
                          speed=dict(speed or {}))
    return MultiModelEngineClient(ModelCatalog(settings, model, options), max_resident=max_resident)


def build_ray_client(model: str, variant: str | None = None, device: str | None = None, settings=None, *,
                     text_encoder: str | None = None, vae: str | None = None, offload: str | None = None,
                     replicas: int = 1, gpus_per_replica: float | None = None, min_replicas: int | None = None,
                     max_replicas: int | None = None, max_resident: int | None = None, speed: dict | None = None):
    """A Ray Serve deployment of ``replicas`` engine pools (needs ``qwenstudio[ray]``; autoscaled between
    ``min_replicas`` and ``max_replicas`` when either is given): connects to the cluster in ``RAY_ADDRESS`` or
    starts a local Ray. Every replica serves every model of the catalog with the same load and ``speed`` options;
    ``model`` (preloaded on one replica) and the models home must resolve on every node that runs a replica."""
    from ..config import Settings
    from ..errors import QwenStudioError

    try:
        from ..service.ray_client import RayServeEngineClient
    except ImportError:
        raise QwenStudioError("--ray needs Ray Serve: pip install 'qwenstudio[ray]'", code="missing_dependency")
    from ..service.model_pool import LoadOptions, ModelCatalog
    from ..service.ray_replica import replica_counts

    replica_counts(replicas, min_replicas, max_replicas)  # bad bounds: a one-line error before Ray starts
    settings = settings or Settings.from_env()
    options = LoadOptions(device=device, text_encoder=text_encoder, vae=vae, offload=offload, variant=variant,
                          speed=dict(speed or {}))
    return RayServeEngineClient(ModelCatalog(settings, model, options), num_replicas=replicas,
                                min_replicas=min_replicas, max_replicas=max_replicas, max_resident=max_resident,
                                num_gpus=gpus_per_replica)


def serve(
    host: str = "127.0.0.1",
    port: int = 8000,
    model: str = "tiny",
    api_key: str | None = None,
    *,
    variant: str | None = None,
    device: str | None = None,
    cors_origins: tuple[str, ...] = (),
    queue_size: int = 16,
    job_deadline_s: float = 600.0,
    max_body_bytes: int = 1 << 20,
    preview_every: int = 0,
    log_level: str = "info",
    models_dirs: tuple = (),
    text_encoder: str | None = None,
    vae: str | None = None,
    offload: str | None = None,
    max_upload_bytes: int = 32 << 20,
    rate_limit: str | None = None,
    ray: bool = False,
    ray_replicas: int | None = None,
    ray_gpus_per_replica: float | None = None,
    api_key_file: str | Path | None = None,
    config_file: str | Path | None = None,
    speed: dict | None = None,
    max_resident: int | None = None,
    **overrides,
) -> None:
    """Run the server until SIGTERM/SIGINT. Raises UnsafeBind for a non-loopback host without a key.
    ``overrides`` are further ServiceConfig fields (max_steps, allowed_hosts, ...), over ``config_file``'s."""
    from dataclasses import replace

    import uvicorn

    from ..config import Settings
    from ..service.app import create_app
    from ..service.ratelimit import parse_rate
    from ..service.service_file import load_service_config

    keys = read_keys(api_key, api_key_file)
    fields = {"host": host, "port": port, "cors_origins": tuple(cors_origins), "queue_size": queue_size,
              "job_deadline_s": job_deadline_s, "max_body_bytes": max_body_bytes,
              "max_upload_bytes": max_upload_bytes, "preview_every": preview_every,
              "rate_limit_per_min": parse_rate(rate_limit) if rate_limit else 0}
    overrides = {**overrides, **{k: v for k, v in (("ray_replicas", ray_replicas),
                                                   ("ray_gpus_per_replica", ray_gpus_per_replica)) if v is not None}}
    config = load_service_config(config_file, keys, defaults=fields, overrides=overrides)
    if ray and "workers" not in overrides and config.workers == 1:  # one job in flight per replica
        config = replace(config, workers=max(config.ray_replicas, config.ray_max_replicas or 0))
    elif not ray and (config.ray_replicas != 1 or config.ray_min_replicas is not None
                      or config.ray_max_replicas is not None):
        import sys

        print("warning: replica settings apply with --ray only; ignored", file=sys.stderr)
    config.check_bind()  # before loading anything

    settings = Settings.from_env()
    # --models-dir joins QWENSTUDIO_MODELS_DIR for the engine *and* the service's listings (/api/models loras)
    settings = replace(settings, models_dirs=(*map(Path, models_dirs), *settings.models_dirs))
    if ray:
        client = build_ray_client(model, variant, device, settings, text_encoder=text_encoder, vae=vae,
                                  offload=offload, replicas=config.ray_replicas,
                                  gpus_per_replica=config.ray_gpus_per_replica, min_replicas=config.ray_min_replicas,
                                  max_replicas=config.ray_max_replicas, max_resident=max_resident, speed=speed)
    else:
        client = build_pool_client(model, variant, device, settings, text_encoder=text_encoder, vae=vae,
                                   offload=offload, max_resident=max_resident, speed=speed)
    try:
        app = create_app(settings, client, config)
        from ..service.server_options import uvicorn_options

        server = _graceful_server(uvicorn.Config(app, host=config.host, port=config.port, log_level=log_level,
                                                **uvicorn_options(config)))
        server.run()
    finally:
        client.close()
        import gc

        gc.freeze()  # everything is persisted; skip a multi-second final collection of the model's objects at exit


def read_keys(api_key: str | None, api_key_file: str | Path | None) -> list[str]:
    """Keys from ``--api-key-file`` (one per line, # comments), QWENSTUDIO_API_KEY (comma-separated) and, last and
    discouraged, ``--api-key`` (the command line is visible to every local user in ``ps``)."""
    from ..errors import InvalidRequest

    text = os.environ.get("QWENSTUDIO_API_KEY", "")
    if api_key_file is not None:
        try:
            lines = Path(api_key_file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise InvalidRequest(f"cannot read the API key file: {e.__class__.__name__}", code="invalid_key_file") \
                from None
        text += "," + ",".join(line for line in lines if not line.lstrip().startswith("#"))
    if api_key:
        import sys

        print("warning: --api-key puts the key on the command line, where `ps` shows it to every local user; "
              "use QWENSTUDIO_API_KEY or --api-key-file instead", file=sys.stderr)
        text += "," + api_key
    return [k.strip() for k in text.split(",") if k.strip()]


def _graceful_server_class():
    import contextlib
    import signal
    import threading

    import uvicorn

    class GracefulServer(uvicorn.Server):
        """uvicorn re-raises SIGTERM after its shutdown, so the process dies "by signal"; a graceful stop that
        persisted everything is a normal exit, so we only trigger the shutdown and then return (exit 0)."""

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

        def handle_exit(self, sig, frame) -> None:
            """Stop taking jobs and cancel the running one *now*: uvicorn only runs the app's shutdown after its
            open connections close, and a client waiting on that job holds one open (SECURITY 24)."""
            state = getattr(self.config.app, "state", None)
            for manager in (getattr(state, "jobs", None), *getattr(state, "extra_workers", ())):
                if manager is not None:
                    manager.begin_shutdown()
            super().handle_exit(sig, frame)

    return GracefulServer


def _graceful_server(config):
    return _graceful_server_class()(config)


def serve_command(
    host: str = typer.Option("127.0.0.1", help="Address to bind; anything but loopback requires --api-key."),
    port: int = typer.Option(8000, help="TCP port."),
    model: str = typer.Option("tiny", "--model", "-m", help="'tiny', a name from `qwenstudio models`, a diffusers "
                              "folder or a DiT file: preloaded and the default; every model of the models dirs is "
                              "served too."),
    max_resident: int | None = typer.Option(None, "--max-resident", min=1, help="Models kept loaded at once "
                                            "(least recently used evicted; default: what the memory planner fits)."),
    models_dir: list[Path] = typer.Option([], "--models-dir", help="Extra models dir (repeatable)."),
    text_encoder: str | None = typer.Option(None, "--text-encoder", help="Text encoder name (single-file DiTs)."),
    vae: str | None = typer.Option(None, "--vae", help="VAE name (single-file DiTs)."),
    offload: str | None = typer.Option(None, help="auto, resident, model_offload, group_offload, leaf_offload, cpu."),
    api_key: str | None = typer.Option(None, "--api-key", help="Require this key (comma-separated). Deprecated: "
                                       "`ps` shows it; use QWENSTUDIO_API_KEY or --api-key-file.", show_default=False),
    api_key_file: Path | None = typer.Option(None, "--api-key-file", help="File with the API keys, one per line."),
    config_file: Path | None = typer.Option(None, "--config", help="TOML/JSON file of service settings (caps, "
                                            "hosts, timeouts; see docs/SECURITY-TESTS.md); options override it."),
    allowed_host: list[str] = typer.Option([], "--allowed-host", help="Also answer for this Host name (repeatable; "
                                           "loopback names always; '*' for any)."),
    trusted_proxy: list[str] = typer.Option([], "--trusted-proxy", help="Believe X-Forwarded-For/Forwarded from "
                                            "this proxy address (repeatable); otherwise they are ignored."),
    public_url: str | None = typer.Option(None, "--public-url", help="Base of absolute URLs in responses."),
    max_steps: int | None = typer.Option(None, "--max-steps", min=1, help="Operator cap on steps (422 beyond)."),
    max_pixels: int | None = typer.Option(None, "--max-pixels", min=256, help="Operator cap on width*height."),
    max_batch: int | None = typer.Option(None, "--max-batch", min=1, help="Operator cap on images per job."),
    shutdown_grace: float | None = typer.Option(None, "--shutdown-grace", min=0.5, help="Seconds SIGTERM waits for "
                                                "the running job to stop (default 10)."),
    variant: str | None = typer.Option(None, help="Recipe (spec) to use for the model."),
    device: str | None = typer.Option(None, help="cuda, cuda:1, cpu."),
    cors_origin: list[str] = typer.Option([], "--cors-origin", help="Allow this browser origin (repeatable)."),
    queue_size: int = typer.Option(16, help="Jobs that may wait; beyond it 429."),
    job_deadline: float = typer.Option(600.0, help="Seconds a job may run before it is cancelled."),
    max_body: int = typer.Option(1 << 20, help="JSON request body cap in bytes (413 beyond)."),
    max_upload: int = typer.Option(32 << 20, help="Multipart upload body cap in bytes (image uploads, edits)."),
    rate_limit: str | None = typer.Option(None, "--rate-limit", help="Per API key (or client address) limit on "
                                          "state-changing requests, e.g. 30/min, 2/s; 429 + Retry-After beyond."),
    preview_every: int = typer.Option(0, help="Default preview interval in steps for SSE (0: off)."),
    ray: bool = typer.Option(False, "--ray", help="Run generations on a Ray Serve deployment (RAY_ADDRESS, else a "
                             "local Ray); needs the 'ray' extra."),
    ray_replicas: int | None = typer.Option(None, "--replicas", "--ray-replicas", min=1, help="Engine replicas "
                                            "(with --ray): one per GPU, or per CPU slot (default 1)."),
    min_replicas: int | None = typer.Option(None, "--min-replicas", min=0, help="With --ray: autoscale, at least "
                                            "this many replicas (Ray Serve autoscaling)."),
    max_replicas: int | None = typer.Option(None, "--max-replicas", min=1, help="With --ray: autoscale, at most "
                                            "this many replicas."),
    ray_gpus_per_replica: float | None = typer.Option(None, "--ray-gpus-per-replica", min=0,
                                                      help="GPUs per replica (with --ray; default 1 when the "
                                                      "cluster has GPUs, else 0)."),
    compile: str = typer.Option("auto", "--compile", help="Regional compile of the DiT blocks: auto (on, except "
                                "the tiny model), on, off."),
    attention: str = typer.Option("auto", "--attention", help="auto, sdpa, math, flash, flash3, sage, xformers."),
    quant: str | None = typer.Option(None, "--quant", help="fp8: fp8 compute; int4 / nf4 (CUDA, CPU): 4-bit weights, "
                                      "on a bf16/fp32 model."),
    cache: str | None = typer.Option(None, "--cache", help="Step cache threshold (e.g. 0.08; off by default)."),
    store: str | None = typer.Option(None, "--store", envvar="QWENSTUDIO_STORE", help="Job/preset store: "
                                     "postgresql://user@host/db to share one queue between nodes (password via "
                                     "PGPASSWORD or ~/.pgpass); default: SQLite in the home."),
) -> None:
    """Serve the HTTP API (native /api, OpenAI-compatible /v1)."""
    from ..engine.acceleration import speed_options
    from ..errors import QwenStudioError

    overrides = {k: v for k, v in (("allowed_hosts", tuple(allowed_host)), ("trusted_proxies", tuple(trusted_proxy)),
                                   ("public_url", public_url), ("max_steps", max_steps), ("max_pixels", max_pixels),
                                   ("max_batch", max_batch), ("shutdown_grace_s", shutdown_grace),
                                   ("store_url", store)) if v}
    overrides.update({k: v for k, v in (("ray_min_replicas", min_replicas), ("ray_max_replicas", max_replicas))
                      if v is not None})
    try:
        speed = speed_options(compile=compile, attention=attention, quant=quant, cache=cache)
        serve(host, port, model, api_key, variant=variant, device=device, cors_origins=tuple(cors_origin),
              queue_size=queue_size, job_deadline_s=job_deadline, max_body_bytes=max_body,
              preview_every=preview_every, models_dirs=tuple(models_dir), text_encoder=text_encoder, vae=vae,
              offload=offload, max_upload_bytes=max_upload, rate_limit=rate_limit, ray=ray,
              ray_replicas=ray_replicas, ray_gpus_per_replica=ray_gpus_per_replica, api_key_file=api_key_file,
              config_file=config_file, speed=speed, max_resident=max_resident, **overrides)
    except QwenStudioError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)


def main() -> None:
    typer.run(serve_command)


if __name__ == "__main__":
    main()
