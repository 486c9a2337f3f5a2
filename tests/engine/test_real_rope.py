"""Real-valued RoPE (the compiled blocks' form) equals diffusers' complex RoPE, on the transformer and end to end."""

from __future__ import annotations

import pytest
import torch

from qwenstudio.engine.real_rope import RealRopeAttnProcessor, real_rope, rotate, stock_rope, use_real_rope


def test_rotation_is_the_complex_product():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 3, 8, generator=g)
    freqs = torch.polar(torch.ones(7, 4), torch.randn(7, 4, generator=g))
    want = torch.view_as_real(torch.view_as_complex(x.reshape(2, 7, 3, 4, 2)) * freqs.unsqueeze(1)).flatten(3)
    torch.testing.assert_close(rotate(x, real_rope(freqs)), want, rtol=0, atol=1e-6)


@pytest.fixture()
def transformer(tiny_folder):
    from qwenstudio.engine.loading import load_diffusers_folder

    return load_diffusers_folder(tiny_folder, device="cpu").transformer


@pytest.mark.parametrize("masked", [False, True])
def test_transformer_output_equals_diffusers(transformer, masked):
    """Batched CFG pair with padding mask, and an edit-style second image in the sequence."""
    g = torch.Generator().manual_seed(1)
    hidden = transformer.config.joint_attention_dim
    x = torch.randn(2, 16 + 4, 64, generator=g)  # 4x4 latent patches + a 2x2 reference image
    e = torch.randn(2, 9, hidden, generator=g)
    mask = torch.tensor([[True] * 9, [True] * 6 + [False] * 3]) if masked else None
    kw = dict(hidden_states=x, timestep=torch.tensor([0.3, 0.3]), encoder_hidden_states=e,
              encoder_hidden_states_mask=mask, img_shapes=[[(1, 4, 4), (1, 2, 2)]] * 2, return_dict=False)
    with torch.no_grad():
        want = transformer(**kw)[0]
        assert use_real_rope(transformer) == len(transformer.transformer_blocks)
        assert all(isinstance(b.attn.processor, RealRopeAttnProcessor) for b in transformer.transformer_blocks)
        got = transformer(**kw)[0]
        with stock_rope(transformer):  # the bench's stock runs: diffusers' own complex path, bit for bit
            assert torch.equal(transformer(**kw)[0], want)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_engine_with_real_rope_gives_the_stock_latents(tiny_folder):
    """Through the engine's public generate with CFG (batched pair): the rotation form changes float rounding only."""
    from qwenstudio import Engine

    kw = {"prompt": "a red fox", "negative_prompt": "blurry", "seed": 3, "steps": 2, "cfg": 4.0, "width": 64,
          "height": 64}
    engine = Engine.load(tiny_folder, variant="tiny", device="cpu")
    want = engine.generate(**kw).latents
    use_real_rope(engine.components.transformer)
    got = engine.generate(**kw).latents
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
