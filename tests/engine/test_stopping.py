"""Every long stage honours a stop (SECURITY 31): text encode, VAE encode, denoise and VAE decode raise Cancelled
naming the stage once ``should_stop()`` turns true mid-stage; the checks change no pixel."""

from __future__ import annotations

import io
import uuid

import numpy as np
import pytest
from PIL import Image

from qwenstudio.errors import Cancelled

REQ = {"prompt": "a lighthouse", "seed": 3, "steps": 2, "width": 64, "height": 64}


def _trip_on(module):
    """A stop flag that turns true when ``module`` starts its forward (a hook of the test's own, registered first)."""
    flag = {"on": False}
    handles = [m.register_forward_pre_hook(lambda m, a: flag.update(on=True)) for m in module.modules()]

    class Handle:
        @staticmethod
        def remove():
            for h in handles:
                h.remove()

    return flag, Handle


@pytest.mark.parametrize("stage", ["text_encode", "denoise", "vae_decode"])
def test_generate_stops_inside_each_stage(tiny_engine, stage):
    c = tiny_engine.components
    module = {"text_encode": c.text_encoder, "denoise": c.transformer, "vae_decode": c.vae.decoder}[stage]
    flag, handle = _trip_on(module)
    try:
        with pytest.raises(Cancelled) as info:
            tiny_engine.generate(**{**REQ, "prompt": f"stop in {stage} {uuid.uuid4().hex}"}, should_stop=lambda: flag["on"])
    finally:
        handle.remove()
    assert info.value.detail["stage"] == stage
    flag["on"] = True  # a hook left behind would still see this flag: the next plain run must not stop
    assert tiny_engine.generate(**REQ).images


def test_edit_stops_inside_vae_encode(tiny_engine):
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 40, 40)).save(buf, format="PNG")
    flag, handle = _trip_on(tiny_engine.components.vae.encoder)
    try:
        with pytest.raises(Cancelled) as info:
            tiny_engine.edit(prompt="img2img stop", images=[buf.getvalue()], strength=0.6, steps=2, seed=1,
                             width=64, height=64, should_stop=lambda: flag["on"])
    finally:
        handle.remove()
    assert info.value.detail["stage"] == "vae_encode"


def test_stop_checks_change_no_pixel_and_leave_no_hooks(tiny_engine):
    plain = tiny_engine.generate(**REQ)
    checked = tiny_engine.generate(**REQ, should_stop=lambda: False)
    assert np.array_equal(np.asarray(plain.images[0].image), np.asarray(checked.images[0].image))


def test_decode_checked_matches_decode_and_stops(tiny_engine):
    """512x512: 4096 latent positions, so the mid-block attention runs chunked (4 blocks of 1024 query rows)."""
    import torch

    from qwenstudio.engine import latents as L
    from qwenstudio.engine.stopping import ATTENTION_ROWS

    vae = tiny_engine.components.vae
    z = torch.randn(1, 16, 64, 64, generator=torch.Generator().manual_seed(0))
    assert 64 * 64 > ATTENTION_ROWS
    with torch.inference_mode():
        assert torch.equal(L.decode(vae, z), L.decode_checked(vae, z, lambda: False))
        calls = {"n": 0}

        def stop_after_some_layers():
            calls["n"] += 1
            return calls["n"] > 5

        with pytest.raises(Cancelled, match="vae_decode"):
            L.decode_checked(vae, z, stop_after_some_layers)


def test_vae_attention_is_chunked_bit_identically_with_a_check_per_block():
    import torch
    import torch.nn.functional as F

    from qwenstudio.engine.stopping import ATTENTION_ROWS, chunked_attention_mode

    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 1, 4 * ATTENTION_ROWS, 32, generator=g) for _ in range(3))
    calls = []
    with torch.inference_mode():
        full = F.scaled_dot_product_attention(q, k, v)
        with chunked_attention_mode(lambda: calls.append(1)):
            chunked = F.scaled_dot_product_attention(q, k, v)
        assert torch.equal(full, chunked) and len(calls) == 4

        def stop_at_third():
            calls.append(1)
            if len(calls) > 6:
                raise Cancelled("cancelled during vae_decode")

        with pytest.raises(Cancelled), chunked_attention_mode(stop_at_third):
            F.scaled_dot_product_attention(q, k, v)
        assert len(calls) == 7  # stopped before its third block


def test_decode_checks_inside_the_attention_blocks_only(tiny_engine):
    """The chunking mode is scoped to the VAE's attention blocks (a mode over the whole decoder intercepted every op):
    a decode whose mid-block attention is chunked into 4 blocks makes exactly 4 more checks than one that is not."""
    import torch

    from qwenstudio.engine import latents as L
    from qwenstudio.engine.stopping import ATTENTION_ROWS, attention_blocks

    vae = tiny_engine.components.vae
    assert attention_blocks(vae.decoder) and all("Attention" in type(m).__name__ for m in attention_blocks(vae.decoder))

    def checks(side: int) -> int:
        calls = []
        z = torch.randn(1, 16, side, side, generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            L.decode_checked(vae, z, lambda: calls.append(1) and False)
        return len(calls)

    assert 32 * 32 == ATTENTION_ROWS  # not chunked; 64 x 64 = 4 blocks of rows
    assert checks(64) - checks(32) == 4
