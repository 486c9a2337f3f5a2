"""Hostile input against a real server on loopback (SECURITY 28-34): every reproduction of the red-team pass is a
case here, and every case answers a typed 4xx (never a 5xx), after which a good job still runs.

One server for the module (tiny model, operator caps); the loops are bounded (a few hundred requests in all).
"""

from __future__ import annotations

import io
import os
import socket
import time

import httpx
import pytest
from svc_helpers import JOB, run_app

DEEP = 100_000
BIG_INT = "9" * 5000
CAPS = {"max_steps": 4, "max_pixels": 256 * 256, "max_batch": 2, "queue_size": 8, "job_deadline_s": 20.0,
        "request_read_timeout_s": 1.0}

# (name, raw JSON body of a generation request) -- each one was a 500 before the one parser.
HOSTILE_JOB_BODIES = [
    ("int-5000-digits", '{"prompt": "x", "seed": ' + BIG_INT + '}', "number_too_large"),
    ("int-in-steps", '{"prompt": "x", "steps": -' + BIG_INT + '}', "number_too_large"),
    ("float-overflow", '{"prompt": "x", "cfg": 1e999999}', "number_too_large"),
    ("float-long", '{"prompt": "x", "cfg": 1.' + BIG_INT + '}', "number_too_large"),
    ("nan-literal", '{"prompt": "x", "cfg": NaN}', "invalid_json"),
    ("nested-100000-list", "[" * DEEP + "]" * DEEP, "too_deep"),
    ("nested-100000-object", '{"a":' * DEEP + "1" + "}" * DEEP, "too_deep"),
    ("nested-in-extra", '{"prompt": "x", "extra": ' + '{"a":' * 40 + "1" + "}" * 40 + "}", "too_deep"),
    ("surrogate-prompt", '{"prompt": "a \\ud800 b"}', "invalid_text"),
    ("surrogate-negative", '{"prompt": "x", "negative_prompt": "\\udfff"}', "invalid_text"),
    ("surrogate-key", '{"prompt": "x", "extra": {"\\ud800": 1}}', "invalid_text"),
    ("not-utf8", b'{"prompt": "\xff\xfe"}', "invalid_json"),
]


@pytest.fixture(scope="module")
def server(tiny_engine, tmp_path_factory):
    from qwenstudio.config import Settings
    from qwenstudio.service.app import create_app
    from qwenstudio.service.config import ServiceConfig
    from qwenstudio.service.engine_client import InProcessEngineClient

    client = InProcessEngineClient.from_engine(tiny_engine)
    client.wait_ready(30)
    home = tmp_path_factory.mktemp("hostile-home")
    app = create_app(Settings(home=home), client, ServiceConfig(**CAPS))
    try:
        with run_app(app) as url:
            yield url, app
    finally:
        client.close()


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server[0], timeout=60) as c:
        yield c


def _post_raw(http, path, body, method="POST"):
    data = body if isinstance(body, bytes) else body.encode("utf-8", "surrogatepass")
    return http.request(method, path, content=data, headers={"Content-Type": "application/json"})


def _assert_typed_4xx(r, code: str | None = None, openai: bool = False):
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    err = r.json()["error"]
    if openai:
        assert err["type"] == "invalid_request_error" and r.status_code == 400
    if code is not None:
        assert err["code"] == code, err


@pytest.mark.parametrize("name,body,code", HOSTILE_JOB_BODIES, ids=[c[0] for c in HOSTILE_JOB_BODIES])
@pytest.mark.parametrize("route", ["/api/jobs", "/v1/images/generations"])
def test_hostile_json_is_a_typed_400_on_generation_routes(http, route, name, body, code):
    r = _post_raw(http, route, body)
    _assert_typed_4xx(r, code, openai=route.startswith("/v1"))
    assert r.status_code == (400 if route.startswith("/v1") else 422)


def _preset_bodies():
    named = [
        ("surrogate-name", '{"name": "p\\ud800", "params": {}}', "invalid_text"),
        ("int-5000-digits", '{"name": "p", "params": {"seed": ' + BIG_INT + '}}', "number_too_large"),
        ("nested", '{"name": "p", "params": ' + "[" * DEEP + "]" * DEEP + "}", "too_deep"),
    ]
    swarm = [
        ("swarm-surrogate", '{"title": "t\\ud800", "param_map": {"prompt": "x"}}', "invalid_text"),
        ("swarm-int", '{"title": "t", "param_map": {"steps": ' + BIG_INT + '}}', "number_too_large"),
        ("swarm-nested", '{"title": "t", "param_map": ' + '{"a":' * DEEP + "1" + "}" * DEEP + "}", "too_deep"),
    ]
    return [("/api/presets", *c) for c in named] + [("/api/presets/import/swarmui", *c) for c in swarm]


