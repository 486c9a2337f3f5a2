"""Native API round trip, validation before queueing, presets, models, history, OpenAI compatibility."""

from __future__ import annotations

import base64
import io

from PIL import Image
from svc_helpers import JOB, read_sse


def test_round_trip_create_events_get_image(serve):
    with serve(preview_every=1) as s, s.client() as http:
        r = http.post("/api/jobs", json={**JOB, "steps": 3})
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        events = read_sse(http, job_id)
        names = [n for n, _ in events]
        assert names[0] == "queued" and names[-1] == "done"
        progress = [d for n, d in events if n == "progress"]
        assert [p["step"] for p in progress] == [1, 2, 3] and all(p["eta"] is not None for p in progress)
        previews = [d for n, d in events if n == "preview"]
        assert previews and Image.open(io.BytesIO(base64.b64decode(previews[0]["images"][0]))).format == "PNG"
        done = events[-1][1]
        job = http.get(f"/api/jobs/{job_id}").json()
        assert job["status"] == "done" and job["progress"] == {"step": 3, "total": 3}
        assert job["request"]["seed"] == 1 and job["request"]["steps"] == 3
        out = job["outputs"][0]
        assert out["url"] == done["outputs"][0]["url"]
        img = http.get(out["url"])
        assert img.status_code == 200
        assert img.headers["content-type"] == "image/png"
        assert img.headers["x-content-type-options"] == "nosniff"
        png = Image.open(io.BytesIO(img.content))
        assert png.size == (64, 64) and "qwenstudio" in png.text  # full reproducible metadata travels with it
        history = http.get("/api/history").json()
        assert history["total"] == 1 and history["items"][0]["metadata"]["request"]["seed"] == 1


def test_wait_returns_finished_job_and_same_seed_reproduces(serve):
    with serve() as s, s.client() as http:
        a = http.post("/api/jobs?wait=true", json=JOB).json()
        b = http.post("/api/jobs?wait=true", json=JOB).json()
        assert a["status"] == b["status"] == "done"
        pa = http.get(a["outputs"][0]["url"]).content
        pb = http.get(b["outputs"][0]["url"]).content
        assert Image.open(io.BytesIO(pa)).tobytes() == Image.open(io.BytesIO(pb)).tobytes()


def test_list_filter_page_and_delete_removes_only_own_files(serve):
    with serve() as s, s.client() as http:
        ids = [http.post("/api/jobs?wait=true", json={**JOB, "prompt": p}).json()["id"]
               for p in ("a cat", "a dog", "a cat on a mat")]
        page = http.get("/api/jobs", params={"q": "cat", "limit": 1}).json()
        assert page["total"] == 2 and len(page["jobs"]) == 1 and page["jobs"][0]["id"] == ids[2]
        assert http.get("/api/jobs", params={"status": "done", "model": "tiny"}).json()["total"] == 3
        assert http.get("/api/jobs", params={"model": "other"}).json()["total"] == 0
        files_before = sorted(p.name for p in s.state.outputs_dir.iterdir())
        assert len(files_before) == 3
        assert http.delete(f"/api/jobs/{ids[0]}").status_code == 200
        assert http.get(f"/api/jobs/{ids[0]}").status_code == 404
        assert len(list(s.state.outputs_dir.iterdir())) == 2
        for other in ids[1:]:
            assert http.get(http.get(f"/api/jobs/{other}").json()["outputs"][0]["url"]).status_code == 200


