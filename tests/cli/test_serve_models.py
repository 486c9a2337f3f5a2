"""``qwenstudio serve`` as a user runs it: the --model model plus every model of --models-dir, --max-resident 1."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import httpx


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_serve_lists_and_runs_every_model_of_the_models_dir(tiny_folder, tmp_path):
    models = tmp_path / "models"
    shutil.copytree(tiny_folder, models / "tiny-copy")
    port = _free_port()
    env = {**os.environ, "QWENSTUDIO_HOME": str(tmp_path / "home"), "HF_HUB_CACHE": str(tmp_path / "hf")}
    env.pop("QWENSTUDIO_API_KEY", None)
    cmd = [sys.executable, "-c", "from qwenstudio.cli.main import main; main()", "serve", "--port", str(port),
           "--model", "tiny", "--models-dir", str(models), "--max-resident", "1"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as http:
            deadline = time.monotonic() + 120
            while True:
                try:
                    if http.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert proc.poll() is None and time.monotonic() < deadline, "server did not become ready"
                time.sleep(0.2)
            listed = {m["id"]: m for m in http.get("/api/models").json()["models"]}
            assert list(listed)[:1] == ["tiny"] and "tiny-copy" in listed
            assert listed["tiny"]["resident"] and not listed["tiny-copy"]["resident"]
            job = http.post("/api/jobs", params={"wait": "true"},
                            json={"prompt": "fox", "seed": 1, "steps": 2, "width": 64, "height": 64,
                                  "model": "tiny-copy"}).json()
            assert job["status"] == "done" and job["outputs"][0]["metadata"]["model"]["name"] == "tiny-copy"
            listed = {m["id"]: m for m in http.get("/api/models").json()["models"]}
            assert listed["tiny-copy"]["resident"] and not listed["tiny"]["resident"]  # budget of one: evicted
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out.decode(errors="replace")[-2000:]
