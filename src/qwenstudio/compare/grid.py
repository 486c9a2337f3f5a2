"""XYZ grids: up to three axes over request fields (or the model), one shared seed unless seed is an axis.

Writes, under the output folder: ``images/x{i}-y{j}-z{k}.png`` (each with the full request as PNG metadata, plus
its grid position), ``grid.png`` (the contact sheet with labelled axes), ``index.html`` and ``grid.md`` (the same
grid as pages that open offline, images referenced relatively, every image's exact request included) and
``grid.json`` (the axes and every cell's request, timings and image path).
"""

from __future__ import annotations

import itertools
import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InvalidRequest
from .engines import EngineSlot, LoadOptions, generate_measured, nfe
from .values import Axis, apply_setting, jsonable

AXIS_NAMES = ("x", "y", "z")
MAX_CELLS = 512


@dataclass(frozen=True)
class GridSpec:
    prompt: str
    axes: tuple[Axis, ...]  # x, then y, then z; one to three
    base: dict[str, Any] = field(default_factory=dict)  # request fields shared by every cell (no prompt)
    model: str = "tiny"
    variant: str | None = None


@dataclass
class Cell:
    index: tuple[int, int, int]
    labels: tuple[str, ...]
    fields: dict[str, Any]  # request fields (prompt included)
    model: str
    variant: str | None

    @property
    def name(self) -> str:
        return "-".join(f"{a}{i}" for a, i in zip(AXIS_NAMES, self.index))


def plan_cells(spec: GridSpec) -> list[Cell]:
    """Every cell, ordered so that a model (or variant) axis changes least often: each model loads once."""
    axes = spec.axes
    if not 1 <= len(axes) <= 3:
        raise InvalidRequest("a grid has one to three axes (--x, --y, --z)", code="invalid_axis")
    names = [a.name for a in axes]
    if len(set(names)) != len(names):
        raise InvalidRequest(f"an axis appears twice: {', '.join(names)}", code="invalid_axis")
    if "prompt" in names and "prompt_sr" in names:
        raise InvalidRequest("prompt and prompt_sr cannot both be axes", code="invalid_axis")
    sizes = [len(a.values) for a in axes] + [1] * (3 - len(axes))
    if sizes[0] * sizes[1] * sizes[2] > MAX_CELLS:
        raise InvalidRequest(f"the grid has {sizes[0] * sizes[1] * sizes[2]} cells (at most {MAX_CELLS})",
                             code="invalid_axis")
    for a in axes:
        if a.name == "prompt_sr" and str(a.values[0]) not in spec.prompt:
            raise InvalidRequest(f"prompt_sr: '{a.values[0]}' does not occur in the prompt", code="invalid_axis")
    base = {k: v for k, v in spec.base.items() if v is not None}
    if "seed" not in names and base.get("seed") is None:
        base["seed"] = secrets.randbelow(2**32)  # drawn once: every cell shares it (and it is recorded)
    cells = []
    for iz, iy, ix in itertools.product(range(sizes[2]), range(sizes[1]), range(sizes[0])):
        index = (ix, iy, iz)
        fields_: dict[str, Any] = {"prompt": spec.prompt, **base, "model": spec.model, "variant": spec.variant}
        labels = []
        for a, i in zip(axes, index):
            value = a.values[i]
            if a.name == "prompt_sr":
                fields_["prompt"] = fields_["prompt"].replace(str(a.values[0]), str(value))
            else:
                apply_setting(fields_, a.name, value)
            labels.append(a.labels[i])
        model, variant = fields_.pop("model"), fields_.pop("variant")
        cells.append(Cell(index, tuple(labels), fields_, str(model), variant))
    load_axis = [k for k, a in enumerate(axes) if a.loads]
    if load_axis:
        cells.sort(key=lambda c: tuple(c.index[k] for k in load_axis))  # stable: z/y/x order kept within a model
    return cells


@dataclass
class GridResult:
    out_dir: Path
    cells: list[dict[str, Any]]
    sheet: Path
    html: Path
    markdown: Path
    manifest: Path


def run_grid(spec: GridSpec, out_dir: Path, options: LoadOptions | None = None,
             on_cell: Callable[[int, int, Cell, dict], Any] | None = None) -> GridResult:
    """Generate every cell (one model loaded at a time), then write the sheet, pages and manifest."""
    from ..engine.requests import GenerateRequest
    from ..outputs import save_png
    from .report import grid_html, grid_markdown
    from .sheet import contact_sheet

    cells = plan_cells(spec)
    requests = {}
    for c in cells:  # every cell must at least build a request before anything is loaded
        try:
            requests[c.index] = GenerateRequest(**c.fields)
        except TypeError as e:
            raise InvalidRequest(f"cell {c.name}: {e}", code="invalid_axis") from None
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    slot = EngineSlot(options or LoadOptions())
    records: list[dict[str, Any]] = []
    images: dict[tuple[int, int, int], Any] = {}
    try:
        for group_key, group in itertools.groupby(cells, key=lambda c: (c.model, c.variant)):
            group = list(group)
            engine = slot.get(*group_key)
            prepared = {c.index: engine.prepare(requests[c.index]) for c in group}  # all checked before any runs
            for c in group:
                result, cost = generate_measured(engine, prepared[c.index])
                img = result.images[0]
                meta = dict(img.metadata)
                meta["grid"] = {a.name: label for a, label in zip(spec.axes, c.labels)}
                path = out_dir / "images" / f"{c.name}.png"
                save_png(img.image, meta, path)
                req = meta["request"]
                rec = {"index": list(c.index), "labels": list(c.labels), "image": f"images/{path.name}",
                       "model": meta.get("model", {}), "request": req, "nfe": nfe(req["steps"], req["cfg"]),
                       **cost, "loras": meta.get("loras", [])}
                records.append(rec)
                images[c.index] = img.image
                if on_cell is not None:
                    on_cell(len(records), len(cells), c, rec)
    finally:
        slot.release()
    records.sort(key=lambda r: (r["index"][2], r["index"][1], r["index"][0]))
    axes_info = [{"axis": n, "name": a.name, "labels": list(a.labels)} for n, a in zip(AXIS_NAMES, spec.axes)]
    labels = [list(a.labels) for a in spec.axes] + [[""]] * (3 - len(spec.axes))
    axes_title = ", ".join(f"{n}: {a.name}" for n, a in zip(AXIS_NAMES, spec.axes))
    sheet = contact_sheet(images, labels[0], labels[1], labels[2], title=f"{axes_title}  —  {spec.prompt[:100]}")
    sheet_path = out_dir / "grid.png"
    sheet.save(sheet_path)
    manifest = {"prompt": spec.prompt, "axes": axes_info, "base": jsonable(spec.base), "model": spec.model,
                "variant": spec.variant, "load_options": (options or LoadOptions()).to_dict(), "cells": records}
    manifest_path = out_dir / "grid.json"
    manifest_path.write_text(json.dumps(manifest, indent=1, ensure_ascii=False))
    html_path = out_dir / "index.html"
    html_path.write_text(grid_html(manifest), encoding="utf-8")
    md_path = out_dir / "grid.md"
    md_path.write_text(grid_markdown(manifest), encoding="utf-8")
    return GridResult(out_dir, records, sheet_path, html_path, md_path, manifest_path)

