"""One pipeline for every mode (after flux's ``prepare_*`` + one ``denoise``).

``run(engine, request, conditioner)`` is the whole story, the same for text-to-image, img2img, inpaint, edit,
edit-inpaint and ControlNet:

1. the LoRA stack of the request is set (one place), and OOM / NaN handling wraps everything below (one place);
2. the mode's *conditioner* prepares its inputs — prompt embeddings, start latents, sigmas and the ``DenoiseHooks``
   it adds to the model (reference latents, ControlNet residuals, an inpaint blend) — from public stage functions
   (``encode_prompts``, ``make_noise`` ...);
3. ``denoise`` runs the request's sampler on ``model(x, sigma)`` (``make_denoiser``: the timestep is derived from
   sigma, never from a step index, so every sampler calls the model at the noise level it means);
4. ``decode`` turns latents into images; the conditioner's ``finish`` crops/composites them;
5. ``image_metadata`` records the exact single-image request, the model identity and where every setting came from.

Text-to-image is ``TextToImage`` below; the image-conditioned modes are ``editing.EditConditioner``.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from .. import __version__
from ..errors import Cancelled, GenerationFailed
from . import latents as L
from .requests import GeneratedImage, GenerateRequest, GenerateResult


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
    """What image-conditioned modes add to the shared denoiser.

    ``ref_tokens``: packed reference latents [B, N, 64] appended after the noisy tokens (edit); ``ref_shapes``: their
    (1, h/2, w/2) grid shapes for RoPE. ``control(x, t, embeds, img_shapes, step, total)`` -> ControlNet block
    residuals or None (``step`` is the schedule interval that ``sigma`` lies in). ``blend(denoised)`` -> denoised
    with the known region put back (inpaint)."""

    ref_tokens: Any = None
    ref_shapes: tuple = ()
    control: Callable | None = None
    blend: Callable | None = None


@dataclass
class Conditioning:
    """What a conditioner hands to the shared loop."""

    cond: Any  # PromptEmbedding
    uncond: Any  # PromptEmbedding or None (CFG <= 1)
    x: Any  # packed start latents at sigmas[0], on the engine device
    sigmas: Any
    lh: int
    lw: int
    hooks: DenoiseHooks = field(default_factory=DenoiseHooks)
    finish: Callable[[list], list] | None = None  # decoded PIL images -> output images (crop, composite)
    metadata: dict = field(default_factory=dict)  # mode-specific metadata for every image


class Conditioner(Protocol):
    def prepare(self, engine, req: GenerateRequest, timings: dict) -> Conditioning: ...


# ---- stages ----------------------------------------------------------------------------------------------------
def encode_prompts(engine, req: GenerateRequest):
    """(cond, uncond) text embeddings; the negative prompt is encoded only when CFG > 1 needs it."""
    with engine.stages.on_device("text_encoder"):
        cond = engine.prompts.encode(req.full_prompt())
        uncond = engine.prompts.encode(req.negative_prompt) if req.cfg > 1.0 else None
    return cond, uncond


def schedule(engine, req: GenerateRequest, image_seq_len: int):
    from .sampling import build_sigmas

    return build_sigmas(req.scheduler, req.steps, image_seq_len=image_seq_len,
                        scheduler_config=engine.components.scheduler_config, shift=req.shift, sampler=req.sampler)


def model_timesteps(sigmas):
    """The model's timestep for each sigma: the reference feeds ``(sigma * 1000) / 1000`` in float32."""
    import torch

    return (torch.as_tensor(sigmas, dtype=torch.float32) * 1000) / 1000


