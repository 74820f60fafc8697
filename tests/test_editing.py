"""Editing and generation (editing.py, FocusModel.edit / generate, stage 4): shapes, the joint
loss, the predicted mask as the decoder's spatial prompt, background kept, refusals, bad input,
determinism, and the shipped checkpoint's held-out quality."""

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from focus_ref import editing as E
from focus_ref import instruct as I
from focus_ref.config import FocusConfig
from focus_ref.model import FocusModel
from focus_ref.shapesworld import ShapesWorld

torch.set_num_threads(1)  # 2 threads on 2 busy cores spin
SHIPPED = Path(__file__).resolve().parent.parent / "data_samples" / "checkpoint"


@pytest.fixture(scope="module")
def cfg():
    return FocusConfig.tiny()


@pytest.fixture(scope="module")
def model(cfg):
    torch.manual_seed(0)
    return FocusModel(cfg).eval()


@pytest.fixture(scope="module")
def val(cfg):
    w = ShapesWorld(cfg.data, "val")
    return [w.sample(i) for i in range(8)]


def bias_first_token(model, monkeypatch, seg_bias: float):
    """Push the LLM towards (+) or away from (-) writing <seg> after the prompt."""
    head = model.llm.model.lm_head
    orig, bias = head.forward, torch.zeros(head.out_features)
    bias[model.llm.seg_id] = seg_bias
    monkeypatch.setattr(head, "forward", lambda h: orig(h) + bias)


def force_edit(model, monkeypatch, mask):
    """Make a random model choose to edit (<seg>) and predict `mask` (H, W) for every row."""
    bias_first_token(model, monkeypatch, 1e4)

    def fake_segment(states, feats, image, maps=None):
        B = len(states)
        logits = torch.where(torch.as_tensor(mask), 5.0, -5.0).expand(B, 1, *mask.shape)
        return logits.clone(), torch.ones(B, 1)  # (B, 1, H, W), present

    monkeypatch.setattr(model.segmentation, "forward", fake_segment)


# ----- examples and the joint loss ---------------------------------------------------------
def test_examples_cover_every_task_and_are_deterministic(cfg, val):
    rng = lambda: np.random.default_rng(3)  # noqa: E731
    a = [I.make_example(s, r, cfg) for s, r in zip(val * 8, [rng()] * 64)]
    r1, r2 = np.random.default_rng(5), np.random.default_rng(5)
    assert [I.make_example(s, r1, cfg)["prompt"] for s in val] == \
        [I.make_example(s, r2, cfg)["prompt"] for s in val]
    r = np.random.default_rng(0)
    exs = [I.make_example(s, r, cfg) for s in val * 12]
    tasks = {x["task"] for x in exs}
    assert tasks == {"edit", "generate", "refuse"}
    for x in exs:
        if x["task"] == "generate":
            assert x["prompt"].startswith("generate:") and x["region"].all()
        elif x["prompt_region"] is not None:  # "make this blue" + a region prompt
            assert "this" in x["prompt"] and "<region>" in x["prompt"]
        elif x["task"] == "refuse":
            assert x["answer"] in (E.NO_OBJECT, E.NOT_AN_EDIT)
    assert len(a) == 64


def test_absent_instruction_names_an_object_not_in_the_scene(val):
    for s in val:
        if E.describe_target(s):
            t = E.absent_instruction(s)
            assert t != s["edit"]["instruction"]
            ref = next(r for r in s["refs"] if r["type"] == "none")
            assert ref["text"] in t and ref["targets"] == []


def test_joint_loss_reaches_every_trained_part_and_uses_the_predicted_mask(cfg, model, val):
    r = np.random.default_rng(1)
    exs = [I.make_example(s, r, cfg) for s in val[:4]]
    exs[0] = {**I.make_example(val[0], np.random.default_rng(0), cfg), "task": "edit",
              "prompt": E.EDIT.format(val[0]["edit"]["instruction"]), "prompt_region": None}
    batch = I.collate(exs, model)
    seen = {}
    orig = model.diffusion.loss

    def spy(goal, source, mask, ctx):
        seen["mask"] = mask.clone()
        return orig(goal, source, mask, ctx)

    model.diffusion.loss = spy
    try:
        model.train()
        loss, logs = I.edit_loss(model, batch, cfg)
    finally:
        del model.diffusion.loss
        model.eval()
    assert torch.isfinite(loss)
    for k in ("text", "sem", "mask_bce", "dec_mse"):
        assert k in logs
    model.zero_grad()
    loss.backward()
    for part in (model.llm, model.semantic_head, model.segmentation, model.diffusion):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())
    # the first row is an edit: its decoder mask is the predictor's (random) mask, not GT
    gt = batch["region"][0].float()
    assert seen["mask"][0].shape == gt.shape and not torch.equal(seen["mask"][0], gt)
    model.zero_grad()


