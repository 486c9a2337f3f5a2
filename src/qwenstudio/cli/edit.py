"""``qwenstudio edit``: image-conditioned generation from the command line (registered in ``cli/main.py``).

Thin: parse, build an ``EditRequest`` through ``Engine.edit``, save PNGs with metadata. The input images are
referenced in the metadata by content hash and size; errors print one line and exit 2.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer


def edit(
    prompt: str | None = typer.Argument(None, help="What to change (edit models) or draw (img2img/inpaint/"
                                        "ControlNet); optional with --from-image."),
    image: list[Path] = typer.Option([], "--image", "-i", help="Input image (PNG/JPEG/WebP; repeatable: up to 3 "
                                     "for qwen-image-edit-2509/2511)."),
    mask: Path | None = typer.Option(None, "--mask", help="Inpaint mask: white (or transparent) = change."),
    strength: float | None = typer.Option(None, help="How much to change, 0-1 (img2img/inpaint; default 0.6, "
                                             "1.0 for edit models)."),
    control: list[Path] = typer.Option([], "--control", help="Control image (repeatable). Base models: needs "
                                       "--controlnet; edit-2509/2511: taken as one more input image."),
    control_mode: list[str] = typer.Option([], "--control-mode", help="Kind of each --control (canny, depth, pose, "
                                           "soft_edge, ...); one value applies to all."),
    control_scale: list[float] = typer.Option([], "--control-scale", help="ControlNet scale per --control "
                                              "(default 1.0; one value applies to all)."),
    controlnet: str | None = typer.Option(None, "--controlnet", help="ControlNet: a name from the models dirs "
                                          "(`qwenstudio models`; a diffusers folder or one safetensors file) or a "
                                          "path to one."),
    keep_size: bool | None = typer.Option(None, "--keep-size/--no-keep-size", help="Output at the input's exact "
                                             "size, pixel-aligned (default: on with --mask)."),
    feather: int = typer.Option(4, help="Seam blend inside the mask, in pixels."),
    model: str = typer.Option("tiny", "--model", "-m", help="'tiny', a model name, a diffusers folder or DiT file."),
    variant: str | None = typer.Option(None, help="Recipe, e.g. qwen-image-edit-2509 (see `qwenstudio models`)."),
    text_encoder: str | None = typer.Option(None, "--text-encoder", help="Text encoder name (single-file DiTs)."),
    vae: str | None = typer.Option(None, "--vae", help="VAE name (single-file DiTs)."),
    models_dir: list[Path] = typer.Option([], "--models-dir", help="Extra models dir (repeatable)."),
    negative: str | None = typer.Option(None, "--negative", "-n", help="Negative prompt (used when CFG > 1)."),
    steps: int | None = typer.Option(None, help="Denoising steps (before strength)."),
    cfg: float | None = typer.Option(None, help="True CFG scale; <= 1 skips the negative pass."),
    seed: int | None = typer.Option(None, help="Seed (random if omitted; always recorded)."),
    width: int | None = typer.Option(None, help="Working width (multiple of 16; not with --keep-size)."),
    height: int | None = typer.Option(None, help="Working height (multiple of 16; not with --keep-size)."),
    sampler: str | None = typer.Option(None, help="euler, euler_ancestral, dpmpp_2m, heun, ..."),
    scheduler: str | None = typer.Option(None, help="reference, simple, normal, karras, ..."),
    shift: float | None = typer.Option(None, help="Sigma shift."),
    batch: int = typer.Option(1, help="Images per run."),
    noise: str = typer.Option("diffusers", help="Seed convention: diffusers or comfy."),
    magic: str | None = typer.Option(None, help="Append the official positive-magic suffix: en or zh."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Output .png file or folder (default ./outputs)."),
    from_image: Path | None = typer.Option(None, "--from-image", help="Re-create a PNG from its metadata (give the "
                                           "same --image/--mask/--control files; its ControlNet is loaded by name)."),
    retry_fp32: bool = typer.Option(False, "--retry-fp32", help="If latents go NaN/inf, retry once in fp32."),
    as_json: bool = typer.Option(False, "--json", help="Print results as JSON."),
    device: str | None = typer.Option(None, help="cuda, cuda:1, cpu."),
    dtype: str | None = typer.Option(None, help="bfloat16, float16, float32."),
    offload: str = typer.Option("auto", help="auto, resident, model_offload, group_offload, cpu."),
    compile: str = typer.Option("auto", "--compile", help="Regional compile: auto (off for one run), on, off."),
    attention: str = typer.Option("auto", "--attention", help="auto, sdpa, math, flash, flash3, sage, xformers."),
    quant: str | None = typer.Option(None, "--quant", help="fp8: fp8 compute on a bf16/fp32 model."),
    cache: str | None = typer.Option(None, "--cache", help="Step cache threshold (e.g. 0.08; off by default)."),
) -> None:
    """Edit / img2img / inpaint / ControlNet. Example: qwenstudio edit "make it night" --image in.png --model tiny"""
    from ..errors import InvalidRequest, QwenStudioError
    from ..outputs import save_png

    try:
        controls = _controls(control, control_mode, control_scale)
        request = None
        if from_image is not None:
            request, variant = _stored_request(from_image, prompt, model, variant, controlnet)
            fields = {}
        else:
            if prompt is None:
                raise InvalidRequest("give a prompt (or --from-image PNG)")
            fields = dict(prompt=prompt, negative_prompt=negative, width=width, height=height, steps=steps,
                          cfg=cfg, sampler=sampler, scheduler=scheduler, shift=shift, seed=seed, batch=batch,
                          noise=noise, magic=magic, strength=strength, keep_size=keep_size, feather=feather)
        spec = _spec(model, variant)
        named = controlnet if request is None else request.controlnet
        if not spec.is_edit and controls and named is None:
            raise InvalidRequest("--control on a base model needs --controlnet NAME (or use an edit-2509/2511 "
                                 "variant, which takes control images as input images)", code="missing_controlnet")
        if controlnet is not None and request is None and not spec.is_edit:
            fields["controlnet"] = controlnet  # loaded by run_edit and recorded in the metadata
        elif controlnet is not None and spec.is_edit:
            raise InvalidRequest(f"'{spec.name}' takes control images as input images; --controlnet is for base "
                                 "models", code="invalid_control")
        from ..engine.acceleration import speed_options
        from ..engine.engine import Engine

        engine = Engine.load(model, variant=spec.name, device=device, dtype=dtype, offload=offload,
                             text_encoder=text_encoder, vae=vae, models_dirs=tuple(models_dir),
                             **speed_options(compile=compile, attention=attention, quant=quant, cache=cache))
        result = engine.edit(request, images=list(image), mask=mask, controls=controls, retry_fp32=retry_fp32,
                             **fields)
        if spec.builtin and not as_json:
            typer.echo("note: the 'tiny' model has random weights; its images are noise (smoke test only).", err=True)
    except QwenStudioError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None

    paths = _output_paths(out, len(result.images), [im.metadata["seed"] for im in result.images])
    for im, path in zip(result.images, paths):
        save_png(im.image, im.metadata, path)
    if as_json:
        typer.echo(json.dumps({"images": [{"path": str(p), **im.metadata} for im, p in zip(result.images, paths)],
                               "timings": result.timings}, indent=2, default=str))
    else:
        for im, path in zip(result.images, paths):
            typer.echo(f"saved {path}  ({im.metadata['mode']}, seed {im.metadata['seed']}, "
                       f"{result.timings['total']:.2f}s)")


def _stored_request(path: Path, prompt: str | None, model: str, variant: str | None, controlnet: str | None):
    """The ``EditRequest`` stored in a PNG made by ``edit`` (the prompt and ControlNet may be overridden)."""
    from dataclasses import replace

    from ..engine.editing import EditRequest
    from ..errors import InvalidRequest
    from ..outputs import read_png_metadata

    meta = read_png_metadata(path)
    request = EditRequest.from_dict(dict(meta["request"]))
    if prompt is not None:
        request = replace(request, prompt=prompt)
    if controlnet is not None:
        request = replace(request, controlnet=controlnet)
    made_with = meta.get("model", {}).get("variant")
    if model == "tiny" and made_with not in (None, "tiny", "tiny-edit", "tiny-edit-plus", "tiny-edit-2511"):
        raise InvalidRequest(f"{path} was made with '{meta['model'].get('name')}'; pass --model with that model")
    return request, variant or made_with


def _spec(model: str, variant: str | None):
    from ..engine.registry import guess_variant
    from ..engine.specs import SPECS, get_spec

    if variant:
        return get_spec(variant)
    name = Path(model).stem if model.endswith((".safetensors", ".gguf")) else Path(model).name
    guessed = guess_variant(name)
    n = name.lower().replace("_", "-")
    if "edit" in n and not get_spec(guessed).is_edit:  # the registry's guess predates the edit variants
        base = next((v for v in ("qwen-image-edit-2511", "qwen-image-edit-2509") if v[len("qwen-image-edit-"):] in n),
                    "qwen-image-edit")
        steps = "4step" if "4step" in n else "8step" if "8step" in n else None
        guessed = f"{base}-lightning-{steps}" if "lightning" in n and steps and f"{base}-lightning-{steps}" in SPECS \
            else base
    return get_spec(guessed)


def _controls(images: list[Path], modes: list[str], scales: list[float]) -> list:
    from ..engine.editing import Control
    from ..errors import InvalidRequest

    def per(values, default, what):
        if not values:
            return [default] * len(images)
        if len(values) == 1:
            return list(values) * len(images)
        if len(values) != len(images):
            raise InvalidRequest(f"give one {what} per --control (or a single one for all)", code="invalid_control")
        return list(values)

    modes_ = per(modes, "other", "--control-mode")
    scales_ = per(scales, 1.0, "--control-scale")
    return [Control(img, m, s) for img, m, s in zip(images, modes_, scales_)]


def _output_paths(out: Path | None, n: int, seeds: list[int]) -> list[Path]:
    if out is not None and out.suffix.lower() == ".png":
        return [out] if n == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(n)]
    folder = out or Path("outputs")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return [folder / f"qwen-edit-{stamp}-{seeds[i]}-{i}.png" for i in range(n)]