@pytest.mark.parametrize("route,name,body,code", _preset_bodies(), ids=[c[1] for c in _preset_bodies()])
def test_hostile_json_is_a_typed_400_on_preset_routes(http, route, name, body, code):
    r = _post_raw(http, route, body)
    _assert_typed_4xx(r, code)
    assert r.status_code == 422


def test_hostile_json_on_preset_update(http):
    made = http.post("/api/presets", json={"name": "to-update", "params": {"steps": 2}})
    assert made.status_code == 201, made.text
    pid = made.json()["id"]
    for body, code in (('{"name": "\\ud800"}', "invalid_text"), ("[" * DEEP + "]" * DEEP, "too_deep"),
                       ('{"name": "u", "params": {"width": ' + BIG_INT + '}}', "number_too_large")):
        _assert_typed_4xx(_post_raw(http, f"/api/presets/{pid}", body, method="PUT"), code)


@pytest.mark.parametrize("params,code", [
    ({"steps": 0}, "invalid_steps"), ({"steps": 100000}, "invalid_steps"), ({"width": 5000}, "invalid_width"),
    ({"width": 100}, "invalid_size"), ({"cfg": -1}, "invalid_cfg"), ({"batch": 99}, "invalid_batch"),
    ({"sampler": "nope"}, "invalid_sampler"), ({"seed": -5}, "invalid_seed"),
], ids=lambda v: str(v))
def test_presets_are_validated_with_the_request_bounds(http, params, code):
    r = http.post("/api/presets", json={"name": f"bad {params}", "params": params})
    _assert_typed_4xx(r, code)


def test_swarmui_import_is_validated_with_the_request_bounds(http):
    for param_map, code in (({"steps": 0}, "invalid_steps"), ({"cfgscale": 99}, "invalid_cfg"),
                            ({"images": 50}, "invalid_batch"), ({"steps": "1e400"}, None)):
        r = http.post("/api/presets/import/swarmui", json={"title": f"swarm {param_map}", "param_map": param_map})
        if code is None:  # a value that does not convert is reported as unmapped, never a 500
            assert r.status_code == 201 and r.json()["unmapped"] == ["steps: 1e400"], r.text
        else:
            _assert_typed_4xx(r, code)


def _png(w=64, h=64) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (w, h), (10, 200, 30)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("field,value,code", [
    ("prompt", "a \udc80 b".encode("utf-8", "surrogateescape"), "latin-1"),
    ("prompt", "a \ud800 b".encode("utf-8", "surrogatepass"), "latin-1"),
    ("loras", ("[" * DEEP + "]" * DEEP).encode(), "too_deep"),
    ("loras", ('[{"name": "x", "weight": ' + BIG_INT + '}]').encode(), "number_too_large"),
    ("loras", b'[{"name": "\\ud800"}]', "invalid_text"),
    ("n", BIG_INT.encode(), "invalid_type"),
    ("steps", b"1e999999", "invalid_type"),
    ("strength", b"nan", "invalid_type"),
], ids=["bad-utf8-prompt", "surrogate-bytes-prompt", "loras-deep", "loras-bigint", "loras-surrogate", "n-bigint", "steps-float", "nan"])
def test_hostile_multipart_fields_on_edits_are_typed_400(http, field, value, code):
    files = [("image", ("a.png", _png(), "image/png")), (field, (None, value))]
    if field != "prompt":
        files.append(("prompt", (None, b"x")))
    r = http.post("/v1/images/edits", files=files)
    if code == "latin-1":  # Starlette decodes a non-UTF-8 text part as Latin-1: no surrogate can reach us, no 5xx
        assert r.status_code == 200, r.text
        return
    _assert_typed_4xx(r, code, openai=True)


def test_extra_is_bounded_in_size(http):
    r = http.post("/api/jobs", json={**JOB, "extra": {"blob": "x" * 100_000}})
    _assert_typed_4xx(r, "extra_too_large")
    r = http.post("/api/jobs", json={**JOB, "extra": {"note": "fine", "tags": ["a", "b"]}})
    assert r.status_code == 202, r.text


