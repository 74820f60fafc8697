"""The shipped tiny checkpoint (data_samples/checkpoint): it loads with the current code, meets
the held-out numbers its metrics.json records (within sampling margin, on fewer scenes), and
is the default of every CLI command, so a new user's first command shows a real result."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from focus_ref.__main__ import main
from focus_ref.editing import NO_OBJECT, edit_ceiling, edit_quality, refusal_quality
from focus_ref.evaluate import evaluate_model
from focus_ref.model import FocusModel
from focus_ref.oracle import PALETTE_NAMES, palette_labels
from focus_ref.shapesworld import ShapesWorld

SHIPPED = Path(__file__).resolve().parent.parent / "data_samples" / "checkpoint"
SCENE = SHIPPED.parent / "scene.png"  # the README's example image (held-out val scene 9)
# Regression floors on 48 held-out scenes, set below what this checkpoint measured there
# (fp16 on disk; refseg cIoU 0.78, GRES N-acc 0.96 / T-acc 0.98 at the presence threshold
# the main job chose on dev scenes, region mIoU 0.935 (clicks 0.91 with two refinement passes
# and clean-up), VQA 0.72 with its answers grounded in masks ("what is this?" 0.88), tokenizer
# 28.4 dB / usage 0.98, edit success 0.27 with background PSNR 82 dB, generation 0.21; the
# checkpoint before, stage 3 at 800 steps on another machine: 0.75, 1.00 / 0.96, 0.925, VQA
# 0.67 ("what" 0.93), edits 0.33, generation 0.24). They catch a checkpoint that no longer
# loads or works with the current code; they are NOT the issues' targets, several of which
# this checkpoint misses (README: "What the shipped checkpoint measures"). Tokenizer and
# background floors are the targets themselves.
FLOORS = {"refseg.ciou": 0.5, "gres.n_acc": 0.85, "gres.t_acc": 0.85, "region.miou": 0.85,
          "region.click.miou": 0.8, "vqa.acc": 0.5, "vqa.what.acc": 0.75,
          "tokenizer.psnr": 28.0, "tokenizer.code_usage": 0.5,
          "edit.success": 0.1, "edit.bg_psnr": 28.0, "gen.attr_acc": 0.1}

VQA_KINDS = ("count", "color", "shape", "exist", "where")  # eval's per-kind answer rates


@pytest.fixture(scope="module")
def model():
    return FocusModel.from_pretrained(SHIPPED)


@pytest.fixture(scope="module")
def val(model):
    w = ShapesWorld(model.config.data, "val")
    return [w.sample(i) for i in range(48)]


def test_the_checkpoint_is_small_half_precision_and_records_its_run():
    size = sum(f.stat().st_size for f in SHIPPED.iterdir()) / 2 ** 20
    assert size <= 25, f"{size:.1f} MB"
    rec = json.loads((SHIPPED / "metrics.json").read_text())
    for key in FLOORS:  # every DESIGN §6 key was measured by the main job
        assert key in rec, key
    assert rec["vqa.blind_acc"] > 0 and all(f"vqa.{k}.acc" in rec for k in VQA_KINDS)
    assert "time.calibrate_min" in rec  # it chose the presence threshold (for this one: 0.0)
    assert "stage4" in json.loads((SHIPPED / "history.json").read_text())


def test_held_out_quality_meets_the_floors(model):
    got = evaluate_model(model, "val", n=48, progress=False)
    low = {k: (round(got[k], 3), v) for k, v in FLOORS.items() if got[k] < v}
    assert not low, f"below the floor (measured, floor): {low}"
    kinds = [got[f"vqa.{k}.acc"] for k in VQA_KINDS]  # the overall answer rate is their mix
    assert min(kinds) <= got["vqa.acc"] <= max(kinds) and 0 < got["vqa.blind_acc"] < 1


def test_edits_keep_the_background_and_some_absent_objects_are_refused(model, val):
    q = edit_quality(model, val[:32])
    assert q["bg_psnr"] >= 28, q  # outside the predicted region the source is kept
    # absent objects: this checkpoint refuses 18 of these 18, as did the one before (issue 6 asks
    # for all; stage 4 trains an empty <seg> for them, GRES-style); a floor
    assert refusal_quality(model, val[:24])["refused"] >= 0.5


def test_the_tokenizer_leaves_room_for_the_edit_target(model, val):
    """The exact target images through the shipped tokenizer pass the oracle at least as
    often as the model's edits, and almost always for removals and background changes
    (measured on 96 val edits, notebook 07: 0.83; removals and background changes 1.00,
    recolours 0.62, edges blurred by a pixel; the checkpoints before: 0.81 and 0.83 of 100)."""
    c = edit_ceiling(model, val)
    assert c["success"] >= edit_quality(model, val)["success"], c
    assert min(c["success.remove"], c["success.background"]) >= 0.85, c


def test_the_presence_threshold_decides_no_target(model, val, monkeypatch, tmp_path, capsys):
    """The main job chose the "no target" threshold on dev scenes; segment and edit obey it,
    and the CLI says when it wrote the image unchanged."""
    thr = model.config.segmentation.presence_threshold
    s = val[1]
    try:
        model.config.segmentation.presence_threshold = -math.inf  # every <seg> is "there"
        # the first expression with a target that this checkpoint gives a mask for
        t, text = next((t, r["text"]) for t in val[:8] for r in t["refs"] if r["targets"]
                       and model.segment(t["image"], expression=r["text"]))
        model.config.segmentation.presence_threshold = math.inf  # nothing is
        assert model.segment(t["image"], expression=text) == []
        with pytest.warns(UserWarning, match="no such object"):
            out = model.edit(s["image"], s["edit"]["instruction"])
        assert out.info["focus_reason"] == NO_OBJECT and (np.asarray(out) == s["image"]).all()
        monkeypatch.setattr("focus_ref.__main__.load_model", lambda args: model)
        with pytest.warns(UserWarning, match="no such object"):
            assert main(["edit", "--image", str(SCENE), "--instruction", "remove the circle",
                         "--out", str(tmp_path / "same.png")]) == 0
        assert f"unchanged: the model answered {NO_OBJECT!r}" in capsys.readouterr().out
    finally:
        model.config.segmentation.presence_threshold = thr


def test_the_readme_commands_run_on_the_shipped_scene(tmp_path, capsys):
    """README "Set up and run": every command with its default (shipped) checkpoint."""
    img = str(SCENE)
    source = np.asarray(Image.open(SCENE))
    assert main(["edit", "--image", img, "--instruction", "remove the blue object",
                 "--out", str(tmp_path / "edit.png")]) == 0
    edited = np.asarray(Image.open(tmp_path / "edit.png"))
    blue = [(palette_labels(im) == PALETTE_NAMES.index("blue")).sum() for im in (source, edited)]
    assert edited.shape == (64, 64, 3) and blue[0] >= 50  # the scene's small blue square
    assert blue[1] <= 5  # the README says the removal works: it does
    assert (edited != source).any(-1).sum() <= 2 * blue[0]  # and only there
    assert main(["segment", "--image", img, "--expression", "the blue object",
                 "--out", str(tmp_path / "mask.png")]) == 0
    assert (np.asarray(Image.open(tmp_path / "mask.png")) > 0).any()
    assert main(["segment", "--image", img, "--click", "44,24",
                 "--out", str(tmp_path / "click.png")]) == 0
    assert (np.asarray(Image.open(tmp_path / "click.png")) > 0)[24, 44]  # the clicked pixel
    assert main(["understand", "--image", img, "--question",
                 "how many blue objects are there?"]) == 0
    assert main(["generate", "--prompt", "a small red circle and a large blue square",
                 "--out", str(tmp_path / "gen.png")]) == 0
    assert np.asarray(Image.open(tmp_path / "gen.png")).shape == (64, 64, 3)
    assert main(["eval", "--n", "2", "--json", str(tmp_path / "m.json")]) == 0
    assert "edit.success" in json.loads((tmp_path / "m.json").read_text())
