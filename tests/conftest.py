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


@pytest.fixture(scope="session")
def postgres_server():
    """A throwaway PostgreSQL cluster for the session (qwenstudio.testing.postgres), stopped and removed at the end.
    Skipped only where the server binaries are not installed (CI installs Debian's postgresql)."""
    from qwenstudio.testing.postgres import find_bindir, start_postgres

    bindir = find_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found: apt-get install postgresql to run the "
                    "PostgreSQL store tests")
    server = start_postgres(bindir)
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request):
    """Run a store test on both backends: None = SQLite in the app's home (the default); else the URL of a fresh
    PostgreSQL database (ServiceConfig.store_url, ``serve --store``)."""
    if request.param == "sqlite":
        return None
    return request.getfixturevalue("postgres_server").create_database()


@pytest.fixture(scope="session", autouse=True)
def _isolated_session_env(tmp_path_factory):
    """The same environment as ``_isolated_home`` for session- and module-scoped fixtures too, which pytest builds
    before any function-scoped one: an engine a module fixture loads must not see the user's home or dtype."""
    mp = pytest.MonkeyPatch()
    mp.setenv("QWENSTUDIO_HOME", str(tmp_path_factory.getbasetemp() / "qwenstudio-home"))
    mp.delenv("QWENSTUDIO_STORE", raising=False)
    mp.setenv("QWENSTUDIO_DTYPE", "float32")
    yield
    mp.undo()


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    """Never touch the user's ~/.qwenstudio; share one home (and its tiny-model cache) across the session."""
    home = tmp_path_factory.getbasetemp() / "qwenstudio-home"
    monkeypatch.setenv("QWENSTUDIO_HOME", str(home))
    monkeypatch.delenv("QWENSTUDIO_STORE", raising=False)
    # The suite's numeric bounds are for fp32 compute; the default dtype on a CPU depends on whether it multiplies bf16
    # natively (engine/precision.py), which differs between machines. tests/engine/test_precision.py tests that rule.
    monkeypatch.setenv("QWENSTUDIO_DTYPE", "float32")
