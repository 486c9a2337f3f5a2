"""SwarmUI preset files over HTTP: a real "Export All" file imports every preset; export is SwarmUI's format."""

from __future__ import annotations

import json
from pathlib import Path

PRESETS = Path(__file__).parents[1] / "fixtures" / "peers" / "swarmui" / "swarmui_presets.json"


def test_import_export_file_and_export(serve):
    data = json.loads(PRESETS.read_text("utf-8"))
    with serve() as s, s.client() as http:
        r = http.post("/api/presets/import/swarmui", json=data)
        assert r.status_code == 201, r.text
        body = r.json()
        assert [p["preset"]["name"] for p in body["presets"]] == ["Qwen Lightning 8", "Ink wash", "Poster"]
        assert body["preset"]["name"] == "Qwen Lightning 8" and body["unmapped"] == []
        ink = body["presets"][1]
        assert ink["preset"]["params"]["prompt"] == "{value}, ink wash painting, muted colors"
        assert ink["preset"]["params"]["loras"] == [{"name": "ink_wash", "weight": 0.8}]
        assert body["presets"][2]["unmapped"] == [] and body["presets"][2]["preset"]["params"]["batch"] == 2
        again = http.post("/api/presets/import/swarmui", json=data)  # names taken: nothing half-imported
        assert again.status_code == 409 and again.json()["error"]["code"] == "preset_exists"
        assert len(http.get("/api/presets").json()["presets"]) == 3

        exported = http.get("/api/presets/export/swarmui")
        assert exported.status_code == 200 and "presets.json" in exported.headers["content-disposition"]
        out = exported.json()
        assert sorted(out) == ["Ink wash", "Poster", "Qwen Lightning 8"]
        assert out["Qwen Lightning 8"]["param_map"] == {
            "model": "Qwen-Image/qwen_image_fp8_e4m3fn", "steps": "8", "cfgscale": "1", "sampler": "euler",
            "scheduler": "simple", "sigmashift": "3.1", "loras": "Qwen-Image-Lightning-8steps-V1.1", "loraweights": "1"}

        bad = http.post("/api/presets/import/swarmui", json={"x": 1})
        assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_preset"


def test_settings_of_an_uploaded_swarmui_png(serve):
    """The studio's "load from image" route on a PNG SwarmUI's own writer made (its <lora:...> prompt tag parsed)."""
    png = PRESETS.parent / "swarmui_lora_tag.png"
    with serve() as s, s.client() as http:
        up = http.post("/api/uploads", files={"file": ("swarm.png", png.read_bytes(), "image/png")})
        assert up.status_code == 201, up.text
        r = http.get(f"/api/uploads/{up.json()['id']}/settings")
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["source"] == "swarmui" and body["unmapped"] == []
        f = body["fields"]
        assert (f["prompt"], f["seed"], f["steps"], f["cfg"]) == ("a koi pond in autumn , soft light", 3, 8, 1.0)
        assert f["loras"] == [{"name": "Qwen-Image-Lightning-8steps-V1.1", "weight": 0.75}]
        assert (f["compat"], f["noise"], f["cfg_norm"]) == ("comfy", "comfy", False)
