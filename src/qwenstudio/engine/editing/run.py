"""Image-conditioned generation on the engine's own denoise loop.

One story for every mode, each step matching a diffusers reference pipeline on the same seed:

* **edit** (Qwen-Image-Edit / 2509 / 2511, ``QwenImageEditPipeline`` / ``QwenImageEditPlusPipeline``): the text
  encoder sees the images (``vision_text``), their VAE latents (mode of the posterior) are appended to the image
  token sequence with their own RoPE grid (``img_shapes``), and only the noisy tokens' prediction is used.
* **img2img** (``QwenImageImg2ImgPipeline``): start at ``sigmas[t_start]`` from ``s*noise + (1-s)*init``.
* **inpaint** (``QwenImageInpaintPipeline``; with an edit variant ``QwenImageEditInpaintPipeline``): additionally the
  prediction outside the (latent) mask is replaced by the init latents each step. For the reference's binary mask
  this gives the reference's trajectory exactly for every sampler (outside the mask ``x`` stays on
  ``s*noise + (1-s)*init``), and it is sampler-agnostic, unlike a post-step blend.
* **ControlNet** (``QwenImageControlNetPipeline``, union model, several controls summed): residuals computed from the
  conditional pass each step and added to the DiT blocks of both CFG passes.
* **ControlNet-inpaint** (``QwenImageControlNetInpaintPipeline``): selected by an image + a mask + an *inpainting*
  ControlNet (``extra_condition_channels > 0``, e.g. InstantX Qwen-Image-ControlNet-Inpainting) that the request uses
  (named by ``controlnet=``, or attached with one ``controls`` entry holding the same image, for its scale/start/
  end); an attached net the request does not use is ignored (plain inpaint). The control input is the VAE latents of
  the image with the (binarised) mask painted black (-1), concatenated with the (1 - mask) channel at latent size
  (nearest), packed to 68 channels per token. It starts from pure noise: no init latents, no strength, no blend;
  the output is composited onto the input like the other masked modes.

Seeds: under the ``diffusers`` convention each image's generator draws, in the reference's order, the VAE posterior
samples (control images, then the init image) and then the noise; under ``comfy`` the VAE posterior mode is used
and the noise is ComfyUI's one CPU stream. ControlNet-inpaint, ``diffusers``: the reference draws the masked
image's posterior sample with ``latent_dist.sample()`` from torch's *global* RNG (its generator draws only the
noise); we draw it from a separate CPU generator seeded with the image's seed, i.e. what the reference draws when
the global RNG is seeded with that seed (``torch.manual_seed(seed)``) right before it runs (batch 1, CPU VAE). The
run stays a pure function of the request, and image ``i`` of a batch equals the single run with seed ``seed + i``.

Pixel-aligned mode (``keep_size``): the input is padded (edge pixels, never stretched) to the 16-pixel grid, the
model runs at that size, the result is cropped back to the input's exact size, and with a mask every pixel outside
it is copied from the input, with a seam blended over ``feather`` pixels *inside* the mask.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Any

from ...errors import InvalidRequest
from .. import images as I
from .. import latents as L
from ..pipeline import Conditioning, DenoiseHooks, encode_prompts, run, schedule
from ..requests import GenerateRequest, GenerateResult
from .request import ControlRef, EditRequest


@dataclass(frozen=True)
class Control:
    """A control input for ``Engine.edit``: an image (path, bytes or PIL) plus how it acts."""

    image: Any
    mode: str = "other"
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0


def _coerce_control(value) -> Control:
    if isinstance(value, Control):
        return value
    if isinstance(value, dict) and "image" in value:
        return Control(**value)
    if isinstance(value, (tuple, list)) and 1 <= len(value) <= 5:
        return Control(*value)
    return Control(value)


def load_controlnet(engine, source) -> None:
    """Attach a ControlNet: a name from the models home (``engine.registry``, role ``controlnet``: a diffusers
    folder or a single safetensors file), a path to one (only when ``engine.allow_paths``), or a
    ``QwenImageControlNetModel`` (or the multi wrapper with one net). Loading the one already attached is a no-op."""
    from pathlib import Path

    from diffusers import QwenImageControlNetModel, QwenImageMultiControlNetModel

    from ...errors import IncompatibleWeights
    from .controlnet import load_controlnet_source, resolve_controlnet

    if isinstance(source, (str, Path)):
        path, name = resolve_controlnet(engine, str(source))
        if engine.controlnet is not None and engine.controlnet_path == path:
            engine.controlnet_name = name
            return
        model = load_controlnet_source(path, engine.components.transformer.config)
    else:
        model, name, path = source, type(source).__name__, None
    if isinstance(model, QwenImageMultiControlNetModel):
        if len(model.nets) != 1:
            raise IncompatibleWeights("only a single (union) ControlNet is supported")
        model = model.nets[0]
    if not isinstance(model, QwenImageControlNetModel):
        raise IncompatibleWeights(f"expected a QwenImageControlNetModel, got {type(model).__name__}")
    dit = engine.components.transformer.config
    if model.config.joint_attention_dim != dit.joint_attention_dim or (
        model.config.num_attention_heads * model.config.attention_head_dim
        != dit.num_attention_heads * dit.attention_head_dim
    ):
        raise IncompatibleWeights("the ControlNet does not match the loaded DiT's dimensions")
    c = engine.components
    engine.controlnet = model.to(device=c.device, dtype=c.dtype).eval()
    engine.controlnet_name = name
    engine.controlnet_path = path


def run_edit(engine, request=None, *, images=(), mask=None, controls=(), on_progress=None, preview_every=0,
             retry_fp32: bool = False, should_stop=None, **fields) -> GenerateResult:
    spec = engine.spec
    controls = [_coerce_control(c) for c in (controls or ())]
    images = list(images or ())
    if spec.is_edit and len(images) + len(controls) > spec.max_input_images:  # before decoding anything
        raise InvalidRequest(f"'{spec.name}' takes at most {spec.max_input_images} input image(s); got "
                             f"{len(images) + len(controls)}", code="too_many_images")
    if len(images) + len(controls) > 8:
        raise InvalidRequest("too many input images", code="too_many_images")
    loaded = [I.load_image(x, what=f"image {i + 1}") for i, x in enumerate(images)]
    lmask = I.load_image(mask, what="mask", mask=True) if mask is not None else None
    lctrl = [I.load_image(c.image, what=f"control image {i + 1}") for i, c in enumerate(controls)]
    refs = {
        "images": tuple(x.ref for x in loaded),
        "mask": lmask.ref if lmask else None,
        "controls": tuple(ControlRef(x.ref, c.mode, c.scale, c.start, c.end) for x, c in zip(lctrl, controls)),
    }
    if request is None:
        request = EditRequest(**fields, **refs)
    else:
        if fields:
            raise InvalidRequest("pass either a request or keyword fields, not both")
        if not isinstance(request, EditRequest):
            data = request.to_dict() if isinstance(request, GenerateRequest) else dict(request)
            request = EditRequest.from_dict(data)
        request = bind_inputs(request, refs)
    req = engine.prepare(request)
    notes: list[str] = []
    _apply_dit_config(engine, notes)
    if req.controlnet:  # named in the request (CLI --controlnet, a server job, a stored request): load it
        engine.load_controlnet(req.controlnet)
    elif req.controls and not spec.is_edit and engine.controlnet_path is not None:
        from dataclasses import replace

        req = replace(req, controlnet=engine.controlnet_name)  # attached by name: record it for re-creation
    if req.controls and not spec.is_edit and engine.controlnet is None:
        raise InvalidRequest("control images need a ControlNet: load one (--controlnet NAME / "
                             "engine.load_controlnet(...)), or use qwen-image-edit-2509 which takes them as images",
                             code="missing_controlnet")
    mask_img = lmask.image if lmask else None
    if mask_img is not None and mask_img.size != loaded[0].image.size:
        msg = f"mask is {mask_img.size[0]}x{mask_img.size[1]}, image is " \
              f"{loaded[0].image.size[0]}x{loaded[0].image.size[1]}: the mask was resized to the image"
        warnings.warn(msg, stacklevel=2)
        notes.append(msg)
        mask_img = mask_img.resize(loaded[0].image.size, resample=_bilinear())
    conditioner = EditConditioner([x.image for x in loaded], mask_img, [x.image for x in lctrl], notes)
    return run(engine, req, conditioner, on_progress=on_progress, preview_every=preview_every,
               retry_fp32=retry_fp32, should_stop=should_stop)


def bind_inputs(request: EditRequest, refs: dict) -> EditRequest:
    """A stored request names its inputs by hash: the given files must be those (or the request names none)."""
    from dataclasses import replace

    out = {}
    for key in ("images", "mask"):
        stored, given = getattr(request, key), refs[key]
        if stored and stored != given:
            raise InvalidRequest(f"the given {key} are not the ones this request was made with (content hashes "
                                 "differ)", code="image_mismatch")
        out[key] = given
    stored_c = request.controls
    if stored_c:
        if tuple(c.image for c in stored_c) != tuple(c.image for c in refs["controls"]):
            raise InvalidRequest("the given control images are not the ones this request was made with",
                                 code="image_mismatch")
        out["controls"] = stored_c
    else:
        out["controls"] = refs["controls"]
    return replace(request, **out)


def _bilinear():
    from PIL import Image

    return Image.BILINEAR


def _apply_dit_config(engine, notes: list) -> None:
    """Edit-2511 needs ``zero_cond_t``; a DiT loaded from a file without that config gets it switched on (it is a
    forward-time flag, no weights), and the metadata says so."""
    want = engine.spec.dit_config.get("zero_cond_t")
    model = engine.components.transformer
    if want is None or bool(getattr(model, "zero_cond_t", False)) == bool(want):
        return
    model.zero_cond_t = bool(want)
    for block in getattr(model, "transformer_blocks", ()):
        block.zero_cond_t = bool(want)
    model.register_to_config(zero_cond_t=bool(want))
    notes.append(f"zero_cond_t set to {bool(want)} on the DiT for {engine.spec.name}")


class _Inputs:
    """The inputs placed on the model's grid (working size ``W`` x ``H``; output ``ow`` x ``oh``)."""

    def __init__(self, req: EditRequest, imgs: list, mask, ctrls: list):
        self.W, self.H = req.width, req.height
        self.keep = bool(req.keep_size)
        anchor = imgs[0] if imgs else ctrls[0]
        self.anchor = anchor
        self.ow, self.oh = anchor.size if self.keep else (self.W, self.H)

    def fit(self, img):
        """To the working grid: pixel-aligned (resize only to the anchor's size if needed, then pad), else resize."""
        if self.keep:
            if img.size != self.anchor.size:
                img = I.resize(img, *self.anchor.size)
            return I.pad_to(img, self.W, self.H)
        return I.resize(img, self.W, self.H)


