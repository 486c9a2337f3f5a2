"""Prompt suites: the built-in ``lightning-report`` (the prompts of the Qwen-Image-Lightning performance report, by
category, seed 42) and the user's own — a JSON file (``{"cases": [...]}`` or a bare list of prompts / case objects)
or a text file with one prompt per line (``#`` starts a comment).

A case's size that is not a multiple of 16 is floored to one (713 -> 704), as the reference diffusers pipeline does;
the report says so for each such case.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InvalidRequest
from .expected import extract_expected

BUILTIN = ("lightning-report",)
_CASE_KEYS = {"id", "prompt", "category", "section", "size", "expect", "expect_note", "report_marks",
              "report_marks_note", "negative_prompt"}


@dataclass(frozen=True)
class Case:
    id: str
    prompt: str
    category: str = ""
    section: str = ""
    size: tuple[int, int] | None = None  # as written in the suite (may be off the 16-px grid)
    expect: tuple[str, ...] | None = None  # overrides the quoted spans of the prompt
    report_marks: tuple[str, ...] = ()  # the reference report's own verdicts, one per suite variant
    negative_prompt: str | None = None

    @property
    def run_size(self) -> tuple[int, int] | None:
        """The size actually generated: floored to multiples of 16 like the reference pipeline."""
        if self.size is None:
            return None
        return (max(16, self.size[0] // 16 * 16), max(16, self.size[1] // 16 * 16))

    def expected(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(expected strings, notes on how they were found)."""
        if self.expect is not None:
            return self.expect, ("expected text set by the suite",)
        e = extract_expected(self.prompt)
        return e.strings, e.notes

    def notes(self) -> list[str]:
        out = []
        if self.size is not None and self.run_size != self.size:
            out.append(f"{self.size[0]}x{self.size[1]} is not a multiple of 16: generated at "
                       f"{self.run_size[0]}x{self.run_size[1]} (floored, as the reference pipeline does)")
        return out


@dataclass(frozen=True)
class Suite:
    name: str
    cases: tuple[Case, ...]
    seed: int | None = None
    source: str = ""
    variants: tuple[dict[str, Any], ...] = ()  # the suite's own variants: {"spec": "LABEL:SETTINGS", "label": ...}
    notes: tuple[str, ...] = field(default=())

    def select(self, selectors: list[str]) -> Suite:
        """Keep the cases named by id or 1-based index (in the order given)."""
        if not selectors:
            return self
        by_id = {c.id: c for c in self.cases}
        picked = []
        for sel in selectors:
            for s in (x.strip() for x in sel.split(",")):
                if s in by_id:
                    picked.append(by_id[s])
                elif s.isdigit() and 1 <= int(s) <= len(self.cases):
                    picked.append(self.cases[int(s) - 1])
                else:
                    raise InvalidRequest(f"suite '{self.name}' has no case '{s}'; cases: "
                                         f"{', '.join(c.id for c in self.cases)}", code="invalid_suite")
        return Suite(self.name, tuple(dict.fromkeys(picked)), self.seed, self.source, self.variants, self.notes)


def load_suite(name_or_path: str | Path) -> Suite:
    """A built-in suite by name, or a .json / text file."""
    text = str(name_or_path)
    if text in BUILTIN:
        from importlib.resources import files

        return _from_json(json.loads((files("qwenstudio.compare") / "suites" / f"{text}.json").read_text("utf-8")),
                          text)
    path = Path(text).expanduser()
    if not path.is_file():
        raise InvalidRequest(f"no suite '{text}': not a built-in ({', '.join(BUILTIN)}) nor a file",
                             code="invalid_suite")
    raw = path.read_text("utf-8")
    if path.suffix.lower() == ".json" or raw.lstrip()[:1] in ("{", "["):
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as e:
            raise InvalidRequest(f"{path}: not valid JSON ({e})", code="invalid_suite") from None
        return _from_json(data, path.stem)
    prompts = [ln.strip() for ln in raw.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not prompts:
        raise InvalidRequest(f"{path}: no prompts (one per line)", code="invalid_suite")
    return Suite(path.stem, tuple(Case(f"p{i + 1}", p) for i, p in enumerate(prompts)))


def _from_json(data: Any, default_name: str) -> Suite:
    if isinstance(data, list):
        data = {"cases": data}
    if not isinstance(data, dict) or not isinstance(data.get("cases"), list) or not data["cases"]:
        raise InvalidRequest("a JSON suite is a list of cases or {\"cases\": [...]}", code="invalid_suite")
    cases, seen = [], set()
    for i, raw in enumerate(data["cases"]):
        case = _case(raw, i)
        if case.id in seen:
            raise InvalidRequest(f"duplicate case id '{case.id}'", code="invalid_suite")
        seen.add(case.id)
        cases.append(case)
    seed = data.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise InvalidRequest("suite 'seed' must be an integer", code="invalid_suite")
    variants = tuple(v for v in data.get("variants", []) if isinstance(v, dict) and isinstance(v.get("spec"), str))
    notes = tuple(str(data[k]) for k in ("size_note",) if data.get(k))
    return Suite(str(data.get("name") or default_name), tuple(cases), seed, str(data.get("source") or ""),
                 variants, notes)


def _case(raw: Any, i: int) -> Case:
    if isinstance(raw, str):
        raw = {"prompt": raw}
    if not isinstance(raw, dict) or not isinstance(raw.get("prompt"), str) or not raw["prompt"].strip():
        raise InvalidRequest(f"case {i + 1}: needs a 'prompt' string", code="invalid_suite")
    unknown = sorted(set(raw) - _CASE_KEYS)
    if unknown:
        raise InvalidRequest(f"case {i + 1}: unknown key(s) {', '.join(unknown)}; known: "
                             f"{', '.join(sorted(_CASE_KEYS))}", code="invalid_suite")
    size = raw.get("size")
    if size is not None:
        if isinstance(size, str) and "x" in size:
            size = size.split("x", 1)
        try:
            size = (int(size[0]), int(size[1]))
        except (TypeError, ValueError, IndexError):
            raise InvalidRequest(f"case {i + 1}: size must be [width, height] or 'WxH'", code="invalid_suite") from None
    expect = raw.get("expect")
    if isinstance(expect, str):
        expect = [expect]
    if expect is not None and not all(isinstance(e, str) for e in expect):
        raise InvalidRequest(f"case {i + 1}: 'expect' must be a string or a list of strings", code="invalid_suite")
    return Case(id=str(raw.get("id") or f"p{i + 1}"), prompt=raw["prompt"], category=str(raw.get("category") or ""),
                section=str(raw.get("section") or ""), size=size, expect=tuple(expect) if expect is not None else None,
                report_marks=tuple(raw.get("report_marks") or ()), negative_prompt=raw.get("negative_prompt"))
