"""Grid jobs through the HTTP API: one ordinary job per cell (history, progress, outputs), cancel, typed errors."""

from __future__ import annotations

import time

from svc_helpers import wait_status


def _wait_grid(http, grid_id, statuses, timeout=60):
    deadline = time.monotonic() + timeout
    while True:
        g = http.get(f"/api/grids/{grid_id}").json()
        if g["status"] in statuses:
            return g
        assert time.monotonic() < deadline, g
        time.sleep(0.05)


def test_grid_job_runs_every_cell_as_a_job(serve):
    with serve() as s, s.client() as http:
        axes = ["steps=1,2", {"name": "cfg", "values": [1, 3]}, {"name": "prompt_sr", "values": ["fox", "owl"]}]
        r = http.post("/api/grids", json={"prompt": "a red fox", "axes": axes, "base": {"seed": 5}})
        assert r.status_code == 202, r.text
        grid = _wait_grid(http, r.json()["id"], ("done",))
        assert grid["progress"]["cells_done"] == grid["progress"]["cells"] == 8
        assert [a["labels"] for a in grid["axes"]] == [["steps=1", "steps=2"], ["cfg=1", "cfg=3"], ["fox", "owl"]]
        for cell in grid["cells"]:
            ix, iy, iz = cell["index"]
            req = cell["job"]["request"]
            assert (req["steps"], req["cfg"], req["seed"]) == (ix + 1, [1.0, 3.0][iy], 5)
            assert req["prompt"] == ["a red fox", "a red owl"][iz]
            assert http.get(cell["job"]["outputs"][0]["url"]).status_code == 200
        ids = {c["job"]["id"] for c in grid["cells"]}
        history = http.get("/api/jobs", params={"limit": 50}).json()
        listed = {j["id"] for j in history["jobs"]}
        assert ids <= listed  # the cells are ordinary jobs in the history
        assert http.get("/api/grids").json()["grids"][0]["id"] == grid["id"]


def test_grid_cancel_and_errors(serve):
    with serve() as s, s.client() as http:
        r = http.post("/api/grids", json={"prompt": "a lamp", "axes": ["steps=40,41,42,43"], "base": {"seed": 1}})
        assert r.status_code == 202
        grid_id = r.json()["id"]
        wait_status(http, r.json()["cells"][0]["job"]["id"], ("running", "done"))
        g = http.post(f"/api/grids/{grid_id}/cancel").json()
        g = _wait_grid(http, grid_id, ("cancelled", "done"))
        assert g["status"] == "cancelled" and "cancelled" in {c["job"]["status"] for c in g["cells"]}
        for body, code in (({"prompt": "x", "axes": ["model=a,b"]}, "invalid_axis"),
                           ({"prompt": "x", "axes": ["stepz=1"]}, "invalid_axis"),
                           ({"prompt": "x", "axes": ["steps=1,999"]}, "invalid_steps"),
                           ({"prompt": "x", "axes": ["steps=1..20"]}, "grid_too_large")):
            r = http.post("/api/grids", json=body)
            assert r.status_code == 422 and r.json()["error"]["code"] == code, r.text
        assert http.get("/api/grids/" + "0" * 32).status_code == 404
        assert http.get("/api/grids/../etc").status_code == 404
