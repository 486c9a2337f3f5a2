"""The web studio end to end: a real server (tiny model), Chromium through Playwright, only the public HTTP API."""

from __future__ import annotations

import io
import json
import re

import httpx
from conftest import shot
from playwright.sync_api import expect


def open_view(page, server, view: str = "generate"):
    page.goto(f"{server.url}/#{view}")
    expect(page.locator("#server-status")).to_contain_text("ready")


def png_bytes(w: int = 64, h: int = 48) -> bytes:
    from PIL import Image

    img = Image.new("RGB", (w, h))
    for x in range(w):
        for y in range(h):
            img.putpixel((x, y), (x * 4 % 256, y * 5 % 256, 128))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_page_and_static_files_are_served_safely(server):
    with httpx.Client(base_url=server.url) as http:
        r = http.get("/")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        assert r.headers["x-content-type-options"] == "nosniff"
        csp = r.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "img-src 'self' data: blob:" in csp and "unsafe-inline" not in csp
        for name, ctype in [("app.js", "text/javascript"), ("style.css", "text/css"), ("favicon.svg", "image/svg+xml")]:
            r = http.get(f"/ui/{name}")
            assert r.status_code == 200 and r.headers["content-type"].startswith(ctype), name
            assert r.headers["x-content-type-options"] == "nosniff"
        for bad in ("/ui/nope.js", "/ui/..%2Fapi%2Fjobs", "/ui/.env", "/ui/app.py"):
            assert http.get(bad).status_code == 404, bad


def test_models_api_exposes_spec_defaults_sizes_and_choices(server):
    with server.http() as http:
        data = http.get("/api/models").json()
    tiny = data["models"][0]
    assert tiny["id"] == "tiny" and tiny["kind"] == "model"
    assert tiny["defaults"]["steps"] == 4 and tiny["defaults"]["aspect"] == "1:1"
    assert (tiny["defaults"]["width"], tiny["defaults"]["height"]) == (64, 64)
    assert tiny["resolutions"]["16:9"] == [112, 64]
    assert "euler" in data["samplers"] and "reference" in data["schedulers"]
    assert data["loras"] == [] and data["limits"]["steps"] == [1, 200]


def test_generate_shows_progress_then_gallery_survives_reload(page, server):
    open_view(page, server)
    page.fill("#gen-prompt", "a lighthouse at dusk, generate test")
    page.fill("#gen-steps", "12")
    page.locator("#gen-prompt").press("Control+Enter")
    expect(page.locator("#gen-live")).to_be_visible()
    expect(page.locator("#live-status")).to_contain_text("Done", timeout=30_000)
    expect(page.locator("#live-steps")).to_have_text("step 12 / 12")
    result = page.locator("#gen-images img").first
    expect(result).to_have_attribute("src", re.compile(r"^blob:"))
    seed = page.input_value("#gen-seed")
    expect(page.locator("#gen-meta")).to_contain_text(f"seed {seed}")
    shot(page, "generate")

    page.click("button[data-view=gallery]")
    thumb = page.locator(".thumb", has_text="generate test").first
    expect(thumb).to_be_visible()
    page.reload()
    expect(page.locator(".thumb", has_text="generate test").first).to_be_visible()
    page.fill("#gallery-q", "lighthouse at dusk")
    page.press("#gallery-q", "Enter")
    expect(page.locator(".thumb")).to_have_count(1)
    page.locator(".thumb").first.click()
    expect(page.locator("#detail")).to_be_visible()
    expect(page.locator("#detail-params")).to_contain_text(seed)
    expect(page.locator("#detail-img")).to_have_attribute("src", re.compile(r"^blob:"))
    with page.expect_download() as dl:
        page.click("#detail-download")
    assert dl.value.suggested_filename.endswith(f"-{seed}.png")


def test_cancel_a_running_job(page, server):
    open_view(page, server)
    page.fill("#gen-prompt", "a long job to cancel")
    page.select_option("#gen-aspect", "custom")
    page.fill("#gen-width", "768")
    page.fill("#gen-height", "768")
    page.fill("#gen-steps", "150")
    page.click("#gen-run")
    expect(page.locator("#live-steps")).to_contain_text("/ 150", timeout=30_000)
    expect(page.locator("#live-eta")).to_contain_text("ETA")
    page.click("#live-cancel")
    expect(page.locator("#live-status")).to_have_text("Cancelled", timeout=30_000)
    with server.http() as http:
        jobs = http.get("/api/jobs", params={"q": "a long job to cancel"}).json()["jobs"]
    assert jobs[0]["status"] == "cancelled"


