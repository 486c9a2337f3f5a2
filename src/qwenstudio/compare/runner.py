"""``qwenstudio compare``: variants × prompt suite × seeds -> images, text verdicts and a report.

Resumable by construction: every finished image is appended to ``results.jsonl`` in the output folder (flushed and
fsynced) keyed by (variant label, case id, seed) with a signature of everything that decides the image (model,
settings, prompt, size, seed). A rerun skips the keys whose signature still matches and whose image is on disk, so a
killed run continues where it stopped, and changing one variant reruns only that variant.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InvalidRequest
from .engines import EngineSlot, LoadOptions, generate_measured, nfe
from .expected import DEFAULT_MAX_CER, Expected
from .suites import Case, Suite
from .variants import Variant

RESULTS = "results.jsonl"
NORMALISATION = "NFKC width folding, case folding, whitespace and emoji removed, dash/dot variants unified"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")


@dataclass(frozen=True)
class Job:
    variant: Variant
    case: Case
    seed: int
    size: tuple[int, int] | None
    image: str  # relative path in the output folder

    @property
    def key(self) -> str:
        return json.dumps([self.variant.label, self.case.id, self.seed], ensure_ascii=False)

    def request_fields(self) -> dict[str, Any]:
        f: dict[str, Any] = {**self.variant.fields, "prompt": self.case.prompt, "seed": self.seed}
        if self.case.negative_prompt is not None and "negative_prompt" not in self.variant.fields:
            f["negative_prompt"] = self.case.negative_prompt
        if self.size is not None:
            f["width"], f["height"] = self.size
        return f

    def signature(self) -> str:
        return json.dumps({"variant": json.loads(self.variant.signature()), "prompt": self.case.prompt,
                           "negative": self.case.negative_prompt, "size": self.size, "seed": self.seed},
                          sort_keys=True, ensure_ascii=False)


@dataclass
class ComparePlan:
    suite: Suite
    variants: list[Variant]
    seeds: list[int]
    out_dir: Path
    size: tuple[int, int] | None = None  # overrides every case's size (smoke runs on small models)
    ocr: bool = True
    max_cer: float = DEFAULT_MAX_CER
    warmup: bool = True
    options: LoadOptions = field(default_factory=LoadOptions)
    suite_variants: bool = False  # the variants are the suite's own (its report marks line up with them)

    def jobs(self) -> list[Job]:
        """Variant-major, variants sharing a model kept together so each model loads once."""
        vslug = _unique([_slug(v.label) or f"v{i + 1}" for i, v in enumerate(self.variants)])
        cslug = _unique([_slug(c.id) or f"case{i + 1}" for i, c in enumerate(self.suite.cases)])
        order = {}
        for v in self.variants:
            order.setdefault((v.model, v.variant), len(order))
        jobs = []
        for vi, v in sorted(enumerate(self.variants), key=lambda t: order[(t[1].model, t[1].variant)]):
            for ci, c in enumerate(self.suite.cases):
                size = self.size or c.run_size
                for seed in self.seeds:
                    jobs.append(Job(v, c, seed, size, f"images/{vslug[vi]}/{cslug[ci]}-s{seed}.png"))
        return jobs


def _unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n}-{seen[n]}")
    return out


class ResultStore:
    """``results.jsonl``: one JSON record per finished image, appended and fsynced; a torn last line (a kill in the
    middle of a write) is cut off on load."""

    def __init__(self, out_dir: Path):
        self.path = Path(out_dir) / RESULTS

    def load(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        raw = self.path.read_bytes()
        if raw and not raw.endswith(b"\n"):
            raw = raw[: raw.rfind(b"\n") + 1]
            with open(self.path, "r+b") as f:
                f.truncate(len(raw))
        out = []
        for line in raw.decode("utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    def append(self, record: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())


def finished(plan: ComparePlan, records: list[dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """{job key: its latest record} for the jobs already done under the current settings (image on disk)."""
    records = ResultStore(plan.out_dir).load() if records is None else records
    sig = {j.key: j.signature() for j in plan.jobs()}
    done = {}
    for r in records:
        if sig.get(r.get("key")) == r.get("signature") and (plan.out_dir / r.get("image", "")).is_file():
            done[r["key"]] = r
    return done


def run_compare(plan: ComparePlan, *, on_start: Callable[[int, int], Any] | None = None,
                on_job: Callable[[int, int, Job, dict], Any] | None = None) -> dict[str, Any]:
    """Run what is left of ``plan``, persist each result as it comes, then write the report. Returns its data."""
    from ..engine.requests import GenerateRequest
    from ..outputs import save_png
    from .ocr import TextReader

    store = ResultStore(plan.out_dir)
    done = finished(plan, store.load())
    jobs = plan.jobs()
    remaining = [j for j in jobs if j.key not in done]
    check_loras(plan, {j.variant.label for j in remaining})
    reader = TextReader() if plan.ocr else None
    if reader is not None:  # results made with --no-ocr (or before a crash mid-score) get their verdicts now
        for j in jobs:
            r = done.get(j.key)
            if r is not None and r.get("text") is None and _expected(j.case).strings:
                from PIL import Image

                with Image.open(plan.out_dir / r["image"]) as im:
                    r = {**r, "text": reader.score(im, _expected(j.case), plan.max_cer).to_dict()}
                store.append(r)
                done[j.key] = r
    if on_start is not None:
        on_start(len(remaining), len(done))
    slot = EngineSlot(plan.options)
    try:
        groups: dict[tuple, list[Job]] = {}
        for j in remaining:
            groups.setdefault((j.variant.model, j.variant.variant), []).append(j)
        count = 0
        for (model, variant), group in groups.items():
            engine = slot.get(model, variant)
            prepared = []
            for j in group:  # every request of this model is checked before the first one runs
                try:
                    prepared.append(engine.prepare(GenerateRequest(**j.request_fields())))
                except TypeError as e:
                    raise InvalidRequest(f"variant '{j.variant.label}': {e}", code="invalid_variant") from None
            warmed: set[str] = set()
            for j, req in zip(group, prepared):
                if plan.warmup and j.variant.label not in warmed:  # one untimed step per variant: lazy init,
                    from dataclasses import replace  # kernel choice and reading its LoRA stay out of s/image

                    engine.generate(replace(req, steps=1))
                    warmed.add(j.variant.label)
                result, cost = generate_measured(engine, req)
                img = result.images[0]
                meta = {**img.metadata, "compare": {"suite": plan.suite.name, "variant": j.variant.label,
                                                    "case": j.case.id, "seed": j.seed}}
                save_png(img.image, meta, plan.out_dir / j.image)
                text = None
                if reader is not None:
                    exp = _expected(j.case)
                    text = reader.score(img.image, exp, plan.max_cer).to_dict() if exp.strings else None
                rec = {"key": j.key, "signature": j.signature(), "variant": j.variant.label, "case": j.case.id,
                       "seed": j.seed, "image": j.image, "request": meta["request"], "model": meta.get("model", {}),
                       "loras": meta.get("loras", []), "nfe": nfe(meta["request"]["steps"], meta["request"]["cfg"]),
                       **cost, "text": text, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
                store.append(rec)
                done[j.key] = rec
                count += 1
                if on_job is not None:
                    on_job(count, len(remaining), j, rec)
    finally:
        slot.release()
    data = report_data(plan, done)
    write_reports(plan.out_dir, data)
    return data


def check_loras(plan: ComparePlan, labels: set[str]) -> None:
    """Every LoRA a variant names must resolve before the first model loads (not an hour into the run)."""
    from ..config import Settings
    from ..engine.sources import registry_for
    from ..errors import ModelNotFound

    registry = registry_for(Settings.from_env(), plan.options.models_dirs)
    for v in (v for v in plan.variants if v.label in labels):
        for ref in v.fields.get("loras") or ():
            try:
                registry.find(ref.name, ("lora",))
            except ModelNotFound:
                if not Path(ref.name).expanduser().is_file():
                    raise ModelNotFound(f"variant '{v.label}': no LoRA named '{ref.name}' (put it in <models>/loras/, "
                                        "pass --models-dir, or give its path)", code="lora_not_found") from None


def _expected(case: Case) -> Expected:
    strings, notes = case.expected()
    return Expected(tuple(strings), tuple(notes))


def report_data(plan: ComparePlan, done: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Everything the HTML/Markdown report shows, from the persisted records."""
    jobs = plan.jobs()
    results = [done[j.key] for j in jobs if j.key in done]
    cases = []
    for c in plan.suite.cases:
        strings, exp_notes = c.expected()
        cases.append({"id": c.id, "category": c.category, "section": c.section, "prompt": c.prompt,
                      "expected": list(strings), "expect_override": c.expect is not None,
                      "notes": c.notes() + [n for n in exp_notes if c.expect is None],
                      "report_marks": list(c.report_marks) if plan.suite_variants else []})
    summary = _summary(plan, results)
    notes = list(plan.suite.notes)
    if plan.size is not None:
        notes.append(f"every case generated at {plan.size[0]}x{plan.size[1]} (--size), whatever the suite says")
    notes.append("s/image is the wall time of engine.generate (text encode + denoise + VAE decode), after one "
                 "untimed warm-up step per variant (model loading excluded)" if plan.warmup else
                 "s/image includes each variant's first-run warm-up (--no-warmup)")
    return {
        "title": f"Compare: {plan.suite.name}",
        "suite": {"name": plan.suite.name, "source": plan.suite.source},
        "variants": [v.describe() for v in plan.variants],
        "suite_variants": [dict(v) for v in plan.suite.variants] if plan.suite_variants else [],
        "seeds": list(plan.seeds),
        "ocr": {"engine": "rapidocr-onnxruntime", "max_cer": plan.max_cer, "normalisation": NORMALISATION}
        if plan.ocr else None,
        "cases": cases, "results": results, "summary": summary, "notes": notes,
        "load_options": plan.options.to_dict(), "planned": len(jobs),
    }


