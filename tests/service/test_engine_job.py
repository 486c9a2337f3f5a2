"""The self-contained engine job (engine/job.py): inputs by content id through an ImageStore, verified on read; one
job type across the fake and the real client; one edit-or-generate dispatch; one result type."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json

import numpy as np
import pytest
from PIL import Image

from qwenstudio.testing.asgi import asgi_client


def _png(w=64, h=48, color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, format="PNG")
    return buf.getvalue()


def _mask(w=64, h=48) -> bytes:
    m = Image.new("L", (w, h), 0)
    m.paste(255, (16, 8, 48, 40))
    buf = io.BytesIO()
    m.save(buf, format="PNG")
    return buf.getvalue()


def _ref(data: bytes):
    from qwenstudio.engine.images import load_image

    return load_image(data).ref


def _pixels(img) -> np.ndarray:
    return np.asarray(img.convert("RGB"))


def test_content_ids_round_trip_and_tampering_is_a_typed_error(tmp_path):
    from qwenstudio.engine.editing import EditRequest
    from qwenstudio.engine.job import EngineJob
    from qwenstudio.errors import InputImageUnavailable
    from qwenstudio.service.uploads import UploadStore
    from qwenstudio.testing.fake_client import MemoryImageStore

    image, mask = _png(), _mask()
    for store in (MemoryImageStore(), UploadStore(tmp_path / "uploads")):
        iid, mid = store.put(image), store.put(mask)
        assert iid == hashlib.sha256(image).hexdigest() and mid == hashlib.sha256(mask).hexdigest()
        assert store.get(iid) == image and store.get(mid) == mask
        job = EngineJob("j", "tiny", EditRequest(prompt="x", images=(_ref(image),), mask=_ref(mask), steps=2))
        assert job.kind == "edit" and job.inputs == (iid, mid)
        again = EngineJob.from_dict(json.loads(json.dumps(job.to_dict())))  # plain JSON: what the store keeps
        assert again == job and again.inputs == (iid, mid)
        assert job.fetch(store) == {iid: image, mid: mask}

        other = _png(color=(0, 0, 255))
        if isinstance(store, UploadStore):
            store.path(iid).write_bytes(other)  # the file changed on disk under the same name
            store.path(mid).unlink()
        else:
            store.replace(iid, other)
            store.remove(mid)
        with pytest.raises(InputImageUnavailable) as changed:
            store.get(iid)
        assert changed.value.code == "input_changed" and changed.value.status == 409
        with pytest.raises(InputImageUnavailable):
            job.fetch(store)
        with pytest.raises(InputImageUnavailable) as gone:
            store.get(mid)
        assert gone.value.code == "input_missing"
    assert EngineJob("g", "tiny", EditRequest(prompt="x")).inputs == ()


def test_an_upload_changed_or_deleted_after_submit_fails_its_job_with_a_typed_error(tmp_path):
    """Through the API: two edit jobs wait behind a running one; one's upload is overwritten with other bytes, the
    other's deleted. Neither runs on a wrong (or no) image: each fails with the typed code, and the fake client never
    started them."""
    from qwenstudio.config import Settings
    from qwenstudio.service.app import create_app
    from qwenstudio.testing.fake_client import FakeEngineClient

    client = FakeEngineClient(("fake",), step_s=0.05)
    app = create_app(Settings(home=tmp_path / "home"), client)

    async def scenario():
        async with asgi_client(app) as http:
            up = [(await http.post("/api/uploads", files={"file": (f"{i}.png", _png(color=(i, 9, 9)), "image/png")}))
                  .json()["id"] for i in (1, 2)]
            blocker = (await http.post("/api/jobs", json={"prompt": "wait", "steps": 20})).json()["id"]
            jobs = [(await http.post("/api/jobs", json={"prompt": "edit", "images": [u], "steps": 2})).json()
                    for u in up]
            assert [j["status"] for j in jobs] == ["queued", "queued"]
            uploads = app.state.uploads
            uploads.path(up[0]).write_bytes(_png(color=(0, 255, 0)))  # same name, other pixels
            uploads.path(up[1]).unlink()
            for job_id in (blocker, *(j["id"] for j in jobs)):
                events = (await http.get(f"/api/jobs/{job_id}/events")).text
                assert "event: done" in events or "event: failed" in events
            return [(await http.get(f"/api/jobs/{i}")).json() for i in (blocker, *(j["id"] for j in jobs))]

    blocker, changed, deleted = asyncio.run(scenario())
    assert blocker["status"] == "done"
    assert changed["status"] == "failed" and changed["error"]["code"] == "input_changed", changed["error"]
    assert deleted["status"] == "failed" and deleted["error"]["code"] == "input_missing", deleted["error"]
    assert "/" not in changed["error"]["message"]  # no path leaks into the message
    assert [job_id for job_id, _ in client.submitted] == [blocker["id"]]


def test_one_engine_job_crosses_the_fake_and_the_real_client(tiny_engine):
    """The same EngineJob (an img2img edit naming its input by content id) runs on the FakeEngineClient and on the
    real in-process client; both read the input through their ImageStore and return an EngineResult; the job survives
    a JSON round trip (what a Ray replica or another worker receives) with identical pixels, and so does the result's
    wire form. A tampered input fails both clients with the same typed error."""
    from qwenstudio.engine.editing import EditRequest
    from qwenstudio.engine.job import EngineJob, EngineResult
    from qwenstudio.errors import InputImageUnavailable
    from qwenstudio.service.engine_client import InProcessEngineClient, StepEvent
    from qwenstudio.testing.fake_client import FakeEngineClient, MemoryImageStore

    store = MemoryImageStore()
    image = _png()
    cid = store.put(image)
    job = EngineJob("job-1", "tiny", EditRequest(prompt="a red fox", images=(_ref(image),), steps=2, seed=3,
                                                 strength=0.7))
    fake = FakeEngineClient(("tiny",), images=store)
    real = InProcessEngineClient.from_engine(tiny_engine)
    real.images = store
    try:
        fake_events, real_events = [], []
        from_fake = fake.submit(job, fake_events.append)
        from_real = real.submit(job, real_events.append)
        for result in (from_fake, from_real):
            assert isinstance(result, EngineResult) and result.model == "tiny" and len(result.images) == 1
        assert from_fake.images[0].metadata["edit"]["content_ids"] == [cid]
        assert from_real.images[0].metadata["request"]["images"][0]["sha256"] == cid
        assert [e.step for e in real_events if isinstance(e, StepEvent)] == [1, 2]
        assert [e.step for e in fake_events if isinstance(e, StepEvent)] == [1, 2]

        wired = EngineJob.from_dict(json.loads(json.dumps(job.to_dict())))
        again = real.submit(wired, lambda ev: True)
        assert np.array_equal(_pixels(again.images[0].image), _pixels(from_real.images[0].image))
        back = EngineResult.from_wire(from_real.to_wire())
        assert np.array_equal(_pixels(back.images[0].image), _pixels(from_real.images[0].image))
        assert back.images[0].metadata == from_real.images[0].metadata

        store.replace(cid, _png(color=(1, 2, 3)))
        for client in (fake, real):
            with pytest.raises(InputImageUnavailable) as e:
                client.submit(job, lambda ev: True)
            assert e.value.code == "input_changed"
    finally:
        real.close()


def test_one_dispatch_runs_generate_edit_and_inpaint_as_the_engine_does(tiny_engine):
    """``run_job`` on a tiny edit model: a text-to-image job, an edit job and an edit-inpaint job give exactly the
    pixels of the engine's own generate/edit calls on the same request and bytes; the inpaint keeps every pixel
    outside the mask."""
    from qwenstudio import Engine
    from qwenstudio.engine.editing import EditRequest
    from qwenstudio.engine.job import EngineJob, run_job
    from qwenstudio.engine.requests import GenerateRequest
    from qwenstudio.engine.specs import get_spec
    from qwenstudio.testing.fake_client import MemoryImageStore

    engine = Engine(tiny_engine.components, get_spec("tiny-edit"))
    store = MemoryImageStore()
    image, mask = _png(), _mask()
    store.put(image)
    store.put(mask)
    common = {"prompt": "a blue square", "steps": 2, "seed": 5}
    cases = {
        "generate": (GenerateRequest(**common, width=64, height=64), lambda r: engine.generate(r)),
        "edit": (EditRequest(**common, images=(_ref(image),)), lambda r: engine.edit(r, images=[image])),
        "inpaint": (EditRequest(**common, images=(_ref(image),), mask=_ref(mask)),
                    lambda r: engine.edit(r, images=[image], mask=mask)),
    }
    for name, (request, direct) in cases.items():
        job = EngineJob(name, "tiny-edit", request)
        assert job.kind == ("generate" if name == "generate" else "edit")
        got = run_job(engine, job, store).images[0]
        want = direct(request).images[0]
        assert np.array_equal(_pixels(got.image), _pixels(want.image)), name
        assert got.metadata["request"] == want.metadata["request"], name
        if name == "inpaint":
            outside = np.asarray(Image.open(io.BytesIO(mask))) == 0
            source = _pixels(Image.open(io.BytesIO(image)))
            assert np.array_equal(_pixels(got.image)[outside], source[outside])


def test_an_edit_queued_by_an_api_only_process_runs_on_a_worker_from_its_content_ids(tmp_path):
    """The stored job is self-contained: an API-only app queues an edit; a worker app on the same store and home
    rebuilds the EngineJob from the row (request + model + content ids, no paths) and reads the upload through its
    own ImageStore."""
    from qwenstudio.config import Settings
    from qwenstudio.service.app import create_app
    from qwenstudio.service.config import ServiceConfig
    from qwenstudio.testing.fake_client import FakeEngineClient

    home = tmp_path / "home"
    api = create_app(Settings(home=home), FakeEngineClient(("fake",)), ServiceConfig(run_worker=False))
    worker_client = FakeEngineClient(("fake",))
    worker = create_app(Settings(home=home), worker_client)

    async def scenario():
        async with asgi_client(api) as http:
            up = (await http.post("/api/uploads", files={"file": ("a.png", _png(), "image/png")})).json()["id"]
            job = (await http.post("/api/jobs", json={"prompt": "edit", "images": [up], "steps": 2})).json()
            row = api.state.store.get_job(job["id"])
            assert row["options"]["kind"] == "edit" and row["request"]["images"][0]["sha256"] == up
            assert "/" not in json.dumps(row["options"]) and str(home) not in json.dumps(row["request"])
            async with asgi_client(worker):
                events = (await http.get(f"/api/jobs/{job['id']}/events")).text  # followed through the store
            return up, job["id"], events, (await http.get(f"/api/jobs/{job['id']}")).json()

    up, job_id, events, done = asyncio.run(scenario())
    assert "event: done" in events and done["status"] == "done", done
    assert done["outputs"][0]["metadata"]["edit"]["content_ids"] == [up]
    assert [j for j, _ in worker_client.submitted] == [job_id]
