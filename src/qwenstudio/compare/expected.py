"""What text a prompt asks the model to render, and how close an OCR reading comes to it.

Qwen-Image prompts put the text to draw in quotes — ``"…"``, ``“…”``, ``‘…’``, ``'…'``, ``「…」``, ``『…』`` — so the
quoted spans are the expected strings (a suite can override them per case). Scoring is deliberately simple and
stated in every report: both sides are normalised (NFKC, which folds full-width letters, digits and punctuation;
case-folded; whitespace, emoji and other pictographs removed; dash and dot variants unified), then the expected string
is located in the OCR reading with a substring edit distance; CER = that distance / expected length. A string passes
when its CER is at most the threshold (default 0: an exact match after normalisation, the Lightning report's ✅).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field

DEFAULT_MAX_CER = 0.0

# opener -> closer for the quote pairs that never double as apostrophes
_PAIRED = {"“": "”", "「": "」", "『": "』", "‘": "’"}
_DASHES = dict.fromkeys(map(ord, "‐‑‒–—―−﹣－"), "-")
_DOTS = dict.fromkeys(map(ord, "•・‧∙⋅"), "·")
_QUOTES = {**dict.fromkeys(map(ord, "“”„‟″"), '"'), **dict.fromkeys(map(ord, "‘’‚‛′"), "'")}


@dataclass(frozen=True)
class Expected:
    """The strings a prompt asks for, plus anything worth telling the reader about how they were found."""

    strings: tuple[str, ...]
    notes: tuple[str, ...] = ()


def extract_expected(prompt: str) -> Expected:
    """The quoted spans of ``prompt``, outermost first, in prompt order.

    Straight double quotes pair up in order; when their count is odd, the stray one (a prompt wrapped in a quote it
    never closes, as one Lightning-report prompt is) is dropped — the first if the prompt starts with it, else the
    last — and a note says so. A straight single quote opens only after a non-letter and closes only before one, so
    apostrophes ("girl's", "stores' lights") are not quotes; ’ closing a ‘ span likewise must not be followed by a
    letter."""
    notes: list[str] = []
    spans: list[tuple[int, int]] = []  # (start, end) of the content, exclusive end
    spans += _straight_double(prompt, notes)
    spans += _single_ascii(prompt)
    for opener, closer in _PAIRED.items():
        spans += _paired(prompt, opener, closer)
    spans.sort(key=lambda s: (s[0], -s[1]))
    outer: list[tuple[int, int]] = []
    for s in spans:
        if outer and s[0] < outer[-1][1]:  # nested in (or overlapping) an earlier span: the outer one counts
            continue
        outer.append(s)
    strings = []
    for start, end in outer:
        text = _strip_punct(prompt[start:end])
        if not normalise(text):
            if text:
                notes.append(f"skipped {text!r}: nothing OCR can read after normalisation")
            continue
        strings.append(text)
    return Expected(tuple(strings), tuple(notes))


def _straight_double(prompt: str, notes: list[str]) -> list[tuple[int, int]]:
    idx = [i for i, ch in enumerate(prompt) if ch == '"']
    if len(idx) % 2:
        drop = 0 if prompt.lstrip().startswith('"') else len(idx) - 1
        notes.append(f"odd number of '\"' quotes: ignored the one at character {idx[drop]}")
        idx.pop(drop)
    return [(idx[i] + 1, idx[i + 1]) for i in range(0, len(idx), 2)]


def _single_ascii(prompt: str) -> list[tuple[int, int]]:
    out = []
    for m in re.finditer(r"(?<![\w'])'([^'\n]+?)'(?![\w'])", prompt):
        out.append((m.start(1), m.end(1)))
    return out


def _paired(prompt: str, opener: str, closer: str) -> list[tuple[int, int]]:
    out, pos = [], 0
    while (start := prompt.find(opener, pos)) >= 0:
        end = start + 1
        while True:
            end = prompt.find(closer, end)
            if end < 0 or closer != "’" or not (end + 1 < len(prompt) and prompt[end + 1].isalpha()):
                break
            end += 1  # an apostrophe inside a word, not the closing quote
        if end < 0:
            break
        out.append((start + 1, end))
        pos = end + 1
    return out


def _strip_punct(text: str) -> str:
    """Trim spaces and the punctuation English quoting drags inside the quotes ("… per cup,")."""
    text = text.strip()
    while text and unicodedata.category(text[-1]).startswith("P") and text[-1] not in ")]}）】":
        text = text[:-1].rstrip()
    while text and unicodedata.category(text[0]).startswith("P") and text[0] not in "([{（【":
        text = text[1:].lstrip()
    return text


def normalise(text: str) -> str:
    """Case, width and spacing folded away; pictographs dropped (OCR cannot read emoji)."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = text.translate(_DASHES).translate(_DOTS).translate(_QUOTES)
    keep = []
    for ch in text:
        cat = unicodedata.category(ch)
        if ch.isspace() or cat in ("So", "Cs", "Cn", "Cf", "Mn", "Zs"):
            continue  # emoji, variation selectors, zero-width joiners, combining marks, spaces
        keep.append(ch)
    return "".join(keep)


