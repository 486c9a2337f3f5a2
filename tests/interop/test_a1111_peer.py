"""A1111's own infotext code on both sides (fixtures by tests/fixtures/peers/a1111/make_a1111_fixtures.py, commit in
SOURCES.md; no A1111 code runs here): PNGs its ``create_infotext`` + ``save_image_with_geninfo`` wrote read as the
request they mean, and what its ``parse_generation_parameters`` / sampler lookup / Lora extension made of the
``parameters`` text our writer emits -- checked against our current writer, so a change A1111 would misread fails."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qwenstudio.cli.main import app
from qwenstudio.interop import read_pasted_settings
from qwenstudio.outputs import a1111_parameters, read_png_metadata

A1111 = Path(__file__).resolve().parents[1] / "fixtures" / "peers" / "a1111"
RECORDS = {w: json.loads((A1111 / f"ours_read_by_{w}.json").read_text()) for w in ("a1111", "forge")}
RECORD = RECORDS["a1111"]
FORGE_VERSION = "f2.0.1v1.10.1-previous-669-gdfdcbab6"
MODEL_HASH = "10135bac27"  # A1111's shorthash of the checkpoint file the script names
FOX, DETAIL = "577746ea5cb5", "a19736ce9189"  # A1111's addnet hashes of the two LoRA files

# what each A1111 PNG must become: (fields, unmapped, warnings, info)
EXPECTED = {
    "a1111_euler_a_lora": (
        {"prompt": "a red fox in the snow, national geographic photo", "negative_prompt": "cartoon, blurry",
         "loras": [{"name": "fox_style", "weight": 0.8}], "steps": 2, "sampler": "euler_ancestral", "cfg": 4.5,
         "seed": 3839105, "width": 64, "height": 48, "model": "qwen_image_tiny"},
        [], ["Schedule type: Automatic -> the model's default scheduler"],
        {"model_hash": MODEL_HASH, "lora_hashes": {"fox_style": FOX}, "version": "v1.10.1"}),
    "a1111_dpmpp_2m_karras_multiline": (
        {"prompt": 'a shop sign reading "OPEN, 24h: all week"\nneon, rain',
         "negative_prompt": "lowres\nwatermark, text",
         "loras": [{"name": "fox_style", "weight": 1.0}, {"name": "detail-tweaker_v1.5", "weight": 0.55}],
         "steps": 30, "sampler": "dpmpp_2m", "scheduler": "karras", "cfg": 4.0, "seed": 42, "width": 1328,
         "height": 1328, "model": "qwen-image-2512, fp8 (e4m3fn)"},
        [], [], {"model_hash": MODEL_HASH, "lora_hashes": {"fox_style": FOX, "detail-tweaker_v1.5": DETAIL},
                 "version": "v1.10.1"}),
    "a1111_dpmpp_2m_sde_exponential": (
        {"prompt": "castle on a hill at dusk", "steps": 25, "sampler": "dpmpp_2m_sde", "scheduler": "exponential",
         "cfg": 7.0, "seed": 1234567890, "width": 1008, "height": 608, "model": "qwen_image"},
        ["Clip skip: 2"],
        ["width 1000 rounded to 1008 (a multiple of 16)", "height 600 rounded to 608 (a multiple of 16)"],
        {"model_hash": MODEL_HASH, "version": "v1.10.1"}),
    "a1111_legacy_sampler_name_variation_seed": (  # A1111 was sent "DPM++ 2M Karras"; it wrote the split form
        {"prompt": "portrait, soft light", "negative_prompt": "ugly", "steps": 20, "sampler": "dpmpp_2m",
         "scheduler": "karras", "cfg": 5.5, "seed": 7, "width": 512, "height": 768, "model": "qwen_image"},
        ["Variation seed: 99", "Variation seed strength: 0.3"], [],
        {"model_hash": MODEL_HASH, "version": "v1.10.1"}),
}

EXPECTED.update({  # the same settings rendered by Forge's copy of the code: the same text but its version
    name.replace("a1111_", "forge_"): (fields, unmapped, warnings, {**info, "version": FORGE_VERSION})
    for name, (fields, unmapped, warnings, info) in EXPECTED.items()
    if name in ("a1111_euler_a_lora", "a1111_dpmpp_2m_karras_multiline")})

# our sampler / schedule -> what A1111 runs (its labels); None: A1111 has no such thing and falls back silently
A1111_RUNS_SAMPLER = {"euler": "Euler", "euler_ancestral": "Euler a", "dpmpp_2m": "DPM++ 2M",
                      "dpmpp_2m_sde": "DPM++ 2M SDE", "uni_pc": "UniPC", "res_multistep": None}
A1111_RUNS_SCHEDULE = {"karras": "Karras", "simple": "Simple", "exponential": "Exponential",
                       "kl_optimal": "KL Optimal", "beta": "Beta", "reference": None}
A1111_DEFAULT_SAMPLER, A1111_AUTOMATIC = "DPM++ 2M", "Automatic"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_a1111_pngs_read_as_the_request_they_mean(name):
    fields, unmapped, warnings, info = EXPECTED[name]
    s = read_pasted_settings(A1111 / f"{name}.png")
    assert s.source == "a1111"
    assert s.fields == fields
    assert s.unmapped == unmapped
    assert s.warnings == warnings
    assert s.info == info


@pytest.mark.parametrize("webui, case", [(w, c) for w, r in sorted(RECORDS.items()) for c in sorted(r["cases"])])
def test_a1111_reads_our_parameters_as_we_mean(webui, case):
    record = RECORDS[webui]
    rec = record["cases"][case]
    meta, seen = rec["ours_metadata"], rec["a1111"]
    # the text A1111 parsed is what our writer emits today for that image's metadata
    assert a1111_parameters(meta) == rec["ours_parameters"], \
        "our parameters text changed: rerun make_a1111_fixtures.py and check what A1111 reads from it"
    r, parsed = meta["request"], seen["parsed"]
    assert (parsed["Steps"], parsed["Seed"]) == (str(r["steps"]), str(r["seed"]))
    assert float(parsed["CFG scale"]) == r["cfg"]
    assert (parsed["Size-1"], parsed["Size-2"]) == (str(r["width"]), str(r["height"]))
    assert parsed["Model"] == meta["model"]["name"]
    assert parsed["Negative prompt"] == r["negative_prompt"].strip()
    assert seen["text_encoder_prompt"].strip() == r["prompt"]  # the <lora:...> tags are taken out again
    sampler, schedule = A1111_RUNS_SAMPLER[r["sampler"]], A1111_RUNS_SCHEDULE[r["scheduler"]]
    assert seen["sampler_runs"] == (sampler or A1111_DEFAULT_SAMPLER)
    assert seen["schedule_runs"] == (schedule or A1111_AUTOMATIC)
    if sampler is None:  # nothing to write that A1111 would run: our name stays, so a reader sees what it was
        assert parsed["Sampler"] == r["sampler"]
    loras = r.get("loras") or []
    assert seen["loras_loaded"]["names"] == [lo["name"] for lo in loras]
    assert seen["loras_loaded"]["unet_multipliers"] == [lo["weight"] for lo in loras]
    assert seen["loras_loaded"]["te_multipliers"] == [lo["weight"] for lo in loras]
    if loras:  # A1111, hashing the same files itself, writes back the Lora hashes we wrote
        assert parsed["Lora hashes"] == seen["lora_hashes_written_back"]
        assert all(lo["hash"] == record["lora_hashes_by_a1111"][lo["name"]] for lo in meta["loras"])
    else:
        assert "Lora hashes" not in parsed and seen["lora_hashes_written_back"] is None


@pytest.mark.parametrize("webui", sorted(RECORDS))
def test_every_label_we_write_is_in_the_webuis_tables(webui):
    """Our writer's labels are names A1111's (and Forge's) sampler and schedule tables hold (the script recorded
    the tables), so no sampler we write for them falls back to their default."""
    from qwenstudio.interop.names import A1111_SAMPLER_LABELS, A1111_SCHEDULE_LABELS

    assert set(A1111_SCHEDULE_LABELS.values()) <= set(RECORDS[webui]["a1111_schedule_labels"])
    assert set(A1111_SAMPLER_LABELS.values()) <= set(RECORDS[webui]["a1111_sampler_labels"])


def test_generate_from_a1111_png_runs_its_settings(tmp_path):
    """The user path: ``generate --from-image`` on the PNG A1111 wrote, its LoRA in the models dir."""
    (tmp_path / "models" / "loras").mkdir(parents=True)
    shutil.copy(A1111.parent / RECORD["lora_files"]["fox_style"], tmp_path / "models" / "loras" / "fox_style.safetensors")
    out = tmp_path / "out.png"
    r = CliRunner().invoke(app, ["generate", "--from-image", str(A1111 / "a1111_euler_a_lora.png"), "--model", "tiny",
                                 "--models-dir", str(tmp_path / "models"), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "Schedule type: Automatic -> the model's default scheduler" in r.output
    meta = read_png_metadata(out)
    req = meta["request"]
    assert (req["prompt"], req["negative_prompt"]) == ("a red fox in the snow, national geographic photo",
                                                       "cartoon, blurry")
    assert (req["steps"], req["sampler"], req["cfg"], req["seed"], req["width"], req["height"]) == (
        2, "euler_ancestral", 4.5, 3839105, 64, 48)
    assert req["scheduler"] == "reference"  # "Automatic": the model's default
    assert req["loras"] == [{"name": "fox_style", "weight": 0.8}]
    assert meta["loras"][0]["hash"] == FOX  # the file A1111 hashed is the one applied
    assert meta["settings_from"]["scheduler"] == "variant tiny"
    assert {k: meta["settings_from"][k] for k in ("steps", "sampler", "cfg", "seed", "width", "loras")} == dict.fromkeys(
        ("steps", "sampler", "cfg", "seed", "width", "loras"), "user")
    assert req["extra"]["pasted_from"] == {"source": "a1111", "file": "a1111_euler_a_lora.png", "unmapped": [],
                                           "warnings": ["Schedule type: Automatic -> the model's default scheduler"]}
