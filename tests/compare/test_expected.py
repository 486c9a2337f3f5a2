"""Which text a prompt asks for (quoted spans), normalisation, and the substring edit distance behind CER."""

from __future__ import annotations

import pytest

from qwenstudio.compare.expected import extract_expected, normalise, score_reading, substring_distance
from qwenstudio.compare.suites import load_suite


@pytest.mark.parametrize("prompt, expected", [
    ('A sign that says "Hello World" and “Open 24h”.', ("Hello World", "Open 24h")),
    ("墙上写着「通义千问」，旁边是『千问』", ("通义千问", "千问")),
    ("The girl's hat says 'HELLO' under the stores' lights", ("HELLO",)),  # apostrophes are not quotes
    ("a ‘Don’t stop’ banner", ("Don’t stop",)),  # ’ inside a word does not close ‘
    ('a chalkboard reading "Qwen Coffee 😊 $2 per cup," and a neon "通义千问"',
     ("Qwen Coffee 😊 $2 per cup", "通义千问")),
    ("“outer 「inner」 text”", ("outer 「inner」 text",)),  # nested: the outer span counts
    ("no text here", ()),
])
def test_quoted_spans(prompt, expected):
    assert extract_expected(prompt).strings == expected


def test_odd_straight_quotes_drop_the_wrapping_one_with_a_note():
    e = extract_expected('"A street at night. Signs include: "龍鳳冰室" "HAPPY HAIR" and lights.')
    assert e.strings == ("龍鳳冰室", "HAPPY HAIR")
    assert e.notes and "odd number" in e.notes[0]


def test_builtin_suite_expectations():
    suite = load_suite("lightning-report")
    by_id = {c.id: c for c in suite.cases}
    assert len(suite.cases) == 11 and suite.seed == 42 and len(suite.variants) == 3
    assert by_id["capybara-hello-world"].expected()[0] == ("Hello World",)  # suite override: the prompt has no quotes
    assert by_id["hong-kong-neon"].expected()[0][:2] == ("龍鳳冰室", "金華燒臘")
    assert len(by_id["hong-kong-neon"].expected()[0]) == 24
    assert by_id["couplet"].expected()[0] == ("义本生知人机同道善思新", "通云赋智乾坤启数高志远", "智启通义")
    small = by_id["coffee-shop-713x1280"]
    assert small.size == (713, 1280) and small.run_size == (704, 1280) and "floored" in small.notes()[0]


def test_normalisation_folds_width_case_space_and_emoji():
    assert normalise("Ｑｗｅｎ　Coffee 😊 $2") == "qwencoffee$2"
    assert normalise("原生中文·复杂场景・自动布局") == "原生中文·复杂场景·自动布局"
    assert normalise("3.14—15") == "3.14-15"


def test_substring_distance_and_cer():
    assert substring_distance("hello", "xxhelloyy") == (0, "hello")
    assert substring_distance("foundational", "a fundational model")[0] == 1
    s = score_reading(["Hello World", "通义千问"], ["HELLO", "WORLD 通义干问"])
    assert [x.passed for x in s.strings] == [True, False] and s.passed is False and s.verdict == "❌"
    assert s.strings[1].distance == 1 and s.strings[1].cer == pytest.approx(0.25)
    assert score_reading(["通义千问"], ["通义干问"], max_cer=0.25).passed is True  # a stated, looser threshold