class EditConditioner:
    """The image-conditioned modes as one conditioner of the shared pipeline: the prompts (edit variants: the text
    encoder sees the images), the VAE encodes in the reference's generator order (controls, init image, then the
    noise), the start point (img2img/inpaint: ``strength``), the hooks (reference latents, ControlNet residuals,
    inpaint blend) and ``finish`` (crop back to the input grid, composite outside the mask)."""

    def __init__(self, images: list, mask, controls: list, notes: list):
        self.images, self.mask, self.controls, self.notes = images, mask, controls, notes

    def prepare(self, engine, req: EditRequest, timings: dict) -> Conditioning:
        import torch

        imgs, mask_img, ctrl_imgs = self.images, self.mask, self.controls
        spec, c = engine.spec, engine.components
        t0 = time.perf_counter()
        geo = _Inputs(req, imgs, mask_img, ctrl_imgs)
        W, H = geo.W, geo.H
        lh, lw = L.latent_hw(W, H)
        batch = req.batch
        diffusers_noise = req.noise == "diffusers"
        gens = [torch.Generator().manual_seed(s) for s in req.image_seeds()] if diffusers_noise else None
        cn_inpaint = _controlnet_inpaint(engine, req)  # the image + mask are the ControlNet's input, not init latents
        use_init = bool(imgs) and not cn_inpaint and (not spec.is_edit or mask_img is not None or req.strength < 1.0)

        # -- 1. prompts (edit variants: the text encoder sees the images) ----------------------------------------------
        use_cfg = req.cfg > 1.0
        with engine.stages.on_device("text_encoder"):
            if spec.is_edit:
                vl_imgs = imgs + ctrl_imgs
                vl_refs = tuple(r.sha256 for r in req.images) + tuple(x.image.sha256 for x in req.controls)
                cond_imgs = [_condition_image(spec, im) for im in vl_imgs]
                keys = tuple(zip(vl_refs, (im.size for im in cond_imgs)))
                enc = engine.vision_prompts
                cond = enc.encode(req.full_prompt(), cond_imgs, keys)
                uncond = enc.encode(req.negative_prompt, cond_imgs, keys) if use_cfg else None
            else:
                cond, uncond = encode_prompts(engine, req)
        timings["text_encode"] = time.perf_counter() - t0

        # -- 2. VAE encodes, in the reference's generator order: controls, init image, then noise ----------------------
        t_enc = time.perf_counter()
        with engine.stages.on_device("vae"):
            engine.stages.set_vae_tiling(W * H)
            if cn_inpaint:
                control_lat = [_masked_control(c.vae, geo, imgs[0], mask_img, req, batch, sample=diffusers_noise)]
            else:
                control_lat = [_encode(c.vae, geo.fit(im), gens, batch, sample=diffusers_noise)
                               for im in ctrl_imgs] if not spec.is_edit else []
            init_lat = _encode(c.vae, geo.fit(imgs[0]), gens, batch, sample=diffusers_noise) if use_init else None
            ref_tokens, ref_shapes = None, ()
            if spec.is_edit:
                refs, shapes = [], []
                for k, im in enumerate(imgs + ctrl_imgs):
                    if k == 0 and init_lat is not None:
                        lat = init_lat  # edit-inpaint: the reference appends the (sampled) init latents
                    else:
                        px = geo.fit(im) if (k == 0 and geo.keep) else I.resize(
                            im, *I.area_dimensions(spec.edit_area, im.size[0] / im.size[1]))
                        lat = _encode(c.vae, px, None, batch, sample=False)
                    refs.append(L.pack(lat))
                    shapes.append((1, lat.shape[-2] // 2, lat.shape[-1] // 2))
                ref_tokens, ref_shapes = torch.cat(refs, dim=1), tuple(shapes)
        timings["vae_encode"] = time.perf_counter() - t_enc

        # -- 3. noise, schedule, start point -----------------------------------------------------------------------
        if diffusers_noise:
            noise = torch.cat([torch.randn((1, L.LATENT_CHANNELS, lh, lw), generator=g) for g in gens])
        else:
            noise = L.make_noise(seeds=req.image_seeds(), convention="comfy", width=W, height=H, skip=req.noise_skip)
        noise = L.pack(noise)
        sigmas = schedule(engine, req, noise.shape[1])
        x = noise
        init_packed = None
        if init_lat is not None:
            n = len(sigmas) - 1
            t_start = int(max(n - min(n * req.strength, n), 0))  # the reference's get_timesteps
            sigmas = sigmas[t_start:]
            if len(sigmas) < 2:
                raise InvalidRequest(f"strength {req.strength} leaves no steps out of {n}; raise strength or steps",
                                     code="invalid_strength")
            init_packed = L.pack(init_lat)
            s0 = sigmas[0].to(torch.float32)
            x = s0 * noise + (1.0 - s0) * init_packed
        x = x.to(c.device)

        control_specs = (list(req.controls) or [ControlRef(req.images[0])]) if cn_inpaint else list(req.controls)
        hooks = _hooks(engine, geo, None if cn_inpaint else mask_img, init_packed, control_lat, control_specs,
                       ref_tokens, ref_shapes, lh, lw)

        def finish(decoded: list) -> list:
            """Crop back to the input grid; with a mask, every pixel outside it comes from the input."""
            out_imgs = [im.crop((0, 0, geo.ow, geo.oh)) if im.size != (geo.ow, geo.oh) else im for im in decoded]
            if mask_img is not None:
                base = imgs[0] if geo.keep else I.resize(imgs[0], W, H)
                m = mask_img if geo.keep else I.resize(mask_img, W, H)
                out_imgs = [composite(base, im, m, req.feather) for im in out_imgs]
            return out_imgs

        meta: dict[str, Any] = {"mode": "controlnet-inpaint" if cn_inpaint else _mode(spec, req, mask_img),
                                "size": {"width": geo.ow, "height": geo.oh, "model_width": W, "model_height": H}}
        if (req.controls or cn_inpaint) and not spec.is_edit:
            meta["controlnet"] = engine.controlnet_name
        if self.notes:
            meta["notes"] = list(self.notes)
        return Conditioning(cond, uncond, x, sigmas, lh, lw, hooks=hooks, finish=finish, metadata=meta)


def _mode(spec, req, mask_img) -> str:
    if spec.is_edit:
        return "edit-inpaint" if mask_img is not None else "edit"
    if mask_img is not None:
        return "inpaint"
    if req.images:
        return "img2img+controlnet" if req.controls else "img2img"
    return "controlnet"


def _controlnet_inpaint(engine, req) -> bool:
    """ControlNet-inpaint mode: a base model, an image + mask, and an inpainting ControlNet the request uses (named,
    or given ``controls``). An attached ControlNet the request does not ask for is not used (plain inpaint)."""
    net = engine.controlnet
    if engine.spec.is_edit or net is None or req.mask is None or not (req.controlnet or req.controls):
        return False
    from .controlnet import uses_inpaint_controlnet

    return uses_inpaint_controlnet(req, int(net.config.extra_condition_channels or 0), engine.controlnet_name)


def _condition_image(spec, img):
    """What the VL path sees: ~``condition_area`` pixels (2509/2511), or the VAE-sized image (Edit)."""
    area = spec.condition_area or spec.edit_area
    return I.resize(img, *I.area_dimensions(area, img.size[0] / img.size[1]))


def _encode(vae, img, gens, batch: int, *, sample: bool):
    """PIL RGB -> normalised latents [B, 16, h, w]. ``sample``: draw the posterior sample from each image's
    generator (the reference's ``retrieve_latents`` in sample mode); else its mode (mean)."""
    return _encode_pixels(vae, I.to_tensor(img), gens, batch, sample=sample)


def _masked_control(vae, geo: _Inputs, img, mask_img, req, batch: int, *, sample: bool):
    """The inpainting ControlNet's input [B, 17, h, w], as the reference's ``prepare_image_with_mask``: the image
    with the binarised mask (>= 0.5) painted -1, VAE-encoded and normalised, then ``1 - mask`` at latent size
    (nearest). ``sample``: the posterior sample, drawn per image from a fresh generator seeded with the image's
    seed (the reference draws it from the global RNG; see the module docstring); else the posterior mode."""
    import torch

    px = I.to_tensor(geo.fit(img))
    m = torch.from_numpy(I.mask_to_array(geo.fit(mask_img.convert("L")))) >= 0.5
    px = px.masked_fill(m[None, None], -1.0)
    gens = [torch.Generator().manual_seed(s) for s in req.image_seeds()] if sample else None
    lat = _encode_pixels(vae, px, gens, batch, sample=sample)
    keep = 1.0 - torch.nn.functional.interpolate(m.float()[None, None], size=tuple(lat.shape[-2:]))
    return torch.cat([lat, keep.expand(lat.shape[0], -1, -1, -1)], dim=1)


def _encode_pixels(vae, px, gens, batch: int, *, sample: bool):
    """[1, 3, H, W] pixels in [-1, 1] -> normalised latents [B, 16, h, w] (see ``_encode``)."""
    import torch

    px = px.unsqueeze(2).to(device=vae.device, dtype=vae.dtype)
    dist = vae.encode(px).latent_dist
    mean, std = dist.mean.float(), dist.std.float()
    if sample:
        eps = torch.cat([torch.randn(mean.shape, generator=g) for g in gens]).to(mean.device)
        lat = mean + std * eps
    else:
        lat = mean.expand(batch, -1, -1, -1, -1)
    cfg = vae.config
    lmean = torch.tensor(cfg.latents_mean, device=lat.device).view(1, cfg.z_dim, 1, 1, 1)
    lstd = torch.tensor(cfg.latents_std, device=lat.device).view(1, cfg.z_dim, 1, 1, 1)
    return ((lat - lmean) / lstd)[:, :, 0].cpu()


def _hooks(engine, geo: _Inputs, mask_img, init_packed, control_lat, control_specs, ref_tokens, ref_shapes, lh, lw):
    import torch

    device = engine.components.device
    blend = None
    if mask_img is not None:
        m = I.mask_to_array(geo.fit(mask_img.convert("L")))
        mt = (torch.from_numpy(m) >= 0.5).float()[None, None]  # binarised, as the reference mask processor
        mt = torch.nn.functional.interpolate(mt, size=(lh, lw))  # nearest, as the reference
        mpacked = L.pack(mt.repeat(1, L.LATENT_CHANNELS, 1, 1)).to(device)
        known = init_packed.to(device)

        def blend(denoised):
            return (1 - mpacked) * known + mpacked * denoised

    control = None
    if control_lat:
        net = engine.controlnet
        dtype = engine.components.dtype
        conds = [L.pack(cl).to(device=device, dtype=dtype) for cl in control_lat]
        specs = list(control_specs)

        def control(xin, t, embeds, img_shapes, i, total):
            out = None
            for cond, cr in zip(conds, specs):
                keep = 1.0 - float(i / total < cr.start or (i + 1) / total > cr.end)
                scale = float(cr.scale) * keep
                if scale == 0.0:
                    continue
                res = net(hidden_states=xin, controlnet_cond=cond, conditioning_scale=scale, timestep=t,
                          encoder_hidden_states=embeds, encoder_hidden_states_mask=None, img_shapes=img_shapes,
                          return_dict=False)
                out = list(res) if out is None else [a + b for a, b in zip(out, res)]
            return out

    return DenoiseHooks(ref_tokens=ref_tokens, ref_shapes=ref_shapes, control=control, blend=blend)


def composite(base, generated, mask, feather: int):
    """Pixels where the mask is < 0.5 come from ``base`` exactly; inside it the generated image, blended in over
    ``feather`` pixels from the mask's edge (the seam lies inside the mask, never outside)."""
    import numpy as np
    from PIL import Image, ImageFilter

    b = (np.asarray(mask.convert("L"), dtype=np.float32) >= 127.5).astype(np.float32)
    alpha = b
    if feather > 0 and b.any():
        blurred = np.asarray(Image.fromarray((b * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(feather)),
                             dtype=np.float32) / 255.0
        alpha = b * np.clip(2.0 * blurred - 1.0, 0.0, 1.0) ** 0.5
    src = np.asarray(base.convert("RGB"), dtype=np.float32)
    gen = np.asarray(generated.convert("RGB"), dtype=np.float32)
    outv = src * (1.0 - alpha[..., None]) + gen * alpha[..., None]
    outv = np.where(alpha[..., None] == 0.0, src, outv)  # exact copy outside the mask
    return Image.fromarray(np.clip(outv.round(), 0, 255).astype(np.uint8), "RGB")