def test_missing_lora_is_lora_not_found(http, tiny_engine, monkeypatch):
    monkeypatch.setattr(tiny_engine, "allow_paths", False)  # as `serve` runs it: LoRAs by registry name only
    r = http.post("/api/jobs", json={**JOB, "loras": [{"name": "no-such-lora", "weight": 1.0}]})
    _assert_typed_4xx(r, "lora_not_found")


def test_negative_prompt_token_error_says_negative_prompt(http):
    long = " ".join(["word"] * 3000)
    r = http.post("/api/jobs", json={**JOB, "cfg": 4.0, "negative_prompt": long})
    _assert_typed_4xx(r, "prompt_too_long")
    assert r.json()["error"]["message"].startswith("negative prompt is ")


def test_worker_survives_the_hostile_module(http):
    r = http.post("/api/jobs?wait=true", json=JOB)
    assert r.status_code == 200 and r.json()["status"] == "done", r.text


# ---- access (SECURITY 29, 30, 16, 34) -------------------------------------------------------------------------------
@pytest.mark.parametrize("host", ["evil.example", "127.0.0.1.evil.example", "localhost.attacker.test", "", "[::2]"])
def test_host_not_in_allow_list_is_421_on_every_route(server, host):
    url = server[0]
    for method, path in (("GET", "/api/jobs"), ("GET", "/api/history"), ("POST", "/api/jobs"), ("GET", "/v1/models")):
        with httpx.Client(base_url=url, timeout=10, headers={"Host": host}) as c:
            r = c.request(method, path, json=JOB if method == "POST" else None)
        assert r.status_code == 421 and r.json()["error"]["code"] == "host_not_allowed", (host, path, r.text)
        assert host not in r.text or not host


def test_allowed_host_option_and_no_host_reflection(serve):
    with serve(allowed_hosts=("studio.lan",)) as s:
        port = s.url.rsplit(":", 1)[1]
        with httpx.Client(base_url=s.url, timeout=60, headers={"Host": f"studio.lan:{port}"}) as c:
            assert c.get("/api/jobs").status_code == 200
            r = c.get("/api/jobs/", follow_redirects=False)  # no slash redirect echoing the Host into Location
            assert "location" not in r.headers and r.status_code == 404
            r = c.post("/v1/images/generations", json={"prompt": "x", "steps": 1, "size": "64x64",
                                                        "response_format": "url"})
            assert r.status_code == 200, r.text
            assert r.json()["data"][0]["url"].startswith(s.url + "/api/outputs/")
        with httpx.Client(base_url=s.url, timeout=10, headers={"Host": "other.lan"}) as c:
            assert c.get("/api/jobs").status_code == 421


@pytest.mark.parametrize("headers", [
    {"Origin": "https://{host}"},  # same host and port, other scheme
    {"Origin": "http://{name}:1"},  # other port
    {"Origin": "http://{host}.evil.example"},
    {"Origin": "null"},
    {"Sec-Fetch-Site": "cross-site"},  # a cross-site fetch without Origin
    {"Sec-Fetch-Site": "cross-site", "Origin": "http://{host}"},
], ids=["scheme", "port", "suffix", "null", "fetch-site", "fetch-site-with-origin"])
def test_cross_site_state_changes_refused(server, http, headers):
    host = server[0].split("//")[1]
    filled = {k: v.format(host=host, name=host.rsplit(":", 1)[0]) for k, v in headers.items()}
    for path in ("/api/jobs", "/api/presets", "/v1/images/generations"):
        r = http.post(path, json=JOB, headers=filled)
        assert r.status_code == 403 and r.json()["error"]["code"] == "cross_origin_forbidden", (path, r.text)
    assert http.get("/api/jobs", headers=filled).status_code == 200  # reads are not state changes
    ok = http.post("/api/presets", json={"name": f"same-origin {headers}", "params": {}},
                   headers={"Origin": f"http://{host}", "Sec-Fetch-Site": "same-origin"})
    assert ok.status_code == 201, ok.text


def test_forwarded_headers_do_not_reset_the_rate_limit(serve):
    with serve(rate_limit_per_min=2) as s, s.client() as http:
        codes = [http.post("/api/presets", json={"name": f"xff{i}", "params": {}},
                           headers={"X-Forwarded-For": f"10.0.0.{i}", "Forwarded": f"for=10.1.0.{i}"}).status_code
                 for i in range(4)]
        assert codes[:2] == [201, 201] and codes[2:] == [429, 429], codes


