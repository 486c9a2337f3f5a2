"""The default compute dtype: bf16 on CUDA, and on a CPU with native bf16 when the weights are stored in bf16 or
less; fp32 otherwise — decided from the file headers, said in a warning and recorded in the image's metadata."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from qwenstudio.cli.main import app
from qwenstudio.engine.precision import cpu_has_native_bf16, default_precision, stored_weight_kind
from qwenstudio.engine.sources import registry_for, resolve
from qwenstudio.outputs import read_png_metadata
from qwenstudio.testing.formats import write_comfy_models_dir


@pytest.fixture(scope="module")
def models(tiny_folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("precision") / "models"
    write_comfy_models_dir(root, tiny_folder, variants=("bf16", "fp32", "fp8_e4m3fn"))
    return root


@pytest.mark.parametrize("stored,native,want", [
    ("bf16", True, torch.bfloat16), ("fp8", True, torch.bfloat16), ("quantized", True, torch.bfloat16),
    ("fp32", True, torch.float32), ("fp16", True, torch.float32), ("unknown", True, torch.float32),
    ("bf16", False, torch.float32), ("quantized", False, torch.float32),
])
def test_cpu_rule(stored, native, want):
    p = default_precision("cpu", stored, native_bf16=native)
    assert p.dtype == want
    assert p.reason.startswith("bf16" if want == torch.bfloat16 else "fp32")


def test_cuda_is_bf16_whatever_the_file():
    assert default_precision("cuda", "fp32", native_bf16=False).dtype == torch.bfloat16


@pytest.mark.parametrize("variant,kind", [("bf16", "bf16"), ("fp32", "fp32"), ("fp8_e4m3fn", "fp8")])
def test_stored_kind_from_the_file_header(models, tiny_folder, variant, kind):
    from qwenstudio.config import Settings

    settings = Settings.from_env()
    source = resolve(f"qwen_image_{variant}", registry_for(settings, (models,)), settings)
    assert stored_weight_kind(source) == kind
    folder = resolve(str(tiny_folder), registry_for(settings), settings)
    assert stored_weight_kind(folder) == "fp32"  # the suite's tiny folder is written in fp32


@pytest.fixture()
def default_dtype_env(monkeypatch):
    monkeypatch.delenv("QWENSTUDIO_DTYPE")  # the suite pins fp32 (tests/conftest.py); these tests test the default


@pytest.mark.parametrize("native", [True, False])
def test_engine_default_and_metadata_follow_the_rule(models, monkeypatch, default_dtype_env, native):
    """A bf16 DiT file on a CPU: bf16 compute exactly when the CPU has native bf16 (with a warning; forced both ways
    here, so the test is the same on any CPU); --dtype float32 overrides it; the metadata says which dtype and why."""
    from qwenstudio.engine import precision
    from qwenstudio.engine.engine import Engine

    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    with pytest.warns(UserWarning, match="computing in bf16") if native else _no_bf16_warning():
        engine = Engine.load("qwen_image_bf16", models_dirs=(models,), device="cpu", variant="tiny")
    assert engine.components.dtype == (torch.bfloat16 if native else torch.float32)
    result = engine.generate(prompt="a red apple", steps=2, seed=0, width=64, height=64)
    meta = result.images[0].metadata["model"]
    assert meta["dtype"] == ("bfloat16" if native else "float32")
    assert engine.components.vae.dtype == torch.float32  # the VAE stays fp32 beside a bf16 DiT on a CPU
    assert meta.get("vae_dtype") == ("float32" if native else None)
    assert meta["dtype_reason"].startswith("bf16: the weights are stored as bf16" if native else "fp32")
    assert torch.isfinite(result.latents).all()
    auto = Engine.load("qwen_image_bf16", models_dirs=(models,), device="cpu", variant="tiny", dtype="auto")
    assert auto.components.dtype == engine.components.dtype and auto.dtype_reason == engine.dtype_reason
    fp32 = Engine.load("qwen_image_bf16", models_dirs=(models,), device="cpu", variant="tiny", dtype="float32")
    assert fp32.components.dtype == torch.float32
    assert fp32.describe()["dtype_reason"] == "float32: chosen with dtype="


def test_cli_png_records_the_dtype_and_its_reason(models, tmp_path, default_dtype_env):
    out = tmp_path / "a.png"
    r = CliRunner().invoke(app, ["generate", "an apple", "--model", "qwen_image_fp32", "--models-dir", str(models),
                                 "--variant", "tiny", "--steps", "2", "--seed", "3", "--out", str(out)])
    assert r.exit_code == 0, r.output
    model = read_png_metadata(out)["model"]
    assert model["dtype"] == "float32"
    assert model["dtype_reason"] == "fp32: the weights are stored in fp32"


def test_native_bf16_check_agrees_with_the_cpu_flags():
    from pathlib import Path

    flags = Path("/proc/cpuinfo")
    if not flags.exists():
        pytest.skip("no /proc/cpuinfo on this system")
    text = flags.read_text()
    assert cpu_has_native_bf16() == (" avx512_bf16" in text or " amx_bf16" in text or " amx_tile" in text)


def test_the_suite_pins_fp32_and_the_setting_is_recorded(tiny_folder):
    from qwenstudio.engine.engine import Engine

    engine = Engine.load(tiny_folder, variant="tiny", device="cpu")
    assert engine.describe()["dtype_reason"] == "float32: chosen with QWENSTUDIO_DTYPE"


class _no_bf16_warning:
    def __enter__(self):
        import warnings

        self.ctx = warnings.catch_warnings(record=True)
        self.caught = self.ctx.__enter__()
        warnings.simplefilter("always")

    def __exit__(self, *exc):
        self.ctx.__exit__(*exc)
        assert not [w for w in self.caught if "computing in bf16" in str(w.message)]


@pytest.mark.parametrize("native", [True, False])
def test_the_server_sizes_a_model_in_the_dtype_it_will_load_in(models, tmp_path, monkeypatch, default_dtype_env,
                                                                 native):
    """The model pool's memory check (submit-time 422, --max-resident) uses the dtype Engine.load will choose: a bf16
    file on a CPU with native bf16 is sized at 2 bytes per weight, not fp32's 4 (which refused models that fit)."""
    from qwenstudio.config import Settings
    from qwenstudio.engine import precision
    from qwenstudio.engine.sources import component_sizes
    from qwenstudio.service.model_pool import LoadOptions, ModelCatalog

    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    settings = replace_models_dir(Settings.from_env(), models, tmp_path)
    catalog = ModelCatalog(settings, "qwen_image_bf16", LoadOptions(device="cpu", variant="tiny"))
    entry = next(e for e in catalog.entries() if e.id == "qwen_image_bf16")
    source = resolve("qwen_image_bf16", registry_for(settings), settings)
    assert catalog.sizes(entry) == component_sizes(source, 2 if native else 4)


def replace_models_dir(settings, models, tmp_path):
    from dataclasses import replace

    return replace(settings, home=tmp_path / "home", models_dirs=(models,))