def test_api_error_is_shown_inline(page, server):
    open_view(page, server)
    page.fill("#gen-prompt", "bad size")
    page.select_option("#gen-aspect", "custom")
    page.fill("#gen-width", "100")
    page.click("#gen-run")
    err = page.locator("#gen-error")
    expect(err).to_be_visible()
    expect(err).to_contain_text("width 100 is not a multiple of 16; nearest valid: 96")
    expect(err).to_contain_text("422")


def test_reuse_settings_and_seed_fill_the_form(page, server):
    body = {"prompt": "reuse me please", "steps": 3, "cfg": 2.5, "seed": 4242, "sampler": "heun",
            "scheduler": "simple", "width": 80, "height": 64, "negative_prompt": "blurry"}
    with server.http() as http:
        assert http.post("/api/jobs?wait=true", json=body).json()["status"] == "done"
    open_view(page, server)
    page.click("#gen-reset")  # form at the model defaults first: shown, not filled in (unset = server decides)
    expect(page.locator("#gen-steps")).to_have_value("")
    expect(page.locator("#gen-steps")).to_have_attribute("placeholder", "4")
    page.click("button[data-view=gallery]")
    page.locator(".thumb", has_text="reuse me please").first.click()
    page.click("#detail-reuse")
    expect(page.locator("#view-generate")).to_be_visible()
    expect(page.locator("#gen-prompt")).to_have_value("reuse me please")
    expect(page.locator("#gen-negative")).to_have_value("blurry")
    for name, value in [("steps", "3"), ("cfg", "2.5"), ("seed", "4242"), ("sampler", "heun"),
                        ("scheduler", "simple"), ("width", "80"), ("height", "64"), ("aspect", "4:3")]:
        expect(page.locator(f"#gen-{name}")).to_have_value(value)
    expect(page.locator("#gen-lock")).to_have_attribute("aria-pressed", "true")

    # model defaults come back with "Defaults" (and on a model change), as placeholders
    page.click("#gen-reset")
    expect(page.locator("#gen-steps")).to_have_value("")
    expect(page.locator("#gen-steps")).to_have_attribute("placeholder", "4")
    expect(page.locator("#gen-width")).to_have_attribute("placeholder", "64")
    expect(page.locator("#gen-sampler")).to_have_value("")

    page.fill("#gen-seed", "1")
    page.click("button[data-view=gallery]")
    page.locator(".thumb", has_text="reuse me please").first.click()
    page.click("#detail-seed")
    expect(page.locator("#gen-seed")).to_have_value("4242")


def test_presets_save_load_and_swarmui_import(page, server, tmp_path):
    open_view(page, server)
    page.fill("#gen-prompt", "preset prompt")
    page.fill("#gen-steps", "7")
    page.fill("#preset-name", "seven steps")
    page.click("#preset-save")
    expect(page.locator("#preset-msg")).to_contain_text("Saved")
    page.fill("#gen-steps", "2")
    page.click("#preset-load")
    expect(page.locator("#gen-steps")).to_have_value("7")

    swarm = tmp_path / "swarm.json"
    swarm.write_text(json.dumps({"title": "swarm look", "param_map": {"steps": 9, "cfgscale": 3.5, "width": 70,
                                                                      "height": 64, "refinermodel": "x"}}))
    page.set_input_files("#preset-import", str(swarm))
    expect(page.locator("#preset-msg")).to_contain_text("Imported “swarm look”. Not mapped: refinermodel: x.")
    expect(page.locator("#preset-msg")).to_contain_text("width 70 rounded to 64")
    page.click("#preset-load")
    expect(page.locator("#gen-steps")).to_have_value("9")
    expect(page.locator("#gen-cfg")).to_have_value("3.5")


