"""Cancellable long stages (SECURITY 31). A run is stopped by a ``should_stop()`` callable (cancel, deadline,
shutdown — the caller decides) that is checked *inside* every long stage, not only between denoising steps:
text encoding, VAE encode, each denoising step, VAE decode.

How: for the duration of a run, a forward pre-hook on every submodule of the text encoder, the VAE encoder and
decoder and the transformer calls ``should_stop()`` and raises ``Cancelled`` naming the stage. The hooks change
nothing in the computation (outputs stay bit-identical, tiled or not), so a stop takes effect at the next layer:
on CPU at the largest size the tiny model allows, the longest gap between two checks is a single convolution of
the decoder's last block (see benchmarks/cancel_latency.py for the measured figures). They fire only on the
thread that installed them, so a second engine user on another thread is never stopped by this run's flag.
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


@contextmanager
def stop_checks(should_stop: ShouldStop | None, stages: dict[str, Any]) -> Iterator[None]:
    """Check ``should_stop`` before every submodule forward of each ``{stage name: module}`` while inside."""
    if should_stop is None:
        yield
        return
    owner = threading.get_ident()
    handles = []

    def hook_for(stage: str):
        def hook(module, args):
            if threading.get_ident() == owner and should_stop():
                raise Cancelled(f"cancelled during {stage}", detail={"stage": stage})

        return hook

    try:
        for stage, module in stages.items():
            if module is None or not hasattr(module, "modules"):
                continue
            hook = hook_for(stage)
            handles.extend(m.register_forward_pre_hook(hook) for m in module.modules())
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
