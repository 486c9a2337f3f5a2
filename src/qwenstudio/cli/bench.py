"""``qwenstudio bench``: stock diffusers vs our engine on the same weights, plus each lossy option's error."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from ..errors import InvalidRequest, QwenStudioError


def bench(
    model: str = typer.Option("tiny", "--model", "-m", help="'tiny' or a diffusers folder."),
    shape: str | None = typer.Option(None, "--shape", help="'wide': a shape-true random model (real width, "
                                        "--layers of the 60 blocks) that measures compute, not overhead."),
    layers: int = typer.Option(2, "--layers", help="DiT blocks of the --shape wide model."),
    vae: str = typer.Option("tiny", "--vae", help="--shape wide: 'tiny' VAE (default) or 'real' width."),
    size: int | None = typer.Option(None, "--size", help="Square side (256 or 512 for --shape wide)."),
    random_full: bool = typer.Option(False, "--random-full", help="Full-size random weights built on the device."),
    steps: int = typer.Option(4),
    cfg: float = typer.Option(4.0),
    width: int = typer.Option(0, help="0: 64 for tiny, 256 for --shape wide, 1024 otherwise."),
    height: int = typer.Option(0),
    repeats: int = typer.Option(2, help="Timed runs per implementation (after one warm-up)."),
    device: str | None = typer.Option(None),
    dtype: str | None = typer.Option(None),
    compile: str = typer.Option("auto", "--compile", help="auto (on, except the tiny model), on, off."),
    attention: str = typer.Option("auto", "--attention", help="auto, sdpa, math, flash, flash3, sage, ..."),
    quant: str | None = typer.Option(None, "--quant", help="fp8, int4, nf4 (comma-separated): also time each "
                                      "quantized DiT and report its error and weight bytes."),
    cache: float | None = typer.Option(None, "--cache", help="Step cache threshold: also time the cache and "
                                          "report its error and calls saved."),
    compare_cache_dit: bool = typer.Option(False, "--compare-cache-dit", help="With --cache: the same policy "
                                           "through the cache-dit package, for comparison."),
    bf16: bool | None = typer.Option(None, "--bf16/--no-bf16", help="Also run bf16 compute (ours and stock); "
                                     "default: when it is the engine's default here (CPU with native bf16, --shape wide)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    markdown: bool = typer.Option(False, "--markdown", help="Print the report as Markdown tables."),
    save: Path | None = typer.Option(None, "--save", help="Also write PATH.json and PATH.md."),
) -> None:
    """Time stock diffusers QwenImagePipeline vs our engine on the same weights; print per-stage times and ratios."""
    from ..bench import print_report, report_markdown, run_bench

    try:
        if size is not None:
            if size <= 0 or size % 16:
                raise InvalidRequest(f"--size must be a positive multiple of 16, got {size}")
            width = height = size
        report = run_bench(model=model, random_full=random_full, shape=shape, layers=layers, vae=vae, steps=steps,
                           cfg=cfg, width=width, height=height, repeats=repeats, device=device, dtype=dtype,
                           compile=compile, attention=attention, quant=quant, cache=cache,
                           compare_cache_dit=compare_cache_dit, bf16=bf16)
    except QwenStudioError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    if save is not None:
        save.parent.mkdir(parents=True, exist_ok=True)
        save.with_suffix(".json").write_text(json.dumps(report, indent=2))
        save.with_suffix(".md").write_text(report_markdown(report))
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    elif markdown:
        typer.echo(report_markdown(report))
    else:
        print_report(report)
