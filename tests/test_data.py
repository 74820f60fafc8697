"""data.py: task formatting, collate, the `datasets` bridge, the shipped sample, RefCOCO."""

import json
import pickle
import shutil
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch

from focus_ref import data
from focus_ref import evaluate as ev
from focus_ref.config import DataConfig
from focus_ref.segmentation import PROMPT_KINDS, rasterize_prompt
from focus_ref.shapesworld import ShapesWorld

FIXTURE = Path(__file__).resolve().parent.parent / "data_samples" / "refcoco_fixture"
FIXTURE_SCENES = [(64, 0), (64, 1), (96, 2)]  # (image size, val index) per image id 1, 2, 3


@pytest.fixture(scope="module")
def world():
    return ShapesWorld(DataConfig(), "val")


def _same_sample(a, b):
    for k in ("image", "inst"):
        np.testing.assert_array_equal(a[k], b[k])
    assert a["scene"] == b["scene"] and a["caption"] == b["caption"]
    assert a["qa"] == b["qa"] and a["refs"] == b["refs"]
    for pa, pb in zip(a["prompts"], b["prompts"], strict=True):
        assert (pa["click"], pa["box"], pa["scribble"]) == (pb["click"], pb["box"], pb["scribble"])
        np.testing.assert_array_equal(pa["mask"], pb["mask"])
    for k, v in b["edit"].items():
        if isinstance(v, np.ndarray):
            np.testing.assert_array_equal(a["edit"][k], v, err_msg=k)
        else:
            assert a["edit"][k] == v, k


def test_image_round_trip():
    img = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    t = data.image_to_tensor(img)
    assert t.shape == (3, 5, 7) and t.min() >= -1 and t.max() <= 1
    np.testing.assert_array_equal(data.tensor_to_image(t), img)


def test_refseg_masks_are_target_unions(world):
    kinds = set()
    for i in range(6):
        s = world.sample(i)
        for ex, r in zip(data.format_refseg(s), s["refs"], strict=True):
            kinds.add(r["type"])
            truth = np.isin(s["inst"], r["targets"])
            np.testing.assert_array_equal(ex["mask"].numpy(), truth)
            assert ex["has_target"] == bool(r["targets"]) == bool(truth.any())
            assert ex["image"].shape == (3, 64, 64) and ex["text"] == r["text"]
    assert {"multi", "none"} <= kinds  # several targets and no target both occur


def test_region_caption_vqa_edit_clip_formats(world):
    s = world.sample(3)
    region = data.format_region(s)
    assert len(region) == 4 * len(s["scene"].objects)
    for ex in region:
        mask = ex["mask"].numpy()
        np.testing.assert_array_equal(mask, s["inst"] == ex["object"])
        pts = ex["points"].long()
        if ex["kind"] in ("click", "scribble"):  # points lie on the object
            assert mask[pts[:, 1], pts[:, 0]].all()
        if ex["kind"] == "box":  # the box is the mask's tight bounding box
            assert (ex["prompt_mask"].numpy() >= mask).all()
        if ex["kind"] == "mask":
            assert pts.shape == (0, 2) and torch.equal(ex["prompt_mask"], ex["mask"])
        prompt = s["prompts"][ex["object"]][ex["kind"]]  # the map the region encoder is given
        assert torch.equal(ex["prompt_mask"], rasterize_prompt(ex["kind"], prompt, 64).bool())
    assert data.format_caption(s)[0]["text"] == s["caption"]
    assert [(e["question"], e["answer"]) for e in data.format_vqa(s)] == s["qa"]
    e = data.format_edit(s)[0]
    assert e["target_image"].shape == (3, 64, 64) and e["region"].dtype == torch.bool
    assert e["region"].any() and e["instruction"] == s["edit"]["instruction"]
    v = data.format_clip(world.clip(0))
    assert v["frames"].shape == (8, 3, 64, 64) and v["masks"].shape == (8, 64, 64)
    assert torch.equal(v["prompt_mask"], v["masks"][0]) and v["prompt_mask"].any()


def test_collate_stacks_pads_and_refuses_mixed(world):
    s = world.sample(1)
    b = data.collate(data.format_region(s))
    n = len(s["scene"].objects) * 4
    assert b["image"].shape == (n, 3, 64, 64) and b["mask"].shape == (n, 64, 64)
    assert b["points"].shape[:1] == (n,) and b["points_len"].tolist()[:4] == [
        1, len(s["prompts"][0]["scribble"]), 2, 0]
    assert b["points"][3].abs().sum() == 0  # the mask prompt has no points: all padding
    assert b["kind"][:4] == list(PROMPT_KINDS) == ["click", "scribble", "box", "mask"]
    assert b["object"].dtype == torch.long
    with pytest.raises(ValueError, match="one task at a time"):
        data.collate(data.format_caption(s) + data.format_vqa(s))
    with pytest.raises(ValueError, match="empty batch"):
        data.collate([])


def test_make_batch_is_deterministic(world):
    a = data.make_batch(world, "refseg", [0, 1, 2], np.random.default_rng(5))
    b = data.make_batch(world, "refseg", [0, 1, 2], np.random.default_rng(5))
    assert a["text"] == b["text"] and torch.equal(a["mask"], b["mask"])
    assert a["image"].shape == (3, 3, 64, 64)
    with pytest.raises(ValueError, match="unknown task"):
        data.make_batch(world, "dance", [0])


