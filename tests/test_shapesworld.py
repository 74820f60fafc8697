"""ShapesWorld: determinism, exact masks, every derived task, and the oracle."""

import numpy as np
import pytest

from focus_ref import oracle
from focus_ref.config import DataConfig
from focus_ref.scenegraph import colour_ref, matches, question_objects
from focus_ref.shapesworld import (COLORS, MIN_VISIBLE, SHAPES, Obj, Scene, ShapesWorld,
                                   pixel_centres, radius, render, sample_scene, shape_mask,
                                   visible_fractions)

N = 40  # scenes checked per property


@pytest.fixture(scope="module")
def world():
    return ShapesWorld(DataConfig(), split="train")


@pytest.fixture(scope="module")
def samples(world):
    return [world.sample(i) for i in range(N)]


def test_same_seed_same_bytes_other_seed_other_scene():
    a, b = ShapesWorld(DataConfig(seed=3)).sample(5), ShapesWorld(DataConfig(seed=3)).sample(5)
    assert a["image"].tobytes() == b["image"].tobytes()
    assert a["caption"] == b["caption"] and a["qa"] == b["qa"] and a["refs"] == b["refs"]
    assert a["edit"]["target_image"].tobytes() == b["edit"]["target_image"].tobytes()
    c = ShapesWorld(DataConfig(seed=4)).sample(5)
    assert c["image"].tobytes() != a["image"].tobytes()
    v = ShapesWorld(DataConfig(seed=3), split="val").sample(5)
    assert v["image"].tobytes() != a["image"].tobytes()  # val is disjoint from train


def test_renders_are_the_callers_to_change(world):
    """Rendering reuses cached pixel grids and backgrounds (speed): changing what it returns
    must not change the next scene."""
    scene = world.scene(3)
    first = render(scene)[0]
    img, inst = render(scene)
    img[:], inst[:] = 0, 7
    assert np.array_equal(render(scene)[0], first) and render(scene)[0].any()
    with pytest.raises(ValueError):  # the shared grids are read-only
        pixel_centres(64)[0][0, 0] = 1.0


def test_variety(samples):
    objs = [o for s in samples for o in s["scene"].objects]
    assert {o.shape for o in objs} == set(SHAPES) and len(SHAPES) >= 4
    assert {o.color for o in objs} == set(COLORS) and len(COLORS) >= 6
    assert {o.size for o in objs} == {"small", "large"}
    assert {s["scene"].background for s in samples} == {"plain", "striped", "checkered"}
    assert {len(s["scene"].objects) for s in samples} == {2, 3, 4, 5, 6}


def test_masks_partition_image_and_apply_occlusion(samples):
    occluded = 0
    for s in samples:
        scene, inst = s["scene"], s["inst"]
        n = len(scene.objects)
        assert inst.dtype == np.int16 and set(np.unique(inst)) <= set(range(-1, n))
        painted, silhouettes = np.full(inst.shape, -1), []
        for k, o in enumerate(scene.objects):  # the later object wins where shapes overlap
            full = shape_mask(o.shape, o.x, o.y, radius(o, scene.size), scene.size)
            painted[full] = k
            silhouettes.append(full)
            assert np.array_equal(s["image"][inst == k], np.tile(COLORS[o.color], ((inst == k).sum(), 1)))
            occluded += int(full.sum() > (inst == k).sum())
        assert np.array_equal(painted, inst)
        assert min(visible_fractions(silhouettes)) >= MIN_VISIBLE
    assert occluded > 0  # occlusion actually happens in the sample


