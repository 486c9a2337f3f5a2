"""ComfyUI RoPE positions on a loaded diffusers DiT vs ComfyUI's own forward (tests/fixtures/peers/compat, made by
running ComfyUI's Qwen-Image model on the tiny weights: make_comfy_rope_fixtures.py, SOURCES.md)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qwenstudio.engine import latents as L
from qwenstudio.engine.compat import ComfyRope, axis_positions, comfy_positions
from qwenstudio.errors import UnsupportedFormat

FIXTURE = load_file(Path(__file__).parents[1] / "fixtures" / "peers" / "compat" / "comfy_forward.safetensors")


def checksum(model):
    return torch.stack([p.double().sum() for _, p in sorted(model.state_dict().items())]).sum()


def forward(transformer, grid):
    """Our engine's call of the DiT on ComfyUI's inputs, back in ComfyUI's latent layout."""
    x = FIXTURE[f"{grid}.x"][:, :, 0]  # [B, 16, H, W]
    lh, lw = x.shape[-2:]
    with torch.no_grad():
        v = transformer(
            hidden_states=L.pack(x), timestep=FIXTURE[f"{grid}.timestep"], encoder_hidden_states=FIXTURE[f"{grid}.context"],
            encoder_hidden_states_mask=None, img_shapes=[[(1, lh // 2, lw // 2)]], return_dict=False,
        )[0]
    return L.unpack(v, lh, lw).unsqueeze(2)


@pytest.fixture(scope="module")
def transformer(tiny_engine):
    model = tiny_engine.components.transformer
    assert checksum(model).item() == pytest.approx(FIXTURE["weights_checksum"].item(), abs=1e-9)  # same tiny weights
    return model


def test_axis_positions_as_each_tool_centres_them():
    assert axis_positions(3, "diffusers") == [-2, -1, 0]
    assert axis_positions(3, "comfy") == [-1, 0, 1]
    assert axis_positions(4, "diffusers") == axis_positions(4, "comfy") == [-2, -1, 0, 1]
    assert axis_positions(83, "comfy")[0] == -41 and axis_positions(83, "diffusers")[0] == -42  # 1328 px
    with pytest.raises(ValueError, match="unknown rope mode"):
        axis_positions(3, "a1111")


@pytest.mark.parametrize("grid", ["odd", "even"])
def test_comfy_mode_reproduces_comfyui_forward(transformer, grid):
    want = FIXTURE[f"{grid}.out"]
    with comfy_positions(transformer):
        assert isinstance(transformer.pos_embed, ComfyRope)
        got = forward(transformer, grid)
    assert not isinstance(transformer.pos_embed, ComfyRope)  # switched back after the call
    assert (got - want).abs().max().item() <= 1e-5

    plain = (forward(transformer, grid) - want).abs().max().item()
    if grid == "even":
        assert plain <= 1e-5  # the tools agree at even grids
    else:
        assert plain > 1e-3  # ... and not at odd ones: the reason for the compat mode


def test_disabled_and_nested_switches_and_no_weight_change(transformer):
    before = {k: v.clone() for k, v in transformer.state_dict().items()}
    original = transformer.pos_embed
    with comfy_positions(transformer, enabled=False):
        assert transformer.pos_embed is original
    with comfy_positions(transformer):
        inner = transformer.pos_embed
        with comfy_positions(transformer):
            assert transformer.pos_embed is inner
        assert transformer.pos_embed is inner
    assert transformer.pos_embed is original
    after = transformer.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_refuses_other_rope_modules():
    with pytest.raises(UnsupportedFormat, match="QwenEmbedRope"):
        ComfyRope(torch.nn.Identity())


def test_compat_comfy_request_field_sets_the_conventions_and_positions(tiny_engine):
    """``compat="comfy"`` through the engine: ComfyUI's noise stream, plain CFG, simple schedule at shift 3.1 fill
    what the user left unset (recorded as ``compat comfy``), and ComfyUI's RoPE positions are used — which only
    change the result at an odd patch grid (48 px = 3 patches)."""
    import torch

    kw = dict(prompt="a lighthouse", seed=3, steps=2, cfg=2.0)
    for w, h, same in ((48, 80, False), (64, 64, True)):
        comfy = tiny_engine.generate(compat="comfy", width=w, height=h, **kw)
        req = comfy.request
        assert (req.noise, req.cfg_norm, req.scheduler, req.shift) == ("comfy", False, "simple", 3.1)
        assert comfy.images[0].metadata["settings_from"]["cfg_norm"] == "compat comfy"
        plain = tiny_engine.generate(noise="comfy", cfg_norm=False, scheduler="simple", shift=3.1, width=w, height=h,
                                     **kw)
        assert torch.equal(comfy.latents, plain.latents) is same
    user = tiny_engine.generate(compat="comfy", cfg_norm=True, width=64, height=64, **kw)
    assert user.request.cfg_norm is True and user.images[0].metadata["settings_from"]["cfg_norm"] == "user"
