"""The service on Ray Serve replicas (``RayServeEngineClient``): a local Ray started here, two CPU replicas, each an
engine pool serving two tiny models with different weights (tiny-a, the --model, and tiny-b), with speed options.

Routing by model (Serve's multiplexing), progress/cancel/typed errors/edits through a replica, the speed options on
every replica, and a replica killed mid-job: the job is retried once elsewhere, completes exactly once, nothing of
eight concurrent jobs is lost or duplicated; killed twice, it fails ``replica_failed``. Skipped only when the
optional extra is missing or Ray cannot start here."""

from __future__ import annotations

import io
import shutil
import threading
import time

import numpy as np
import pytest
from PIL import Image
from svc_helpers import JOB, SLOW, read_sse, run_app, wait_status

ray = pytest.importorskip("ray")
pytest.importorskip("ray.serve")

REQ = {"prompt": "a red fox", "steps": 2, "width": 64, "height": 64}
LONG = {"prompt": "a long walk", "steps": 24, "width": 128, "height": 128}  # ~0.5 s: long enough to be killed in
SPEED = {"compile": "off", "attention": "sdpa", "cache": "0.05"}


@pytest.fixture(scope="module")
def ray_models(tiny_folder, tmp_path_factory):
    from qwenstudio import Engine
    from qwenstudio.testing.loras import write_lora
    from qwenstudio.testing.tiny import TinySpec, write_diffusers_folder

    root = tmp_path_factory.mktemp("ray-models")
    shutil.copytree(tiny_folder, root / "tiny-a")
    write_diffusers_folder(root / "tiny-b", TinySpec(seed=1))
    write_lora(root / "loras" / "style.safetensors", Engine.load(root / "tiny-a", device="cpu").components.transformer, "comfy", seed=1)
    return root


@pytest.fixture(scope="module")
def direct(ray_models):
    """(model, request fields) -> pixels of a direct Engine run, with the replicas' speed options."""
    from qwenstudio import Engine
    from qwenstudio.engine.acceleration import speed_options

    engines = {m: Engine.load(ray_models / m, device="cpu", **speed_options(**SPEED)) for m in ("tiny-a", "tiny-b")}

    def run(model: str, **fields) -> np.ndarray:
        return np.asarray(engines[model].generate(**fields).images[0].image)

    return run


@pytest.fixture(scope="module")
def ray_client(ray_models, tmp_path_factory):
    from qwenstudio.config import Settings
    from qwenstudio.engine.acceleration import speed_options
    from qwenstudio.service.model_pool import LoadOptions, ModelCatalog
    from qwenstudio.service.ray_client import RayServeEngineClient

    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_CACHE", str(tmp_path_factory.mktemp("hf-empty")))  # replicas inherit it: no machine models
    started = time.monotonic()
    try:
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=80 * 1024 * 1024, log_to_driver=False)
    except Exception as e:  # noqa: BLE001
        mp.undo()
        pytest.skip(f"Ray cannot start here: {type(e).__name__}: {e}")
    init_s = time.monotonic() - started
    settings = Settings(home=tmp_path_factory.mktemp("ray-engine-home"), models_dirs=(ray_models,), device="cpu")
    catalog = ModelCatalog(settings, "tiny-a", LoadOptions(device="cpu", speed=speed_options(**SPEED)))
    client = RayServeEngineClient(catalog, num_replicas=2)
    try:
        assert client.wait_ready(120), client.load_error
        print(f"\nray.init {init_s:.1f} s; Serve deployment (2 replicas) + model load {client.startup_s:.1f} s")
        yield client
    finally:
        client.close()
        ray.shutdown()
        mp.undo()


@pytest.fixture
def served(ray_client, tmp_path):
    """Factory: ``with served(workers=2) as http:`` runs an app on the Ray client."""
    from contextlib import contextmanager

    import httpx

    from qwenstudio.config import Settings
    from qwenstudio.service.app import create_app
    from qwenstudio.service.config import ServiceConfig

    @contextmanager
    def start(**config):
        app = create_app(Settings(home=tmp_path / "home"), ray_client, ServiceConfig(**config))
        with run_app(app) as url, httpx.Client(base_url=url, timeout=60) as http:
            yield http

    return start