def make_denoiser(engine, cond, uncond, req: GenerateRequest, batch: int, lh: int, lw: int, sigmas,
                  hooks: DenoiseHooks | None = None):
    """The model as a k-diffusion denoiser ``denoise(x, sigma) -> x0`` with true CFG.

    The model's timestep comes from ``sigma`` itself. With CFG, the conditional and unconditional passes run as
    one batched forward when ``engine.batch_cfg`` (unequal prompt lengths are padded and masked with the
    transformer's ``encoder_hidden_states_mask``: exact up to float rounding), else as two forwards."""
    import torch

    c = engine.components
    model = c.transformer
    hooks = hooks or DenoiseHooks()
    ref = hooks.ref_tokens.to(device=c.device, dtype=c.dtype) if hooks.ref_tokens is not None else None
    schedule_points = [float(s) for s in torch.as_tensor(sigmas).tolist()]
    total = len(schedule_points) - 1
    cond_e = cond.embeds.expand(batch, -1, -1)
    cfg, cfg_norm = float(req.cfg), bool(req.cfg_norm)
    paired = None
    if uncond is not None and engine.batch_cfg:
        paired = _pair_embeddings(cond.embeds, uncond.embeds, batch)
    uncond_e = uncond.embeds.expand(batch, -1, -1) if uncond is not None else None

    def step_of(sigma: float) -> int:
        """The schedule interval [sigma_i, sigma_i+1) that ``sigma`` is in (ControlNet start/end fractions)."""
        for i in range(total):
            if sigma > schedule_points[i + 1] or i == total - 1:
                return i
        return total - 1

    def forward(xin, t, embeds, mask, control, rows: int):
        n = xin.shape[1]
        if ref is not None:
            r = ref if ref.shape[0] == xin.shape[0] else ref.repeat(xin.shape[0] // ref.shape[0], 1, 1)
            xin = torch.cat([xin, r], dim=1)
        shapes = [[(1, lh // 2, lw // 2), *hooks.ref_shapes]] * rows
        extra = {"controlnet_block_samples": control} if control is not None else {}
        return model(hidden_states=xin, timestep=t, encoder_hidden_states=embeds, encoder_hidden_states_mask=mask,
                     img_shapes=shapes, return_dict=False, **extra)[0][:, :n].float()

    def denoise(x, sigma):
        xin = x.to(c.dtype)
        t = model_timesteps([sigma]).to(c.device).expand(batch)
        control = None
        if hooks.control is not None:  # residuals from the conditional pass, reused for both (reference)
            control = hooks.control(xin, t, cond_e, [[(1, lh // 2, lw // 2), *hooks.ref_shapes]] * batch,
                                    step_of(float(sigma)), total)
        if paired is not None:
            embeds, mask = paired
            ctl2 = [torch.cat([r, r]) for r in control] if control is not None else None
            both = forward(torch.cat([xin, xin]), torch.cat([t, t]), embeds, mask, ctl2, 2 * batch)
            v, vu = both[:batch], both[batch:]
        else:
            v = forward(xin, t, cond_e, None, control, batch)
            vu = forward(xin, t, uncond_e, None, control, batch) if uncond_e is not None else None
        if vu is not None:
            comb = vu + cfg * (v - vu)
            if cfg_norm:  # reference: rescale to the conditional prediction's norm, per token
                comb = comb * (torch.norm(v, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))
            v = comb
        denoised = x - sigma * v
        return hooks.blend(denoised) if hooks.blend is not None else denoised

    return denoise


def _pair_embeddings(cond, uncond, batch: int):
    """[cond x B; uncond x B] padded to one length, with the mask that hides the padding (None if equal)."""
    import torch

    lc, lu = cond.shape[1], uncond.shape[1]
    n = max(lc, lu)

    def padded(e, length):
        if length == n:
            return e
        return torch.cat([e, e.new_zeros(e.shape[0], n - length, e.shape[2])], dim=1)

    embeds = torch.cat([padded(cond, lc).expand(batch, -1, -1), padded(uncond, lu).expand(batch, -1, -1)])
    if lc == lu:
        return embeds, None
    mask = torch.zeros(2 * batch, n, dtype=torch.bool, device=cond.device)
    mask[:batch, :lc] = True
    mask[batch:, :lu] = True
    return embeds, mask


def noise_sampler(engine, req: GenerateRequest, lh: int, lw: int, sigmas=None):
    """Per-step noise for stochastic samplers, drawn on the CPU in the unpacked latent shape (the same on every
    device). ``comfy`` convention: what ComfyUI's KSampler draws for the job's seed (the Brownian tree for the SDE
    samplers, a generator seeded with the seed itself for ancestral/LCM — ``sampling/noise.py``); ``diffusers``:
    per-image generators seeded like the initial noise but on a separate stream (seed + 1), so image ``i`` of a
    batch equals the single run at ``seed + i``."""
    import torch

    device = engine.components.device
    if req.noise == "comfy":
        from .sampling.noise import comfy_noise_sampler

        draw = comfy_noise_sampler(req.sampler, (req.batch, L.LATENT_CHANNELS, lh, lw), sigmas, req.seed)
        if draw is None:
            return None
        return lambda sigma, sigma_next: L.pack(draw(sigma, sigma_next)).to(device)
    gens = [torch.Generator().manual_seed(s + 1) for s in req.image_seeds()]

    def sample(sigma, sigma_next):
        n = torch.cat([torch.randn((1, L.LATENT_CHANNELS, lh, lw), generator=g) for g in gens])
        return L.pack(n).to(device)

    return sample


def denoise(engine, req: GenerateRequest, cond: Conditioning, on_progress: ProgressCallback | None,
            preview_every: int, t0: float, timings: dict):
    """The request's sampler over ``model(x, sigma)``; progress, previews and cancel after every step; one host
    sync after the loop (the NaN/inf guard). Returns the final packed latents."""
    import torch

    from .compat import comfy_positions
    from .sampling import DEFAULT_COMFY_SHIFT, SHIFT_AWARE_SAMPLERS, STOCHASTIC_SAMPLERS, get_sampler

    lh, lw, sigmas = cond.lh, cond.lw, cond.sigmas
    model = make_denoiser(engine, cond.cond, cond.uncond, req, cond.x.shape[0], lh, lw, sigmas, cond.hooks)
    stochastic = noise_sampler(engine, req, lh, lw, sigmas) if req.sampler in STOCHASTIC_SAMPLERS else None
    extra = {"shift": req.shift if req.shift is not None else DEFAULT_COMFY_SHIFT} \
        if req.sampler in SHIFT_AWARE_SAMPLERS else {}
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
        if on_progress is not None and on_progress(Progress(i + 1, total, now - t0, preview)) is False:
            raise Cancelled(f"cancelled after step {i + 1} of {total}")

    comfy = getattr(req, "compat", None) == "comfy"  # ComfyUI's RoPE positions (they differ at odd patch grids)
    with engine.stages.on_device("transformer"), comfy_positions(engine.components.transformer, enabled=comfy):
        x = get_sampler(req.sampler)(model, cond.x, sigmas, callback=callback, noise_sampler=stochastic, **extra)
    timings["denoise"] = time.perf_counter() - t_loop
    timings["steps"] = step_times
    if not bool(torch.isfinite(x).all()):  # the one host sync of the run, after the loop
        raise GenerationFailed(
            "the latents became NaN/inf (numerical overflow, usually fp16/bf16); retry with retry_fp32 or "
            "--dtype float32", code="non_finite",
        )
    return x


def decode(engine, x, lh: int, lw: int, pixels: int) -> list:
    """Packed latents -> PIL images (VAE tiling above the planner's threshold)."""
    c = engine.components
    with engine.stages.on_device("vae"):
        engine.stages.set_vae_tiling(pixels)
        return L.to_pil(L.decode(c.vae, L.unpack(x, lh, lw).to(c.device)))


def image_metadata(engine, req: GenerateRequest, i: int, timings: dict) -> dict:
    """What re-creates image ``i`` exactly: its single-image request, the model identity, the LoRAs as applied,
    and where each setting came from (user, preset, LoRA recipe, variant)."""
    single = req.for_image(i)
    return {
        "generator": f"qwenstudio {__version__}",
        "request": single.to_dict(),
        "model": engine.describe(),
        "seed": single.seed,
        "noise": single.noise,
        "loras": engine.lora_metadata(),
        "settings_from": dict(req.settings_from or {}),
        "timings": {k: round(v, 4) for k, v in timings.items() if isinstance(v, float)},
    }


# ---- the run ---------------------------------------------------------------------------------------------------
def run(engine, req: GenerateRequest, conditioner: Conditioner, *, on_progress: ProgressCallback | None = None,
        preview_every: int = 0, retry_fp32: bool = False, should_stop: Callable[[], bool] | None = None
        ) -> GenerateResult:
    """Run a *prepared* request through ``conditioner`` (see the module docstring). ``should_stop`` is checked
    inside every long stage — text encoding, VAE encode, each step, VAE decode (``engine/stopping.py``)."""
    from .stopping import stage_modules, stop_checks, stopping_progress

    engine.apply_loras(req)
    on_progress = stopping_progress(on_progress, should_stop)
    with stop_checks(should_stop, stage_modules(engine.components)), out_of_memory_as_typed_error():
        try:
            return _run_once(engine, req, conditioner, on_progress, preview_every)
        except GenerationFailed as e:
            if not (retry_fp32 and e.code == "non_finite" and not engine.runs_in_fp32):
                raise
            with engine.in_fp32():
                result = _run_once(engine, req, conditioner, on_progress, preview_every)
            for img in result.images:
                img.metadata["retried_fp32"] = True
            return result


def _run_once(engine, req, conditioner, on_progress, preview_every) -> GenerateResult:
    import torch

    timings: dict[str, Any] = {}
    t0 = time.perf_counter()
    with torch.inference_mode():
        cond = conditioner.prepare(engine, req, timings)
        x = denoise(engine, req, cond, on_progress, preview_every, t0, timings)
        t_dec = time.perf_counter()
        images = decode(engine, x, cond.lh, cond.lw, req.width * req.height)
        if cond.finish is not None:
            images = cond.finish(images)
        timings["vae_decode"] = time.perf_counter() - t_dec
    timings["total"] = time.perf_counter() - t0
    out = [GeneratedImage(img, {**image_metadata(engine, req, i, timings), **cond.metadata})
           for i, img in enumerate(images)]
    return GenerateResult(images=out, request=req, timings=timings, latents=L.unpack(x, cond.lh, cond.lw))


class TextToImage:
    """Text-to-image: prompt embeddings, the request's noise, the full schedule."""

    def prepare(self, engine, req: GenerateRequest, timings: dict) -> Conditioning:
        t0 = time.perf_counter()
        cond, uncond = encode_prompts(engine, req)
        timings["text_encode"] = time.perf_counter() - t0
        lh, lw = L.latent_hw(req.width, req.height)
        noise = L.make_noise(seeds=req.image_seeds(), convention=req.noise, width=req.width, height=req.height,
                             skip=req.noise_skip)
        x = L.pack(noise).to(engine.components.device)
        return Conditioning(cond, uncond, x, schedule(engine, req, x.shape[1]), lh, lw)


@contextmanager
def out_of_memory_as_typed_error():
    """A CUDA (or CPU allocator) OOM fails this run with a typed error and gives the cached blocks back, so the
    next request starts from a clean allocator instead of inheriting a fragmented one (SECURITY 21)."""
    import torch

    try:
        yield
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as e:
        # the CPU allocator raises a plain RuntimeError ("DefaultCPUAllocator: can't allocate memory")
        if isinstance(e, RuntimeError) and not isinstance(e, torch.OutOfMemoryError) and (
                "can't allocate memory" not in str(e) and "not enough memory" not in str(e)):
            raise
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        raise GenerationFailed(
            "out of memory during this run; use a smaller size or batch, or load with --offload model_offload / "
            "group_offload", code="out_of_memory",
        ) from None
