"""The Engine: owns the loaded components; requests in, images + metadata out.

``prepare`` makes a request concrete once (``engine/prepare.py``); ``generate`` and ``edit`` run a prepared request
through the one pipeline (``engine/pipeline.py``) with the mode's conditioner — text-to-image, or the
image-conditioned modes of ``engine/editing/``. The engine's public members (``stages``, ``prompts``,
``vision_prompts``, ``apply_loras``, ``in_fp32`` ...) are what the pipeline and the modes use; nothing outside this
module touches its private state.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from ..config import Settings
from ..errors import InvalidRequest, ModelNotFound
from .loading import Components, default_device
from .memory import Plan, StagePlacement
from .pipeline import DenoiseHooks, Progress, ProgressCallback, out_of_memory_as_typed_error
from .requests import GenerateRequest, GenerateResult
from .specs import ModelSpec, get_spec
from .text import PromptEncoder

__all__ = ["DenoiseHooks", "Engine", "Progress", "ProgressCallback", "out_of_memory_as_typed_error"]


class Engine:
    def __init__(self, components: Components, spec: ModelSpec, plan: Plan | None = None):
        self.components = components
        self.spec = spec
        self.plan = plan or Plan("resident" if str(components.device) != "cpu" else "cpu", 0, 0)
        self.stages = StagePlacement(components, self.plan)
        self.registry = None  # set by Engine.load: where LoRA names are looked up
        self.allow_paths = True  # False in the server: LoRAs by registry name only
        self._lora_manager = None
        self._lora_hashes: dict[tuple, str] = {}  # (path, size, mtime) -> A1111 short hash, per engine
        self.controlnet = None  # attached by load_controlnet (editing/ControlNet mode)
        self.controlnet_name = None
        self.controlnet_path = None  # the file/folder it came from (None: attached as a module)
        self.batch_cfg = True  # CFG's two passes as one batched forward (exact; pipeline.make_denoiser)
        self.preset_lookup = None  # name -> preset params, for requests naming a preset (set by the service/CLI)
        self._vision_prompts = None  # built on the first edit: the VL prompt encoder
        self.dtype_reason = ""  # why this compute dtype (engine/precision.py), recorded in the metadata
        self.acceleration: dict = {}  # speed options applied to the DiT (engine/acceleration.py)
        self.prompts = PromptEncoder(
            components.tokenizer,
            components.text_encoder,
            template=spec.template,
            drop_tokens=spec.drop_tokens,
            max_tokens=spec.max_prompt_tokens,
        )

    # ---- construction --------------------------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        model: str | Path = "tiny",
        *,
        variant: str | None = None,
        device: str | None = None,
        dtype: Any = None,
        settings: Settings | None = None,
        text_encoder: str | None = None,
        vae: str | None = None,
        models_dirs: tuple = (),
        offload: str | None = None,
        allow_paths: bool = True,
        keep_lm_head: bool = False,
        compile: bool | str = "auto",
        attention: str = "auto",
        quant: str | None = None,
        cache=None,
        long_lived: bool = False,
        on_load_progress: Callable[[float], Any] | None = None,
        vram_budget: float | None = None,
    ) -> Engine:
        """Load ``model``: ``"tiny"`` (built-in random model), a diffusers folder, a DiT file (safetensors in any
        ComfyUI flavour, or GGUF), or a name found in the models dirs. ``variant`` names the recipe
        (default: decided by ``identity`` — a folder's model_index.json, a file's name — and recorded with its
        reason). ``text_encoder``/``vae`` name components for single-file DiTs (default: picked from the models
        dirs, else a diffusers folder's). ``offload`` forces a memory strategy (resident, model_offload, group_offload,
        cpu); by default the cheapest that fits is chosen, and a model that cannot fit is refused before anything
        is loaded. ``allow_paths=False`` (the server) accepts registry names only. Speed options
        (engine/acceleration.py): ``compile`` (auto: on when ``long_lived``, e.g. a server), ``attention`` backend,
        ``quant="fp8"`` (fp8 compute) / ``"int4"`` / ``"nf4"`` (4-bit quantize-on-load), ``cache`` (step cache
        threshold or ``StepCacheConfig``; off by default). ``on_load_progress`` gets the fraction of the weights'
        bytes loaded so far (engine/loading.py). ``vram_budget``: GiB of accelerator memory the memory planner may
        use (on a CPU device: a simulated accelerator of that size, see engine/memory.py); the plan and its reason
        are in ``describe()["memory"]``."""
        import torch

        from .loading import load_progress
        from .memory import measure, plan_memory
        from .quant.nf4 import mute_kernels_notice
        from .sources import component_footprints, load_source, registry_for, resolve

        mute_kernels_notice()  # a bitsandbytes log line diffusers' import would print (quant/nf4.py)

        settings = settings or Settings.from_env()
        if isinstance(dtype, str) and dtype.lower() == "auto":  # the default rule (engine/precision.py)
            dtype = None
        elif dtype is None and (settings.dtype or "").lower() == "auto":
            settings = replace(settings, dtype=None)
        dtype_chosen_by = "dtype=" if dtype is not None else "QWENSTUDIO_DTYPE" if settings.dtype else None
        if isinstance(dtype, str):
            dtype = parse_dtype(dtype)
        elif dtype is None and settings.dtype:
            dtype = parse_dtype(settings.dtype)
        registry = registry_for(settings, models_dirs)
        device = check_device(device or settings.device or default_device())
        from .quant.load_time import LOAD_TIME_QUANTS, check_quant_base, check_quant_device

        check_quant_device(quant, device)  # e.g. --quant nf4 off CUDA: refused before any weight is read
        source = resolve(model, registry, settings, text_encoder=text_encoder, vae=vae, allow_paths=allow_paths)
        check_quant_base(quant, source)  # e.g. --quant int4 on a GGUF file: refused from its headers
        spec = get_spec(variant or source.variant)
        reason = f"chosen with --variant {variant}" if variant else source.identity.reason
        if not variant and source.identity.guessed:
            warnings.warn(f"'{source.name}': variant {spec.name} ({reason})", stacklevel=2)
        dtype, vae_dtype, dtype_reason = _compute_dtype(dtype, device, source, chosen_by=dtype_chosen_by)
        itemsize = torch.empty(0, dtype=dtype).element_size()
        width, height = max(spec.resolutions.values(), key=lambda wh: wh[0] * wh[1])
        stored = component_footprints(source, itemsize)
        # a quantize-on-load run (--quant fp8/int4/nf4) is planned at the size it runs at; the load holds the float
        # DiT in RAM (it is loaded on the CPU and quantized layer by layer onto its device: acceleration.py)
        quant_at_load = quant if quant in LOAD_TIME_QUANTS else None
        footprints = component_footprints(source, itemsize, quant_at_load) if quant_at_load else stored
        plan = plan_memory(footprints, measure(device), device=str(device), width=width,
                           height=height, compute_itemsize=itemsize, prefer=offload, vram_budget=vram_budget,
                           text_tokens=spec.max_prompt_tokens,
                           load_ram=sum(fp.total for fp in stored.values()) if quant_at_load else 0)
        if plan.strategy not in ("resident", "cpu"):  # a slower placement is never silent
            warnings.warn(f"memory plan for '{source.name}': {plan.summary()}", stacklevel=2)
        on_device = plan.strategy in ("resident", "cpu") and not quant_at_load
        load_device = device if on_device else torch.device("cpu")
        with torch.inference_mode(False):
            with load_progress(sum(fp.total for fp in stored.values()), on_load_progress):
                components = load_source(source, device=load_device, dtype=dtype, keep_lm_head=keep_lm_head,
                                         vae_dtype=vae_dtype)
        if plan.strategy == "resident" and not on_device:  # the DiT follows once quantized (accelerate_engine)
            components.text_encoder.to(device)
            components.vae.to(device)
        components.device = device
        components.identity = {**components.identity, "variant_reason": reason}
        engine = cls(components, spec, plan=plan)
        engine.dtype_reason = dtype_reason
        engine.registry = registry
        engine.allow_paths = allow_paths
        from .acceleration import accelerate_engine

        engine.acceleration = accelerate_engine(engine, compile=compile, attention=attention, quant=quant, cache=cache,
                                                long_lived=long_lived, home=settings.home)
        return engine

    @property
    def device(self):
        return self.components.device

    def describe(self) -> dict:
        c = self.components
        return {"variant": self.spec.name, **c.identity, "device": str(c.device),
                "dtype": str(c.dtype).replace("torch.", ""), "offload": self.plan.strategy,
                **({"dtype_reason": self.dtype_reason} if self.dtype_reason else {}),
                **({"vae_dtype": str(c.vae.dtype).replace("torch.", "")}
                   if getattr(c.vae, "dtype", c.dtype) != c.dtype else {}),
                **({"memory": self.plan.as_metadata()} if self.plan.reason else {}),
                **({"acceleration": self.acceleration} if self.acceleration else {})}

    # ---- requests -----------------------------------------------------------------------------------------
    def prepare(self, request: GenerateRequest) -> GenerateRequest:
        """Make ``request`` concrete, once, before any GPU work (``engine/prepare.py``): preset, LoRA recipe and
        variant defaults fill what the user left unset (recorded in ``settings_from``), every bound is checked
        and the prompts fit the token limit. Cheap, so a server refuses a bad job before queueing it. A prepared
        request passes through unchanged (bounds re-checked)."""
        from .prepare import prepare_request

        return prepare_request(self, request)

    def check_request(self, req: GenerateRequest, original: GenerateRequest | None = None) -> GenerateRequest:
        """The checks of a concrete request that need the loaded model: bounds, a named ControlNet (an
        inpainting one fixes strength 1), prompt token counts."""
        req.validate(self.spec)
        if hasattr(req, "controls"):
            from .editing.controlnet import check_controlnet_request

            req = check_controlnet_request(self, original or req, req)
        self.prompts.check(req.full_prompt())
        if req.cfg > 1.0:
            self.prompts.check(req.negative_prompt, what="negative prompt")
        return req

    # ---- generation ----------------------------------------------------------------------------------------
    def generate(self, request: GenerateRequest | None = None, *, on_progress: ProgressCallback | None = None,
                 preview_every: int = 0, retry_fp32: bool = False, should_stop: Callable[[], bool] | None = None,
                 **fields) -> GenerateResult:
        """Text-to-image for one request (or keyword fields: ``engine.generate(prompt="...", seed=1)``); a request
        that is not prepared yet is prepared here, once. ``should_stop``: checked inside every long stage (text
        encode, VAE, each step); True stops the run with Cancelled (engine/stopping.py)."""
        from .pipeline import TextToImage, run

        if request is None:
            request = GenerateRequest(**fields)
        elif fields:
            raise InvalidRequest("pass either a GenerateRequest or keyword fields, not both")
        if hasattr(request, "controls"):
            raise InvalidRequest("an image-conditioned request runs through engine.edit", code="invalid_mode")
        return run(self, self.prepare(request), TextToImage(), on_progress=on_progress,
                   preview_every=preview_every, retry_fp32=retry_fp32, should_stop=should_stop)

    def edit(self, request=None, *, images=(), mask=None, controls=(), on_progress: ProgressCallback | None = None,
             preview_every: int = 0, retry_fp32: bool = False, should_stop: Callable[[], bool] | None = None,
             **fields) -> GenerateResult:
        """Image-conditioned generation: edit (edit variants), img2img (``strength``), inpaint (``mask``),
        edit-inpaint, ControlNet (``controls``; ``controlnet=NAME`` loads one from the models home). Images are
        paths, bytes or PIL images; see ``engine/editing/``. ``retry_fp32``: as in ``generate``."""
        from .editing import run_edit

        return run_edit(self, request, images=images, mask=mask, controls=controls, on_progress=on_progress,
                        preview_every=preview_every, retry_fp32=retry_fp32, should_stop=should_stop, **fields)

    def load_controlnet(self, source) -> None:
        """Attach a ControlNet for ``controls``: a name from the models home (role ``controlnet``: a diffusers
        folder or one safetensors file; names only when ``allow_paths`` is False), a path, or a module."""
        from .editing import load_controlnet

        load_controlnet(self, source)

    @property
    def vision_prompts(self):
        """The VL prompt encoder of edit variants (the text encoder sees the input images); built on first use and
        sharing the text prompts' tokenizer lock."""
        if self._vision_prompts is None:
            from .vision_text import VisionPromptEncoder, build_image_processor

            c, spec = self.components, self.spec
            self._vision_prompts = VisionPromptEncoder(
                c.tokenizer, c.text_encoder, build_image_processor(c.text_encoder, c.identity.get("folder")),
                template=spec.template, image_template=spec.image_template, drop_tokens=spec.drop_tokens,
                max_tokens=spec.max_prompt_tokens, tokenizer_lock=self.prompts.tokenizer_lock,
            )
        return self._vision_prompts

    # ---- LoRAs ---------------------------------------------------------------------------------------------
    def apply_loras(self, req: GenerateRequest) -> None:
        """Make the request's LoRA stack the active one (read, or taken from the manager's cache; switching a
        stack never reloads the base)."""
        if not req.loras and self._lora_manager is None:
            return
        manager = self._loras()
        manager.set_stack([(manager.load(self.lora_path(ref.name)), float(ref.weight)) for ref in req.loras])

    def lora_metadata(self) -> list[dict]:
        """The applied stack as the PNG records it: name, weight, file, A1111's short hash (``Lora hashes``), and
        ``match`` (what did not apply) for a partly applied file — a partial match is never silent."""
        stack = self._lora_manager.stack if self._lora_manager else []
        return [{**f.as_metadata(w), "hash": self._lora_hash(f.path)} for f, w in stack]

    def _lora_hash(self, path: Path) -> str:
        from ..interop.settings import a1111_short_hash

        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
        if key not in self._lora_hashes:
            self._lora_hashes[key] = a1111_short_hash(path)
        return self._lora_hashes[key]

    def lora_path(self, name: str) -> Path:
        if self.registry is not None:
            try:
                return self.registry.find(name, ("lora",)).path
            except ModelNotFound as e:
                if not self.allow_paths:
                    raise ModelNotFound(str(e), code="lora_not_found", detail=e.detail) from None
        path = Path(name).expanduser()
        if self.allow_paths and path.is_file():
            return path
        raise ModelNotFound(f"no LoRA named '{name}' (put it in <models>/loras/ or give its path)", code="lora_not_found")

    def _loras(self):
        if self._lora_manager is None:
            from .lora import LoraManager

            self._lora_manager = LoraManager(self.components.transformer)
        return self._lora_manager

    # ---- precision -----------------------------------------------------------------------------------------
    @property
    def runs_in_fp32(self) -> bool:
        return self.components.dtype == _fp32()

    @contextmanager
    def in_fp32(self):
        """The DiT (and an attached ControlNet) in fp32 for the duration (the NaN/inf retry)."""
        models = [m for m in (self.components.transformer, self.controlnet) if m is not None]
        dtype = self.components.dtype
        for m in models:
            m.to(_fp32())
        self.components.dtype = _fp32()
        try:
            yield
        finally:
            for m in models:
                m.to(dtype)
            self.components.dtype = dtype


