"""Request validation (every bad input gives its typed error) and variant specs."""

from __future__ import annotations

import math

import pytest

from qwenstudio import InvalidRequest, ModelNotFound
from qwenstudio.engine.requests import GenerateRequest
from qwenstudio.engine.specs import SPECS, get_spec

QWEN = get_spec("qwen-image")


def test_defaults_come_from_the_spec():
    r = GenerateRequest(prompt="a").resolve(QWEN)
    assert (r.width, r.height, r.steps, r.cfg, r.sampler, r.scheduler) == (1328, 1328, 50, 4.0, "euler", "reference")
    assert r.negative_prompt == " " and r.cfg_norm is True and 0 <= r.seed < 2**32


def test_aspect_uses_recommended_sizes():
    r = GenerateRequest(prompt="a", aspect="16:9").resolve(QWEN)
    assert (r.width, r.height) == (1664, 928)
    with pytest.raises(InvalidRequest, match="valid: 1:1, 16:9"):
        GenerateRequest(prompt="a", aspect="5:1").resolve(QWEN)


def test_lightning_recipe():
    spec = get_spec("qwen-image-lightning-4step")
    r = GenerateRequest(prompt="a").resolve(spec)
    assert (r.steps, r.cfg, r.shift) == (4, 1.0, 3.0)
    assert spec.recipe_lora and "Lightning" in spec.recipe_lora
    assert get_spec("qwen-image-lightning-8step").defaults.steps == 8


def test_spec_format_fits_edit_variants():
    spec = QWEN
    assert spec.max_input_images == 0 and not spec.is_edit and spec.drop_tokens == 34


@pytest.mark.parametrize(
    "fields,pattern",
    [
        ({"width": 1000}, "width 1000 is not a multiple of 16; nearest valid: 1008"),
        ({"height": 1030}, "nearest valid: 1024"),
        ({"steps": 0}, r"steps 0 out of range \[1, 200\]"),
        ({"steps": 201}, "steps 201 out of range"),
        ({"sampler": "foo"}, "unknown sampler 'foo'; valid: euler"),
        ({"scheduler": "bar"}, "unknown scheduler 'bar'; valid: reference"),
        ({"cfg": -1.0}, "cfg -1.0 out of range"),
        ({"cfg": float("nan")}, "cfg must be a number"),
        ({"batch": 0}, "batch 0 out of range"),
        ({"batch": 100}, "batch 100 out of range"),
        ({"seed": -1}, "seed -1 out of range"),
        ({"width": 8192, "height": 8192}, "out of range"),
        ({"noise": "gpu"}, "unknown noise convention"),
        ({"shift": 0.0}, "shift 0.0 out of range"),
        ({"steps": "4"}, "steps must be an integer"),
        ({"prompt": "   "}, "prompt is empty"),
    ],
)
def test_bad_inputs_raise_typed_errors(fields, pattern):
    with pytest.raises(InvalidRequest, match=pattern):
        GenerateRequest(**{"prompt": "a", **fields}).resolve(QWEN)


def test_json_round_trip_and_unknown_fields():
    r = GenerateRequest(prompt="a", seed=3, steps=5, extra={"k": 1}).resolve(QWEN)
    assert GenerateRequest.from_dict(r.to_dict()) == r
    with pytest.raises(InvalidRequest, match="unknown request field"):
        GenerateRequest.from_dict({"prompt": "a", "stepz": 3})


def test_unknown_variant():
    with pytest.raises(ModelNotFound, match="known: qwen-image"):
        get_spec("sdxl")


def test_magic_is_explicit():
    r = GenerateRequest(prompt="a cat", magic="en").resolve(QWEN)
    assert r.full_prompt() == "a cat, Ultra HD, 4K, cinematic composition."
    assert GenerateRequest(prompt="a cat").resolve(QWEN).full_prompt() == "a cat"


def test_every_spec_is_consistent():
    for spec in SPECS.values():
        for w, h in spec.resolutions.values():
            assert w % 16 == 0 and h % 16 == 0
        assert spec.default_aspect in spec.resolutions
    assert math.isclose(math.log(get_spec("qwen-image-lightning-4step").defaults.shift), math.log(3))