def test_api_keys_from_file_and_env_not_the_command_line(tmp_path, monkeypatch, capsys):
    from qwenstudio.cli.serve import read_keys

    keyfile = tmp_path / "keys"
    keyfile.write_text("# operators\nfile-key-1\n\nfile-key-2\n")
    monkeypatch.setenv("QWENSTUDIO_API_KEY", "env-key")
    assert read_keys(None, keyfile) == ["env-key", "file-key-1", "file-key-2"]
    assert capsys.readouterr().err == ""
    assert read_keys("cli-key", None) == ["env-key", "cli-key"]
    assert "ps" in capsys.readouterr().err  # the deprecated flag still works, with a warning


# ---- connections (SECURITY 33) --------------------------------------------------------------------------------------
def test_half_open_connections_are_dropped(server, http):
    host, port = server[0].rsplit("//", 1)[1].split(":")
    partial = [b"", b"POST /api/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Ty",
               (b"POST /api/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
               b"Content-Length: 1000\r\n\r\n{\"prompt\": ")]
    socks = []
    try:
        for i in range(60):  # nothing sent, half a head, a head and part of the body
            sock = socket.create_connection((host, int(port)), timeout=6)
            if partial[i % 3]:
                sock.sendall(partial[i % 3])
            socks.append(sock)
        assert http.get("/healthz").status_code == 200  # served meanwhile
        t0 = time.monotonic()
        for sock in socks:
            try:
                data = sock.recv(65536)  # the server closes it (EOF); a timeout here is the old behaviour
            except ConnectionResetError:
                data = b""
            assert data == b"" or data.startswith(b"HTTP/1.1 4"), data[:80]
        assert time.monotonic() - t0 < 5
    finally:
        for sock in socks:
            sock.close()
    assert http.post("/api/jobs?wait=true", json=JOB).json()["status"] == "done"


def test_uploads_expire_and_have_a_quota(serve):
    one = len(_png(64, 64))
    with serve(upload_quota_bytes=int(one * 2.5), upload_ttl_s=3600) as s, s.client() as http:
        ids = []
        for color in range(2):
            r = http.post("/api/uploads", files={"file": ("a.png", _png_color(color), "image/png")})
            assert r.status_code == 201, r.text
            ids.append(r.json()["id"])
        r = http.post("/api/uploads", files={"file": ("c.png", _png_color(7), "image/png")})
        assert r.status_code == 507 and r.json()["error"]["code"] == "upload_quota_exceeded"
        again = http.post("/api/uploads", files={"file": ("a.png", _png_color(0), "image/png")})
        assert again.status_code == 201  # the same bytes again take no new room
        old = time.time() - 7200
        for p in s.state.uploads.folder.iterdir():  # two hours pass for the first two uploads
            os.utime(p, (old, old))
        r = http.post("/api/uploads", files={"file": ("c.png", _png_color(7), "image/png")})
        assert r.status_code == 201, r.text
        r = http.post("/api/jobs", json={**JOB, "images": [ids[0]]})
        assert r.status_code == 404 and r.json()["error"]["code"] == "upload_not_found"  # expired, by id


def _png_color(i: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (i * 30 % 256, 200, 30)).save(buf, format="PNG")
    return buf.getvalue()


def test_service_config_file_and_its_precedence(tmp_path):
    from qwenstudio.errors import InvalidRequest
    from qwenstudio.service.service_file import load_service_config

    f = tmp_path / "caps.toml"
    f.write_text('max_steps = 3\nmax_pixels = 65536\nallowed_hosts = ["studio.lan"]\nqueue_size = 5\n')
    c = load_service_config(f, ["k"], defaults={"queue_size": 16, "port": 9000}, overrides={"max_batch": 2})
    assert (c.max_steps, c.max_pixels, c.max_batch, c.queue_size, c.port) == (3, 65536, 2, 5, 9000)
    assert c.allowed_hosts == ("studio.lan",) and c.auth_enabled
    for bad in ('api_key_hashes = ["x"]\n', "max_stepz = 3\n", 'max_steps = "many"\n', "max_steps = 2.5\n"):
        f.write_text(bad)
        with pytest.raises(InvalidRequest) as info:
            load_service_config(f, [])
        assert info.value.code == "invalid_config"
