"""The interactive demo (focus_ref/widgets.py), driven without a browser: every task runs and
shows a result; bad input shows one red line and keeps the last result."""

import io

import numpy as np
import pytest
from PIL import Image

from focus_ref.widgets import Demo, parse_region


@pytest.fixture(scope="module")
def demo(model):
    return Demo(model)  # the random-weight tiny model of conftest.py: fast, same code paths


def _object_centre(d: Demo, k: int = 0) -> str:
    ys, xs = np.nonzero(d.world.sample(d.scene.value)["inst"] == k)
    return f"{int(xs.mean())},{int(ys.mean())}"


def test_parse_region_uses_the_cli_syntax():
    assert parse_region("none", "") == {}
    assert parse_region("click", "3,4") == {"click": (3, 4)}
    assert parse_region("box", "1,2,30,40") == {"box": (1, 2, 30, 40)}
    assert parse_region("scribble", "1,2;5,6") == {"scribble": [(1, 2), (5, 6)]}
    for kind, text, says in [("click", "", "empty"), ("click", "a,b", "integers"),
                             ("box", "1,2,3", "needs 4"), ("lasso", "1,2", "unknown")]:
        with pytest.raises(ValueError, match=says):
            parse_region(kind, text)


@pytest.mark.parametrize("task", ["segment", "understand", "edit", "generate"])
def test_every_task_runs_and_shows_a_result(demo, task):
    demo.region_kind.value = "none"
    demo.task.value = task  # fills the text box with this scene's own example
    assert demo.text.value.strip()
    demo.output_view.value = b""
    result = demo.run()
    assert result is not None, demo.status.value
    assert "color:#c00" not in demo.status.value
    shown = Image.open(io.BytesIO(demo.output_view.value))
    assert shown.size == (64 * 4, 64 * 4)  # the 64 px result, magnified
    if task == "segment":
        assert all(m.shape == (64, 64) and m.dtype == bool for m in result["masks"])
    elif task == "understand":
        assert isinstance(result["answer"], str)
    else:
        assert result["image"].shape == (64, 64, 3)


def test_segment_by_click_draws_the_prompt(demo):
    demo.task.value, demo.region_kind.value = "segment", "click"
    demo.region.value = _object_centre(demo)
    before = demo.input_view.value
    assert demo.run() is not None, demo.status.value
    assert demo.input_view.value != before  # the click is drawn on the input


@pytest.mark.parametrize("task,kind,region,text,says", [
    ("segment", "click", "100,5", "x", "outside"),
    ("segment", "box", "30,30,10,10", "x", "swapped"),
    ("segment", "none", "", "   ", "empty expression"),
    ("generate", "click", "5,5", "a red circle", "takes no region"),
    ("edit", "none", "", "", "instruction"),
])
def test_bad_input_shows_one_red_line_and_keeps_the_last_result(demo, task, kind, region,
                                                                  text, says):
    demo.task.value, demo.region_kind.value = "segment", "none"
    demo._suggest()  # a good expression first
    assert demo.run() is not None
    last = demo.output_view.value
    demo.task.value, demo.region_kind.value, demo.region.value = task, kind, region
    demo.text.value = text
    assert demo.run() is None
    assert "color:#c00" in demo.status.value and says in demo.status.value
    assert demo.output_view.value == last


def test_upload_replaces_the_scene_and_a_bad_upload_is_refused(demo):
    buf = io.BytesIO()
    Image.new("RGB", (100, 80), (200, 30, 30)).save(buf, format="PNG")
    demo._new_upload({"new": [{"name": "red.png", "content": buf.getvalue()}]})
    assert demo.image().shape == (64, 64, 3) and (demo.image()[0, 0] == (200, 30, 30)).all()
    demo._new_upload({"new": [{"name": "notes.txt", "content": b"not an image"}]})
    assert "cannot read notes.txt" in demo.status.value
    assert demo.image().shape == (64, 64, 3)  # the last good upload is kept
    demo.scene.value = 3  # a scene again
    assert demo.uploaded is None and (demo.image() == demo.world.sample(3)["image"]).all()


def test_default_is_the_shipped_checkpoint():
    from focus_ref.__main__ import SHIPPED

    d = Demo()
    assert d.model.config.to_dict() == type(d.model.config).from_json(
        SHIPPED / "config.json").to_dict()