def available_devices() -> list[str]:
    """The devices this machine can run on, in the names ``--device`` takes."""
    import torch

    out = []
    if torch.cuda.is_available():
        out += ["cuda", *(f"cuda:{i}" for i in range(torch.cuda.device_count()))]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        out.append("mps")
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        out += ["xpu", *(f"xpu:{i}" for i in range(torch.xpu.device_count()))]
    return [*out, "cpu"]


def check_device(name):
    """A torch device that exists here, or a typed error naming the ones that do (never a traceback)."""
    import torch

    if isinstance(name, torch.device):
        name = str(name)
    available = available_devices()
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise InvalidRequest(f"unknown device '{name}'; available here: {', '.join(available)}",
                             code="invalid_device") from None
    if str(device) not in available and not (device.index is None and device.type in available):
        raise InvalidRequest(f"device '{name}' is not available on this machine; available: {', '.join(available)}",
                             code="invalid_device")
    return device


def _fp32():
    import torch

    return torch.float32


def _compute_dtype(dtype, device, source, *, chosen_by: str | None):
    """``(dtype, vae_dtype, reason)``: the user's (``--dtype`` / settings) or the default for this device and these
    weights (``vae_dtype`` None: the same)."""
    from .precision import default_precision, stored_weight_kind

    if dtype is not None:
        name = str(dtype).replace("torch.", "")
        return dtype, None, f"{name}: chosen with {chosen_by}"
    precision = default_precision(device, stored_weight_kind(source))
    import torch

    if torch.device(device).type == "cpu" and precision.dtype == torch.bfloat16:
        warnings.warn(f"computing in {precision.reason}", stacklevel=3)
    return precision.dtype, precision.vae_dtype, precision.reason


def parse_dtype(name: str):
    import torch

    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise InvalidRequest(f"unknown dtype '{name}'; valid: {', '.join(table)}")
    return table[name]