def test_stage4_batches_are_a_function_of_the_step(cfg, model):
    c = FocusConfig.from_dict({"train": {"stage4": {"batch_size": 4}}})
    st1, st2 = I.stage4_edit(model, c), I.stage4_edit(model, c)
    b1, b2 = st1.batch_fn(3), st2.batch_fn(3)
    assert torch.equal(b1["input_ids"], b2["input_ids"]) and b1["task"] == b2["task"]
    assert not torch.equal(b1["source"], st1.batch_fn(4)["source"])
    model.eval()


def test_stage4_rehearses_stage3_tasks_and_the_ablation_does_not(cfg, model):
    c = FocusConfig.from_dict({"train": {"stage4": {"batch_size": 4}, "stage4_rehearsal": 3}})
    st = I.stage4_edit(model, c)
    batch = st.batch_fn(0)
    assert len(batch["rehearsal"]["input_ids"]) == 3  # stage-3 examples ride along
    torch.manual_seed(0)
    loss, logs = st.loss_fn(batch)
    assert torch.isfinite(loss) and "s3_text" in logs  # stage-3 loss on the rehearsal rows
    assert any(k.startswith("dec_") for k in logs)  # + the edit loss as before
    assert "rehearsal" not in I.stage4_edit(model, c, [model.diffusion], rehearse=False
                                            ).batch_fn(0)
    model.zero_grad()
    model.eval()


# ----- inference paths ---------------------------------------------------------------------
def test_edit_keeps_every_pixel_outside_the_predicted_mask(model, val, monkeypatch):
    s = val[0]
    mask = np.zeros((64, 64), bool)
    mask[10:30, 20:40] = True
    force_edit(model, monkeypatch, mask)
    res = model.edit(s["image"], s["edit"]["instruction"], return_details=True)
    assert res.reason == "edited" and res.mask is not None
    assert np.array_equal(res.image[~mask], s["image"][~mask])  # background kept exactly
    assert not np.array_equal(res.image[mask], s["image"][mask])  # something was rendered
    assert len(res.codes) == model.semantic_head.num_tokens


def test_refusal_returns_the_image_unchanged_with_the_reason(model, val, monkeypatch):
    s = val[1]
    bias_first_token(model, monkeypatch, -1e4)  # never <seg>: the model answers in words
    with pytest.warns(UserWarning, match="no edit made"):
        out = model.edit(s["image"], E.absent_instruction(s))
    assert np.array_equal(np.asarray(out), s["image"])
    assert out.info["focus_reason"] != "edited"


def test_generate_is_deterministic_under_a_seed(model):
    a = np.asarray(model.generate("a small red circle on a plain white background", seed=1))
    b = np.asarray(model.generate("a small red circle on a plain white background", seed=1))
    c = np.asarray(model.generate("a small red circle on a plain white background", seed=2))
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)


# ----- bad input ---------------------------------------------------------------------------
@pytest.mark.parametrize("instruction,match", [("", "empty instruction"),
                                               ("   ", "empty instruction"),
                                               ("make it red " * 40, "tokens long")])
def test_bad_instructions(model, val, instruction, match):
    with pytest.raises(ValueError, match=match):
        model.edit(val[0]["image"], instruction)


def test_bad_images_and_regions(model, val):
    img = val[0]["image"]
    with pytest.raises(TypeError, match="uint8 H x W x 3"):
        model.edit(img.astype(np.float32), "make the red circle blue")
    with pytest.raises(TypeError, match="PIL image"):
        model.edit("not/an/image.png", "make the red circle blue")
    with pytest.raises(ValueError, match="region must be"):
        model.edit(img, "make this blue", region={"point": (3, 4)})
    with pytest.raises(ValueError, match="outside"):
        model.edit(img, "make this blue", region={"click": (99, 4)})
    with pytest.raises(ValueError, match="empty prompt"):
        model.generate("")


def test_other_sizes_and_modes_are_converted(model, val):
    from PIL import Image

    grey = Image.fromarray(val[0]["image"]).convert("L").resize((96, 96))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model.edit(grey, "make the red circle blue")
    assert out.size == (64, 64) and out.mode == "RGB"


# ----- the shipped checkpoint --------------------------------------------------------------
@pytest.mark.skipif(not (SHIPPED / "model.safetensors").is_file(), reason="no shipped checkpoint")
def test_shipped_checkpoint_edits_and_refuses_on_held_out_scenes():
    m = FocusModel.from_pretrained(SHIPPED)
    w = ShapesWorld(m.config.data, "val")
    samples = [w.sample(i) for i in range(24)]
    q = E.edit_quality(m, samples)
    assert q["success"] >= 0.6 and q["bg_psnr"] >= 28, q  # full split: see notebook 07
    assert E.refusal_quality(m, samples[:12])["refused"] >= 0.75
