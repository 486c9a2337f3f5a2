"""`qwenstudio grid` on the tiny model: a 2x2x2 grid over steps, the model (two loads) and a prompt search/replace,
one shared seed; every image carries its request; the sheet and pages reference the images relatively."""

from __future__ import annotations

import json
import re

from PIL import Image
from typer.testing import CliRunner

from qwenstudio.cli.main import app
from qwenstudio.outputs import read_png_metadata

runner = CliRunner()


def test_grid_2x2x2_steps_model_prompt_sr(tmp_path, tiny_folder):
    out = tmp_path / "grid"
    r = runner.invoke(app, ["grid", "a red fox in the snow", "--x", "steps=1..2", "--y", f"model=tiny,{tiny_folder}",
                            "--z", "prompt_sr=fox,cat", "--seed", "7", "--cfg", "1", "--out", str(out)])
    assert r.exit_code == 0, r.output
    manifest = json.loads((out / "grid.json").read_text())
    assert [a["labels"] for a in manifest["axes"]] == [["steps=1", "steps=2"], ["model=tiny", "model=tiny-qwen-image"],
                                                       ["fox", "cat"]]
    assert len(manifest["cells"]) == 8
    for cell in manifest["cells"]:
        ix, iy, iz = cell["index"]
        meta = read_png_metadata(out / cell["image"])
        req = meta["request"]
        assert req == cell["request"]
        assert req["steps"] == ix + 1 and req["seed"] == 7 and req["cfg"] == 1.0  # one shared seed
        assert req["prompt"] == ["a red fox in the snow", "a red cat in the snow"][iz]
        assert meta["model"]["name"] == ["tiny", "tiny-qwen-image"][iy]
        assert meta["grid"] == {"steps": f"steps={ix + 1}", "model": manifest["axes"][1]["labels"][iy],
                                "prompt_sr": ["fox", "cat"][iz]}
    with Image.open(out / "grid.png") as sheet:
        assert sheet.width >= 2 * 160 and sheet.height >= 4 * 160  # 2 columns; 2 rows in each of 2 blocks
    html = (out / "index.html").read_text()
    srcs = re.findall(r'<img src="([^"]+)"', html)
    assert sorted(srcs) == sorted(c["image"] for c in manifest["cells"]) and all((out / s).is_file() for s in srcs)
    assert html.count("&quot;seed&quot;: 7") == 8 and "grid.png" in html  # every image's exact request
    md = (out / "grid.md").read_text()
    assert len(re.findall(r"!\[[^\]]*\]\(images/x\d-y\d-z\d\.png\)", md)) == 8


def test_grid_errors_are_one_line(tmp_path):
    for args, text in ((["--x", "stepz=1,2"], "unknown axis 'stepz'"),
                       (["--x", "prompt_sr=dog,cat"], "'dog' does not occur in the prompt"),
                       (["--x", "steps=1,2", "--y", "steps=3"], "appears twice"),
                       (["--x", "cfg=a,b"], "'a' is not a valid float")):
        r = runner.invoke(app, ["grid", "a fox", *args, "--out", str(tmp_path / "g")])
        assert r.exit_code == 2 and text in r.output and "Traceback" not in r.output, r.output