def alive(ray_client) -> dict[str, dict]:
    return {k: v for k, v in ray_client.replica_info().items() if v["alive"]}


def pixels(http, output: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(http.get(output["url"]).content)).convert("RGB"))


def test_job_runs_on_a_replica_with_progress(served, ray_client):
    assert ray_client.ready and [m.id for m in ray_client.models()] == ["tiny-a", "tiny-b"]
    with served() as http:
        assert http.get("/readyz").status_code == 200
        job = http.post("/api/jobs", json={**JOB, "steps": 3, "preview_every": 1}).json()
        events = read_sse(http, job["id"])
        names = [n for n, _ in events]
        assert names[-1] == "done", events
        progress = [d for n, d in events if n == "progress"]
        assert [p["step"] for p in progress] == [1, 2, 3] and all(p["total"] == 3 for p in progress)
        assert "preview" in names
        out = events[-1][1]["outputs"][0]
        assert out["metadata"]["seed"] == JOB["seed"] and out["metadata"]["model"]["name"] == "tiny-a"
        png = http.get(out["url"])
        assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n"


def test_jobs_go_to_the_replica_holding_their_model(served, ray_client, direct):
    """B, A, B, A: the first B job loads tiny-b on the replica without a model (its SSE ``loading`` events: start,
    the loader's rising fractions, done); every later job runs where its model already is (no model loaded twice);
    outputs name their model and equal a direct run of it, pixel for pixel."""
    before = alive(ray_client)
    assert sorted(len(s["models"]) for s in before.values()) == [0, 1], before  # tiny-a preloaded on one
    ran = []
    with served() as http:
        for i, model in enumerate(("tiny-b", "tiny-a", "tiny-b", "tiny-a")):
            if i == 0:
                job_id = http.post("/api/jobs", json={**REQ, "model": model, "seed": i}).json()["id"]
                events = read_sse(http, job_id)
                loading = [d for n, d in events if n == "loading"]
                assert loading[0] == {"model": "tiny-b", "phase": "start"} and loading[-1]["phase"] == "done", events
                fractions = [d["fraction"] for d in loading[1:-1]]
                assert [d["phase"] for d in loading[1:-1]] == ["progress"] * len(fractions)
                assert len(fractions) >= 2 and fractions == sorted(fractions) and fractions[-1] == 1.0, loading
                job = http.get(f"/api/jobs/{job_id}").json()
            else:
                job = http.post("/api/jobs?wait=true", json={**REQ, "model": model, "seed": i}).json()
            assert job["status"] == "done", job.get("error")
            out = job["outputs"][0]
            assert out["metadata"]["model"]["name"] == model
            assert out["metadata"]["model"]["acceleration"]["cache"]["threshold"] == 0.05  # the replica's --cache
            assert np.array_equal(pixels(http, out), direct(model, **REQ, seed=i))
            ran.append((job["id"], model))
    states = alive(ray_client)
    holder = {m: name for name, s in states.items() for m in s["models"]}
    assert set(holder) == {"tiny-a", "tiny-b"} and holder["tiny-a"] != holder["tiny-b"], states
    for job_id, model in ran:
        assert job_id in states[holder[model]]["completed"], (job_id, model, states)
    loads = [m for s in states.values() for m, _ in s["loads"]]
    assert sorted(loads) == ["tiny-a", "tiny-b"], loads  # each model loaded once, on one replica


