"""Exact speed-ups applied to a loaded DiT: regional compile of the repeated blocks and the attention backend.

Why regional compile (diffusers' ``compile_repeated_blocks``) rather than ``torch.compile(model)``: the 60 blocks
share one class, so one compiled graph serves all of them — warm-up is one block's compile, not the whole model's,
and the glue between blocks (RoPE, embeddings, our step cache) stays eager Python. Compiled graphs are written to an
on-disk cache (``TORCHINDUCTOR_CACHE_DIR`` under the qwenstudio home) so a restarted server warms up from disk.
Shapes: each image size is its own static graph (the sizes are a fixed list of buckets); text lengths vary per prompt,
so dynamo's automatic-dynamic mode marks that one axis dynamic after the second length instead of recompiling per
prompt. ``compile="auto"`` is on where warm-up is paid back (server, bench: many runs on one process) and off for a
one-shot CLI run and for the built-in tiny model (a toy whose steps take milliseconds).

Attention goes through diffusers' attention dispatcher. ``auto`` picks the fastest *exact* backend that works with
attention masks (padding or batched CFG use them): PyTorch SDPA ("native"), which already dispatches to
FlashAttention-2/efficient kernels on CUDA. flash-attn 2/3 reject masks in the dispatcher, and SageAttention
quantizes Q/K to int8 (lossy): both only when asked for.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import InvalidRequest

# user name -> diffusers AttentionBackendName value
ATTENTION_BACKENDS = {
    "sdpa": "native",
    "native": "native",
    "math": "_native_math",
    "efficient": "_native_efficient",
    "cudnn": "_native_cudnn",
    "flex": "flex",
    "flash": "flash",
    "flash3": "_flash_3",
    "sage": "sage",
    "xformers": "xformers",
}
LOSSY_ATTENTION = ("sage",)
CUDA_ONLY_ATTENTION = ("efficient", "cudnn", "flash", "flash3", "sage", "xformers")
COMPILE_VALUES = ("auto", "on", "off")


@dataclass(frozen=True)
class Acceleration:
    """What was applied to a transformer (recorded in the metadata so a re-run is the same computation)."""

    compile: bool = False
    attention: str = "native"  # the diffusers backend name actually set
    compile_cache_dir: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def parse_compile(value) -> bool | str:
    """``True``/``False``/``"auto"`` from the API, or ``on``/``off``/``auto`` from the CLI."""
    if isinstance(value, bool) or value == "auto":
        return value
    if isinstance(value, str) and value.lower() in ("on", "true", "1", "yes"):
        return True
    if isinstance(value, str) and value.lower() in ("off", "false", "0", "no"):
        return False
    raise InvalidRequest(f"unknown compile setting '{value}'; valid: auto, on, off", code="invalid_compile")


def resolve_compile(value, *, long_lived: bool, device, builtin: bool = False) -> bool:
    """``auto`` -> on for a long-lived process (server, bench) on a real-size model, off otherwise."""
    value = parse_compile(value)
    if value != "auto":
        return bool(value)
    del device  # the same rule on CPU and GPU: compile pays on both once the process lives long enough
    return long_lived and not builtin


def available_attention(device) -> list[str]:
    """The user-facing attention names that can run on ``device`` here (what ``auto`` chooses among)."""
    import torch
    from diffusers.utils import (
        is_flash_attn_3_available,
        is_flash_attn_available,
        is_sageattention_available,
        is_xformers_available,
    )

    names = ["sdpa", "native", "math", "flex"]
    if torch.device(device).type == "cuda":
        names += ["efficient", "cudnn"]
        names += ["flash"] if is_flash_attn_available() else []
        names += ["flash3"] if is_flash_attn_3_available() else []
        names += ["sage"] if is_sageattention_available() else []
        names += ["xformers"] if is_xformers_available() else []
    return names


def select_attention(name: str | None, device) -> str:
    """The diffusers backend for ``name`` on ``device``; unknown or unavailable names are typed errors."""
    name = (name or "auto").lower()
    if name == "auto":
        return "native"
    if name not in ATTENTION_BACKENDS:
        raise InvalidRequest(f"unknown attention backend '{name}'; valid: auto, {', '.join(ATTENTION_BACKENDS)}",
                             code="unknown_attention")
    available = available_attention(device)
    if name not in available:
        why = "needs a CUDA device" if name in CUDA_ONLY_ATTENTION else "is not installed"
        raise InvalidRequest(f"attention backend '{name}' {why} here; available: {', '.join(available)}",
                             code="attention_unavailable")
    if name in LOSSY_ATTENTION:
        warnings.warn(f"attention '{name}' quantizes Q/K (not exact); images differ slightly from sdpa", stacklevel=2)
    return ATTENTION_BACKENDS[name]


def compile_cache_dir(home: Path) -> Path:
    return Path(home) / "cache" / "torch-compile"


def use_compile_cache(folder: Path) -> str:
    """Point inductor's on-disk cache at ``folder`` unless the user chose one. inductor reads the variable each time
    it looks for its cache, and writes its default (``<tmp>/torchinductor_<user>``) back into it on first use, so
    that default value counts as "not chosen"."""
    import getpass
    import tempfile

    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    try:
        default = os.path.abspath(os.path.join(tempfile.gettempdir(), "torchinductor_" + getpass.getuser()))
    except (KeyError, OSError):
        default = None
    if current is None or os.path.abspath(current) == default:
        Path(folder).mkdir(parents=True, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    return os.environ["TORCHINDUCTOR_CACHE_DIR"]


def apply_acceleration(transformer, *, compile: bool, attention: str | None = "auto", device=None,
                       home: Path | None = None) -> Acceleration:
    """Set the attention backend and (optionally) compile the repeated blocks in place; returns what was done.
    Compiling is lazy: the first forward at each shape pays the warm-up, later ones run the compiled graph."""
    device = device if device is not None else next(transformer.parameters()).device
    backend = select_attention(attention, device)
    if compile:  # inductor cannot fuse complex arithmetic: compiled blocks rotate with cos/sin (engine/real_rope.py)
        from .real_rope import use_real_rope

        use_real_rope(transformer)
    if backend != "native":  # native is diffusers' default dispatch: leave the stock modules as they are
        transformer.set_attention_backend(backend)
    cache = None
    if compile:
        if home is not None:
            cache = use_compile_cache(compile_cache_dir(home))
        transformer.compile_repeated_blocks(fullgraph=True)
    return Acceleration(compile=bool(compile), attention=backend, compile_cache_dir=cache)



QUANT_VALUES = (None, "none", "fp8", "int4", "nf4")  # int4/nf4: 4-bit quantize-on-load (quant/load_time.py)


def fp8_compute_mode(device, compile: bool, quant_requested: bool) -> str:
    """How fp8 layers multiply on ``device``: ``scaled_mm`` on fp8 tensor cores when compiled (eager fp8 is slower
    than bf16: the activation quantize is not fused), ``emulate`` for ``--quant fp8`` on a CPU (the GPU's numbers,
    to measure quality), else ``upcast`` (fp8 storage only)."""
    import torch

    from .quant.fp8 import scaled_mm_supported

    if scaled_mm_supported(device):
        return "scaled_mm" if compile else "upcast"
    if quant_requested and torch.device(device).type == "cpu":
        return "emulate"
    return "upcast"


def accelerate_engine(engine, *, compile=False, attention="auto", quant=None, cache=None, long_lived=False,
                      home: Path | None = None) -> dict:
    """Apply the speed options to ``engine``'s DiT in place (quantize, attention, step cache, compile — in that
    order, so compile traces the final modules). Returns what was done, for the metadata and ``describe()``."""
    import torch

    from .quant.fp8 import FP8Linear, quantize_model_fp8, set_fp8_compute
    from .step_cache import enable_step_cache, parse_cache

    transformer, device = engine.components.transformer, engine.components.device
    if quant not in QUANT_VALUES:
        raise InvalidRequest(f"unknown quant '{quant}'; valid: fp8, int4, nf4", code="invalid_quant")
    quant = None if quant == "none" else quant
    on_gpu = torch.device(device).type == "cuda"
    compile_value = parse_compile(compile)
    if quant == "fp8" and on_gpu and compile_value is False:
        raise InvalidRequest("--quant fp8 on a GPU needs --compile on (eager fp8 is slower than bf16)",
                             code="fp8_needs_compile")
    do_compile = resolve_compile(compile_value, long_lived=long_lived or (quant == "fp8" and on_gpu),
                                 device=device, builtin=engine.spec.builtin and quant != "fp8")
    done: dict = {}
    # where the DiT's weights live: on the device when resident, else in RAM (offloaded, or a CPU run); a
    # quantize-on-load DiT arrives here in RAM and each layer is quantized onto that place (engine.Engine.load)
    place = torch.device(device) if engine.plan.mode("transformer") == "resident" else torch.device("cpu")
    if quant in ("int4", "nf4"):
        from .quant.load_time import quantize_on_load

        done.update(quantize_on_load(transformer, quant, device=device, place=place, dtype=engine.components.dtype))
    if quant == "fp8":
        from .quant.load_time import refuse_quantized_base

        refuse_quantized_base(transformer, quant)
    has_fp8 = any(isinstance(m, FP8Linear) for m in transformer.modules())
    if quant == "fp8" and not has_fp8:
        done["fp8_layers_quantized"] = len(quantize_model_fp8(transformer, device=place))
        has_fp8 = True
    transformer.to(place)  # (a no-op unless a quantize-on-load DiT still has float layers in RAM)
    if has_fp8:
        mode = fp8_compute_mode(device, do_compile, quant == "fp8")
        done["fp8_compute"] = mode
        done["fp8_compute_layers"] = set_fp8_compute(transformer, mode)
    step_cache = parse_cache(cache)
    if step_cache is not None:
        enable_step_cache(transformer, step_cache)
        done["cache"] = step_cache.to_dict()
    acc = apply_acceleration(transformer, compile=do_compile, attention=attention, device=device, home=home)
    done.update(compile=acc.compile, attention=acc.attention)
    if quant:
        done["quant"] = quant
    return done


def speed_options(*, compile="auto", attention="auto", quant=None, cache=None) -> dict:
    """The CLI's ``--compile/--attention/--quant/--cache`` as ``Engine.load`` keywords, checked before any loading
    (a typo is a one-line error, not a failure after minutes of reading weights)."""
    from .step_cache import parse_cache

    compile = parse_compile(compile)
    name = (attention or "auto").lower()
    if name != "auto" and name not in ATTENTION_BACKENDS:
        select_attention(name, "cpu")  # raises the unknown-backend error
    quant = None if quant in (None, "", "none") else quant.lower()
    if quant not in QUANT_VALUES:
        raise InvalidRequest(f"unknown quant '{quant}'; valid: fp8, int4, nf4", code="invalid_quant")
    return {"compile": compile, "attention": name, "quant": quant, "cache": parse_cache(cache)}