def paint_mask(page):
    canvas = page.locator("#mask-canvas")
    expect(canvas).to_be_visible()
    page.wait_for_function("() => document.getElementById('mask-canvas').width > 300")  # sized to the image
    box = canvas.bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.3)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.7, box["y"] + box["height"] * 0.6, steps=8)
    page.mouse.up()
    return page.evaluate("""() => { const c = document.getElementById('mask-canvas');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i]) n++; return [c.width, c.height, n]; }""")


def set_range(page, selector: str, value: str):
    page.eval_on_selector(selector, "(e, v) => { e.value = v; e.dispatchEvent(new Event('input', {bubbles: true})); }",
                          value)


def test_edit_uploads_runs_a_job_with_progress_and_reuse_restores_it(page, server, tmp_path):
    img = tmp_path / "input.png"
    img.write_bytes(png_bytes(310, 230))  # not a multiple of 16: pixel-aligned keeps it exactly
    open_view(page, server)
    page.fill("#gen-steps", "6")
    page.click("button[data-view=edit]")
    with page.expect_response("**/api/uploads") as up:
        page.set_input_files("#edit-files", str(img))
    assert up.value.status == 201
    upload_id = up.value.json()["id"]
    expect(page.locator("#edit-thumbs li")).to_have_count(1)
    expect(page.locator("#edit-thumbs li")).to_contain_text("310×230 png")
    assert paint_mask(page)[:2] == [310, 230]
    page.fill("#edit-prompt", "make it blue, edit test")
    set_range(page, "#edit-strength", "0.8")
    expect(page.locator("#edit-strength-out")).to_have_text("0.80")
    with page.expect_request(lambda r: r.url.endswith("/api/jobs") and r.method == "POST") as req:
        page.click("#edit-run")
    body = req.value.post_data_json
    assert body["images"] == [upload_id] and re.fullmatch(r"[0-9a-f]{64}", body["mask"]) and body["mask"] != upload_id
    assert body["strength"] == 0.8 and body["keep_size"] is True and body["model"] == "tiny" and body["steps"] == 6
    assert "width" not in body and body["prompt"] == "make it blue, edit test"
    expect(page.locator("#edit-live")).to_be_visible()
    expect(page.locator("#edit-live-status")).to_contain_text("Done", timeout=60_000)
    expect(page.locator("#edit-live-steps")).to_have_text(re.compile(r"^step (\d+) / \1$"))  # strength 0.8: fewer
    result = page.locator("#edit-images img").first
    expect(result).to_have_attribute("src", re.compile(r"^blob:"))
    page.wait_for_function("() => { const i = document.querySelector('#edit-images img'); return i && i.complete && i.naturalWidth; }")
    assert result.evaluate("img => [img.naturalWidth, img.naturalHeight]") == [310, 230]
    expect(page.locator("#edit-meta")).to_contain_text(f"310×230 · 6 steps · strength 0.8 · seed {page.input_value('#gen-seed')}")
    expect(page.locator("#edit-error")).to_be_hidden()
    shot(page, "edit")

    # the result opens like a generation's, with the edit's parameters
    result.click()
    expect(page.locator("#detail")).to_be_visible()
    params = page.locator("#detail-params")
    expect(params).to_contain_text("Inputs310×230 png")
    expect(params).to_contain_text("Strength0.8")
    page.click("#detail-reuse")
    expect(page.locator("#view-edit")).to_be_visible()
    expect(page.locator("#edit-notice")).to_contain_text("same ones")

    # reuse from the gallery with the images gone: the fields come back, the images must be picked again
    page.get_by_role("button", name="Remove input.png").click()
    page.fill("#edit-prompt", "")
    set_range(page, "#edit-strength", "0.3")
    page.uncheck("#edit-aligned")
    page.click("button[data-view=generate]")
    page.fill("#gen-steps", "2")
    page.click("button[data-view=gallery]")
    page.locator(".thumb", has_text="edit test").first.click()
    page.click("#detail-reuse")
    expect(page.locator("#view-edit")).to_be_visible()
    expect(page.locator("#edit-prompt")).to_have_value("make it blue, edit test")
    expect(page.locator("#edit-strength")).to_have_value("0.8")
    expect(page.locator("#edit-strength-out")).to_have_text("0.80")
    expect(page.locator("#edit-aligned")).to_be_checked()
    expect(page.locator("#gen-steps")).to_have_value("6")
    expect(page.locator("#gen-lock")).to_have_attribute("aria-pressed", "true")
    notice = page.locator("#edit-notice")
    expect(notice).to_contain_text("1 input image (310×230 PNG) and its mask")
    expect(notice).to_contain_text("pick the images and paint the mask again")
    page.set_input_files("#edit-files", str(img))
    expect(notice).to_be_hidden()


