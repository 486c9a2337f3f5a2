"""Model identity by content: a diffusers folder is the variant its model_index.json and transformer config say,
whatever it is called — an arbitrary folder name, a Hugging Face cache snapshot named by a commit hash — and a
single-file DiT takes its text encoder/VAE/tokenizer from a diffusers folder when no separate files exist."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from qwenstudio import Engine
from qwenstudio.engine.identity import identify_folder
from qwenstudio.testing.parity import check_latent_parity

AREA_MAP = {1024 * 1024: 64 * 64, 384 * 384: 32 * 32}


def _variant_folder(tiny_folder, dst, cls: str, zero_cond_t: bool = False):
    """The tiny model re-labelled as another pipeline class (what a downloaded Edit-2509/2511 folder says)."""
    shutil.copytree(tiny_folder, dst, symlinks=False)
    index = json.loads((dst / "model_index.json").read_text())
    index["_class_name"] = cls
    (dst / "model_index.json").write_text(json.dumps(index))
    if zero_cond_t:
        cfg = json.loads((dst / "transformer" / "config.json").read_text())
        cfg["zero_cond_t"] = True
        (dst / "transformer" / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.fixture(scope="module")
def hub(tiny_folder, tmp_path_factory):
    """An HF hub cache holding Qwen/Qwen-Image-Edit-2509 as a snapshot named by a commit hash."""
    root = tmp_path_factory.mktemp("hub")
    repo = root / "models--Qwen--Qwen-Image-Edit-2509"
    rev = "0123456789abcdef0123456789abcdef01234567"
    _variant_folder(tiny_folder, repo / "snapshots" / rev, "QwenImageEditPlusPipeline")
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(rev)
    return root


def test_folders_are_what_their_model_index_says(tiny_folder, tmp_path):
    plus = _variant_folder(tiny_folder, tmp_path / "my downloaded model", "QwenImageEditPlusPipeline")
    ident = identify_folder(plus)
    assert ident.variant == "tiny-edit-plus" and "QwenImageEditPlusPipeline" in ident.reason
    z = _variant_folder(tiny_folder, tmp_path / "edit-2509-but-really-2511", "QwenImageEditPlusPipeline", True)
    assert identify_folder(z).variant == "tiny-edit-2511" and "zero_cond_t" in identify_folder(z).reason
    e = _variant_folder(tiny_folder, tmp_path / "qwen-image-edit-2509", "QwenImageEditPipeline")  # name lies
    assert identify_folder(e).variant == "tiny-edit"
    assert identify_folder(tiny_folder).variant == "tiny"


def test_engine_load_uses_the_folder_identity_and_records_why(tiny_folder, tmp_path):
    plus = _variant_folder(tiny_folder, tmp_path / "anything", "QwenImageEditPlusPipeline")
    engine = Engine.load(plus, device="cpu")
    assert engine.spec.name == "tiny-edit-plus"
    assert engine.describe()["variant_reason"].startswith("model_index: QwenImageEditPlusPipeline")
    forced = Engine.load(plus, device="cpu", variant="tiny-edit")
    assert forced.spec.name == "tiny-edit" and forced.describe()["variant_reason"] == "chosen with --variant tiny-edit"


def _img(w, h, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


def test_hub_snapshot_by_repo_id_matches_edit_plus_pipeline(hub, monkeypatch):
    """``--model Qwen/Qwen-Image-Edit-2509`` from the HF cache runs as Edit-2509 — parity with diffusers'
    QwenImageEditPlusPipeline on the same snapshot (tiny areas, as tests/engine/test_edit_parity.py)."""
    from diffusers import QwenImageEditPlusPipeline
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessorPil

    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    engine = Engine.load("Qwen/Qwen-Image-Edit-2509", device="cpu")
    assert engine.spec.name == "tiny-edit-plus"
    assert engine.describe()["name"] == "Qwen/Qwen-Image-Edit-2509"

    class Processor(Qwen2_5_VLProcessor):
        def check_argument_for_proper_class(self, name, arg):  # no torchvision video processor here
            return None

    orig = pipeline_qwenimage_edit_plus.calculate_dimensions
    monkeypatch.setattr(pipeline_qwenimage_edit_plus, "calculate_dimensions",
                        lambda area, ratio: orig(AREA_MAP.get(area, area), ratio))
    snapshot = next((hub / "models--Qwen--Qwen-Image-Edit-2509" / "snapshots").iterdir())
    pipe = QwenImageEditPlusPipeline.from_pretrained(
        str(snapshot), processor=Processor(image_processor=Qwen2VLImageProcessorPil(),
                                           tokenizer=engine.components.tokenizer))
    pipe.set_progress_bar_config(disable=True)
    imgs = [_img(64, 64, 2), _img(90, 50, 3)]
    ref = pipe(imgs, "make the sky purple", negative_prompt=" ", true_cfg_scale=4.0, num_inference_steps=4,
               output_type="latent", generator=torch.Generator().manual_seed(11)).images
    res = engine.edit(prompt="make the sky purple", images=imgs, negative_prompt=" ", cfg=4.0, steps=4, seed=11,
                      scheduler="reference", sampler="euler")
    check_latent_parity("QwenImageEditPlusPipeline from an HF snapshot", res.latents, ref, res.request.width,
                        res.request.height)
    assert res.images[0].metadata["model"]["variant_reason"].startswith("model_index: QwenImageEditPlusPipeline")


def test_models_lists_hub_repos_with_variants_and_reasons(hub, monkeypatch):
    from typer.testing import CliRunner

    from qwenstudio.cli.main import app

    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    r = CliRunner().invoke(app, ["models", "--json"])
    assert r.exit_code == 0, r.output
    entry = next(f for f in json.loads(r.output)["files"] if f["name"] == "Qwen/Qwen-Image-Edit-2509")
    assert entry["kind"] == "diffusers" and entry["variant"] == "tiny-edit-plus"
    assert entry["variant_reason"].startswith("model_index: QwenImageEditPlusPipeline")


@pytest.fixture(scope="module")
def dit_beside_folder(tiny_folder, tmp_path_factory):
    """The common "GGUF/fp8 DiT + the official diffusers folder" models dir: no separate TE/VAE files."""
    from qwenstudio.testing.formats import write_dit_file
    from qwenstudio.testing.gguf_files import write_tiny_gguf

    root = tmp_path_factory.mktemp("dit-beside-folder")
    shutil.copytree(tiny_folder, root / "Qwen-Image")
    write_dit_file(tiny_folder, root / "diffusion_models" / "qwen_image_fp32.safetensors", "fp32")
    write_tiny_gguf(tiny_folder, root / "diffusion_models" / "qwen-image-Q8_0.gguf", "Q8_0")
    return root


def test_single_file_dit_takes_te_vae_tokenizer_from_the_folder(dit_beside_folder, tiny_folder):
    kw = dict(prompt="a lighthouse at dusk", steps=3, seed=4, width=64, height=64, cfg=2.0)
    want = Engine.load(tiny_folder, variant="tiny", device="cpu").generate(**kw).latents
    with pytest.warns(UserWarning, match="using those of the diffusers folder 'Qwen-Image'"):
        exact = Engine.load("qwen_image_fp32", variant="tiny", device="cpu", models_dirs=(dit_beside_folder,))
    assert exact.components.identity["components_from"] == "Qwen-Image"
    assert torch.equal(exact.generate(**kw).latents, want)  # lossless DiT file + the folder's TE/VAE: bit-exact
    gguf = Engine.load("qwen-image-Q8_0", variant="tiny", device="cpu", models_dirs=(dit_beside_folder,))
    assert gguf.components.identity["format"] == "gguf"
    assert (gguf.generate(**kw).latents - want).abs().max() < 0.05  # Q8_0 DiT error, as tests/engine/test_gguf.py
