# ruff: noqa: B008  (typer declares options as argument defaults)
"""``qwenstudio grid`` and ``qwenstudio compare [score]`` (registered in ``cli/main.py``).

Thin: parse the axes / variants / suite into the ``qwenstudio.compare`` records, run, print where the report is.
Errors print one line and exit 2.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import typer

from ..errors import InvalidRequest, QwenStudioError


def _fail(err: Exception) -> None:
    typer.echo(f"error: {err}", err=True)
    raise typer.Exit(2)


def _load_options(device, dtype, offload, text_encoder, vae, models_dir):
    from ..compare.engines import LoadOptions

    return LoadOptions(device=device, dtype=dtype, offload=offload, text_encoder=text_encoder, vae=vae,
                       models_dirs=tuple(models_dir))


def _parse_size(text: str | None):
    if text is None:
        return None
    from ..compare.values import parse_value

    return parse_value("size", text)


# ---- grid ------------------------------------------------------------------------------------------------------
def grid_command(
    prompt: str = typer.Argument(..., help="The prompt (prompt_sr axes search and replace in it)."),
    x: str = typer.Option(..., "--x", help="First axis, NAME=VALUES: steps=4,8,20 · cfg=1..4:1 · seed=1,2 · "
                          "size=64x64,112x64 · lora=none,NAME:1 · model=A,B · prompt_sr=fox,cat,owl · any request "
                          "field."),
    y: str | None = typer.Option(None, "--y", help="Second axis (rows)."),
    z: str | None = typer.Option(None, "--z", help="Third axis (one block per value)."),
    model: str = typer.Option("tiny", "--model", "-m", help="Model for every cell unless model is an axis."),
    variant: str | None = typer.Option(None, help="Recipe (see `qwenstudio models`)."),
    seed: int | None = typer.Option(None, help="Seed shared by every cell (random if omitted; recorded)."),
    steps: int | None = typer.Option(None),
    cfg: float | None = typer.Option(None),
    negative: str | None = typer.Option(None, "--negative", "-n"),
    width: int | None = typer.Option(None),
    height: int | None = typer.Option(None),
    sampler: str | None = typer.Option(None),
    scheduler: str | None = typer.Option(None),
    shift: float | None = typer.Option(None),
    lora: list[str] = typer.Option([], "--lora", help="LoRA NAME[:WEIGHT] for every cell (repeatable)."),
    setting: list[str] = typer.Option([], "--set", help="Any other request field for every cell, NAME=VALUE "
                                      "(repeatable)."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Output folder (default outputs/grid-<time>)."),
    models_dir: list[Path] = typer.Option([], "--models-dir", help="Extra models dir (repeatable)."),
    text_encoder: str | None = typer.Option(None, "--text-encoder"),
    vae: str | None = typer.Option(None, "--vae"),
    device: str | None = typer.Option(None),
    dtype: str | None = typer.Option(None),
    offload: str = typer.Option("auto"),
    as_json: bool = typer.Option(False, "--json", help="Print the grid manifest as JSON."),
) -> None:
    """An XYZ grid over request fields or models: every image with metadata, a labelled contact sheet, HTML and
    Markdown pages. Example: qwenstudio grid "a fox" --x steps=4,8 --y cfg=1,4 --z seed=1,2"""
    from ..compare.grid import GridSpec, run_grid
    from ..compare.values import parse_axis, parse_settings
    from ..engine.lora import parse_lora_arg
    from ..engine.requests import LoraRef

    try:
        axes = tuple(parse_axis(a) for a in (x, y, z) if a)
        base = {"seed": seed, "steps": steps, "cfg": cfg, "negative_prompt": negative, "width": width,
                "height": height, "sampler": sampler, "scheduler": scheduler, "shift": shift}
        if lora:
            base["loras"] = tuple(LoraRef(*parse_lora_arg(t)) for t in lora)
        for s in setting:
            extra = parse_settings(s)
            for k in ("model", "variant"):
                if k in extra:
                    raise InvalidRequest(f"--set {k}=...: use --{k}", code="invalid_axis")
            base.update(extra)
        spec = GridSpec(prompt=prompt, axes=axes, base=base, model=model, variant=variant)
        folder = out or Path("outputs") / time.strftime("grid-%Y%m%d-%H%M%S")
        result = run_grid(spec, folder, _load_options(device, dtype, offload, text_encoder, vae, models_dir),
                          on_cell=None if as_json else _grid_progress)
    except QwenStudioError as e:
        _fail(e)
        return
    if as_json:
        typer.echo(result.manifest.read_text())
        return
    typer.echo(f"{len(result.cells)} images in {result.out_dir}/images; contact sheet {result.sheet}; "
               f"pages {result.html} and {result.markdown}")


def _grid_progress(i: int, n: int, cell, rec: dict) -> None:
    typer.echo(f"[{i}/{n}] {' · '.join(cell.labels)}  {rec['seconds']:.2f}s", err=True)


# ---- compare ---------------------------------------------------------------------------------------------------
compare_app = typer.Typer(add_completion=False, help="Compare variants on a prompt suite; score images' text.")


@compare_app.callback(invoke_without_command=True)
def compare_command(
    ctx: typer.Context,
    suite: str = typer.Option("lightning-report", "--suite", "-s", help="Built-in suite (lightning-report) or a "
                              "file: JSON ({\"cases\": [...]}) or one prompt per line."),
    case: list[str] = typer.Option([], "--case", help="Only these cases: id or 1-based index (repeatable, or "
                                   "comma separated)."),
    variant: list[str] = typer.Option([], "--variant", "-v", help="LABEL:SETTINGS, e.g. base: · 'base:steps=50,"
                                      "cfg=4' · 'lightning8:lora=Qwen-Image-Lightning-8steps-V1.1:1' · "
                                      "'q4:model=qwen-image-Q4_K_M'. Repeatable; default: the suite's variants."),
    model: str = typer.Option("tiny", "--model", "-m", help="Model of every variant that names none."),
    recipe: str | None = typer.Option(None, "--recipe", help="Recipe (engine variant) of every variant that names "
                                      "none (see `qwenstudio models`)."),
    seed: list[int] = typer.Option([], "--seed", help="Seed (repeatable; default: the suite's, else 0)."),
    size: str | None = typer.Option(None, "--size", help="Generate every case at WxH (smoke runs), whatever the "
                                    "suite says."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Output folder (default outputs/compare-<suite>); "
                                    "rerunning into it resumes."),
    no_ocr: bool = typer.Option(False, "--no-ocr", help="Do not score text (score later with `compare score`)."),
    max_cer: float = typer.Option(0.0, "--max-cer", help="A string passes when its character error rate is at "
                                  "most this (0: exact after normalisation, like the Lightning report's ✅)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan (images, estimated time) and stop."),
    bench: Path | None = typer.Option(None, "--bench", help="A `qwenstudio bench --json` report for --dry-run's "
                                      "estimate."),
    warmup: bool = typer.Option(True, "--warmup/--no-warmup", help="One untimed step per variant before timing."),
    models_dir: list[Path] = typer.Option([], "--models-dir", help="Extra models dir (repeatable)."),
    text_encoder: str | None = typer.Option(None, "--text-encoder"),
    vae: str | None = typer.Option(None, "--vae"),
    device: str | None = typer.Option(None),
    dtype: str | None = typer.Option(None),
    offload: str = typer.Option("auto"),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Variants × prompt suite × seeds -> images, NFE, s/image, peak memory and OCR text verdicts in one report
    (report.html / report.md). Resumable: rerun the same command to continue a stopped run."""
    if ctx.invoked_subcommand is not None:
        return
    from ..compare.runner import ComparePlan, finished, run_compare
    from ..compare.suites import load_suite
    from ..compare.variants import parse_variants

    try:
        s = load_suite(suite).select(case)
        suite_variants = not variant
        texts = variant or [v["spec"] for v in s.variants]
        if not texts:
            raise InvalidRequest(f"suite '{s.name}' defines no variants: give --variant LABEL:SETTINGS",
                                 code="invalid_variant")
        variants = parse_variants(texts, model, recipe)
        if not 0.0 <= max_cer <= 1.0:
            raise InvalidRequest("--max-cer must be between 0 and 1")
        plan = ComparePlan(suite=s, variants=variants, seeds=seed or [s.seed if s.seed is not None else 0],
                           out_dir=out or Path("outputs") / f"compare-{s.name}", size=_parse_size(size),
                           ocr=not no_ocr, max_cer=max_cer, warmup=warmup,
                           options=_load_options(device, dtype, offload, text_encoder, vae, models_dir),
                           suite_variants=suite_variants)
        if dry_run:
            _print_plan(plan, finished(plan), bench, as_json)
            return
        progress = _CompareProgress(quiet=as_json)
        try:
            data = run_compare(plan, on_start=progress.start, on_job=progress.step)
        finally:
            progress.close()
    except QwenStudioError as e:
        _fail(e)
        return
    if as_json:
        typer.echo(json.dumps({"out": str(plan.out_dir), "summary": data["summary"]}, indent=1, ensure_ascii=False))
        return
    _print_summary(data)
    typer.echo(f"report: {plan.out_dir / 'report.html'} (also report.md, report.json; results in "
               f"{plan.out_dir / 'results.jsonl'})")


