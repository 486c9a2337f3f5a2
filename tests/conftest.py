"""Shared fixtures: the tiny model written once per session as a diffusers folder, and an engine on it."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    from qwenstudio.testing.tiny import write_diffusers_folder

    return write_diffusers_folder(tmp_path_factory.mktemp("models") / "tiny-qwen-image")


@pytest.fixture(scope="session")
def tiny_engine(tiny_folder):
    from qwenstudio import Engine

    return Engine.load(tiny_folder, variant="tiny", device="cpu")


@pytest.fixture(scope="session")
def reference_pipe(tiny_folder):
    """Stock diffusers QwenImagePipeline on the same files: the numerical reference."""
    from diffusers import QwenImagePipeline

    pipe = QwenImagePipeline.from_pretrained(str(tiny_folder))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    """Never touch the user's ~/.qwenstudio; share one home (and its tiny-model cache) across the session."""
    home = tmp_path_factory.getbasetemp() / "qwenstudio-home"
    monkeypatch.setenv("QWENSTUDIO_HOME", str(home))