def test_caption_and_questions_are_true(samples):
    for s in samples:
        objs = s["scene"].objects
        for o in objs:
            assert f"{o.size} {o.color} {o.shape}" in s["caption"]
        kinds = set()
        for q, a in s["qa"]:
            if q.startswith("how many"):
                kinds.add("count")
                noun = q[len("how many "):-len(" are there?")]
                if noun == "objects":
                    want = len(objs)
                elif noun.endswith(" objects"):
                    want = sum(o.color == noun.split()[0] for o in objs)
                else:
                    want = sum(o.shape + "s" == noun for o in objs)
                assert a == str(want), (q, a)
            elif q.startswith("is there"):
                kinds.add("exist")
                c, sh = q.split()[-2], q.split()[-1][:-1]
                assert a == ("yes" if any(o.color == c and o.shape == sh for o in objs) else "no")
            elif q.startswith("what color"):
                kinds.add("color")
                assert a in COLORS
            elif q.startswith("what shape"):
                kinds.add("shape")
                assert a in SHAPES
            elif q.startswith("where"):
                kinds.add("where")
                assert a in ("left", "right", "above", "below")
        assert "count" in kinds and "exist" in kinds


def test_question_objects_are_the_objects_each_question_names(samples):
    """What a grounded answer segments: a count's objects number the answer, an existence
    question finds objects iff the answer is yes, a colour / shape question names the one object
    whose colour / shape is the answer, a "where" question the object asked about then the
    reference, placed as the answer says."""
    seen = set()
    for s in samples:
        objs = s["scene"].objects
        for q, a in s["qa"]:
            ks = question_objects(s["scene"], q)
            kind = q.split()[0] + " " + q.split()[1]
            seen.add(kind)
            if kind == "how many":
                assert len(ks) == int(a), (q, a, ks)
            elif kind == "is there":
                assert bool(ks) == (a == "yes"), (q, a, ks)
            elif kind in ("what color", "what shape"):
                assert len(ks) == 1 and getattr(objs[ks[0]], kind.split()[1]) == a, (q, a)
            else:
                (o, ref) = [objs[k] for k in ks]  # exactly two, in the order named
                dx, dy = o.x - ref.x, o.y - ref.y
                assert a == (("left" if dx < 0 else "right") if abs(dx) > abs(dy) else
                             ("above" if dy < 0 else "below")), (q, a)
    assert seen == {"how many", "is there", "what color", "what shape", "where is"}


def test_referring_expressions(samples):
    types = set()
    for s in samples:
        objs = s["scene"].objects
        for r in s["refs"]:
            types.add(r["type"])
            if r["type"] == "none":  # worded as targets are: shape, colour or both
                attrs = {("shape" if w in SHAPES else "color"): w
                         for w in r["text"].split()[1:] if w != "object"}
                assert r["targets"] == [] and attrs and not any(matches(o, attrs) for o in objs)
            elif r["type"] == "multi":
                assert len(r["targets"]) >= 1
            else:
                assert len(r["targets"]) == 1
            if r["type"] == "attribute":  # the words pick out exactly the target
                words = r["text"].split()[1:]
                attrs = {("shape" if w in SHAPES else "color" if w in COLORS else "size"): w
                         for w in words if w != "object"}
                assert [k for k, o in enumerate(objs) if matches(o, attrs)] == r["targets"]
    assert types == {"attribute", "relation", "superlative", "multi", "none"}
    forms = {len(r["text"].split()) for s in samples for r in s["refs"] if r["type"] == "none"}
    assert forms == {2, 3}  # "the triangle" / "the red object" as well as "the red triangle"
    assert sum(len(r["targets"]) > 1 for s in samples for r in s["refs"]) > 0


def test_colour_refs_name_one_visible_object_by_its_colour(samples):
    """Stage 0d's colour practice: the words hold a colour and pick out exactly the target,
    which is visible; a scene whose objects share every colour-bearing description gets none."""
    rng, found = np.random.default_rng(0), 0
    for s in samples:
        r = colour_ref(s["scene"], s["inst"], rng)
        if r is None:
            continue
        found += 1
        words = r["text"].split()[1:]
        attrs = {("shape" if w in SHAPES else "color" if w in COLORS else "size"): w
                 for w in words if w != "object"}
        assert "color" in attrs and r["type"] == "attribute"
        assert [k for k, o in enumerate(s["scene"].objects) if matches(o, attrs)] == r["targets"]
        assert (s["inst"] == r["targets"][0]).any()
    assert found >= N // 2
    twins = Scene([Obj("circle", "red", "large", 16, 16), Obj("circle", "red", "large", 46, 46)])
    assert colour_ref(twins, render(twins)[1], rng) is None


