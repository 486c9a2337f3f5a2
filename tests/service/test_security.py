"""SECURITY.md properties on a real loopback server: file serving by id (7, 8, 9), access (14, 15, 16), errors (6)."""

from __future__ import annotations

import os

import pytest
from svc_helpers import JOB, raw_request

SECRET = b"TOPSECRET-d41d8cd9"


@pytest.fixture
def secret_file(tmp_path):
    p = tmp_path / "secret.txt"
    p.write_bytes(SECRET)
    return p


def test_output_route_traversal_corpus(serve, secret_file):
    with serve() as s, s.client() as http:
        job = http.post("/api/jobs?wait=true", json=JOB).json()
        good_id = job["outputs"][0]["id"]
        name = s.state.store.output_filename(good_id)
        rel = os.path.relpath(secret_file, s.state.outputs_dir)
        absolute = str(secret_file)
        corpus = [
            f"../{rel}", "../../../../../../etc/passwd", f"..%2f{rel.replace('/', '%2f')}",
            f"..%252f{rel.replace('/', '%252f')}", "%2e%2e%2f%2e%2e%2fetc%2fpasswd",
            absolute, absolute.replace("/", "%2f"), "%2f" + absolute.lstrip("/").replace("/", "%2f"),
            "..\\..\\" + rel.replace("/", "\\"), "..%5c..%5c" + rel.replace("/", "%5c"),
            good_id + "%00", good_id + "%00.png", name, name[:-4], "..", ".", "%2e%2e", good_id.upper(),
            good_id + "/../" + good_id, "~/.bashrc", "file:" + absolute,
        ]
        for attempt in corpus:
            status, body = raw_request(s.url, f"GET /api/outputs/{attempt} HTTP/1.1".encode())
            assert status in (400, 404), (attempt, status)
            assert SECRET not in body and b"root:" not in body and b"\x89PNG" not in body, attempt
        status, body = raw_request(s.url, b"GET /api/outputs/" + good_id.encode() + b"\x00 HTTP/1.1")
        assert status in (400, 404) and SECRET not in body
        status, body = raw_request(s.url, f"GET /api/outputs/{good_id} HTTP/1.1".encode())
        assert status == 200 and body.startswith(b"\x89PNG")


def test_symlinks_in_outputs_dir_are_never_followed(serve, secret_file):
    with serve() as s, s.client() as http:
        out_id = http.post("/api/jobs?wait=true", json=JOB).json()["outputs"][0]["id"]
        path = s.state.outputs_dir / s.state.store.output_filename(out_id)
        path.unlink()
        path.symlink_to(secret_file)  # a known output swapped for a link
        planted = s.state.outputs_dir / ("ab" * 16 + ".png")
        planted.symlink_to(secret_file)  # a link with a plausible name, no row
        for oid in (out_id, "ab" * 16):
            r = http.get(f"/api/outputs/{oid}")
            assert r.status_code == 404 and SECRET not in r.content
            assert r.json()["error"]["code"] == "output_not_found"


def test_served_files_are_png_with_nosniff(serve):
    with serve() as s, s.client() as http:
        out = http.post("/api/jobs?wait=true", json=JOB).json()["outputs"][0]
        r = http.get(out["url"])
        assert r.headers["content-type"] == "image/png"
        assert r.headers["x-content-type-options"] == "nosniff"
        assert "sandbox" in r.headers["content-security-policy"]


def test_api_key_required_everywhere_but_healthz(serve):
    with serve(keys=("k1-secret", "k2-secret")) as s, s.client() as http:
        assert http.get("/healthz").status_code == 200
        for method, path in [("GET", "/readyz"), ("GET", "/metrics"), ("GET", "/api/jobs"), ("GET", "/api/models"),
                             ("GET", "/v1/models"), ("POST", "/api/jobs"), ("GET", "/api/presets"),
                             ("GET", "/api/outputs/" + "0" * 32), ("GET", "/docs"), ("GET", "/openapi.json")]:
            r = http.request(method, path, json=JOB if method == "POST" else None)
            assert r.status_code == 401, (method, path)
            assert "k1-secret" not in r.text
            r = http.request(method, path, headers={"Authorization": "Bearer nope"})
            assert r.status_code == 401
        assert http.get("/v1/models").json()["error"]["type"] == "authentication_error"
        assert http.get("/api/jobs", headers={"Authorization": "Bearer k1-secret"}).status_code == 200
        assert http.get("/api/jobs", headers={"X-API-Key": "k2-secret"}).status_code == 200
        r = http.post("/api/jobs?wait=true", json=JOB, headers={"Authorization": "Bearer k2-secret"})
        assert r.json()["status"] == "done"
        # stored hashed, never in the config's repr
        cfg = s.state.config
        assert "k1-secret" not in repr(cfg) and all(len(h) == 64 for h in cfg.api_key_hashes)
        assert "k1-secret" not in str(vars(cfg))


def test_non_loopback_bind_without_key_is_refused():
    from qwenstudio.cli.serve import serve
    from qwenstudio.service.config import ServiceConfig
    from qwenstudio.service.errors import UnsafeBind

    with pytest.raises(UnsafeBind, match="API key"):
        serve(host="0.0.0.0", port=1, model="tiny", api_key=None)
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.5"):
        ServiceConfig(host=host).check_bind()
    ServiceConfig.with_keys(["k"], host="0.0.0.0").check_bind()


def test_cors_closed_and_cross_site_posts_refused(serve):
    with serve() as s, s.client() as http:
        r = http.options("/api/jobs", headers={"Origin": "https://evil.example",
                                               "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in r.headers
        r = http.get("/api/jobs", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in r.headers
        r = http.post("/api/jobs", json=JOB, headers={"Origin": "https://evil.example"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "cross_origin_forbidden"
        r = http.post("/api/jobs", data={"prompt": "x"})  # a form post without Origin still cannot pass
        assert r.status_code == 415
        host = s.url.split("//")[1]
        r = http.post("/api/jobs", json=JOB, headers={"Origin": f"http://{host}"})
        assert r.status_code == 202
    with serve(cors_origins=("https://studio.example",)) as s, s.client() as http:
        r = http.options("/api/jobs", headers={"Origin": "https://studio.example",
                                               "Access-Control-Request-Method": "POST"})
        assert r.headers["access-control-allow-origin"] == "https://studio.example"
        assert http.post("/api/jobs", json=JOB, headers={"Origin": "https://studio.example"}).status_code == 202


def test_errors_do_not_leak_internals(serve):
    with serve() as s, s.client() as http:
        for r in (http.get("/api/jobs/does-not-exist"), http.get("/nowhere"),
                  http.post("/api/jobs", json={"prompt": "x", "steps": -1}), http.put("/healthz")):
            assert r.status_code in (404, 405, 422)
            assert "Traceback" not in r.text and str(s.home) not in r.text
            assert set(r.json()["error"]) == {"code", "message"}