class _CompareProgress:
    """A rich progress bar with ETA on a terminal; one line per image otherwise (logs, CI)."""

    def __init__(self, quiet: bool):
        self.quiet, self.bar, self.task = quiet, None, None

    def start(self, remaining: int, done: int) -> None:
        if done:
            typer.echo(f"resuming: {done} image(s) already done, {remaining} to go", err=True)
        if self.quiet or not sys.stderr.isatty() or not remaining:
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
        self.bar.start()
        self.task = self.bar.add_task("compare", total=remaining)

    def step(self, i: int, n: int, job, rec: dict) -> None:
        verdict = (rec.get("text") or {}).get("verdict", "—")
        line = f"[{i}/{n}] {job.variant.label} · {job.case.id} · seed {job.seed}  {rec['seconds']:.2f}s  text {verdict}"
        if self.bar is not None:
            self.bar.update(self.task, completed=i, description=f"{job.variant.label} · {job.case.id}")
        elif not self.quiet:
            typer.echo(line, err=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _print_plan(plan, done: dict, bench: Path | None, as_json: bool) -> None:
    from ..compare.estimate import estimate

    bench_data = None
    if bench is not None:
        try:
            bench_data = json.loads(bench.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise InvalidRequest(f"--bench {bench}: {e}") from None
    est = estimate(plan, done, bench_data)
    jobs = plan.jobs()
    rows = [{"variant": v.label, "spec": v.spec, "model": v.model, "images": sum(1 for j in jobs if j.variant is v),
             "remaining": est[v.label].images, "seconds": est[v.label].seconds, "basis": est[v.label].basis}
            for v in plan.variants]
    known = [r["seconds"] for r in rows if r["seconds"] is not None]
    total = sum(known) if len(known) == len(rows) else None
    if as_json:
        typer.echo(json.dumps({"images": len(jobs), "done": len(done), "remaining": len(jobs) - len(done),
                               "estimated_seconds": total, "variants": rows, "out": str(plan.out_dir),
                               "cases": [c.id for c in plan.suite.cases], "seeds": plan.seeds}, indent=1))
        return
    typer.echo(f"plan: {len(plan.suite.cases)} prompts × {len(plan.variants)} variants × {len(plan.seeds)} seed(s) "
               f"= {len(jobs)} images ({len(done)} already done) -> {plan.out_dir}")
    for r in rows:
        secs = "unknown" if r["seconds"] is None else f"~{_duration(r['seconds'])}"
        typer.echo(f"  {r['variant']:<24} {r['remaining']:>3}/{r['images']} to run, {secs} ({r['basis']})  "
                   f"[{r['spec']}]")
    for c in plan.suite.cases:
        for note in c.notes():
            typer.echo(f"  note: {c.id}: {note}")
    typer.echo(f"estimated total: {'unknown' if total is None else '~' + _duration(total)} (model loading not "
               f"included)")


def _duration(s: float) -> str:
    return f"{s:.1f}s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


def _print_summary(data: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("variant", "NFE", "images", "mean s/image", "speed-up", "peak memory", "text pass",
                  title=data["title"])
    for v in data["variants"]:
        m = data["summary"]["variants"][v["label"]]
        rate = f"{m['text_passed']}/{m['text_scored']}" if m["text_scored"] else "—"
        table.add_row(v["label"], m["nfe"], str(m["images"]),
                      "—" if m["mean_seconds"] is None else f"{m['mean_seconds']:.3f}",
                      "—" if m["speedup"] is None else f"{m['speedup']:.2f}×",
                      "—" if not m["peak_memory_bytes"] else f"{m['peak_memory_bytes'] / 2**30:.2f} GiB", rate)
    Console(stderr=False).print(table)


@compare_app.command("score")
def score_command(
    images: list[Path] = typer.Argument(..., help="PNG/JPEG/WebP images (ours, or another tool's)."),
    prompt: str | None = typer.Option(None, "--prompt", "-p", help="Prompt to take the expected text from "
                                      "(default: each image's own metadata: our JSON chunk or A1111 parameters)."),
    expect: list[str] = typer.Option([], "--expect", help="Expected text, verbatim (repeatable; overrides the "
                                     "prompt's quoted spans)."),
    max_cer: float = typer.Option(0.0, "--max-cer", help="Pass threshold on the character error rate."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """OCR images and score the text their prompt asked for: per string exact match, CER and ✅/❌."""
    from ..compare.ocr import TextReader

    reader = TextReader()
    out = []
    try:
        for path in images:
            exp, source = _expected_for(path, prompt, expect)
            from PIL import Image, UnidentifiedImageError

            try:
                with Image.open(path) as im:
                    score = reader.score(im, exp, max_cer)
            except (OSError, UnidentifiedImageError) as e:
                raise InvalidRequest(f"{path}: not a readable image ({e})") from None
            out.append({"image": str(path), "expected_from": source, **score.to_dict()})
    except QwenStudioError as e:
        _fail(e)
        return
    if as_json:
        typer.echo(json.dumps(out if len(out) > 1 else out[0], indent=1, ensure_ascii=False))
        return
    for r in out:
        cer = "" if r["cer"] is None else f" CER {r['cer']:.2f}"
        typer.echo(f"{r['image']}: {r['verdict']}{cer}  (expected text from {r['expected_from']})")
        for s in r["strings"]:
            typer.echo(f"  {s['verdict']} {s['expected']!r} -> {s['found']!r} (CER {s['cer']:.2f})")


def _expected_for(path: Path, prompt: str | None, expect: list[str]):
    """(Expected, where it came from) for one image."""
    from ..compare.expected import Expected, extract_expected

    if expect:
        return Expected(tuple(expect)), "--expect"
    if prompt is not None:
        return extract_expected(prompt), "--prompt"
    from ..outputs import read_png_metadata

    try:
        meta = read_png_metadata(path)
    except QwenStudioError as e:
        raise InvalidRequest(f"{e}; pass --prompt or --expect") from None
    p = (meta.get("request") or {}).get("prompt")
    if not p:
        raise InvalidRequest(f"{path}: its metadata has no prompt; pass --prompt or --expect")
    return extract_expected(p), "metadata" if meta.get("model") else "A1111 parameters"
