"""``qwenstudio generate`` and ``qwenstudio edit``: parse, call the engine, save, print — nothing else.

Both take the same request options (``cli/options.py``, from the one field table). The CLI never fills a default:
an option the user did not type stays unset, and ``Engine.prepare`` fills it from the preset, a LoRA's recipe
(Lightning: 8 steps, CFG 1, shift 3) or the variant, recording where each value came from. Errors print one line
and exit 2; warnings (a guessed variant, a partial LoRA match) print as ``warning: ...`` lines and go into the JSON.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Optional

import typer

from ..errors import InvalidRequest, QwenStudioError
from .options import RunOptions, request_options


@request_options("generate")
def generate(
    prompt: Optional[str] = typer.Argument(None, help="What to draw (optional with --from-image)."),
    control: list[Path] = typer.Option([], "--control", help="Control image for --controlnet (repeatable)."),
    control_mode: list[str] = typer.Option([], "--control-mode", help="Kind of each --control (canny, depth, "
                                           "pose, soft_edge, ...); one value applies to all."),
    control_scale: list[float] = typer.Option([], "--control-scale", help="ControlNet scale per --control "
                                              "(default 1.0; one value applies to all)."),
    controlnet: Optional[str] = typer.Option(None, "--controlnet", help="ControlNet name from the models dirs "
                                             "(or a path) that --control images drive."),
    *, fields: dict, run: RunOptions, loras: tuple,
) -> None:
    """Text-to-image. Example: qwenstudio generate "a red fox" --model tiny --seed 1"""
    if (controlnet and not control) or (control and not controlnet and run.from_image is None):
        _fail(InvalidRequest("--control and --controlnet go together", code="missing_controlnet"))
    _run(prompt, fields, run, loras, images=[], mask=None, controls=(control, control_mode, control_scale),
         controlnet=controlnet, edit_mode=bool(control))


@request_options("edit")
def edit(
    prompt: Optional[str] = typer.Argument(None, help="What to change (edit models) or draw (img2img/inpaint/"
                                           "ControlNet); optional with --from-image."),
    image: list[Path] = typer.Option([], "--image", "-i", help="Input image (PNG/JPEG/WebP; repeatable: up to 3 "
                                     "for qwen-image-edit-2509/2511)."),
    mask: Optional[Path] = typer.Option(None, "--mask", help="Inpaint mask: white (or transparent) = change."),
    control: list[Path] = typer.Option([], "--control", help="Control image (repeatable). Base models: needs "
                                       "--controlnet; edit-2509/2511: taken as one more input image."),
    control_mode: list[str] = typer.Option([], "--control-mode", help="Kind of each --control (canny, depth, pose, "
                                           "soft_edge, ...); one value applies to all."),
    control_scale: list[float] = typer.Option([], "--control-scale", help="ControlNet scale per --control "
                                              "(default 1.0; one value applies to all)."),
    controlnet: Optional[str] = typer.Option(None, "--controlnet", help="ControlNet: a name from the models dirs "
                                             "(a diffusers folder or one safetensors file) or a path to one."),
    *, fields: dict, run: RunOptions, loras: tuple,
) -> None:
    """Edit / img2img / inpaint / ControlNet. Example: qwenstudio edit "make it night" --image in.png --model tiny"""
    _run(prompt, fields, run, loras, images=list(image), mask=mask, controls=(control, control_mode, control_scale),
         controlnet=controlnet, edit_mode=True)


def _fail(err: Exception) -> None:
    typer.echo(f"error: {err}", err=True)
    raise typer.Exit(2)


def _run(prompt, fields: dict, run: RunOptions, loras: tuple, *, images, mask, controls, controlnet,
         edit_mode: bool) -> None:
    caught: list[str] = []
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            result, paths = _generate(prompt, fields, run, loras, images, mask, controls, controlnet, edit_mode)
            caught = _unique(str(w.message) for w in seen if not issubclass(w.category, DeprecationWarning))
    except QwenStudioError as e:
        _fail(e)
        return
    for msg in caught:
        if not run.as_json:
            typer.echo(f"warning: {msg}", err=True)
    if run.as_json:
        typer.echo(json.dumps({"images": [{"path": str(p), **im.metadata} for im, p in zip(result.images, paths)],
                               "timings": result.timings, "warnings": caught}, indent=2, default=str))
        return
    for im, path in zip(result.images, paths):
        mode = im.metadata.get("mode")
        typer.echo(f"saved {path}  ({mode + ', ' if mode else ''}seed {im.metadata['seed']}, "
                   f"{result.timings['total']:.2f}s)")


def _unique(messages) -> list[str]:
    return list(dict.fromkeys(messages))


def _generate(prompt, fields, run: RunOptions, loras, images, mask, controls, controlnet, edit_mode):
    from ..engine.editing import EditRequest
    from ..engine.engine import Engine
    from ..engine.fields import check_bounds
    from ..engine.job import EngineJob, local_job, run_job
    from ..engine.lora import parse_lora_arg, parse_stack_spec
    from ..engine.requests import GenerateRequest
    from ..outputs import save_png

    _check_out(run.out)
    lora_args, loras_text = loras
    stack = [parse_lora_arg(x) for x in lora_args] + (parse_stack_spec(loras_text) if loras_text else [])
    check_bounds(fields)  # a typo'd number fails before anything is loaded
    variant, stored = run.variant, {}
    if run.from_image is not None:
        request, made_with, stored = _stored_request(run.from_image, prompt, fields, stack, controlnet, run)
        variant = variant or made_with
        edit_mode = edit_mode or isinstance(request, EditRequest)
    else:
        if prompt is None:
            raise InvalidRequest("give a prompt (or --from-image PNG)")
        data = dict(fields, prompt=prompt, loras=stack)
        if controlnet is not None:
            data["controlnet"] = controlnet
        request = (EditRequest if edit_mode else GenerateRequest)(**data)
    from ..engine.acceleration import speed_options

    cache = run.cache if run.cache is not None else stored.get("cache")
    quant = run.quant if run.quant is not None else stored.get("quant")
    speed = speed_options(compile=run.compile, attention=run.attention, quant=quant, cache=cache)
    engine = Engine.load(run.model, variant=variant, device=run.device, dtype=run.dtype, offload=run.offload,
                         text_encoder=run.text_encoder, vae=run.vae, models_dirs=run.models_dir,
                         vram_budget=run.vram_budget, **speed)
    if request.preset:
        engine.preset_lookup = _local_presets()
    if engine.spec.builtin:
        warnings.warn("the 'tiny' model has random weights; its images are noise (smoke test only)", stacklevel=1)
    if edit_mode:
        if engine.spec.is_edit and controlnet is not None:
            raise InvalidRequest(f"'{engine.spec.name}' takes control images as input images; --controlnet is for "
                                 "base models", code="invalid_control")
        if not engine.spec.is_edit and controls[0] and controlnet is None and not getattr(request, "controlnet", None):
            raise InvalidRequest("--control on a base model needs --controlnet NAME (or use an edit-2509/2511 "
                                 "variant, which takes control images as input images)", code="missing_controlnet")
        job, store = local_job("cli", engine.spec.name, request, images=images, mask=mask,
                               controls=control_inputs(*controls))
    else:
        job, store = EngineJob("cli", engine.spec.name, request), None
    result = _with_progress(run.as_json, lambda cb: run_job(engine, job, store, on_progress=cb,
                                                            retry_fp32=run.retry_fp32))
    paths = _output_paths(run.out, len(result.images), [im.metadata["seed"] for im in result.images],
                          "qwen-edit" if edit_mode else "qwen")
    for im, path in zip(result.images, paths):
        save_png(im.image, im.metadata, path)
    return result, paths


def _stored_request(path: Path, prompt, fields: dict, stack: list, controlnet, run: RunOptions):
    """The request stored in a PNG (ours, or another tool's ``parameters``), with what the user typed on top."""
    from dataclasses import replace

    from ..engine.editing import EditRequest
    from ..engine.requests import GenerateRequest
    from ..outputs import read_png_metadata

    meta = read_png_metadata(path)
    pasted = meta.get("pasted") or {}  # another tool's PNG: say what was adjusted and what did not map
    for note in [*pasted.get("warnings", []), *(f"not mapped: {u}" for u in pasted.get("unmapped", []))]:
        warnings.warn(note, stacklevel=1)
    data = dict(meta["request"])
    if pasted:  # ... and the new PNG keeps it: where the settings came from, and what was left behind
        data["extra"] = {**(data.get("extra") or {}), "pasted_from": {
            "source": pasted.get("source"), "file": path.name, "unmapped": pasted.get("unmapped", []),
            "warnings": pasted.get("warnings", [])}}
    controlled = any(data.get(k) for k in ("images", "mask", "controls"))
    request = (EditRequest if controlled else GenerateRequest).from_dict(data)
    overrides = dict(fields)
    if prompt is not None:
        overrides["prompt"] = prompt
    if stack:
        overrides["loras"] = tuple(stack)
    if controlnet is not None and controlled:
        overrides["controlnet"] = controlnet
    if overrides:  # a changed setting is the user's: its provenance is re-decided
        request = replace(request, **overrides, settings_from=None)
    made_with = meta.get("model", {}).get("variant")
    if run.model == "tiny" and made_with not in (None, "tiny", "tiny-edit", "tiny-edit-plus", "tiny-edit-2511"):
        raise InvalidRequest(f"{path} was made with '{meta['model'].get('name')}'; pass --model with that model")
    # the step cache and a quantize-on-load change the pixels: a re-run uses the ones the image was made with
    # (unless --cache / --quant is given)
    acc = meta.get("model", {}).get("acceleration") or {}
    return request, made_with, {k: acc[k] for k in ("cache", "quant") if acc.get(k) is not None}


def _local_presets():
    """Presets saved through the studio/API on this machine (the server's store under the qwenstudio home)."""
    from ..config import Settings
    from ..errors import ModelNotFound
    from ..service.app import DB_NAME

    path = Settings.from_env().home / DB_NAME
    shared = os.environ.get("QWENSTUDIO_STORE")  # the store `serve --store` shares between nodes

    def lookup(name: str) -> dict:
        if not shared and not path.is_file():
            raise ModelNotFound(f"no preset named '{name}' (no presets saved on this machine yet)",
                                code="preset_not_found")
        from ..service.store import Store

        store = Store(shared or path)
        try:
            preset = store.find_preset(name)
        finally:
            store.close()
        if preset is None:
            raise ModelNotFound(f"no preset named '{name}'", code="preset_not_found")
        return preset["params"]

    return lookup


def _with_progress(quiet: bool, call):
    if quiet or not sys.stderr.isatty():
        return call(None)
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    with Progress(TextColumn("[bold]denoising"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), TimeRemainingColumn(), transient=True) as bar:
        task = bar.add_task("denoise", total=None)
        return call(lambda p: bar.update(task, total=p.total, completed=p.step))


def _check_out(out: Optional[Path]) -> None:
    if out is not None and out.suffix and out.suffix.lower() != ".png" and not out.is_dir():
        raise InvalidRequest(f"--out {out}: qwenstudio writes PNG files only (their metadata re-creates the image); "
                             "give a .png name or a folder", code="invalid_output")


def _output_paths(out: Optional[Path], n: int, seeds: list[int], stem: str) -> list[Path]:
    if out is not None and out.suffix.lower() == ".png":
        return [out] if n == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(n)]
    folder = out or Path("outputs")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return [folder / f"{stem}-{stamp}-{seeds[i]}-{i}.png" for i in range(n)]


def control_inputs(images: list[Path], modes: list[str], scales: list[float]) -> list:
    """``--control`` images with their ``--control-mode``/``--control-scale`` (one value applies to all)."""
    from ..engine.editing import Control

    def per(values, default, what):
        if not values:
            return [default] * len(images)
        if len(values) == 1:
            return list(values) * len(images)
        if len(values) != len(images):
            raise InvalidRequest(f"give one {what} per --control (or a single one for all)", code="invalid_control")
        return list(values)

    return [Control(img, m, s) for img, m, s in
            zip(images, per(modes, "other", "--control-mode"), per(scales, 1.0, "--control-scale"))]
