"""Editing and generation at inference (editing.py, FocusModel.edit / generate): the predicted
mask as the decoder's spatial prompt, background kept, refusals, bad input, determinism.
Stage-4 training is tests/test_instruct.py; the shipped checkpoint, tests/test_shipped.py."""

import warnings

import numpy as np
import pytest
import torch

from focus_ref import editing as E

torch.set_num_threads(1)  # 2 threads on 2 busy cores spin


def bias_first_token(model, monkeypatch, seg_bias: float):
    """Push the LLM towards (+) or away from (-) writing <seg> after the prompt."""
    head = model.llm.model.lm_head
    orig, bias = head.forward, torch.zeros(head.out_features)
    bias[model.llm.seg_id] = seg_bias
    monkeypatch.setattr(head, "forward", lambda h: orig(h) + bias)


def force_edit(model, monkeypatch, mask):
    """Make a random model choose to edit (<seg>) and predict `mask` (H, W) for every row."""
    bias_first_token(model, monkeypatch, 1e4)

    def fake_segment(states, feats, image, maps=None, **text):
        B = len(states)
        logits = torch.where(torch.as_tensor(mask), 5.0, -5.0).expand(B, 1, *mask.shape)
        return logits.clone(), torch.ones(B, 1)  # (B, 1, H, W), present

    monkeypatch.setattr(model.segmentation, "forward", fake_segment)


# ----- examples and the joint loss ---------------------------------------------------------
def test_the_decoder_reads_the_prompt_in_order_whatever_the_padding():
    """context_states: word order reaches the decoder ("make the red circle blue" is not "make
    the blue circle red"), counted from the prompt's end, so left padding (inference) and right
    padding (training) give the same context; every prompt vector has the same length."""
    g = torch.Generator().manual_seed(0)
    words = torch.randn(5, 16, generator=g) * torch.tensor([1, 30, 1, 1, 1.0])[:, None]  # (T, D)
    codes = torch.randn(1, 3, 16, generator=g)  # (1, N, D) states at the codes
    right = torch.cat([words, torch.zeros(2, 16)])[None]  # (1, 7, D): padding after
    left = torch.cat([torch.zeros(2, 16), words])[None]  # padding before
    m_right, m_left = torch.tensor([[1] * 5 + [0] * 2]), torch.tensor([[0] * 2 + [1] * 5])
    a, b = E.context_states(codes, right, m_right), E.context_states(codes, left, m_left)
    torch.testing.assert_close(a[0, :5], b[0, 2:7])  # the same prompt tokens, the same vectors
    assert (a[0, 5:7] == 0).all() and (b[0, :2] == 0).all()  # padding carries nothing
    torch.testing.assert_close(a[0, 7:], codes[0])  # the code states pass unchanged
    swapped = E.context_states(codes, words[[0, 3, 2, 1, 4]][None], torch.ones(1, 5))
    assert not torch.allclose(swapped[0, 1], a[0, 3])  # a word's place is part of its vector
    norms = (a[0, :5] - E.POSITION_NORM * E.sincos_1d(torch.arange(4, -1, -1), 16)).norm(dim=-1)
    torch.testing.assert_close(norms, torch.full((5,), E.PROMPT_RMS * 4))  # 30x longer -> same


# ----- inference paths ---------------------------------------------------------------------
def test_edit_keeps_every_pixel_outside_the_predicted_mask(model, val, monkeypatch):
    s = val[0]
    mask = np.zeros((64, 64), bool)
    mask[10:30, 20:40] = True
    force_edit(model, monkeypatch, mask)
    res = model.edit(s["image"], s["edit"]["instruction"], return_details=True)
    assert res.reason == E.EDITED and res.mask is not None
    assert np.array_equal(res.image[~mask], s["image"][~mask])  # background kept exactly
    assert not np.array_equal(res.image[mask], s["image"][mask])  # something was rendered
    assert len(res.codes) == model.semantic_head.num_tokens


def test_an_edit_by_click_edits_where_segment_finds_the_clicked_object(model, val,
                                                                       monkeypatch):
    """A click is ambiguous; edit() resolves it as segment() does (refined to a mask, a box
    clipped, a scribble refined), so a prompt selects the same region in both. A mask prompt
    goes to the LLM as given."""
    s, H = val[0], model.config.data.image_size
    found = np.zeros((H, H), bool)
    found[10:20, 12:22] = True
    monkeypatch.setattr(model, "segment", lambda image, **prompt: [found])
    seen, real = [], E.run_edits
    monkeypatch.setattr(E, "run_edits", lambda m, x, ins, regions, **kw: (
        seen.append(regions[0]) or real(m, x, ins, regions, **kw)))
    given = np.zeros((H, H), bool)
    given[30:40, 30:40] = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a random model may refuse; the region is what counts
        for region in ({"click": (15, 15)}, {"box": (10, 10, 20, 20)},
                       {"scribble": [(12, 12), (18, 18)]}, {"mask": given}):
            model.edit(s["image"], s["edit"]["instruction"], region=region)
    for got in seen[:3]:
        assert list(got) == ["mask"] and np.array_equal(got["mask"], found)
    assert list(seen[3]) == ["mask"] and np.array_equal(seen[3]["mask"], given)


def test_refusal_returns_the_image_unchanged_with_the_reason(model, val, monkeypatch):
    s = val[1]
    bias_first_token(model, monkeypatch, -1e4)  # never <seg>: the model answers in words
    with pytest.warns(UserWarning, match="no edit made"):
        out = model.edit(s["image"], E.absent_instruction(s))
    assert np.array_equal(np.asarray(out), s["image"])
    assert out.info["focus_reason"] != E.EDITED


def test_generate_is_deterministic_under_a_seed(model):
    a = np.asarray(model.generate("a small red circle on a plain white background", seed=1))
    b = np.asarray(model.generate("a small red circle on a plain white background", seed=1))
    c = np.asarray(model.generate("a small red circle on a plain white background", seed=2))
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)



def test_the_edit_ceiling_pastes_the_decoded_target_inside_the_true_region(model, val, monkeypatch):
    """edit_ceiling: with a tokenizer that decodes every image exactly, every edit passes;
    with one that decodes everything as the source image, only what the region changes fails."""
    tok = model.visual_tokenizer
    monkeypatch.setattr(tok, "encode", lambda x: x)
    monkeypatch.setattr(tok, "decode", lambda x: x)
    perfect = E.edit_ceiling(model, val)
    assert perfect["success"] == 1.0 and perfect["n"] == len(val)
    assert {f"success.{s['edit']['kind']}" for s in val} <= set(perfect)
    from focus_ref.data import image_to_tensor

    sources = torch.stack([image_to_tensor(s["image"]) for s in val])
    monkeypatch.setattr(tok, "decode", lambda x: sources[:len(x)])  # "nothing changed"
    assert E.edit_ceiling(model, val)["success"] == 0.0

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
