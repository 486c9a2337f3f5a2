"""Behaviour of the engine on the tiny model: seeds and batches, progress, cancel, guardrails, prompt cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qwenstudio import Cancelled, GenerationFailed, InvalidRequest
from qwenstudio.engine.requests import GenerateRequest


def _pixels(img):
    return np.asarray(img.image)


def test_batch_image_i_equals_single_run_with_its_seed(tiny_engine):
    batch = tiny_engine.generate(prompt="three cats", batch=3, seed=10, steps=3)
    assert [im.metadata["seed"] for im in batch.images] == [10, 11, 12]
    for i in range(3):
        single = tiny_engine.generate(prompt="three cats", seed=10 + i, steps=3)
        assert (single.latents[0] - batch.latents[i]).abs().max().item() < 1e-5
        assert np.abs(_pixels(single.images[0]).astype(int) - _pixels(batch.images[i]).astype(int)).max() <= 1


def test_comfy_noise_is_one_stream_and_image_i_is_recreatable(tiny_engine):
    req = GenerateRequest(prompt="a boat", batch=2, seed=5, steps=3, noise="comfy")
    batch = tiny_engine.generate(req)
    # ComfyUI: torch.manual_seed(seed); randn([B, 16, H/8, W/8]) -> image 1 of the batch uses the second slice.
    expected = torch.randn((2, 16, 8, 8), generator=torch.Generator().manual_seed(5))
    from qwenstudio.engine.latents import make_noise

    assert torch.equal(make_noise(seeds=[5, 5], convention="comfy", width=64, height=64), expected)
    again = tiny_engine.generate(GenerateRequest.from_dict(batch.images[1].metadata["request"]))
    assert (again.latents[0] - batch.latents[1]).abs().max().item() < 1e-5


def test_same_seed_same_image_different_seed_different(tiny_engine):
    a = tiny_engine.generate(prompt="a tree", seed=7, steps=2)
    b = tiny_engine.generate(prompt="a tree", seed=7, steps=2)
    c = tiny_engine.generate(prompt="a tree", seed=8, steps=2)
    assert np.array_equal(_pixels(a.images[0]), _pixels(b.images[0]))
    assert not np.array_equal(_pixels(a.images[0]), _pixels(c.images[0]))


def test_progress_reports_every_step_with_previews(tiny_engine):
    events = []
    tiny_engine.generate(prompt="p", steps=4, seed=0, preview_every=2, on_progress=events.append)
    assert [e.step for e in events] == [1, 2, 3, 4]
    assert all(e.total == 4 for e in events)
    assert [e.preview is not None for e in events] == [False, True, False, True]
    assert events[1].preview.shape == (1, 8, 8, 3) and events[1].preview.dtype == np.uint8
    assert events[-1].elapsed >= events[0].elapsed > 0


def test_cancel_from_progress_callback(tiny_engine):
    seen = []

    def stop_at_two(p):
        seen.append(p.step)
        return p.step < 2

    with pytest.raises(Cancelled):
        tiny_engine.generate(prompt="p", steps=5, seed=0, on_progress=stop_at_two)
    assert seen == [1, 2]
    assert tiny_engine.generate(prompt="p", steps=2, seed=0).images  # the engine still works afterwards


def test_nan_latents_fail_with_typed_error(tiny_engine):
    bias = tiny_engine.components.transformer.proj_out.bias
    saved = bias.detach().clone()
    try:
        with torch.no_grad():
            bias.fill_(float("nan"))
        with pytest.raises(GenerationFailed) as err:
            tiny_engine.generate(prompt="p", steps=2, seed=0)
        assert err.value.code == "non_finite"
    finally:
        with torch.no_grad():
            bias.copy_(saved)
    assert tiny_engine.generate(prompt="p", steps=2, seed=0).images


def test_retry_in_fp32_recovers_from_low_precision_overflow(tiny_folder):
    from qwenstudio import Engine

    engine = Engine.load(tiny_folder, variant="tiny", device="cpu", dtype="bfloat16")

    def overflow_in_bf16(module, args, kwargs, output):
        if output[0].dtype == torch.bfloat16:
            return (torch.full_like(output[0], float("inf")),)
        return output

    engine.components.transformer.register_forward_hook(overflow_in_bf16, with_kwargs=True)
    with pytest.raises(GenerationFailed):
        engine.generate(prompt="p", steps=2, seed=0)
    result = engine.generate(prompt="p", steps=2, seed=0, retry_fp32=True)
    assert result.images[0].metadata["retried_fp32"] is True
    assert engine.components.transformer.proj_out.weight.dtype == torch.bfloat16  # restored


def test_prompt_embedding_cache_skips_the_encoder(tiny_engine):
    enc = tiny_engine.prompts
    enc.clear()
    calls = []
    hook = tiny_engine.components.text_encoder.model.language_model.register_forward_hook(lambda *a: calls.append(1))
    try:
        first = enc.encode("a cached prompt")
        second = enc.encode("a cached prompt")
    finally:
        hook.remove()
    assert len(calls) == 1 and first is second


def test_prompt_over_token_limit_is_refused(tiny_engine):
    long_prompt = "word " * 1100
    with pytest.raises(InvalidRequest) as err:
        tiny_engine.generate(prompt=long_prompt, steps=1, seed=0)
    assert err.value.code == "prompt_too_long" and "1024" in str(err.value)


def test_every_sampler_and_scheduler_runs(tiny_engine):
    from qwenstudio.engine.sampling import SAMPLERS, SCHEDULERS

    for sampler in SAMPLERS:
        r = tiny_engine.generate(prompt="p", steps=3, seed=0, sampler=sampler, scheduler="simple", shift=3.1)
        assert torch.isfinite(r.latents).all(), sampler
    for scheduler in SCHEDULERS:
        r = tiny_engine.generate(prompt="p", steps=3, seed=0, scheduler=scheduler)
        assert torch.isfinite(r.latents).all(), scheduler


def test_stochastic_sampler_is_reproducible(tiny_engine):
    a = tiny_engine.generate(prompt="p", steps=3, seed=4, sampler="euler_ancestral", scheduler="simple")
    b = tiny_engine.generate(prompt="p", steps=3, seed=4, sampler="euler_ancestral", scheduler="simple")
    assert torch.equal(a.latents, b.latents)


def test_out_of_memory_is_a_typed_error_and_the_engine_recovers(tiny_engine):
    calls = []

    def oom_once(module, args, kwargs):
        if not calls:
            calls.append(1)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    hook = tiny_engine.components.transformer.register_forward_pre_hook(oom_once, with_kwargs=True)
    try:
        with pytest.raises(GenerationFailed) as err:
            tiny_engine.generate(prompt="p", steps=2, seed=0)
        assert err.value.code == "out_of_memory" and "--offload" in str(err.value)
        assert tiny_engine.generate(prompt="p", steps=2, seed=0).images  # the next request runs
    finally:
        hook.remove()