def test_cancel_an_edit_job(page, server, tmp_path):
    from PIL import Image

    img = tmp_path / "big.png"
    Image.new("RGB", (768, 768), (30, 90, 200)).save(img)
    open_view(page, server)
    page.fill("#gen-steps", "150")
    page.click("button[data-view=edit]")
    page.set_input_files("#edit-files", str(img))
    expect(page.locator("#edit-thumbs li")).to_contain_text("768×768 png")
    page.fill("#edit-prompt", "an edit to cancel")
    page.click("#edit-run")
    expect(page.locator("#edit-live-steps")).to_contain_text("/ 150", timeout=30_000)
    expect(page.locator("#edit-live-eta")).to_contain_text("ETA")
    page.click("#edit-live-cancel")
    expect(page.locator("#edit-live-status")).to_have_text("Cancelled", timeout=30_000)
    expect(page.locator("#edit-live")).to_have_attribute("data-state", "cancelled")
    expect(page.locator("#edit-run")).to_be_enabled()
    with server.http() as http:
        jobs = http.get("/api/jobs", params={"q": "an edit to cancel"}).json()["jobs"]
    assert jobs[0]["status"] == "cancelled" and len(jobs[0]["request"]["images"]) == 1


def test_invalid_upload_shows_the_api_error_inline(page, server, tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("this is a text file, not an image")
    with server.http() as http:
        r = http.post("/api/uploads", files={"file": ("notes.png", bad.read_bytes(), "image/png")})
    assert r.status_code == 422
    open_view(page, server, "edit")
    page.set_input_files("#edit-files", str(bad))
    err = page.locator("#edit-error")
    expect(err).to_be_visible()
    expect(err).to_contain_text(f"notes.png: {r.json()['error']['message']}")
    expect(err).to_contain_text(f"422 {r.json()['error']['code']}")
    expect(page.locator("#edit-thumbs li")).to_have_count(0)
    page.fill("#edit-prompt", "nothing to edit")
    page.click("#edit-run")
    expect(err).to_have_text("add at least one input image")


def test_compare_grid_with_timings(page, server):
    open_view(page, server)
    page.fill("#gen-prompt", "compare grid test")
    page.click("button[data-view=compare]")
    page.select_option("#compare-param", "steps")
    page.fill("#compare-values", "2, 4, 6")
    page.click("#compare-run")
    cells = page.locator(".compare-cell")
    expect(cells).to_have_count(3)
    for i in range(3):
        expect(cells.nth(i).locator("img")).to_have_attribute("src", re.compile(r"^blob:"), timeout=30_000)
        expect(cells.nth(i).locator(".timing")).to_contain_text(" s")
    expect(cells.nth(0)).to_contain_text("steps=2")
    seeds = {json.dumps(j["request"]["seed"]) for j in server.http().get(
        "/api/jobs", params={"q": "compare grid test"}).json()["jobs"]}
    assert len(seeds) == 1  # one shared seed
    page.select_option("#compare-param", "sampler")  # values suggested per parameter
    expect(page.locator("#compare-values")).to_have_value(re.compile("euler, euler_ancestral"))


def test_compare_three_axes_and_export(page, server):
    open_view(page, server)
    page.fill("#gen-prompt", "three axes of a red fox")
    page.click("button[data-view=compare]")
    page.select_option("#compare-param", "steps")
    page.fill("#compare-values", "1, 2")
    page.select_option("#compare-param-y", "cfg")
    page.fill("#compare-values-y", "1, 3")
    page.select_option("#compare-param-z", "prompt_sr")
    page.fill("#compare-values-z", "fox, owl")
    page.click("#compare-run")
    cells = page.locator(".compare-cell")
    expect(cells).to_have_count(8)
    for i in range(8):
        expect(cells.nth(i).locator(".timing")).to_contain_text(" s", timeout=60_000)
    expect(page.locator(".compare-block h3")).to_have_text(["fox", "owl"])
    expect(page.locator(".compare-block").nth(1).locator("thead th, tr").first).to_contain_text("steps=1")
    expect(cells.nth(7)).to_contain_text("steps=2 · cfg=3 · owl")
    shot(page, "compare")
    with page.expect_download() as dl:
        page.click("#compare-export")
    grid = json.loads(open(dl.value.path()).read())
    assert len(grid["cells"]) == 8 and grid["status"] == "done"
    reqs = [c["job"]["request"] for c in grid["cells"]]
    assert len({r["seed"] for r in reqs}) == 1 and {r["prompt"] for r in reqs} == {"three axes of a red fox",
                                                                                     "three axes of a red owl"}
    page.select_option("#compare-param-y", "steps")  # one parameter per axis
    page.click("#compare-run")
    expect(page.locator("#compare-error")).to_contain_text("one axis only")


def test_gallery_screenshot_and_delete(page, server):
    with server.http() as http:
        for i in range(3):
            http.post("/api/jobs", json={"prompt": f"gallery filler {i}", "steps": 2, "seed": i})
        http.post("/api/jobs?wait=true", json={"prompt": "delete me", "steps": 2, "seed": 99})
    open_view(page, server, "gallery")
    expect(page.locator(".thumb", has_text="delete me")).to_have_count(1)
    expect(page.locator(".thumb img").first).to_have_attribute("src", re.compile(r"^blob:"))
    page.wait_for_timeout(200)
    shot(page, "gallery")
    page.locator(".thumb", has_text="delete me").click()
    shot(page, "detail")
    page.click("#detail-delete")
    expect(page.locator("#detail-delete")).to_contain_text("again")
    page.click("#detail-delete")
    expect(page.locator("#detail")).to_be_hidden()
    expect(page.locator(".thumb", has_text="delete me")).to_have_count(0)


def test_phone_width_is_usable(browser, server):
    context = browser.new_context(viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True,
                                  has_touch=True)
    page = context.new_page()
    try:
        open_view(page, server)
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= 390, f"page scrolls sideways at phone width ({width}px)"
        for sel in ("#gen-prompt", "#gen-run", "button[data-view=gallery]", "#gen-seed"):
            box = page.locator(sel).bounding_box()
            assert box["x"] >= 0 and box["x"] + box["width"] <= 390, sel
        shot(page, "phone")
    finally:
        context.close()


def test_api_key_is_asked_once_kept_and_history_survives_restart(browser, make_server):
    keyed = make_server("keyed", api_key="s3cret-key")
    with httpx.Client(base_url=keyed.url) as http:
        assert http.get("/").status_code == 200  # the page itself needs no key
        assert http.get("/api/models").status_code == 401
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    try:
        page.goto(keyed.url + "/")
        dialog = page.locator("#key-dialog")
        expect(dialog).to_be_visible()
        page.fill("#key-input", "wrong")
        page.press("#key-input", "Enter")
        expect(page.locator("#server-status")).to_contain_text("API key needed")
        page.click("#key-button")
        expect(dialog).to_be_visible()
        page.fill("#key-input", "s3cret-key")
        page.click("#key-save")
        expect(page.locator("#server-status")).to_contain_text("ready")
        page.fill("#gen-prompt", "with a key")
        page.click("#gen-run")
        expect(page.locator("#live-status")).to_contain_text("Done", timeout=30_000)
        expect(page.locator("#gen-images img").first).to_have_attribute("src", re.compile(r"^blob:"))
        page.reload()  # kept in localStorage: no prompt the second time
        expect(page.locator("#server-status")).to_contain_text("ready")
        expect(dialog).to_be_hidden()
        page.click("button[data-view=gallery]")
        expect(page.locator(".thumb", has_text="with a key")).to_have_count(1)

        # history survives a server restart (same home and origin, so the key stays saved): stop, start, reload
        keyed.stop()
        again = make_server("keyed-again", api_key="s3cret-key", home=keyed.home, port=keyed.port)
        page.goto(again.url + "/#gallery")
        expect(page.locator(".thumb", has_text="with a key")).to_have_count(1)
        expect(page.locator(".thumb img").first).to_have_attribute("src", re.compile(r"^blob:"))
        expect(dialog).to_be_hidden()
    finally:
        context.close()


def test_lora_stack_is_sent_and_a_missing_lora_fails_inline(page, server):
    open_view(page, server)
    page.fill("#gen-prompt", "lora stack test")
    page.click("#lora-add")
    page.click("#lora-add")
    expect(page.locator(".lora-row")).to_have_count(2)
    page.locator(".lora-row").nth(1).get_by_role("button", name="Remove LoRA").click()
    expect(page.locator(".lora-row")).to_have_count(1)
    page.locator(".lora-name").fill("no-such-lora")
    page.locator(".lora-weight").fill("0.5")
    expect(page.locator(".lora-row output")).to_have_text("0.50")
    with page.expect_request("**/api/jobs") as req:
        page.click("#gen-run")
    assert req.value.post_data_json["loras"] == [{"name": "no-such-lora", "weight": 0.5}]
    # rejected at submit (404) or failed as a job: either way the server's message shows inline
    expect(page.locator("#gen-error")).to_contain_text("no-such-lora", timeout=30_000)


def test_lightning_lora_and_typed_seed_reach_the_image(page, make_server, home_root):
    """The path matrix's studio row: a Lightning LoRA picked in the form runs at its recipe (8 steps, CFG 1,
    shift 3) because the form sends no pre-filled values, and a typed seed is the seed (no lock needed)."""
    from qwenstudio import Engine
    from qwenstudio.testing.loras import write_lora

    name = "Qwen-Image-Lightning-8steps-V1.1"
    home = home_root / "lightning"
    dit = Engine.load("tiny", device="cpu").components.transformer
    write_lora(home / "models" / "loras" / f"{name}.safetensors", dit, "diffusers", seed=1, rank=2)
    server = make_server("lightning", home=home)
    open_view(page, server)
    page.fill("#gen-prompt", "studio lightning test")
    page.click("#lora-add")
    page.locator(".lora-name").fill(name)
    page.fill("#gen-seed", "777")
    with page.expect_request("**/api/jobs") as req:
        page.click("#gen-run")
    body = req.value.post_data_json
    assert body["seed"] == 777 and not {"steps", "cfg", "shift", "sampler", "scheduler"} & set(body)
    expect(page.locator("#live-status")).to_contain_text("Done", timeout=30_000)
    with server.http() as http:
        meta = http.get("/api/jobs", params={"limit": 1}).json()["jobs"][0]["outputs"][0]["metadata"]
    r = meta["request"]
    assert (r["steps"], r["cfg"], r["shift"], r["seed"]) == (8, 1.0, 3.0, 777)
    assert meta["settings_from"]["cfg"] == f"lora {name}" and meta["settings_from"]["seed"] == "user"
    expect(page.locator("#gen-seed")).to_have_value("777")  # kept for the next run


def test_load_settings_from_another_tools_png(page, server, tmp_path):
    """"Load settings from an image": an A1111/Forge PNG fills the form with what maps and lists what does not."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", "a lighthouse <lora:detail:0.5>\nNegative prompt: fog\nSteps: 3, Sampler: DPM++ 2M, "
                  "Schedule type: Karras, CFG scale: 2.5, Seed: 4321, Size: 80x64, Hires upscale: 2")
    src = tmp_path / "forge.png"
    Image.new("RGB", (80, 64), (10, 20, 30)).save(src, pnginfo=info)
    open_view(page, server)
    page.set_input_files("#settings-from-image", str(src))
    expect(page.locator("#preset-msg")).to_contain_text("Loaded the a1111 settings of forge.png")
    expect(page.locator("#preset-msg")).to_contain_text("Not mapped: Hires upscale: 2")
    for name, value in [("prompt", "a lighthouse"), ("negative", "fog"), ("steps", "3"), ("cfg", "2.5"),
                        ("seed", "4321"), ("sampler", "dpmpp_2m"), ("scheduler", "karras"), ("width", "80")]:
        expect(page.locator(f"#gen-{name}")).to_have_value(value)
    expect(page.locator(".lora-name")).to_have_value("detail")