def test_datasets_bridge_round_trips(world, tmp_path):
    ds = data.shapesworld_dataset(DataConfig(), "val", n=3, start=2, cache_dir=str(tmp_path))
    assert isinstance(ds, datasets.Dataset) and len(ds) == 3
    for j, row in enumerate(ds):
        _same_sample(data.from_record(row), world.sample(2 + j))
    it = data.shapesworld_dataset(DataConfig(), "val", n=2, streaming=True)
    assert isinstance(it, datasets.IterableDataset)
    _same_sample(data.from_record(next(iter(it))), world.sample(0))
    with pytest.raises(ValueError, match="unknown split"):
        data.shapesworld_dataset(DataConfig(), "test")


def test_shipped_sample_equals_fresh_regeneration(world):
    ds = datasets.load_dataset(str(data.SAMPLE_DIR), split="val")
    assert len(ds) == data.SAMPLE_SPLITS["val"]
    for i, row in enumerate(ds):
        assert row["index"] == i
        _same_sample(data.from_record(row), world.sample(i))
    size = sum(f.stat().st_size for f in data.SAMPLE_DIR.rglob("*") if f.is_file())
    assert size < 3_000_000  # "a few MB at most"


# ----- RefCOCO-format loader on the shipped fixture ----------------------------------------
def _fixture(**kw):
    return data.RefCOCO(FIXTURE / "instances.json", FIXTURE / "refs.json", FIXTURE / "images",
                        **kw)


def test_refcoco_masks_match_the_renderer():
    ds = _fixture()
    coco = json.loads((FIXTURE / "instances.json").read_text())
    kinds = set()
    for a in coco["annotations"]:
        size, idx = FIXTURE_SCENES[a["image_id"] - 1]
        truth = ShapesWorld(DataConfig(image_size=size), "val").sample(idx)["inst"] == a["id"] % 100
        iou = ev.mask_iou(ds.mask([a["id"]], size, size)[None], truth[None])[0]
        seg = a["segmentation"]
        kind = "polygon" if isinstance(seg, list) else (
            "rle" if isinstance(seg["counts"], str) else "rle_uncompressed")
        kinds.add(kind)
        assert iou == 1.0 if kind != "polygon" else iou > 0.9, (a["id"], kind, iou)
    assert kinds == {"polygon", "rle", "rle_uncompressed"}


def test_refcoco_items_several_and_no_target():
    ds = _fixture()
    refs = json.loads((FIXTURE / "refs.json").read_text())
    assert len(ds) == sum(len(r["sentences"]) for r in refs)
    items = [ds[i] for i in range(len(ds))]
    assert {tuple(x["image"].shape) for x in items} == {(3, 64, 64), (3, 96, 96)}
    none = [x for x in items if not x["has_target"]]
    multi = [x for x in items if x["n_targets"] >= 2]
    assert none and multi and all(not x["mask"].any() for x in none)
    for x in items:  # each mask is the union of the named objects, straight from the renderer
        size, idx = FIXTURE_SCENES[x["image_id"] - 1]
        s = ShapesWorld(DataConfig(image_size=size), "val").sample(idx)
        match = [r for r in s["refs"] if r["text"].endswith(x["text"])]
        assert match and ev.mask_iou(x["mask"][None], np.isin(s["inst"], match[0]["targets"])[
            None])[0] > 0.9, x["text"]
    b = data.collate(items[:4])  # same-size images stack like ShapesWorld batches
    assert b["image"].shape == (4, 3, 64, 64) and b["mask"].shape == (4, 64, 64)


def test_refcoco_split_and_resize():
    test_a = _fixture(split="testA", image_size=64)
    assert len(test_a) > 0 and all(test_a.items[i][0]["split"] == "testA"
                                   for i in range(len(test_a)))
    x = test_a[0]
    assert x["image"].shape == (3, 64, 64) and x["mask"].shape == (64, 64)
    assert x["image"].min() >= -1 and x["mask"].dtype == torch.bool and x["mask"].any()
    assert len(_fixture(split="val")) + len(test_a) == len(_fixture())


def test_refcoco_bad_files_give_one_clear_error(tmp_path):
    refs = json.loads((FIXTURE / "refs.json").read_text())
    pkl = tmp_path / "refs(unc).p"
    pkl.write_bytes(pickle.dumps(refs))
    with pytest.raises(ValueError, match="is a pickle"):
        data.RefCOCO(FIXTURE / "instances.json", pkl, FIXTURE / "images")
    bad = tmp_path / "refs.json"
    bad.write_text(json.dumps([{"image_id": 1, "sentences": []}]))
    with pytest.raises(ValueError, match="lacks image_id / ann_id / sentences"):
        data.RefCOCO(FIXTURE / "instances.json", bad, FIXTURE / "images")
    bad.write_text(json.dumps([{**refs[0], "ann_id": 999}]))
    with pytest.raises(ValueError, match="does not have"):
        data.RefCOCO(FIXTURE / "instances.json", bad, FIXTURE / "images")
    inst = tmp_path / "instances.json"
    inst.write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match="not a COCO instances file"):
        data.RefCOCO(inst, FIXTURE / "refs.json", FIXTURE / "images")
    with pytest.raises(FileNotFoundError, match="not found"):
        data.RefCOCO(tmp_path / "nope.json", FIXTURE / "refs.json", FIXTURE / "images")
    images = tmp_path / "images"
    shutil.copytree(FIXTURE / "images", images)
    (images / "shapes_000002.png").unlink()
    with pytest.raises(FileNotFoundError, match="1 image.* missing .*shapes_000002.png"):
        data.RefCOCO(FIXTURE / "instances.json", FIXTURE / "refs.json", images)
    shutil.copy(FIXTURE / "images" / "shapes_000002.png", images)
    (images / "shapes_000001.png").write_bytes(b"not a png")
    ds = data.RefCOCO(FIXTURE / "instances.json", FIXTURE / "refs.json", images, split="val")
    with pytest.raises(ValueError, match="cannot read image"):
        ds[0]