def test_bounds_are_checked_before_queueing(serve):
    with serve() as s, s.client() as http:
        cases = [
            ({"steps": 100000}, "invalid_steps"),
            ({"width": 100000, "height": 64}, "invalid_width"),
            ({"width": 4096, "height": 4096, "batch": 16}, None),  # within per-field bounds: allowed shape...
            ({"batch": 1000}, "invalid_batch"),
            ({"cfg": 1e9}, "invalid_cfg"),
            ({"shift": -1.0}, "invalid_shift"),
            ({"seed": -5}, "invalid_seed"),
            ({"width": 65, "height": 64}, "invalid_size"),
            ({"steps": "many"}, "invalid_type"),
            ({"sampler": ["x"]}, "invalid_type"),
            ({"sampler": "nope"}, "invalid_sampler"),
            ({"bogus": 1}, "invalid_request"),
            ({"prompt": ""}, "invalid_request"),
            ({"preview_every": -1}, "invalid_preview_every"),
        ]
        for extra, code in cases:
            if code is None:
                continue
            r = http.post("/api/jobs", json={**JOB, **extra})
            assert r.status_code == 422, (extra, r.text)
            assert r.json()["error"]["code"] == code, (extra, r.json())
        assert http.get("/api/jobs").json()["total"] == 0  # nothing was queued
        r = http.post("/api/jobs", json={**JOB, "model": "qwen-image-9000"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        r = http.post("/api/jobs", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_json"
        # a bad request never poisons the worker: the next good one succeeds
        assert http.post("/api/jobs?wait=true", json=JOB).json()["status"] == "done"


def test_content_type_and_body_cap(serve):
    with serve(max_body_bytes=4096) as s, s.client() as http:
        r = http.post("/api/jobs", data={"prompt": "form post"})
        assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"
        r = http.post("/api/jobs", content=b'{"prompt": "x"}', headers={"content-type": "text/plain"})
        assert r.status_code == 415
        r = http.post("/api/jobs", json={"prompt": "x" * 10000})
        assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"

        def chunks():  # no Content-Length: the cap counts real bytes
            for _ in range(10):
                yield b"x" * 1000

        r = http.post("/api/jobs", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413
        r = http.post("/v1/images/generations", json={"prompt": "x" * 10000})
        assert r.status_code == 413 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_models_health_ready_presets(serve):
    with serve() as s, s.client() as http:
        assert http.get("/healthz").json() == {"ok": True}
        assert http.get("/readyz").json() == {"ready": True}
        models = http.get("/api/models").json()["models"]
        assert models[0]["id"] == "tiny" and models[0]["ready"] is True
        assert http.get("/openapi.json").status_code == 200

        p = http.post("/api/presets", json={"name": "fast", "params": {"steps": 2, "cfg": 1.0}})
        assert p.status_code == 201, p.text
        pid = p.json()["id"]
        assert http.post("/api/presets", json={"name": "fast", "params": {}}).status_code == 409
        assert http.post("/api/presets", json={"name": "bad", "params": {"path": "/etc"}}).status_code == 422
        assert http.put(f"/api/presets/{pid}", json={"name": "fast2", "params": {"steps": 3}}).json()["params"] == {
            "steps": 3}
        assert [x["name"] for x in http.get("/api/presets").json()["presets"]] == ["fast2"]
        swarm = {"title": "Swarm look", "author": "me", "description": "d", "param_map": {
            "prompt": "a castle", "negativeprompt": "blurry", "seed": "-1", "steps": "30", "cfgscale": "4.5",
            "sidelength": "1000", "sampler": "euler", "scheduler": "simple", "sigmashift": "3.1",
            "model": "qwen_image.safetensors", "loras": "x"}}
        r = http.post("/api/presets/import/swarmui", json=swarm)
        assert r.status_code == 201, r.text
        params = r.json()["preset"]["params"]
        assert params == {"prompt": "a castle", "negative_prompt": "blurry", "steps": 30, "cfg": 4.5,
                          "sampler": "euler", "scheduler": "simple", "shift": 3.1, "model": "qwen_image.safetensors",
                          "loras": [{"name": "x", "weight": 1.0}]}
        # SwarmUI uses a side length only with an aspect ratio; -1 is its "random" seed
        assert r.json()["unmapped"] == ["sidelength: 1000 (aspect ratio unset)"]
        assert r.json()["warnings"] == ["seed -1 is SwarmUI's 'random': no seed set"]
        assert http.delete(f"/api/presets/{pid}").status_code == 200
        assert http.get(f"/api/presets/{pid}").status_code == 404


def test_openai_client_b64_and_url(serve):
    import openai

    with serve(keys=("sk-test",)) as s:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="sk-test", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["tiny"]
        res = client.images.generate(model="tiny", prompt="a fox", n=2, size="64x64", response_format="b64_json",
                                     extra_body={"steps": 2, "seed": 7, "cfg": 1.0})
        assert len(res.data) == 2
        img = Image.open(io.BytesIO(base64.b64decode(res.data[0].b64_json)))
        assert img.size == (64, 64) and img.format == "PNG"
        res = client.images.generate(model="tiny", prompt="a fox", size="80x64", response_format="url",
                                     extra_body={"steps": 2})
        url = res.data[0].url
        assert url.startswith(s.url + "/api/outputs/")
        import httpx

        got = httpx.get(url, headers={"Authorization": "Bearer sk-test"})
        assert got.status_code == 200 and Image.open(io.BytesIO(got.content)).size == (80, 64)

        with __import__("pytest").raises(openai.BadRequestError) as e:
            client.images.generate(model="tiny", prompt="x", extra_body={"steps": 10**6})
        assert e.value.code == "invalid_steps"
        with __import__("pytest").raises(openai.NotFoundError) as e:
            client.images.generate(model="dall-e-3", prompt="x")
        assert e.value.code == "model_not_found"
        with __import__("pytest").raises(openai.AuthenticationError):
            openai.OpenAI(base_url=s.url + "/v1", api_key="wrong", max_retries=0).models.list()
        with __import__("pytest").raises(openai.BadRequestError) as e:  # a truncated PNG is refused cleanly
            client.images.edit(model="tiny", image=("a.png", io.BytesIO(b"\x89PNG"), "image/png"), prompt="x")
        assert e.value.code in ("invalid_image", "unsupported_image")


def test_openai_error_shape(serve):
    with serve() as s, s.client() as http:
        r = http.post("/v1/images/generations", json={"prompt": "x", "size": "big"})
        assert r.status_code == 400
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["code"] == "invalid_size"
        assert err["type"] == "invalid_request_error"
        r = http.post("/v1/images/generations", json={"prompt": "x", "n": 500})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_batch"
        r = http.post("/v1/images/generations", json={"prompt": "x", "whatever": 1})
        assert r.status_code == 400 and r.json()["error"]["code"] == "unknown_parameter"
