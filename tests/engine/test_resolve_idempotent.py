"""A resolved request resolves to itself: the server resolves before queueing and the engine again at run time."""

from __future__ import annotations

from qwenstudio.engine.editing import EditRequest
from qwenstudio.engine.images import ImageRef
from qwenstudio.engine.requests import GenerateRequest
from qwenstudio.engine.specs import get_spec

IMG = ImageRef("ab" * 32, 70, 50, "png")
MASK = ImageRef("cd" * 32, 70, 50, "png")


def test_generate_request():
    spec = get_spec("qwen-image")
    r = GenerateRequest(prompt="a", aspect="16:9", loras=[("x", 0.5)]).resolve(spec)
    assert r.resolve(spec) == r


def test_edit_requests_in_every_mode():
    for spec_name, fields in (
        ("tiny", {"images": [IMG], "mask": MASK}),  # inpaint, keep_size on
        ("tiny", {"images": [IMG]}),  # img2img
        ("tiny-edit", {"images": [IMG]}),  # edit
        ("tiny-edit-plus", {"images": [IMG, IMG]}),  # multi-image edit
    ):
        spec = get_spec(spec_name)
        r = EditRequest(prompt="a", **fields).resolve(spec)
        assert r.resolve(spec) == r, spec_name
        assert EditRequest.from_dict(r.to_dict()).resolve(spec) == r
