"""A1111 / Forge ``parameters`` text: the block people paste between tools, and its ``<lora:name:weight>`` tags.

Layout (A1111 ``infotext``): prompt lines, then ``Negative prompt: ...`` lines, then one line of ``Key: value``
pairs separated by commas, where a value holding commas is a JSON-quoted string (``Lora hashes: "a: 1, b: 2"``).
LoRAs are tags in the prompt (``<lora:name:weight>``, ``<lora:name:te:unet>``, ``<lyco:...>``); A1111 applies the
tags of the negative prompt too, and removes all of them from the text the text encoder sees.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from .names import AUTOMATIC_SCHEDULE, sampler_name, scheduler_name
from .settings import PastedSettings, lora_name, set_size

_PARAM = re.compile(r'\s*(\w[\w \-/+]*):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_TAG = re.compile(r"<(lora|lyco):([^<>]*)>", re.IGNORECASE)


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] == '"':
        try:
            return str(json.loads(value))
        except json.JSONDecodeError:
            return value[1:-1]
    return value


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def extract_lora_tags(text: str, out: PastedSettings, where: str = "prompt") -> str:
    """Move ``<lora:...>`` tags of ``text`` into ``out.fields['loras']`` and return the text without them.

    The DiT weight is the ``unet`` multiplier when given (third item or ``unet=``), else the first multiplier, else
    1 (A1111's default); a different text-encoder multiplier is reported, not applied (our LoRAs patch the DiT).
    """
    loras: list[dict[str, Any]] = out.fields.setdefault("loras", [])

    def take(match: re.Match) -> str:
        items = [s.strip() for s in match.group(2).split(":")]
        positional = [s for s in items[1:] if "=" not in s]
        named = dict(s.split("=", 1) for s in items[1:] if "=" in s)
        te = _number(named.get("te", positional[0] if positional else "1"))
        unet = _number(named.get("unet", positional[1] if len(positional) > 1 else str(te) if te is not None else ""))
        if not items[0] or te is None or unet is None:
            out.unmapped.append(f"{where} tag {match.group(0)}")
            return ""
        if te != unet:
            out.warnings.append(f"{match.group(0)}: text-encoder weight {te:g} not applied (the DiT gets {unet:g})")
        extra = sorted(set(named) - {"te", "unet"})
        if extra:
            out.unmapped.append(f"{match.group(0)}: {', '.join(extra)}")
        if where != "prompt":
            out.warnings.append(f"{match.group(0)} in the {where} is applied, as A1111 does")
        loras.append({"name": lora_name(items[0], out), "weight": unet})
        return ""

    cleaned = _TAG.sub(take, text)
    if not loras:
        out.fields.pop("loras")
    if cleaned == text:
        return text
    return re.sub(r"[ \t]+\n", "\n", re.sub(r"[ \t]{2,}", " ", cleaned)).strip()


def parse_a1111_parameters(text: str) -> PastedSettings:
    """An A1111/Forge ``parameters`` block -> request fields; keys we have no field for are listed in ``unmapped``."""
    out = PastedSettings(source="a1111")
    *lines, last = text.strip().split("\n")
    if len(_PARAM.findall(last)) < 3 and not re.search(r"\bSteps: \d+", last):  # A1111's test, or a Steps key
        lines.append(last)
        last = ""
    prompt: list[str] = []
    negative: list[str] | None = None
    for line in lines:
        if negative is None and line.startswith("Negative prompt:"):
            negative = [line[len("Negative prompt:"):].strip()]
        elif negative is not None:
            negative.append(line)
        else:
            prompt.append(line)
    out.fields["prompt"] = extract_lora_tags("\n".join(prompt).strip(), out)
    if negative is not None:
        out.fields["negative_prompt"] = extract_lora_tags("\n".join(negative).strip(), out, "negative prompt")
    folded_scheduler = None
    for key, raw in _PARAM.findall(last):
        key, value = key.strip(), _unquote(raw)
        if not value:
            continue
        if key == "Steps" and value.isdigit():
            out.fields["steps"] = int(value)
        elif key == "Sampler":
            sampler, folded_scheduler = sampler_name(value)
            if sampler is None:
                out.unmapped.append(f"Sampler: {value} (no such sampler here)")
            else:
                out.fields["sampler"] = sampler
        elif key == "Schedule type":
            if value.lower() == AUTOMATIC_SCHEDULE:
                out.warnings.append("Schedule type: Automatic -> the model's default scheduler")
            elif scheduler_name(value) is None:
                out.unmapped.append(f"Schedule type: {value} (no such scheduler here)")
            else:
                out.fields["scheduler"] = scheduler_name(value)
        elif key == "CFG scale" and _number(value) is not None:
            out.fields["cfg"] = _number(value)
        elif key == "Seed" and re.fullmatch(r"-?\d+", value):
            if int(value) >= 0:
                out.fields["seed"] = int(value)
            else:
                out.unmapped.append(f"Seed: {value} (random)")
        elif key == "Size" and re.fullmatch(r"\d+x\d+", value):
            w, h = value.split("x")
            set_size(out, "width", w, "Size")
            set_size(out, "height", h, "Size")
        elif key == "Model":
            out.fields["model"] = value
        elif key == "Model hash":
            out.info["model_hash"] = value
        elif key == "Lora hashes":
            pairs = [p.split(":", 1) for p in value.split(",") if ":" in p]
            out.info["lora_hashes"] = {k.strip(): v.strip() for k, v in pairs}
        elif key == "Shift" and _number(value) is not None:
            out.fields["shift"] = _number(value)
        elif key == "Shift" and value == "auto":
            continue  # ours: the model's default shift
        elif key == "Noise" and value in ("diffusers", "comfy"):
            out.fields["noise"] = value
        elif key == "Version":
            out.info["version"] = value
        else:
            out.unmapped.append(f"{key}: {value}")
    if folded_scheduler is not None:
        if "scheduler" in out.fields and out.fields["scheduler"] != folded_scheduler:
            out.warnings.append(f"sampler name says {folded_scheduler}, Schedule type says "
                                f"{out.fields['scheduler']}: Schedule type is used")
        out.fields.setdefault("scheduler", folded_scheduler)
    return out


def lora_prompt_tags(loras: list[dict[str, Any]]) -> str:
    """``<lora:name:weight>`` tags as A1111 writes them into the prompt of its ``parameters`` text."""
    return " ".join(f"<lora:{lo['name']}:{float(lo['weight']):g}>" for lo in loras)


def lora_hashes_value(loras: list[dict[str, Any]]) -> str | None:
    """A1111's ``Lora hashes`` value (a JSON-quoted ``"name: hash, ..."``) for the LoRAs that carry a hash; as
    A1111's ``ExtraNetworkLora.activate``, ":" and "," are removed from the names (they would split the value)."""
    drop = str.maketrans("", "", ":,")
    pairs = [f"{str(lo['name']).translate(drop)}: {lo['hash']}" for lo in loras if lo.get("hash")]
    return json.dumps(", ".join(pairs)) if pairs else None


__all__ = ["extract_lora_tags", "lora_hashes_value", "lora_prompt_tags", "parse_a1111_parameters"]
