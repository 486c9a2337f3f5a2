"""The ``qwenstudio`` command: parse, call the engine, print. No logic here that the Python API lacks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from ..errors import InvalidRequest, QwenStudioError
from .commands import edit, generate

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Run the Qwen-Image family of image models.")


def _fail(err: Exception) -> None:
    typer.echo(f"error: {err}", err=True)
    raise typer.Exit(2)


app.command()(generate)
app.command()(edit)


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
    found = Table("name", "kind", "format", "dtype/quant", "size", "variant (why)",
                  title="files in " + ", ".join(map(str, registry.dirs)))
    for f in files:
        why = f"{f['variant']} ({f['variant_reason']})" if f.get("variant") else ""
        found.add_row(f["name"], f["kind"], f["format"], f["quant"] or f["dtype"], f"{f['size_bytes'] / 2**30:.2f} GiB",
                      why)
    console.print(found)
    for p in skipped:
        console.print(f"[yellow]skipped[/] {p['path']}: {p['reason']}")


@app.command()
def convert(
    src: Path = typer.Argument(..., help="A diffusers folder (or its transformer/) or a ComfyUI DiT file."),
    dst: Path = typer.Argument(..., help="Output file (or folder for --to diffusers)."),
    to: str = typer.Option(..., "--to", help="comfy, diffusers, fp8, fp8_scaled (ComfyUI per-layer), fp8_scaled_legacy, "
                           "int4, gguf_q8_0, gguf_q6_k, gguf_q5_k, gguf_q4_k, gguf_q5_0, gguf_q4_0, gguf_f16, gguf_bf16"),
    dtype: Optional[str] = typer.Option(None, help="Float dtype for non-fp8 tensors (bf16, fp16, fp32)."),
    scale_input: bool = typer.Option(False, "--scale-input", help="fp8_scaled_legacy: also write scale_input tensors."),
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

from .train import train_lora_command  # noqa: E402  (light: imports torch only when run)

app.command("train-lora")(train_lora_command)

from .bench import bench  # noqa: E402

app.command()(bench)

from .compare import compare_app, grid_command  # noqa: E402

app.command("grid")(grid_command)
app.add_typer(compare_app, name="compare")


def main() -> None:
    from ..engine.quant.nf4 import mute_kernels_notice

    mute_kernels_notice()  # every command, not only those that load a model: diffusers imports bitsandbytes
    app()


if __name__ == "__main__":
    main()