def test_region_prompts_lie_on_their_object(samples):
    for s in samples:
        for k, p in enumerate(s["prompts"]):
            m = s["inst"] == k
            x, y = p["click"]
            assert m[y, x]
            ys, xs = np.nonzero(m)
            assert p["box"] == (xs.min(), ys.min(), xs.max(), ys.max())
            assert len(p["scribble"]) >= 2 and all(m[y, x] for x, y in p["scribble"])
            assert np.array_equal(p["mask"], m)


def test_edits_are_exact(samples):
    kinds = set()
    for s in samples:
        e = s["edit"]
        kinds.add(e["kind"])
        target, t_inst = render(e["target_scene"])
        assert np.array_equal(target, e["target_image"]) and np.array_equal(t_inst, e["target_inst"])
        changed = np.any(target != s["image"], -1)
        assert changed.any() and not (changed & ~e["region"]).any()  # nothing changes outside
    assert kinds == {"recolor", "remove", "replace", "move", "background"}


def test_clip_has_moving_objects_with_exact_masks(world):
    c = world.clip(2, n_frames=8)
    assert c["frames"].shape == (8, 64, 64, 3) and c["insts"].shape == (8, 64, 64)
    assert not np.array_equal(c["frames"][0], c["frames"][-1])
    for k in range(len(c["scene"].objects)):
        assert all((c["insts"][t] == k).any() for t in range(8))


def test_oracle_accepts_target_rejects_source_and_wrong_colour(samples):
    for s in samples:
        e = s["edit"]
        assert oracle.judge_edit(e["target_image"], e)["success"]
        assert not oracle.judge_edit(s["image"], e)["success"]
    s = next(s for s in samples if s["edit"]["kind"] == "recolor")
    e, wrong = s["edit"], s["edit"]["target_image"].copy()
    k = e["target_object"]
    other = next(c for c in COLORS if c not in (e["target_scene"].objects[k].color,
                                                 s["scene"].objects[k].color))
    wrong[e["target_inst"] == k] = COLORS[other]
    assert not oracle.judge_edit(wrong, e)["success"]
    noisy = np.clip(e["target_image"].astype(int) + np.random.default_rng(0).integers(-3, 4, wrong.shape), 0, 255)
    assert oracle.judge_edit(noisy.astype(np.uint8), e)["success"]  # small noise is not a failure


def test_attribute_accuracy_of_a_clean_render():
    scene = Scene([Obj("circle", "red", "large", 16, 16), Obj("triangle", "blue", "large", 46, 40),
                   Obj("diamond", "green", "small", 14, 48), Obj("square", "yellow", "small", 48, 12)])
    img, _ = render(scene)
    assert oracle.attribute_accuracy(img, scene) == 1.0
    wrong = Scene([Obj("square", "red", "large", 16, 16)] + scene.objects[1:])
    assert oracle.attribute_accuracy(img, wrong) == 0.75


def test_bad_requests_get_clear_errors():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="cannot fit 60 objects"):
        sample_scene(rng, 64, n_objects=60)
    with pytest.raises(TypeError, match="seed must be an int"):
        ShapesWorld(DataConfig(seed="1"))
    with pytest.raises(ValueError, match="unknown split"):
        ShapesWorld(DataConfig(), split="test")
    with pytest.raises(ValueError, match="non-negative int"):
        ShapesWorld(DataConfig()).sample(-1)
    with pytest.raises(ValueError, match="unknown shape"):
        shape_mask("blob", 1, 1, 1, 8)