@dataclass(frozen=True)
class StringScore:
    expected: str
    found: str  # the part of the OCR reading that matches best (normalised)
    distance: int
    cer: float
    exact: bool
    passed: bool

    @property
    def verdict(self) -> str:
        return "✅" if self.passed else "❌"

    def to_dict(self) -> dict:
        return {"expected": self.expected, "found": self.found, "distance": self.distance,
                "cer": round(self.cer, 4), "exact": self.exact, "passed": self.passed, "verdict": self.verdict}


@dataclass(frozen=True)
class TextScore:
    """Per-image verdict: every expected string passes (``None`` when the prompt asks for no text)."""

    strings: tuple[StringScore, ...]
    ocr_text: str
    max_cer: float
    notes: tuple[str, ...] = field(default=())

    @property
    def passed(self) -> bool | None:
        return all(s.passed for s in self.strings) if self.strings else None

    @property
    def verdict(self) -> str:
        return {True: "✅", False: "❌", None: "—"}[self.passed]

    @property
    def cer(self) -> float | None:
        """Character error rate over all expected characters of the image."""
        total = sum(len(normalise(s.expected)) for s in self.strings)
        return sum(s.distance for s in self.strings) / total if total else None

    def to_dict(self) -> dict:
        return {"verdict": self.verdict, "passed": self.passed, "cer": None if self.cer is None else round(self.cer, 4),
                "max_cer": self.max_cer, "strings": [s.to_dict() for s in self.strings], "ocr_text": self.ocr_text,
                "notes": list(self.notes)}


def score_reading(expected: Expected | list[str] | tuple[str, ...], ocr_lines: list[str],
                  max_cer: float = DEFAULT_MAX_CER) -> TextScore:
    """Score OCR lines (reading order) against the expected strings."""
    exp = expected if isinstance(expected, Expected) else Expected(tuple(expected))
    reading = normalise("".join(ocr_lines))
    scores = []
    for s in exp.strings:
        target = normalise(s)
        dist, found = substring_distance(target, reading)
        cer = dist / len(target) if target else 0.0
        scores.append(StringScore(s, found, dist, cer, dist == 0, cer <= max_cer + 1e-12))
    return TextScore(tuple(scores), " ".join(ocr_lines), max_cer, exp.notes)


def substring_distance(needle: str, haystack: str) -> tuple[int, str]:
    """Smallest edit distance between ``needle`` and any substring of ``haystack`` (Sellers' algorithm), and that
    substring. Free start and end in the haystack: text around the expected string costs nothing."""
    m = len(needle)
    if m == 0:
        return 0, ""
    prev = list(range(m + 1))  # column for haystack position 0: distance from needle[:i] to ""
    prev_start = [0] * (m + 1)
    best, best_end, best_start = m, 0, 0
    for j, ch in enumerate(haystack, start=1):
        cur, cur_start = [0], [j]  # matching may start anywhere: row 0 is free
        for i in range(1, m + 1):
            sub = prev[i - 1] + (needle[i - 1] != ch)
            dele = cur[i - 1] + 1  # needle char missing from the haystack
            ins = prev[i] + 1  # extra haystack char
            if sub <= dele and sub <= ins:
                cur.append(sub)
                cur_start.append(prev_start[i - 1])
            elif dele <= ins:
                cur.append(dele)
                cur_start.append(cur_start[i - 1])
            else:
                cur.append(ins)
                cur_start.append(prev_start[i])
        if cur[m] < best:
            best, best_end, best_start = cur[m], j, cur_start[m]
        prev, prev_start = cur, cur_start
    return best, haystack[best_start:best_end]
