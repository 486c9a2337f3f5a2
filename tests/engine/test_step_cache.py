"""Step cache: off is bit-identical, on reuses block residuals on quiet steps and says how many, bad settings are
typed errors, and the engine records the settings so a re-run is the same computation."""

from __future__ import annotations

import pytest
import torch

from qwenstudio import Engine
from qwenstudio.engine.step_cache import StepCacheConfig, disable_step_cache, enable_step_cache, parse_cache
from qwenstudio.errors import InvalidRequest

KW = {"prompt": "a red fox", "negative_prompt": "blurry", "seed": 3, "steps": 8, "cfg": 4.0, "width": 64,
      "height": 64}


@pytest.fixture(scope="module")
def engine():
    return Engine.load("tiny", device="cpu")  # its own engine: the cache changes the transformer in place


@pytest.fixture(scope="module")
def exact(engine):
    return engine.generate(**KW)


def test_cache_off_and_never_reusing_are_bit_identical(engine, exact):
    tr = engine.components.transformer
    cache = enable_step_cache(tr, StepCacheConfig(threshold=1e-9))  # on, but no step is ever quiet enough
    never = engine.generate(**KW)
    assert cache.stats.calls == 8 and cache.stats.reused == 0  # CFG's two passes are one batched call per step
    assert torch.equal(never.latents, exact.latents)
    disable_step_cache(tr)
    assert type(tr.transformer_blocks) is torch.nn.ModuleList and tr.step_cache is None
    assert torch.equal(engine.generate(**KW).latents, exact.latents)


def test_cache_reuses_quiet_steps_for_both_cfg_passes(engine, exact):
    tr = engine.components.transformer
    cache = enable_step_cache(tr, StepCacheConfig(threshold=0.6, warmup_steps=3, max_skip=2))
    try:
        assert len(list(tr.transformer_blocks[0:2])) == 2  # a slice iterates as plain blocks
        out = engine.generate(**KW)
        first = cache.stats.to_dict()
        again = engine.generate(**KW)  # a new run resets the state: same decisions, same image
    finally:
        disable_step_cache(tr)
    assert first["calls"] == 8 and first["reused"] > 0  # one batched call per step: cond + uncond reused together
    assert first["reused"] <= 8 - 3
    assert torch.equal(again.latents, out.latents)
    rel = float((out.latents - exact.latents).norm() / exact.latents.norm())
    assert 0 < rel < 0.3


def test_taylor_extrapolation_changes_the_reused_residual(engine):
    tr = engine.components.transformer
    results = []
    for taylor in (0, 1):
        enable_step_cache(tr, StepCacheConfig(threshold=0.6, warmup_steps=3, max_skip=2, taylor=taylor))
        try:
            results.append(engine.generate(**KW).latents)
        finally:
            disable_step_cache(tr)
    assert not torch.equal(results[0], results[1])


def test_engine_load_cache_option_is_recorded_in_the_metadata():
    engine = Engine.load("tiny", device="cpu", cache=0.5)
    assert engine.components.transformer.step_cache.config.threshold == 0.5
    meta = engine.generate(prompt="a cat", steps=2, seed=1).images[0].metadata
    assert meta["model"]["acceleration"]["cache"] == {"kind": "first_block", "threshold": 0.5, "warmup_steps": 4,
                                                      "max_skip": 3, "taylor": 1}
    assert parse_cache(meta["model"]["acceleration"]["cache"]) == StepCacheConfig(threshold=0.5)


@pytest.mark.parametrize("value", ["lots", 1.5, -0.1, {"threshold": 0.1, "colour": "red"},
                                   {"threshold": 0.1, "taylor": 3}])
def test_bad_cache_settings_are_typed_errors(value):
    with pytest.raises(InvalidRequest) as e:
        parse_cache(value)
    assert e.value.code == "invalid_cache"


def test_off_values_mean_no_cache():
    for off in (None, False, "off", "0", 0, ""):
        assert parse_cache(off) is None
    assert parse_cache("0.1") == StepCacheConfig(threshold=0.1)
