"""Cancellable long stages (SECURITY 31). A run is stopped by a ``should_stop()`` callable (cancel, deadline,
shutdown — the caller decides) that is checked *inside* every long stage, not only between denoising steps:
text encoding, VAE encode, each denoising step, VAE decode.

How: for the duration of a run, a forward pre-hook on every submodule of the text encoder, the VAE encoder and
decoder and the transformer calls ``should_stop()`` and raises ``Cancelled`` naming the stage. The hooks change
nothing in the computation (outputs stay bit-identical, tiled or not), so a stop takes effect at the next layer.
The one layer that is long on its own is the VAE mid-block's spatial self-attention (one scaled-dot-product
attention over every latent position: quadratic in the pixel count, seconds on CPU at 2048x2048); inside the VAE
on CPU it runs in blocks of query rows with a check between blocks (``ChunkedAttention``, a TorchFunctionMode active
only inside the attention blocks; each row's result does not depend on the others, and the output is bit-identical
— tests/engine/test_stopping.py). Figures:
benchmarks/cancel_latency.py. The checks fire only on the thread that installed them, so a second engine user on
another thread is never stopped by this run's flag.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from ..errors import Cancelled

ShouldStop = Callable[[], bool]


def check(should_stop: ShouldStop | None, stage: str) -> None:
    """A stage boundary: raise Cancelled when the run should stop."""
    if should_stop is not None and should_stop():
        raise Cancelled(f"cancelled during {stage}", detail={"stage": stage})


ATTENTION_ROWS = 1024  # query rows per block of a chunked VAE attention


def chunked_attention_mode(check: Callable[[], None], rows: int = ATTENTION_ROWS):
    """A TorchFunctionMode that runs plain CPU ``scaled_dot_product_attention(q, k, v)`` calls (no mask, no options:
    the VAE's) in blocks of ``rows`` query rows, calling ``check()`` before each block."""
    import torch
    import torch.nn.functional as F
    from torch.overrides import TorchFunctionMode

    class ChunkedAttention(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if (func is F.scaled_dot_product_attention and len(args) == 3 and not kwargs
                    and args[0].device.type == "cpu" and args[0].shape[-2] > rows):
                q, k, v = args
                blocks = []
                for i in range(0, q.shape[-2], rows):
                    check()
                    blocks.append(func(q[..., i:i + rows, :], k, v))
                return torch.cat(blocks, dim=-2)
            return func(*args, **kwargs)

    return ChunkedAttention()


def attention_blocks(module) -> list:
    """The VAE's self-attention blocks (the layers that call ``scaled_dot_product_attention``): modules whose class
    name says attention; the module itself when none does (then the mode covers all of it, as before)."""
    found = [m for m in module.modules() if "attention" in type(m).__name__.lower()]
    return found or [module]


def _scope_mode(module, make_mode) -> list:
    """Enter a fresh mode for each forward of ``module`` and leave it when the forward ends, raised or not."""
    active: list = []

    def enter(m, args):
        mode = make_mode()
        mode.__enter__()
        active.append(mode)

    def leave(m, args, output):
        if active:
            active.pop().__exit__(None, None, None)

    return [module.register_forward_pre_hook(enter), module.register_forward_hook(leave, always_call=True)]


@contextmanager
def stop_checks(should_stop: ShouldStop | None, stages: dict[str, Any]) -> Iterator[None]:
    """Check ``should_stop`` before every submodule forward of each ``{stage name: module}`` while inside."""
    if should_stop is None:
        yield
        return
    owner = threading.get_ident()
    handles = []

    def check_for(stage: str):
        def check_now():
            if threading.get_ident() == owner and should_stop():
                raise Cancelled(f"cancelled during {stage}", detail={"stage": stage})

        return check_now

    try:
        for stage, module in stages.items():
            if module is None or not hasattr(module, "modules"):
                continue
            check_now = check_for(stage)
            handles.extend(m.register_forward_pre_hook(lambda m, a, c=check_now: c()) for m in module.modules())
            if stage.startswith("vae"):  # only around the attention blocks: a mode over the whole decoder
                for m in attention_blocks(module):  # intercepts every op (456 per 256² decode, ~3 us each)
                    handles.extend(_scope_mode(m, lambda c=check_now: chunked_attention_mode(c)))
        yield
    finally:
        for h in handles:
            h.remove()


def stage_modules(components: Any) -> dict[str, Any]:
    """The modules of each long stage of a loaded engine."""
    vae = components.vae
    return {"text_encode": components.text_encoder, "vae_encode": getattr(vae, "encoder", None),
            "vae_decode": getattr(vae, "decoder", None), "denoise": components.transformer}


def stopping_progress(on_progress: Callable | None, should_stop: ShouldStop | None) -> Callable | None:
    """An ``on_progress`` that also answers False (stop) when ``should_stop()`` says so, at every step."""
    if should_stop is None:
        return on_progress

    def progress(p):
        if should_stop():
            return False
        return True if on_progress is None else on_progress(p)

    return progress
