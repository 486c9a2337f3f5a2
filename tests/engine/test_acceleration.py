"""Exact speed-ups: regional compile gives the eager result, attention backends are chosen among what is installed,
and bad settings are typed errors before anything loads."""

from __future__ import annotations

import pytest
import torch

from qwenstudio import Engine
from qwenstudio.engine.acceleration import (
    available_attention,
    parse_compile,
    resolve_compile,
    select_attention,
    speed_options,
)
from qwenstudio.errors import InvalidRequest

KW = {"prompt": "a red fox", "seed": 3, "steps": 2, "cfg": 1.0, "width": 64, "height": 64}


def test_compiled_blocks_give_the_eager_latents_and_use_the_home_cache(tmp_path, monkeypatch):
    """The one compile test (tiny model, one text length, ~20-30 s on 2 cores): compiled == eager."""
    from qwenstudio.config import Settings

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)  # restored after the test
    settings = Settings(home=tmp_path / "home")
    eager = Engine.load("tiny", device="cpu", settings=settings).generate(**KW)
    engine = Engine.load("tiny", device="cpu", settings=settings, compile=True)
    assert engine.acceleration["compile"] is True and engine.describe()["acceleration"]["compile"] is True
    compiled = engine.generate(**KW)
    torch.testing.assert_close(compiled.latents, eager.latents, rtol=1e-4, atol=1e-4)
    assert compiled.images[0].metadata["model"]["acceleration"] == {"compile": True, "attention": "native"}
    cache = tmp_path / "home" / "cache" / "torch-compile"
    assert cache.is_dir() and any(cache.rglob("*")), "inductor's on-disk cache lives under the qwenstudio home"


def test_auto_compile_is_on_for_long_lived_real_models_only():
    assert resolve_compile("auto", long_lived=True, device="cpu") is True  # server, bench
    assert resolve_compile("auto", long_lived=False, device="cpu") is False  # one-shot CLI run
    assert resolve_compile("auto", long_lived=True, device="cpu", builtin=True) is False  # the tiny toy
    assert resolve_compile("on", long_lived=False, device="cpu") is True
    assert parse_compile("off") is False and parse_compile(True) is True
    with pytest.raises(InvalidRequest) as e:
        parse_compile("sometimes")
    assert e.value.code == "invalid_compile"


def test_attention_auto_picks_exact_sdpa_and_names_map_to_the_dispatcher():
    assert select_attention("auto", "cpu") == "native"
    assert select_attention(None, "cpu") == "native"
    assert select_attention("sdpa", "cpu") == "native"
    assert select_attention("math", "cpu") == "_native_math"
    assert set(available_attention("cpu")) == {"sdpa", "native", "math", "flex"}


@pytest.mark.parametrize("name, code", [("flash", "attention_unavailable"), ("sage", "attention_unavailable"),
                                        ("warp-speed", "unknown_attention")])
def test_attention_unavailable_or_unknown_is_a_typed_error(name, code):
    with pytest.raises(InvalidRequest) as e:
        select_attention(name, "cpu")
    assert e.value.code == code and "available" in e.value.message or "valid" in e.value.message


def test_math_attention_backend_gives_the_sdpa_image():
    engine = Engine.load("tiny", device="cpu", attention="math")
    assert engine.acceleration["attention"] == "_native_math"
    ref = Engine.load("tiny", device="cpu").generate(**KW)
    torch.testing.assert_close(engine.generate(**KW).latents, ref.latents, rtol=1e-5, atol=1e-5)


def test_speed_options_reject_typos_before_loading():
    assert speed_options() == {"compile": "auto", "attention": "auto", "quant": None, "cache": None}
    for kw, code in (({"quant": "int3"}, "invalid_quant"), ({"cache": "lots"}, "invalid_cache"),
                     ({"compile": "maybe"}, "invalid_compile"), ({"attention": "warp"}, "unknown_attention")):
        with pytest.raises(InvalidRequest) as e:
            speed_options(**kw)
        assert e.value.code == code
