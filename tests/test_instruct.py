"""Stage 4 (instruct.py): the example mix, the joint loss reaching every trained part with the
PREDICTED mask as the decoder's spatial prompt, batches as a function of the step, and the
stage-3 rehearsal."""

import numpy as np
import torch

from focus_ref import editing as E
from focus_ref import instruct as I
from focus_ref.config import FocusConfig
from focus_ref.llm import SEG

torch.set_num_threads(1)  # 2 threads on 2 busy cores spin


def test_examples_cover_every_task_and_are_deterministic(cfg, val):
    rng = lambda: np.random.default_rng(3)  # noqa: E731
    a = [I.make_example(s, r, cfg) for s, r in zip(val * 8, [rng()] * 64)]
    r1, r2 = np.random.default_rng(5), np.random.default_rng(5)
    assert [I.make_example(s, r1, cfg)["prompt"] for s in val] == \
        [I.make_example(s, r2, cfg)["prompt"] for s in val]
    r = np.random.default_rng(0)
    exs = [I.make_example(s, r, cfg) for s in val * 12]
    tasks = {x["task"] for x in exs}
    assert tasks == {"edit", "generate", "absent", "refuse"}
    for x in exs:
        if x["task"] == "generate":
            assert x["prompt"].startswith("generate:") and x["region"].all()
        elif x["prompt_region"] is not None:  # "make this blue" + a region prompt
            assert "this" in x["prompt"] and "<region>" in x["prompt"]
        elif x["task"] == "refuse":  # a question or a caption is no edit
            assert x["answer"] == E.NOT_AN_EDIT
        elif x["task"] == "absent":  # one <seg>, trained to find nothing
            assert x["answer"] == SEG and x["prompt"].startswith("<image> edit:")
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


def test_an_absent_object_trains_an_empty_mask_and_no_decoder_row(cfg, model, val, monkeypatch,
                                                                   seg_targets):
    """GRES in stage 4: the <seg> of an edit naming an absent object learns the empty mask and
    presence 0 (inference then answers "no such object"); only real edits reach the decoder."""
    s = next(v for v in val if E.describe_target(v))
    edit = {**I.make_example(s, np.random.default_rng(0), cfg), "task": "edit",
            "prompt": E.EDIT.format(s["edit"]["instruction"]), "prompt_region": None}
    absent = {**edit, "task": "absent", "prompt": E.EDIT.format(E.absent_instruction(s)),
              "answer": SEG}
    got, dec = seg_targets, {}
    orig = model.diffusion.loss
    monkeypatch.setattr(model.diffusion, "loss", lambda g, s_, m, c: (
        dec.update(rows=len(g)) or orig(g, s_, m, c)))
    I.edit_loss(model, I.collate([edit, absent], model), cfg)
    assert got["present"][:, 0].tolist() == [True, False]
    assert got["gt"][0].any() and not got["gt"][1].any()
    assert dec["rows"] == 1  # the absent row writes no codes and renders nothing


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
