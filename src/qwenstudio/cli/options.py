"""The CLI options shared by ``generate`` and ``edit``, built from the one field table (``engine/fields.py``).

``@request_options("edit")`` adds an option for every request field of that mode that has a CLI flag, plus the LoRA
stack (``--lora``/``--loras``) and the run options both commands take (model, device, output ...). The command
receives ``fields`` — only what the user typed (unset stays unset: recipes fill it in ``Engine.prepare``) — and
``run``, a ``RunOptions``. Adding a field to the table adds it to both commands, the API and the OpenAPI schema.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import typer

from ..engine.fields import FIELDS


@dataclass(frozen=True)
class RunOptions:
    model: str
    variant: Optional[str]
    text_encoder: Optional[str]
    vae: Optional[str]
    models_dir: tuple[Path, ...]
    device: Optional[str]
    dtype: Optional[str]
    offload: str
    retry_fp32: bool
    out: Optional[Path]
    as_json: bool
    from_image: Optional[Path]
    compile: str
    attention: str
    quant: Optional[str]
    cache: Optional[str]
    vram_budget: Optional[float] = None


_RUN = [
    ("model", str, typer.Option("tiny", "--model", "-m", help="'tiny', a name from `qwenstudio models` (also a hub "
                                "repo id such as Qwen/Qwen-Image-Edit-2509), a diffusers folder or a DiT file.")),
    ("variant", Optional[str], typer.Option(None, help="Recipe to use (default: decided from the model; see "
                                            "`qwenstudio models`).")),
    ("text_encoder", Optional[str], typer.Option(None, "--text-encoder", help="Text encoder name (single-file DiTs).")),
    ("vae", Optional[str], typer.Option(None, "--vae", help="VAE name (single-file DiTs).")),
    ("models_dir", list[Path], typer.Option([], "--models-dir", help="Extra models dir (repeatable); also "
                                            "QWENSTUDIO_MODELS_DIR, ~/.qwenstudio/models and the HF cache.")),
    ("device", Optional[str], typer.Option(None, help="cuda, cuda:N, mps, xpu, cpu (default: cuda if available).")),
    ("dtype", Optional[str], typer.Option(None, help="auto, bfloat16, float16, float32 (auto/unset: bf16 on CUDA; on a "
                                          "CPU bf16 when it has native bf16 and the weights are bf16/fp8/quantized, "
                                          "VAE fp32; else fp32 — the reason is in the image's metadata).")),
    ("offload", str, typer.Option("auto", help="auto, resident, model_offload, group_offload, leaf_offload, cpu.")),
    ("vram_budget", Optional[float], typer.Option(None, "--vram-budget", help="GiB of GPU memory the memory planner "
                                                  "may use (on a CPU device: simulate a GPU of that size).")),
    ("retry_fp32", bool, typer.Option(False, "--retry-fp32", help="If latents go NaN/inf, retry once in fp32.")),
    ("out", Optional[Path], typer.Option(None, "--out", "-o", help="Output .png file or folder (default ./outputs).")),
    ("as_json", bool, typer.Option(False, "--json", help="Print results as JSON, no progress bar.")),
    ("from_image", Optional[Path], typer.Option(None, "--from-image", help="Re-create a PNG from its metadata "
                                                "(edits: give the same input images).")),
    # speed (engine/acceleration.py; README "Speed"): load-time options, recorded in the metadata
    ("compile", str, typer.Option("auto", "--compile", help="Regional compile of the DiT blocks: auto (off for a "
                                  "one-shot run: warm-up costs more than it saves), on, off.")),
    ("attention", str, typer.Option("auto", "--attention", help="auto, sdpa, math, flash, flash3, sage, xformers.")),
    ("quant", Optional[str], typer.Option(None, "--quant", help="fp8: fp8 compute; int4: groupwise 4-bit weights "
                                          "(any device); nf4: bitsandbytes NF4 (CUDA or CPU) — on a bf16/fp32 model.")),
    ("cache", Optional[str], typer.Option(None, "--cache", help="Step cache threshold (e.g. 0.08; off by default; "
                                          "lossy: see README Speed).")),
]
_LORA = [
    ("lora", list[str], typer.Option([], "--lora", help="LoRA as NAME[:WEIGHT] (repeatable; a name from the models "
                                     "dirs' loras/ or a path).")),
    ("loras_text", Optional[str], typer.Option(None, "--loras", help="SwarmUI-style stack: 'name : 0.8, b : 0.5'.")),
]


def _field_option(f) -> tuple[str, Any, Any]:
    kind = {str: str, int: int, float: float, bool: bool}[f.kind]
    flag = f.cli
    if f.kind is bool:
        flag = f"{f.cli}/--no-{f.cli[2:]}"
    short = ("-n",) if f.name == "negative_prompt" else ()
    return f.name, Optional[kind], typer.Option(None, flag, *short, help=f.help)


def request_options(mode: str):
    """Decorate a command ``fn(..., fields: dict, run: RunOptions, loras: list)`` with the shared options."""

    def decorate(fn):
        own = [p for p in inspect.signature(fn, eval_str=True).parameters.values()
               if p.name not in ("fields", "run", "loras")]
        table = [_field_option(f) for f in FIELDS if f.cli and mode in f.modes]
        names = {f.name for f in FIELDS if f.cli and mode in f.modes}
        extra = [*table, *_LORA, *_RUN]
        params = own + [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=d, annotation=t)
                        for n, t, d in extra]

        @functools.wraps(fn)
        def command(**kwargs):
            fields = {k: kwargs.pop(k) for k in list(kwargs) if k in names and kwargs[k] is not None}
            for k in names:
                kwargs.pop(k, None)
            lora_args, loras_text = kwargs.pop("lora"), kwargs.pop("loras_text")
            run = RunOptions(**{n: kwargs.pop(n) for n, _, _ in _RUN})
            run = RunOptions(**{**run.__dict__, "models_dir": tuple(run.models_dir)})
            return fn(**kwargs, fields=fields, run=run, loras=(lora_args, loras_text))

        command.__signature__ = inspect.Signature(params)
        command.__annotations__ = {p.name: p.annotation for p in params}
        return command

    return decorate