def test_a_lora_stack_prefers_the_replica_that_has_it(ray_client):
    """Both replicas hold tiny-a; once one has run the ``style`` LoRA, jobs with that stack go to it and jobs
    without LoRAs to the other (ray_routing.py's second preference), each replica keeping its stack."""
    from qwenstudio.engine.job import EngineJob
    from qwenstudio.engine.requests import GenerateRequest, LoraRef
    from qwenstudio.service.ray_routing import ROUTING_STATS_PERIOD_S

    def run(job_id: str, loras=()) -> None:
        ray_client.submit(EngineJob(job_id, "tiny-a", GenerateRequest(**REQ, seed=1, loras=list(loras))),
                          lambda ev: True)

    for attempt in range(4):  # two concurrent jobs: the busy holder makes the second load tiny-a on the other
        if all("tiny-a" in s["models"] for s in alive(ray_client).values()):
            break
        pair = [threading.Thread(target=ray_client.submit, args=(
            EngineJob(f"spread{attempt}{i}", "tiny-a", GenerateRequest(**LONG, seed=i)), lambda ev: True))
            for i in range(2)]
        for t in pair:
            t.start()
        for t in pair:
            t.join(60)
    assert all("tiny-a" in s["models"] for s in alive(ray_client).values()), alive(ray_client)
    style = [LoraRef("style", 1.0)]
    run("lora0", style)
    time.sleep(3 * ROUTING_STATS_PERIOD_S)  # the router sees the new stack at the next stats round
    for i in range(1, 4):
        run(f"lora{i}", style)
        run(f"plain{i}")
    states = alive(ray_client)
    where = {j: name for name, s in states.items() for j in s["completed"]}
    lora_replica, plain_replica = where["lora0"], where["plain1"]
    assert lora_replica != plain_replica
    assert {where[f"lora{i}"] for i in range(4)} == {lora_replica}
    assert {where[f"plain{i}"] for i in range(1, 4)} == {plain_replica}
    assert states[lora_replica]["resident"]["tiny-a"]["loras"] == ["style"]
    assert states[lora_replica]["resident"]["tiny-a"]["lora_stack"] == "style:1"
    assert states[plain_replica]["resident"]["tiny-a"]["loras"] == []


def test_speed_options_reach_every_replica(ray_client):
    states = alive(ray_client)
    assert len(states) == 2
    for s in states.values():
        assert s["speed"]["compile"] is False and s["speed"]["attention"] == "sdpa" and s["speed"]["quant"] is None
        assert s["speed"]["cache"]["threshold"] == 0.05
        assert s["device"] == "cpu" and s["max_resident"] >= 1
        for model in s["resident"].values():
            assert model["acceleration"]["attention"] == "native"  # diffusers' name of torch sdpa
            assert model["acceleration"]["cache"]["threshold"] == 0.05


def test_cancel_reaches_the_replica_and_it_goes_on(served, ray_client):
    def cancelled() -> int:
        return sum(s["runs"]["cancelled"] for s in ray_client.replica_info().values())

    before = cancelled()
    with served() as http:
        job_id = http.post("/api/jobs", json=SLOW).json()["id"]
        deadline = time.monotonic() + 30
        while http.get(f"/api/jobs/{job_id}").json().get("progress", {}).get("step", 0) < 1:
            assert time.monotonic() < deadline, "the slow job never made progress"
            time.sleep(0.05)
        asked = time.monotonic()
        assert http.post(f"/api/jobs/{job_id}/cancel").json()["status"] == "cancelling"
        wait_status(http, job_id, ("cancelled",), timeout=15)
        assert time.monotonic() - asked < 10
        assert [n for n, _ in read_sse(http, job_id)][-1] == "cancelled"
        ok = http.post("/api/jobs?wait=true", json=JOB).json()  # the replica stopped the run and takes the next
        assert ok["status"] == "done", ok
    assert cancelled() == before + 1  # the engine on the replica stopped the run (not just the client)
    assert ray_client.retried == []


def test_typed_errors_keep_their_class_and_code(served, ray_client):
    from qwenstudio.engine.job import EngineJob
    from qwenstudio.engine.requests import GenerateRequest
    from qwenstudio.errors import InvalidRequest, ModelNotFound

    with served() as http:
        # refused at prepare, which runs on a replica (tokenizer): 422 with the engine's code, nothing queued
        r = http.post("/api/jobs", json={"prompt": "word " * 1100, "steps": 1})
        assert r.status_code == 422 and r.json()["error"]["code"] == "prompt_too_long", r.text
        r = http.post("/api/jobs", json={**REQ, "model": "tiny-c"})
        assert r.status_code == 404 and "tiny-b" in r.json()["error"]["message"], r.text
        assert http.get("/api/jobs").json()["total"] == 0
    # raised inside a replica's run (an unvalidated request straight to submit): same class, same code
    with pytest.raises(InvalidRequest) as e:
        ray_client.submit(EngineJob("bad", "tiny-a", GenerateRequest(prompt="x", steps=0)), lambda ev: True)
    assert e.value.code == "invalid_steps" and e.value.status == 422
    with pytest.raises(ModelNotFound):
        ray_client.submit(EngineJob("other", "nope", GenerateRequest(prompt="x")), lambda ev: True)


