"""The Engine: owns the loaded components and runs the denoise loop. Requests in, images + metadata out.

``generate`` reads as the reference pipeline's story — resolve the request, encode prompts, make noise, build
sigmas, sample, decode — but every stage is ours: the schedule and sampler are swappable pure functions, the
progress callback can preview and cancel, NaN/inf latents fail with a typed error (optionally retried in fp32), and
each image carries the exact request that re-creates it. The loop never syncs with the GPU per step.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .. import __version__
from ..config import Settings
from ..errors import Cancelled, GenerationFailed, InvalidRequest, ModelNotFound
from . import latents as L
from .loading import Components, default_device, default_dtype
from .memory import Plan, StagePlacement
from .requests import GeneratedImage, GenerateRequest, GenerateResult
from .specs import ModelSpec, get_spec
from .text import PromptEncoder


@dataclass
class Progress:
    """One step done. ``preview`` is a uint8 [B, h, w, 3] array when previews were asked for on this step."""

    step: int
    total: int
    elapsed: float
    preview: Any = None


ProgressCallback = Callable[[Progress], Any]  # return False (or raise Cancelled) to stop the run


@dataclass
class DenoiseHooks:
    """What image-conditioned modes add to the shared denoiser (see ``engine/editing/``).

    ``ref_tokens``: packed reference latents [B, N, 64] appended after the noisy tokens (edit); ``ref_shapes``: their
    (1, h/2, w/2) grid shapes for RoPE. ``control(x, t, embeds, img_shapes, step, total)`` -> ControlNet block
    residuals or None. ``blend(denoised, step)`` -> denoised with the known region put back (inpaint)."""

    ref_tokens: Any = None
    ref_shapes: tuple = ()
    control: Callable | None = None
    blend: Callable | None = None


class Engine:
    def __init__(self, components: Components, spec: ModelSpec, plan: Plan | None = None):
        self.components = components
        self.spec = spec
        self.plan = plan or Plan("resident" if str(components.device) != "cpu" else "cpu", 0, 0)
        self._stages = StagePlacement(components, self.plan)
        self.registry = None  # set by Engine.load: where LoRA names are looked up
        self.allow_paths = True  # False in the server: LoRAs by registry name only
        self._lora_manager = None
        self.controlnet = None  # attached by load_controlnet (editing/ControlNet mode)
        self.controlnet_name = None
        self._controlnet_path = None  # the file/folder it came from (None: attached as a module)
        self._vision_prompts = None  # built on the first edit: the VL prompt encoder (editing/run.py)
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
    ) -> Engine:
        """Load ``model``: ``"tiny"`` (built-in random model), a diffusers folder, a DiT file (safetensors in any
        ComfyUI flavour, or GGUF), or a name found in the models dirs. ``variant`` names the recipe (default: guessed
        from the name, else ``qwen-image``). ``text_encoder``/``vae`` name components for single-file DiTs (default:
        picked from the models dirs). ``offload`` forces a memory strategy (resident, model_offload, group_offload,
        cpu); by default the cheapest that fits is chosen, and a model that cannot fit is refused before anything
        is loaded. ``allow_paths=False`` (the server) accepts registry names only. Speed options
        (engine/acceleration.py): ``compile`` (auto: on when ``long_lived``, e.g. a server), ``attention`` backend,
        ``quant="fp8"`` (fp8 compute), ``cache`` (step cache threshold or ``StepCacheConfig``; off by default)."""
        import torch

        from .memory import measure, plan_memory
        from .sources import component_sizes, load_source, registry_for, resolve

        settings = settings or Settings.from_env()
        if isinstance(dtype, str):
            dtype = _parse_dtype(dtype)
        elif dtype is None and settings.dtype:
            dtype = _parse_dtype(settings.dtype)
        registry = registry_for(settings, models_dirs)
        source = resolve(model, registry, settings, text_encoder=text_encoder, vae=vae, allow_paths=allow_paths)
        spec = get_spec(variant or source.variant)
        device = torch.device(device or settings.device or default_device())
        dtype = dtype or default_dtype(device)
        itemsize = torch.empty(0, dtype=dtype).element_size()
        width, height = max(spec.resolutions.values(), key=lambda wh: wh[0] * wh[1])
        plan = plan_memory(component_sizes(source, itemsize), measure(device), device=str(device), width=width,
                           height=height, compute_itemsize=itemsize, prefer=offload)
        load_device = device if plan.strategy in ("resident", "cpu") else torch.device("cpu")
        with torch.inference_mode(False):
            components = load_source(source, device=load_device, dtype=dtype, keep_lm_head=keep_lm_head)
        components.device = device
        engine = cls(components, spec, plan=plan)
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
                **({"acceleration": self.acceleration} if self.acceleration else {})}

    # ---- generation ----------------------------------------------------------------------------------------
    def generate(
        self,
        request: GenerateRequest | None = None,
        *,
        on_progress: ProgressCallback | None = None,
        preview_every: int = 0,
        retry_fp32: bool = False,
        **fields,
    ) -> GenerateResult:
        """Run one request (or build one from keyword fields: ``engine.generate(prompt="...", seed=1)``)."""
        if request is None:
            request = GenerateRequest(**fields)
        elif fields:
            raise InvalidRequest("pass either a GenerateRequest or keyword fields, not both")
        req = self.prepare(request)
        self._set_lora_stack(self._load_loras(req))
        with out_of_memory_as_typed_error():
            try:
                return self._generate(req, on_progress, preview_every)
            except GenerationFailed as e:
                if not (retry_fp32 and e.code == "non_finite" and self.components.dtype != _fp32()):
                    raise
                return self._retry_in_fp32(req, on_progress, preview_every)

    def prepare(self, request: GenerateRequest) -> GenerateRequest:
        """Everything checkable before any GPU work, so a server can refuse a job before queueing it: LoRA names
        resolve, a Lightning LoRA's recipe fills the defaults the user left open, every bound is checked, and the
        prompts fit the model's token limit. Cheap: reads LoRA file headers and runs the tokenizer only."""
        req = self._apply_lora_recipes(request).resolve(self.spec)
        if hasattr(req, "controls"):  # an edit: a named ControlNet must resolve (404 otherwise), and an inpainting
            # ControlNet's request is checked and gets strength 1 (editing/controlnet.py)
            from .editing.controlnet import check_controlnet_request

            req = check_controlnet_request(self, request, req)
        self.prompts.check(req.full_prompt())
        if req.cfg > 1.0:
            self.prompts.check(req.negative_prompt)
        return req

    def edit(
        self,
        request=None,
        *,
        images=(),
        mask=None,
        controls=(),
        on_progress: ProgressCallback | None = None,
        preview_every: int = 0,
        retry_fp32: bool = False,
        **fields,
    ) -> GenerateResult:
        """Image-conditioned generation: edit (edit variants), img2img (``strength``), inpaint (``mask``),
        edit-inpaint, ControlNet (``controls``; ``controlnet=NAME`` loads one from the models home). Images are
        paths, bytes or PIL images; see ``engine/editing/``. ``retry_fp32``: as in ``generate``."""
        from .editing import run_edit

        with out_of_memory_as_typed_error():
            return run_edit(self, request, images=images, mask=mask, controls=controls, on_progress=on_progress,
                            preview_every=preview_every, retry_fp32=retry_fp32, **fields)

    def load_controlnet(self, source) -> None:
        """Attach a ControlNet for ``controls``: a name from the models home (role ``controlnet``: a diffusers
        folder or one safetensors file; names only when ``allow_paths`` is False), a path, or a module."""
        from .editing import load_controlnet

        load_controlnet(self, source)

    def _generate(self, req: GenerateRequest, on_progress, preview_every: int) -> GenerateResult:
        import torch

        from .sampling import build_sigmas

        c, timings = self.components, {}
        t0 = time.perf_counter()
        with torch.inference_mode():
            with self._stages.on_device("text_encoder"):
                cond = self.prompts.encode(req.full_prompt())
                use_cfg = req.cfg > 1.0
                uncond = self.prompts.encode(req.negative_prompt) if use_cfg else None
            timings["text_encode"] = time.perf_counter() - t0

            lh, lw = L.latent_hw(req.width, req.height)
            noise = L.make_noise(
                seeds=req.image_seeds(), convention=req.noise, width=req.width, height=req.height, skip=req.noise_skip
            )
            x = L.pack(noise).to(c.device)
            sigmas = build_sigmas(
                req.scheduler, req.steps, image_seq_len=x.shape[1], scheduler_config=c.scheduler_config, shift=req.shift
            )
            x = self._sample(req, cond, uncond, x, sigmas, lh, lw, on_progress, preview_every, t0, timings)
            t_dec = time.perf_counter()
            with self._stages.on_device("vae"):
                self._stages.set_vae_tiling(req.width * req.height)
                images = L.to_pil(L.decode(c.vae, L.unpack(x, lh, lw).to(c.device)))
            timings["vae_decode"] = time.perf_counter() - t_dec
        timings["total"] = time.perf_counter() - t0
        out = [GeneratedImage(img, self._metadata(req, i, timings)) for i, img in enumerate(images)]
        return GenerateResult(images=out, request=req, timings=timings, latents=L.unpack(x, lh, lw))

    def _sample(self, req: GenerateRequest, cond, uncond, x, sigmas, lh: int, lw: int, on_progress,
                preview_every: int, t0: float, timings: dict, hooks: DenoiseHooks | None = None):
        """The denoise loop shared by every mode (text-to-image, img2img, inpaint, edit, ControlNet): ``x`` are
        the packed start latents at ``sigmas[0]``; ``hooks`` add what a mode needs. Returns the final latents."""
        import torch

        from .sampling import STOCHASTIC_SAMPLERS, get_sampler

        denoise = self._denoiser(cond, uncond, req, x.shape[0], lh, lw, sigmas, hooks)
        noise_sampler = (
            self._noise_sampler(req, lh, lw) if req.sampler in STOCHASTIC_SAMPLERS else None
        )

        total = len(sigmas) - 1  # ComfyUI's ddim_uniform/beta may give a different count than req.steps
        step_times: list[float] = []
        t_loop = last = time.perf_counter()

        def callback(i, x_i, denoised, sigma, sigma_next):
            nonlocal last
            now = time.perf_counter()
            step_times.append(now - last)
            last = now
            preview = None
            if preview_every and ((i + 1) % preview_every == 0 or i + 1 == total):
                preview = L.preview_rgb(L.unpack(denoised, lh, lw))
            if on_progress is not None:
                if on_progress(Progress(i + 1, total, now - t0, preview)) is False:
                    raise Cancelled(f"cancelled after step {i + 1} of {total}")

        with self._stages.on_device("transformer"):
            x = get_sampler(req.sampler)(denoise, x, sigmas, callback=callback, noise_sampler=noise_sampler)
        timings["denoise"] = time.perf_counter() - t_loop
        timings["steps"] = step_times

        if not bool(torch.isfinite(x).all()):  # the one host sync of the run, after the loop
            raise GenerationFailed(
                "the latents became NaN/inf (numerical overflow, usually fp16/bf16); retry with retry_fp32 or "
                "--dtype float32", code="non_finite",
            )
        return x

    # ---- LoRAs ---------------------------------------------------------------------------------------------
    def _load_loras(self, request: GenerateRequest) -> list:
        """Read (or take from the manager's cache) every LoRA the request names; errors before any work."""
        if not request.loras and self._lora_manager is None:
            return []
        manager = self._loras()
        return [(manager.load(self._lora_path(ref.name)), float(ref.weight)) for ref in request.loras]

    def _lora_path(self, name: str) -> Path:
        if self.registry is not None:
            try:
                return self.registry.find(name, ("lora",)).path
            except ModelNotFound:
                if not self.allow_paths:
                    raise
        path = Path(name).expanduser()
        if self.allow_paths and path.is_file():
            return path
        raise ModelNotFound(f"no LoRA named '{name}' (put it in <models>/loras/ or give its path)", code="lora_not_found")

    def _apply_lora_recipes(self, request: GenerateRequest) -> GenerateRequest:
        """A Lightning LoRA switches the defaults to its recipe (steps, CFG 1, shift 3) unless the user set them."""
        from dataclasses import replace

        from .loading import read_safetensors_header
        from .lora import apply_recipe, detect_lightning

        for ref in request.loras:
            path = self._lora_path(ref.name)
            metadata = read_safetensors_header(path).get("__metadata__") or {}
            recipe = detect_lightning(path, metadata) if ref.weight else None
            if recipe is not None:
                fields = request.to_dict()
                keys = ("steps", "cfg", "shift", "scheduler")
                user_set = {k for k in keys if fields.get(k) is not None}
                request = replace(request, **apply_recipe({k: fields[k] for k in keys}, recipe, user_set))
        return request

    def _set_lora_stack(self, stack: list) -> None:
        if self._lora_manager is not None:
            self._lora_manager.set_stack(stack)

    def _loras(self):
        if self._lora_manager is None:
            from .lora import LoraManager

            self._lora_manager = LoraManager(self.components.transformer)
        return self._lora_manager

    def _denoiser(self, cond, uncond, req: GenerateRequest, batch: int, lh: int, lw: int, sigmas,
                  hooks: DenoiseHooks | None = None):
        """The model as a k-diffusion denoiser: (x, step, sigma) -> predicted clean latents, with true CFG.
        ``hooks``: reference latents appended to the image sequence (edit), ControlNet residuals, and a blend of
        the prediction with known latents (inpaint)."""
        import torch

        c = self.components
        model = c.transformer
        hooks = hooks or DenoiseHooks()
        img_shapes = [[(1, lh // 2, lw // 2), *hooks.ref_shapes]] * batch
        ref = hooks.ref_tokens.to(device=c.device, dtype=c.dtype) if hooks.ref_tokens is not None else None
        # The reference feeds timestep = (sigma * 1000) / 1000 in float32; do the same for bit-level parity.
        timesteps = ((sigmas[:-1].to(torch.float32) * 1000) / 1000).to(c.device)
        cond_e = cond.embeds.expand(batch, -1, -1)
        uncond_e = uncond.embeds.expand(batch, -1, -1) if uncond is not None else None
        cfg, cfg_norm = float(req.cfg), bool(req.cfg_norm)

        def velocity(xin, t, embeds, control=None):
            n = xin.shape[1]
            if ref is not None:
                xin = torch.cat([xin, ref], dim=1)
            extra = {"controlnet_block_samples": control} if control is not None else {}
            return model(
                hidden_states=xin, timestep=t, encoder_hidden_states=embeds, encoder_hidden_states_mask=None,
                img_shapes=img_shapes, return_dict=False, **extra,
            )[0][:, :n].float()

        def denoise(x, i, sigma):
            xin = x.to(c.dtype)
            t = timesteps[i].expand(batch)
            # ControlNet residuals are computed once per step from the conditional pass and reused (reference)
            control = hooks.control(xin, t, cond_e, img_shapes, i, len(timesteps)) if hooks.control else None
            v = velocity(xin, t, cond_e, control)
            if uncond_e is not None:
                vu = velocity(xin, t, uncond_e, control)
                comb = vu + cfg * (v - vu)
                if cfg_norm:  # reference: rescale to the conditional prediction's norm, per token
                    comb = comb * (torch.norm(v, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))
                v = comb
            denoised = x - sigma * v
            return hooks.blend(denoised, i) if hooks.blend is not None else denoised

        return denoise

    def _noise_sampler(self, req: GenerateRequest, lh: int, lw: int):
        """Per-step noise for ancestral samplers, drawn on the CPU in the unpacked latent shape (so it is the same
        on every device), from generators seeded like the initial noise but on a separate stream (seed + 1)."""
        import torch

        device = self.components.device
        if req.noise == "comfy":
            gens = [torch.Generator().manual_seed(req.seed + 1)]
            sizes = [req.batch]
        else:
            gens = [torch.Generator().manual_seed(s + 1) for s in req.image_seeds()]
            sizes = [1] * req.batch

        def sample(sigma, sigma_next):
            n = torch.cat([torch.randn((k, L.LATENT_CHANNELS, lh, lw), generator=g) for g, k in zip(gens, sizes)])
            return L.pack(n).to(device)

        return sample

    def _retry_in_fp32(self, req, on_progress, preview_every, run: Callable | None = None) -> GenerateResult:
        """Run again with the DiT (and an attached ControlNet) in fp32; ``run()`` defaults to ``_generate``."""
        models = [m for m in (self.components.transformer, self.controlnet) if m is not None]
        dtype = self.components.dtype
        for m in models:
            m.to(_fp32())
        self.components.dtype = _fp32()
        try:
            result = run() if run is not None else self._generate(req, on_progress, preview_every)
        finally:
            for m in models:
                m.to(dtype)
            self.components.dtype = dtype
        for img in result.images:
            img.metadata["retried_fp32"] = True
        return result

    def _metadata(self, req: GenerateRequest, i: int, timings: dict) -> dict:
        single = req.for_image(i)
        return {
            "generator": f"qwenstudio {__version__}",
            "request": single.to_dict(),
            "model": self.describe(),
            "seed": single.seed,
            "noise": single.noise,
            "loras": [{"name": f.name, "weight": w, "file": f.path.name} for f, w in
                      (self._lora_manager.stack if self._lora_manager else [])],
            "timings": {k: round(v, 4) for k, v in timings.items() if isinstance(v, float)},
        }


@contextmanager
def out_of_memory_as_typed_error():
    """A CUDA (or CPU allocator) OOM fails this run with a typed error and gives the cached blocks back, so the
    next request starts from a clean allocator instead of inheriting a fragmented one (SECURITY 21)."""
    import torch

    try:
        yield
    except torch.OutOfMemoryError:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        raise GenerationFailed(
            "out of memory during this run; use a smaller size or batch, or load with --offload model_offload / "
            "group_offload", code="out_of_memory",
        ) from None


def _fp32():
    import torch

    return torch.float32


def _parse_dtype(name: str):
    import torch

    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise InvalidRequest(f"unknown dtype '{name}'; valid: {', '.join(table)}")
    return table[name]
