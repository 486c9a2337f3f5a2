"""The ``qwenstudio`` command: parse, call the engine, print. No logic here that the Python API lacks."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Optional

import typer

from ..errors import InvalidRequest, QwenStudioError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Run the Qwen-Image family of image models.")


def _fail(err: Exception) -> None:
    typer.echo(f"error: {err}", err=True)
    raise typer.Exit(2)


def _output_paths(out: Optional[Path], n: int, seeds: list[int]) -> list[Path]:
    if out is not None and out.suffix.lower() == ".png":
        if n == 1:
            return [out]
        return [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(n)]
    folder = out or Path("outputs")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return [folder / f"qwen-{stamp}-{seeds[i]}-{i}.png" for i in range(n)]


@app.command()
def generate(
    prompt: Optional[str] = typer.Argument(None, help="What to draw."),
    model: str = typer.Option("tiny", "--model", "-m", help="'tiny', a name from `qwenstudio models`, a diffusers "
                              "folder or a DiT file (safetensors/GGUF)."),
    variant: Optional[str] = typer.Option(None, help="Recipe to use (see `qwenstudio models`)."),
    text_encoder: Optional[str] = typer.Option(None, "--text-encoder", help="Text encoder name (single-file DiTs)."),
    vae: Optional[str] = typer.Option(None, "--vae", help="VAE name (single-file DiTs)."),
    models_dir: list[Path] = typer.Option([], "--models-dir", help="Extra models dir (repeatable); also "
                                          "QWENSTUDIO_MODELS_DIR and ~/.qwenstudio/models."),
    negative: Optional[str] = typer.Option(None, "--negative", "-n", help="Negative prompt (used when CFG > 1)."),
    steps: Optional[int] = typer.Option(None, help="Denoising steps."),
    cfg: Optional[float] = typer.Option(None, help="True CFG scale; <= 1 skips the negative pass."),
    cfg_norm: Optional[bool] = typer.Option(None, "--cfg-norm/--no-cfg-norm", help="Reference CFG renorm (default on)."),
    seed: Optional[int] = typer.Option(None, help="Seed (random if omitted; always recorded)."),
    width: Optional[int] = typer.Option(None, help="Width, a multiple of 16."),
    height: Optional[int] = typer.Option(None, help="Height, a multiple of 16."),
    aspect: Optional[str] = typer.Option(None, help="Recommended size by aspect, e.g. 16:9."),
    sampler: Optional[str] = typer.Option(None, help="euler, euler_ancestral, dpmpp_2m, heun, ..."),
    scheduler: Optional[str] = typer.Option(None, help="reference, simple, normal, karras, exponential, sgm_uniform, beta"),
    shift: Optional[float] = typer.Option(None, help="Sigma shift (ComfyUI ModelSamplingAuraFlow; Lightning: 3)."),
    batch: int = typer.Option(1, help="Images per run."),
    noise: str = typer.Option("diffusers", help="Seed convention: diffusers (seed+i per image) or comfy."),
    magic: Optional[str] = typer.Option(None, help="Append the official positive-magic suffix: en or zh."),
    lora: list[str] = typer.Option([], "--lora", help="LoRA as NAME[:WEIGHT] (repeatable; name from the models "
                                   "dirs' loras/ or a path)."),
    loras_text: Optional[str] = typer.Option(None, "--loras", help="SwarmUI-style stack: 'name : 0.8, other : 0.5'."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output .png file or folder (default ./outputs)."),
    as_json: bool = typer.Option(False, "--json", help="Print results as JSON, no progress bar."),
    from_image: Optional[Path] = typer.Option(None, "--from-image", help="Re-create a PNG from its metadata."),
    device: Optional[str] = typer.Option(None, help="cuda, cuda:1, cpu (default: cuda if available)."),
    dtype: Optional[str] = typer.Option(None, help="bfloat16, float16, float32 (default: bf16 on CUDA, fp32 on CPU)."),
    retry_fp32: bool = typer.Option(False, "--retry-fp32", help="If latents go NaN/inf, retry once in fp32."),
    offload: str = typer.Option("auto", help="auto, resident, model_offload, group_offload, cpu."),
    control: list[Path] = typer.Option([], "--control", help="Control image for --controlnet (repeatable)."),
    control_mode: list[str] = typer.Option([], "--control-mode", help="Kind of each --control (canny, depth, "
                                           "pose, soft_edge, ...); one value applies to all."),
    control_scale: list[float] = typer.Option([], "--control-scale", help="ControlNet scale per --control "
                                              "(default 1.0; one value applies to all)."),
    controlnet: Optional[str] = typer.Option(None, "--controlnet", help="ControlNet name from the models dirs "
                                             "(or a path) that --control images drive."),
    compile: str = typer.Option("auto", "--compile", help="Regional compile: auto (off for one run), on, off."),
    attention: str = typer.Option("auto", "--attention", help="auto, sdpa, math, flash, flash3, sage, xformers."),
    quant: Optional[str] = typer.Option(None, "--quant", help="fp8: fp8 compute on a bf16/fp32 model."),
    cache: Optional[str] = typer.Option(None, "--cache", help="Step cache threshold (e.g. 0.08; off by default)."),
) -> None:
    """Text-to-image. Example: qwenstudio generate "a red fox" --model tiny --seed 1"""
    from ..engine.editing import EditRequest
    from ..engine.requests import GenerateRequest
    from ..engine.specs import get_spec

    try:
        if from_image is not None:
            from ..outputs import read_png_metadata

            meta = read_png_metadata(from_image)
            data = dict(meta["request"])
            if prompt is not None:
                data["prompt"] = prompt
            controlled = any(data.get(k) for k in ("images", "mask", "controls"))
            request = (EditRequest if controlled else GenerateRequest).from_dict(data)
            if controlnet is not None and controlled:
                from dataclasses import replace

                request = replace(request, controlnet=controlnet)
            if model == "tiny" and meta.get("model", {}).get("variant") not in (None, "tiny"):
                raise InvalidRequest(
                    f"{from_image} was made with '{meta['model'].get('name')}'; pass --model with that model"
                )
            variant = variant or meta.get("model", {}).get("variant")
        else:
            if prompt is None:
                raise InvalidRequest("give a prompt (or --from-image PNG)")
            from ..engine.lora import parse_lora_arg, parse_stack_spec

            stack = [parse_lora_arg(x) for x in lora] + (parse_stack_spec(loras_text) if loras_text else [])
            if (control or controlnet) and not (control and controlnet):
                raise InvalidRequest("--control and --controlnet go together", code="missing_controlnet")
            request = (EditRequest if control else GenerateRequest)(
                prompt=prompt, negative_prompt=negative, width=width, height=height, aspect=aspect, steps=steps,
                cfg=cfg, cfg_norm=cfg_norm, sampler=sampler, scheduler=scheduler, shift=shift, seed=seed,
                batch=batch, noise=noise, magic=magic, loras=stack,
                **({"controlnet": controlnet} if control else {}),
            )
        from ..engine.registry import guess_variant

        spec = get_spec(variant or guess_variant(Path(model).stem if model.endswith((".safetensors", ".gguf"))
                                                 else Path(model).name))
        if not isinstance(request, EditRequest):  # (an edit is validated once its control images are read)
            request = request.resolve(spec)  # validate before spending time on loading
        from ..engine.acceleration import speed_options
        from ..engine.engine import Engine

        engine = Engine.load(model, variant=spec.name, device=device, dtype=dtype, offload=offload,
                             text_encoder=text_encoder, vae=vae, models_dirs=tuple(models_dir),
                             **speed_options(compile=compile, attention=attention, quant=quant, cache=cache))
        if spec.builtin and not as_json:
            typer.echo("note: the 'tiny' model has random weights; its images are noise (smoke test only).", err=True)
        if isinstance(request, EditRequest):  # ControlNet text-to-image runs on the image-conditioned path
            from .edit import _controls

            result = engine.edit(request, controls=_controls(control, control_mode, control_scale),
                                 retry_fp32=retry_fp32)
        else:
            result = _run_with_progress(engine, request, as_json, retry_fp32)
    except QwenStudioError as e:
        _fail(e)
        return

    from ..outputs import save_png

    paths = _output_paths(out, len(result.images), [im.metadata["seed"] for im in result.images])
    for im, path in zip(result.images, paths):
        save_png(im.image, im.metadata, path)
    if as_json:
        typer.echo(json.dumps(
            {"images": [{"path": str(p), **im.metadata} for im, p in zip(result.images, paths)],
             "timings": {k: v for k, v in result.timings.items()}}, indent=2))
    else:
        for im, path in zip(result.images, paths):
            typer.echo(f"saved {path}  (seed {im.metadata['seed']}, {result.timings['total']:.2f}s)")


def _run_with_progress(engine, request, quiet: bool, retry_fp32: bool):
    if quiet or not sys.stderr.isatty():
        return engine.generate(request, retry_fp32=retry_fp32)
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    with Progress(TextColumn("[bold]denoising"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), TimeRemainingColumn(), transient=True) as bar:
        task = bar.add_task("denoise", total=request.steps)
        return engine.generate(request, retry_fp32=retry_fp32,
                               on_progress=lambda p: bar.update(task, completed=p.step))


@app.command()
def models(
    as_json: bool = typer.Option(False, "--json"),
    models_dir: list[Path] = typer.Option([], "--models-dir", help="Extra models dir (repeatable)."),
) -> None:
    """List the known model variants (recipes) and the model files found in the models dirs."""
    from dataclasses import asdict

    from ..config import Settings
    from ..engine.sources import registry_for
    from ..engine.specs import SPECS

    variants = [{"name": s.name, "description": s.description, **asdict(s.defaults),
                 "default_size": "x".join(map(str, s.default_size)), "recipe_lora": s.recipe_lora}
                for s in SPECS.values()]
    registry = registry_for(Settings.from_env(), models_dir)
    files = [{**e.public(), "path": str(e.path)} for e in registry.scan()]
    skipped = [{"path": str(p), "reason": why} for p, why in registry.problems]
    if as_json:
        typer.echo(json.dumps({"variants": variants, "files": files, "skipped": skipped,
                               "dirs": [str(d) for d in registry.dirs]}, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("variant", "steps", "cfg", "sampler", "scheduler", "shift", "size", "description", title="recipes")
    for r in variants:
        table.add_row(r["name"], str(r["steps"]), str(r["cfg"]), r["sampler"], r["scheduler"],
                      "auto" if r["shift"] is None else str(r["shift"]), r["default_size"], r["description"])
    console = Console()
    console.print(table)
    found = Table("name", "kind", "format", "dtype/quant", "size", title="files in " + ", ".join(map(str, registry.dirs)))
    for f in files:
        found.add_row(f["name"], f["kind"], f["format"], f["quant"] or f["dtype"], f"{f['size_bytes'] / 2**30:.2f} GiB")
    console.print(found)
    for p in skipped:
        console.print(f"[yellow]skipped[/] {p['path']}: {p['reason']}")


@app.command()
def convert(
    src: Path = typer.Argument(..., help="A diffusers folder (or its transformer/) or a ComfyUI DiT file."),
    dst: Path = typer.Argument(..., help="Output file (or folder for --to diffusers)."),
    to: str = typer.Option(..., "--to", help="comfy, diffusers, fp8, fp8_scaled, gguf_q8_0, gguf_q5_0, gguf_q4_0, "
                           "gguf_f16, gguf_bf16"),
    dtype: Optional[str] = typer.Option(None, help="Float dtype for non-fp8 tensors (bf16, fp16, fp32)."),
    scale_input: bool = typer.Option(False, "--scale-input", help="fp8_scaled: also write scale_input tensors."),
    overwrite: bool = typer.Option(False, "--overwrite"),
) -> None:
    """Convert a Qwen-Image DiT between layouts; the output is validated by loading it back."""
    try:
        if to.startswith("gguf_"):
            from ..engine.formats.gguf import WRITABLE_QTYPES, read_gguf, write_dit_gguf

            qtype = to[len("gguf_"):].upper()
            if qtype not in WRITABLE_QTYPES:
                raise InvalidRequest(f"unknown GGUF type '{qtype}'; writable: {', '.join(WRITABLE_QTYPES)}")
            if dst.exists() and not overwrite:
                raise InvalidRequest(f"{dst} exists; pass --overwrite")
            out = write_dit_gguf(src, dst, qtype)
            read_gguf(out)  # validate: readable, Qwen-Image tensors present
        else:
            from ..engine.formats.convert import convert as convert_dit

            out = convert_dit(src, dst, to, dtype=dtype, scale_input=scale_input, overwrite=overwrite)
    except QwenStudioError as e:
        _fail(e)
        return
    typer.echo(f"wrote {out}")


from .serve import serve_command  # noqa: E402  (light: imports the service lazily)

app.command("serve")(serve_command)

from .edit import edit  # noqa: E402

app.command()(edit)

from .bench import bench  # noqa: E402

app.command()(bench)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