def test_a_preset_from_the_store_applies_on_the_replica(served):
    with served() as http:
        assert http.post("/api/presets", json={"name": "fast", "params": {"steps": 3, "cfg": 1.0}}).status_code == 201
        job = http.post("/api/jobs?wait=true", json={"prompt": "a fox", "preset": "fast", "seed": 4}).json()
        assert job["status"] == "done", job.get("error")
        meta = job["outputs"][0]["metadata"]
        assert meta["request"]["steps"] == 3 and meta["request"]["cfg"] == 1.0
        assert meta["settings_from"]["steps"] == "preset fast"
        r = http.post("/api/jobs", json={"prompt": "a fox", "preset": "nope"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "preset_not_found", r.text


def test_inpaint_edit_ships_its_inputs_and_comes_back_pixel_exact(served):
    def png(im) -> bytes:
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return buf.getvalue()

    source = Image.new("RGB", (70, 50), (200, 30, 30))
    mask = Image.new("L", (70, 50), 0)
    mask.paste(255, (20, 10, 50, 40))
    with served() as http:
        img_id = http.post("/api/uploads", files={"file": ("a.png", png(source), "image/png")}).json()["id"]
        mask_id = http.post("/api/uploads", files={"file": ("m.png", png(mask), "image/png")}).json()["id"]
        job = http.post("/api/jobs?wait=true", json={"prompt": "a blue square", "images": [img_id], "mask": mask_id,
                                                     "steps": 2, "seed": 3}).json()
        assert job["status"] == "done", job.get("error")
        result = pixels(http, job["outputs"][0])
    assert result.shape == (50, 70, 3)
    outside = np.asarray(mask) == 0
    assert np.array_equal(result[outside], np.asarray(source)[outside])  # lossless PNG transport, untouched pixels


def test_an_edit_crosses_as_content_ids_and_bytes_verified_on_both_sides(ray_client):
    """What reaches a replica is the job as data (inputs by sha256, no path) and the bytes: changed bytes in the
    client's store fail on the driver, and bytes that do not match their id fail on the replica, both
    ``input_changed``; never a run on another image."""
    import json

    from ray import serve

    from qwenstudio.engine.editing import EditRequest
    from qwenstudio.engine.images import load_image
    from qwenstudio.engine.job import EngineJob, MemoryImageStore
    from qwenstudio.errors import InputImageUnavailable
    from qwenstudio.service.ray_client import DEFAULT_APP_NAME, DEPLOYMENT_NAME

    def png(colour) -> bytes:
        buf = io.BytesIO()
        Image.new("RGB", (64, 64), colour).save(buf, format="PNG")
        return buf.getvalue()

    store = MemoryImageStore()
    cid = store.put(png((200, 30, 30)))
    job = EngineJob("edit-ids", "tiny-a", EditRequest(prompt="a fox", images=(load_image(png((200, 30, 30))).ref,),
                                                       steps=2, seed=1, strength=0.6))
    wired = json.dumps(job.to_dict())
    assert set(json.loads(wired)["request"]["images"][0]) == {"sha256", "width", "height", "format"}
    ray_client.images = store
    try:
        done = ray_client.submit(job, lambda ev: True)
        assert done.images[0].metadata["request"]["images"][0]["sha256"] == cid
        store.replace(cid, png((1, 2, 3)))
        with pytest.raises(InputImageUnavailable) as e:
            ray_client.submit(job, lambda ev: True)
        assert e.value.code == "input_changed"
    finally:
        ray_client.images = None
    handle = serve.get_deployment_handle(DEPLOYMENT_NAME, app_name=DEFAULT_APP_NAME)
    stream = handle.options(stream=True, multiplexed_model_id="tiny-a").generate.remote(
        job.to_dict(), {cid: png((1, 2, 3))})
    outcome = [item for item in stream if item[0] in ("result", "error")]
    assert [k for k, _ in outcome] == ["error"] and outcome[0][1]["code"] == "input_changed", outcome


def kill_replica_running(ray_client, wanted, stop: threading.Event, killed: list, times: int = 1) -> None:
    """Kill (``ray.kill``, no restart) the replica that reports running a job in ``wanted``, ``times`` times."""
    while not stop.is_set() and len(killed) < times:
        for name, state in ray_client.replica_info().items():
            if state["alive"] and state["running"] in wanted and name not in {n for n, _ in killed}:
                ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
                killed.append((name, state["running"]))
                break
        time.sleep(0.02)


def test_a_replica_killed_mid_job_the_job_completes_once_elsewhere(served, ray_client, direct):
    """Eight jobs from two workers over both models; the replica running the third is killed mid-denoise. Every job
    ends done exactly once (the killed one retried on another replica), each output names its model and the killed
    job's pixels equal a direct run."""
    jobs: list[tuple[str, str, int]] = []
    killed: list[tuple[str, str]] = []
    stop = threading.Event()
    with served(workers=2) as http:
        for i in range(8):
            model = ("tiny-a", "tiny-b")[i % 2]
            r = http.post("/api/jobs", json={**LONG, "model": model, "seed": 10 + i})
            assert r.status_code == 202, r.text
            jobs.append((r.json()["id"], model, 10 + i))
        killer = threading.Thread(target=kill_replica_running,
                                  args=(ray_client, {j for j, _, _ in jobs[2:]}, stop, killed), daemon=True)
        killer.start()
        try:
            finished = [wait_status(http, j, ("done", "failed", "cancelled"), timeout=120) for j, _, _ in jobs]
        finally:
            stop.set()
            killer.join(5)
        assert killed, "no replica was killed"
        assert [f["status"] for f in finished] == ["done"] * 8, [(f["status"], f.get("error")) for f in finished]
        for f, (_, model, _) in zip(finished, jobs):
            assert len(f["outputs"]) == 1 and f["outputs"][0]["metadata"]["model"]["name"] == model
        dead_name, victim = killed[0]
        k = [j for j, _, _ in jobs].index(victim)
        # the retried job is the same image (a wrong model or seed differs by far more): within 1/255, since in the
        # full suite the replica (1 thread) and this process may round differently once (seen once in a full run)
        got = pixels(http, finished[k]["outputs"][0]).astype(int)
        assert np.abs(got - direct(jobs[k][1], **LONG, seed=jobs[k][2]).astype(int)).max() <= 1
        assert http.get("/api/jobs").json()["total"] == 8
    assert (victim, dead_name) in ray_client.retried
    states = ray_client.replica_info()
    assert states[dead_name]["alive"] is False and victim not in states[dead_name]["completed"]
    completed = [j for s in states.values() for j in s["completed"] if j in {j for j, _, _ in jobs}]
    assert sorted(completed) == sorted(j for j, _, _ in jobs)  # each ran to completion once, on one replica


def test_a_job_whose_replicas_die_twice_fails_replica_failed(ray_client):
    from qwenstudio.engine.job import EngineJob
    from qwenstudio.engine.requests import GenerateRequest
    from qwenstudio.service.errors import ReplicaFailed

    deadline = time.monotonic() + 60  # Serve replaces the replica the previous test killed
    while len(alive(ray_client)) < 2:
        assert time.monotonic() < deadline, "Serve did not replace the killed replica"
        time.sleep(0.2)
    killed: list = []
    stop = threading.Event()
    killer = threading.Thread(target=kill_replica_running, args=(ray_client, {"twice"}, stop, killed, 2),
                              daemon=True)
    killer.start()
    try:
        with pytest.raises(ReplicaFailed) as e:
            ray_client.submit(EngineJob("twice", "tiny-a", GenerateRequest(**{**LONG, "steps": 200})), lambda ev: True)
    finally:
        stop.set()
        killer.join(5)
    assert e.value.code == "replica_failed" and e.value.status == 503
    assert len(killed) == 2 and e.value.detail["replicas"] == [n for n, _ in killed]
    assert all("twice" not in s["completed"] for s in ray_client.replica_info().values())