def _summary(plan: ComparePlan, results: list[dict]) -> dict[str, Any]:
    by_variant: dict[str, dict[str, Any]] = {}
    categories: dict[str, dict[str, list[int]]] = {}
    case_cat = {c.id: c.category or "(uncategorised)" for c in plan.suite.cases}
    first_mean = None
    kinds = {r["peak_memory"]["kind"] for r in results if r.get("peak_memory")}
    for v in plan.variants:
        rs = [r for r in results if r["variant"] == v.label]
        secs = [r["seconds"] for r in rs]
        mean = sum(secs) / len(secs) if secs else None
        if first_mean is None and v is plan.variants[0]:
            first_mean = mean
        scored = [r for r in rs if r.get("text") and r["text"].get("passed") is not None]
        strings = [s for r in scored for s in r["text"]["strings"]]
        by_variant[v.label] = {
            "images": len(rs), "nfe": ", ".join(str(n) for n in sorted({r["nfe"] for r in rs})) or "—",
            "mean_seconds": mean, "speedup": (first_mean / mean) if (first_mean and mean) else None,
            "peak_memory_bytes": max((r["peak_memory"]["bytes"] for r in rs if r.get("peak_memory")), default=None),
            "text_scored": len(scored), "text_passed": sum(1 for r in scored if r["text"]["passed"]),
            "strings_scored": len(strings), "strings_passed": sum(1 for s in strings if s["passed"]),
        }
        for r in scored:
            cell = categories.setdefault(case_cat.get(r["case"], "(uncategorised)"), {}).setdefault(v.label, [0, 0])
            cell[0] += 1 if r["text"]["passed"] else 0
            cell[1] += 1
    kind = {"cuda_allocated": "CUDA allocator peak per image (max over the variant's images)",
            "process_peak_rss": "process peak RSS on the CPU (a high-water mark for the whole run so far: an "
                                "upper bound)"}
    return {"images": len(results), "variants": by_variant,
            "categories": {k: {lbl: tuple(x) for lbl, x in v.items()} for k, v in categories.items()},
            "memory_kind": "; ".join(kind.get(k, k) for k in sorted(kinds)) or "—"}


def write_reports(out_dir: Path, data: dict[str, Any]) -> dict[str, Path]:
    from .report import compare_html, compare_markdown

    out_dir = Path(out_dir)
    paths = {"html": out_dir / "report.html", "markdown": out_dir / "report.md", "json": out_dir / "report.json"}
    paths["html"].write_text(compare_html(data), encoding="utf-8")
    paths["markdown"].write_text(compare_markdown(data), encoding="utf-8")
    paths["json"].write_text(json.dumps(data, indent=1, ensure_ascii=False), encoding="utf-8")
    return paths
