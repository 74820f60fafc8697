"""Segmentation predictor, region-prompt encoder and losses (focus_ref/segmentation.py)."""

import copy

import numpy as np
import pytest
import torch

from focus_ref.config import FocusConfig
from focus_ref.segmentation import (
    PROMPT_KINDS,
    RegionPromptEncoder,
    SegmentationPredictor,
    rasterize_prompt,
    segmentation_loss,
)

CFG = FocusConfig.tiny()
H = CFG.encoder.high_res
D = CFG.llm.hidden_size


def features(B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, c, H // s, H // s, generator=g)
            for c, s in zip(CFG.encoder.convnext_dims, (4, 8, 16, 32))]  # ConvNeXt stages


def image(B=2, seed=0):
    return torch.rand(B, 3, H, H, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One thread: on a shared 2-core machine this is several times faster than two."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def predictor():
    torch.manual_seed(0)
    return SegmentationPredictor(CFG).eval()


@pytest.fixture(scope="module")
def region():
    torch.manual_seed(0)
    return RegionPromptEncoder(CFG).eval()


# ----- predictor -------------------------------------------------------------------------
def test_predictor_shapes_one_mask_per_seg(predictor):
    logits, presence = predictor(torch.randn(2, 1, D), features(), image())
    assert logits.shape == (2, 1, H, H) and presence.shape == (2, 1)
    assert torch.isfinite(logits).all() and torch.isfinite(presence).all()


def test_several_targets_give_independent_masks(predictor):
    states = torch.randn(2, 3, D)
    logits, presence = predictor(states, features(), image())
    assert logits.shape == (2, 3, H, H) and presence.shape == (2, 3)
    alone, _ = predictor(states[:, 1:2], features(), image())  # each <seg> decoded alone
    torch.testing.assert_close(logits[:, 1:2], alone, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(logits[:, 0], logits[:, 1])


def test_no_seg_token_means_no_target(predictor):
    logits, presence = predictor(torch.zeros(2, 0, D), features(), image())
    assert logits.shape == (2, 0, H, H) and presence.shape == (2, 0)


def test_presence_score_empties_the_mask():
    logits = torch.full((1, 2, 4, 4), 5.0)  # confident foreground everywhere
    masks = SegmentationPredictor.to_masks(logits, torch.tensor([[3.0, -3.0]]))
    assert masks[0, 0].all() and not masks[0, 1].any()  # the 2nd <seg> says "no target"


def test_predictor_bad_inputs(predictor):
    with pytest.raises(ValueError, match="hidden states"):
        predictor(torch.randn(2, 1, D + 1), features(), image())
    with pytest.raises(ValueError, match="feature maps"):
        predictor(torch.randn(2, 1, D), features()[:3], image())
    with pytest.raises(ValueError, match="high-res input"):
        predictor(torch.randn(2, 1, D), features(), image()[:, :, :32])
    with pytest.raises(ValueError, match="one map per <seg>"):
        predictor(torch.randn(2, 2, D), features(), image(), torch.zeros(2, 1, H, H))
    bad = FocusConfig.from_dict({"segmentation": {"decoder_stride": 2}})
    with pytest.raises(ValueError, match="decoder_stride"):
        SegmentationPredictor(bad)


def _with_and_without(field: str):
    """Two predictors built from one seed: the tiny config's, and one with
    `segmentation.<field>` = 0 (the part switched off)."""
    off = copy.deepcopy(CFG)
    setattr(off.segmentation, field, 0)
    torch.manual_seed(0)
    a = SegmentationPredictor(CFG).eval()
    torch.manual_seed(0)
    return a, SegmentationPredictor(off).eval()


def test_refinement_starts_as_the_identity_and_reads_the_image():
    """The full-resolution refinement is zero-initialised from a forked RNG: with it the
    predictor gives exactly the masks it gives without it, every other weight unchanged; once
    its last layer is non-zero the masks change with it."""
    a, b = _with_and_without("fine_width")
    assert a.fine is not None and b.fine is None
    sb = b.state_dict()
    assert all(torch.equal(v, sb[k]) for k, v in a.state_dict().items() if k in sb)
    seg = torch.randn(2, 2, D)
    with torch.no_grad():
        la, _ = a(seg, features(), image())
        lb, _ = b(seg, features(), image())
        assert torch.equal(la, lb)
        torch.nn.init.normal_(a.fine[-1].weight, std=0.1)
        lc, _ = a(seg, features(), image())
    assert (lc - la).abs().mean() > 1e-3


@pytest.mark.parametrize("stride", [4, 16])
def test_other_decoder_strides_still_full_resolution(stride):
    cfg = FocusConfig.from_dict({"segmentation": {"decoder_stride": stride}})
    logits, _ = SegmentationPredictor(cfg)(torch.randn(1, 2, D), features(1), image(1))
    assert logits.shape == (1, 2, H, H)


def test_region_map_is_a_dense_prompt(predictor):
    states, maps = torch.randn(1, 2, D).expand(1, 2, D), torch.zeros(1, 2, H, H)
    maps[0, 1, 10:20, 10:20] = 1  # the 2nd <seg> answers a box prompt, the 1st words only
    logits, _ = predictor(states, features(1), image(1), maps)
    plain, _ = predictor(states, features(1), image(1))
    torch.testing.assert_close(logits[:, 0], plain[:, 0])  # an empty map = no region prompt
    assert (logits[:, 1] - plain[:, 1]).abs().max() > 1e-4


# ----- rasterising prompts ---------------------------------------------------------------
def test_rasterize_each_kind():
    click = rasterize_prompt("click", (10, 20), H)
    assert click[20, 10] == 1 and click[20, 30] == 0 and 5 <= click.sum() <= 20
    scrib = rasterize_prompt("scribble", [(5, 5), (40, 5), (40, 30)], H)
    assert scrib[5, 5] == scrib[5, 20] == scrib[5, 40] == scrib[18, 40] == scrib[30, 40] == 1
    assert scrib[20, 20] == 0  # the polyline, not its convex hull
    box = rasterize_prompt("box", (3, 4, 12, 9), H)  # both ends inclusive
    assert box.sum() == 10 * 6 and box[4, 3] == box[9, 12] == 1 and box[10, 12] == 0
    m = np.zeros((H, H), bool)
    m[7:9, 2:5] = True
    assert torch.equal(rasterize_prompt("mask", m, H).bool(), torch.from_numpy(m))


@pytest.mark.parametrize("kind, value, match", [
    ("click", (H, 3), "outside"),
    ("click", (-1, 3), "outside"),
    ("click", "here", r"\(x, y\)"),
    ("box", (0, 0, H + 5, 10), "outside"),
    ("box", (30, 30, 10, 40), "swapped corners"),
    ("box", (1, 2, 3), r"\(x0, y0, x1, y1\)"),
    ("scribble", [(3, 3)], "at least 2 points"),
    ("scribble", [], "at least 2 points"),
    ("scribble", [(3, 3), (H + 2, 3)], "outside"),
    ("mask", np.zeros((H, H), bool), "empty"),
    ("mask", np.ones((H // 2, H), bool), "does not match"),
    ("lasso", [(1, 1)], "unknown region prompt kind"),
])
def test_rasterize_bad_inputs(kind, value, match):
    with pytest.raises(ValueError, match=match):
        rasterize_prompt(kind, value, H)


# ----- region-prompt encoder -------------------------------------------------------------
def test_region_tokens_for_each_kind(region):
    m = np.zeros((H, H), bool)
    m[10:20, 30:44] = True
    prompts = [("click", (35, 15)), ("scribble", [(31, 11), (40, 18)]),
               ("box", (30, 10, 43, 19)), ("mask", m)]
    assert [k for k, _ in prompts] == list(PROMPT_KINDS)
    maps, kinds = region.rasterize(prompts)
    assert maps.shape == (4, H, H) and kinds.tolist() == [0, 1, 2, 3]
    f = [x[:1].expand(4, -1, -1, -1) for x in features()]  # one image, four prompts
    tokens = region(f, maps, kinds)
    assert tokens.shape == (4, CFG.segmentation.num_region_tokens, D)
    assert torch.isfinite(tokens).all()
    for i in range(4):  # every kind of prompt gives its own tokens
        for j in range(i + 1, 4):
            assert not torch.allclose(tokens[i], tokens[j])


def test_region_tokens_depend_on_where_and_what(region):
    f = features(1)
    maps, kinds = region.rasterize([("click", (5, 5)), ("click", (50, 50))])
    t = region([x.expand(2, -1, -1, -1) for x in f], maps, kinds)
    assert (t[0] - t[1]).abs().max() > 1e-3  # a different place -> different tokens
    f2 = features(1, seed=1)  # same place, different image content
    t2 = region(f2, maps[:1], kinds[:1])
    assert (t[0] - t2[0]).abs().max() > 1e-3


def test_region_encoder_rejects_empty_map(region):
    with pytest.raises(ValueError, match="at least one marked pixel"):
        region(features(1), torch.zeros(1, H, H), torch.tensor([0]))


# ----- losses ----------------------------------------------------------------------------
def _targets(B=2, K=2):
    t = torch.zeros(B, K, H, H, dtype=torch.bool)
    t[:, 0, 10:30, 10:30] = True
    if K > 1:
        t[:, 1, 40:60, 5:25] = True
    return t


def test_loss_terms_and_an_absent_target_learns_the_empty_mask():
    logits = torch.randn(2, 2, H, H)
    present = torch.tensor([[True, False], [True, True]])
    loss, logs = segmentation_loss(logits, torch.zeros(2, 2), _targets(), present, CFG)
    assert set(logs) == {"mask_bce", "mask_dice", "presence"} and torch.isfinite(loss)
    # the mask of a slot with no target is scored against the empty mask (GRES / ReLA),
    # whatever target was passed for it: all background lowers the loss, all object raises it
    logits2, logits3 = logits.clone(), logits.clone()
    logits2[0, 1], logits3[0, 1] = -10.0, 10.0
    loss2, _ = segmentation_loss(logits2, torch.zeros(2, 2), _targets(), present, CFG)
    loss3, _ = segmentation_loss(logits3, torch.zeros(2, 2), _targets(), present, CFG)
    assert loss2 < loss < loss3
    # padding slots (valid=False) are ignored entirely
    valid = torch.tensor([[True, True], [True, False]])
    loss3, _ = segmentation_loss(logits, torch.zeros(2, 2), _targets(), present, CFG, valid)
    logits2 = logits.clone()
    logits2[1, 1] = -10.0
    loss4, _ = segmentation_loss(logits2, torch.full((2, 2), 0.0), _targets(), present, CFG,
                                 valid)
    assert torch.isclose(loss3, loss4)
    # a perfect prediction scores far better than a random one
    perfect = (_targets().float() * 2 - 1) * 20
    lp, _ = segmentation_loss(perfect, torch.full((2, 2), 20.0), _targets(),
                              torch.ones(2, 2, dtype=torch.bool), CFG)
    assert lp < 0.05 < loss


def test_loss_all_absent_keeps_graph():
    logits = torch.randn(1, 1, H, H, requires_grad=True)
    pres = torch.zeros(1, 1, requires_grad=True)
    loss, _ = segmentation_loss(logits, pres, _targets(1, 1), torch.zeros(1, 1, dtype=torch.bool),
                                CFG)
    loss.backward()
    assert pres.grad is not None and pres.grad.abs().sum() > 0


def test_loss_shape_mismatch_is_explained():
    with pytest.raises(ValueError, match="resize targets"):
        segmentation_loss(torch.zeros(1, 1, H, H), torch.zeros(1, 1),
                          torch.zeros(1, 1, H // 2, H // 2, dtype=torch.bool),
                          torch.ones(1, 1, dtype=torch.bool), CFG)


def test_loss_decreases_on_a_fixed_batch():
    """Predictor + region encoder learn a fixed batch: prompts at two objects -> their masks."""
    torch.manual_seed(0)
    pred, reg = SegmentationPredictor(CFG), RegionPromptEncoder(CFG)
    head = torch.nn.Linear(D, D)  # stands in for the LLM: region tokens -> <seg> state
    f = features(1)
    t = _targets(1, 2)  # object 0 top-left, object 1 bottom-left
    maps, kinds = reg.rasterize([("click", (20, 20)), ("box", (5, 40, 24, 59))])
    params = [*pred.parameters(), *reg.parameters(), *head.parameters()]
    opt = torch.optim.Adam(params, lr=3e-3)
    losses = []
    for _ in range(40):
        tokens = reg([x.expand(2, -1, -1, -1) for x in f], maps, kinds)  # (2, T, D)
        states = head(tokens.mean(1))[None]  # (1, K=2, D): one <seg> per prompt
        logits, pres = pred(states, f, image(1), region_maps=maps[None])
        loss, _ = segmentation_loss(logits, pres, t, torch.ones(1, 2, dtype=torch.bool), CFG)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    iou = ((logits > 0) & t).sum() / ((logits > 0) | t).sum()
    assert iou > 0.5, iou


@pytest.mark.parametrize("preset", ["small", "paper"])
def test_larger_presets_build_on_meta_device(preset):
    from accelerate import init_empty_weights

    cfg = FocusConfig.from_preset(preset)
    with init_empty_weights():
        pred, reg = SegmentationPredictor(cfg), RegionPromptEncoder(cfg)
    assert pred.seg_proj[0].in_features == cfg.llm.hidden_size
    assert reg.token.weight.shape == (cfg.segmentation.num_region_tokens, cfg.llm.hidden_size)


def test_expression_words_are_a_second_prompt_that_changes_the_mask(predictor):
    states, text = torch.randn(2, 3, D), torch.randn(2, D)
    a, pa = predictor(states, features(), image())
    b, pb = predictor(states, features(), image(), text_states=text)
    c, _ = predictor(states, features(), image(), text_states=text.flip(0))
    assert b.shape == a.shape == (2, 3, H, H) and pb.shape == (2, 3)
    assert not torch.allclose(a, b) and not torch.allclose(b, c)


def test_word_order_matters(predictor):
    """Learned word positions: "the circle left of the square" and "the square left of the
    circle" hold the same words and must be able to give different masks (a bag of words,
    pooled or attended without positions, cannot tell them apart)."""
    states, words = torch.randn(2, 1, D), torch.randn(2, 5, D)
    keep = torch.ones(2, 5, dtype=torch.bool)
    a, _ = predictor(states, features(), image(), text_states=words, text_mask=keep)
    b, _ = predictor(states, features(), image(), text_states=words.flip(1), text_mask=keep)
    assert not torch.allclose(a, b, atol=1e-4)
    bag = copy.deepcopy(predictor)
    bag.word_pos.weight.data.zero_()  # without positions the order is invisible
    a, pa = bag(states, features(), image(), text_states=words, text_mask=keep)
    b, pb = bag(states, features(), image(), text_states=words.flip(1), text_mask=keep)
    assert torch.allclose(a, b, atol=1e-4) and torch.allclose(pa, pb, atol=1e-4)


def test_per_word_states_steer_the_mask_and_padding_words_are_ignored(predictor):
    """Word-level prompts (CRIS / LAVT): (B, L, D) states + mask; a row padded with junk
    words (training batches are padded, inference is not) gives the same mask."""
    states, words = torch.randn(2, 2, D), torch.randn(2, 4, D)
    keep = torch.ones(2, 4, dtype=torch.bool)
    a, pa = predictor(states, features(), image(), text_states=words, text_mask=keep)
    b, _ = predictor(states, features(), image(), text_states=words.flip(1)[:, :2])
    assert a.shape == (2, 2, H, H) and pa.shape == (2, 2) and not torch.allclose(a, b, atol=1e-4)
    padded = torch.cat([words, 50 * torch.randn(2, 3, D)], 1)  # (2, 7, D): 3 junk words
    keep7 = torch.cat([keep, torch.zeros(2, 3, dtype=torch.bool)], 1)
    c, pc = predictor(states, features(), image(), text_states=padded, text_mask=keep7)
    assert torch.allclose(a, c, atol=1e-4) and torch.allclose(pa, pc, atol=1e-4)


def test_words_are_also_prompt_tokens_of_the_two_way_transformer():
    """segmentation.word_tokens: the first S prompt words join the two-way transformer's prompt
    tokens (a longer expression is cut there; PWAM and the pooled token still read it all).
    Built from one seed, a predictor with and without them shares every other weight, and
    without per-word states (only their mean) the two give the same mask."""
    S = CFG.segmentation.word_tokens
    assert S > 0
    on, off = _with_and_without("word_tokens")
    shared = off.state_dict()
    assert set(on.state_dict()) - set(shared) == {"word_pad", "word_type"}
    assert all(torch.equal(on.state_dict()[k], v) for k, v in shared.items())
    states, words = torch.randn(2, 1, D), torch.randn(2, S + 3, D)  # longer than the slots
    mean = words.mean(1)
    a, pa = off(states, features(), image(), text_states=mean)
    b, pb = on(states, features(), image(), text_states=mean)
    assert torch.equal(a, b) and torch.equal(pa, pb)
    a, _ = off(states, features(), image(), text_states=words)
    b, _ = on(states, features(), image(), text_states=words)
    assert b.shape == (2, 1, H, H) and not torch.allclose(a, b, atol=1e-4)
    cut = words.clone()
    cut[:, S:] = torch.randn(2, 3, D)  # words past the slots: read by PWAM / the mean only
    no_pwam = copy.deepcopy(on)
    for m in (no_pwam.word_fuse[-1], no_pwam.text_proj[-1]):
        m.weight.data.zero_()
        m.bias.data.zero_()
    c, _ = no_pwam(states, features(), image(), text_states=words)
    d, _ = no_pwam(states, features(), image(), text_states=cut)
    e, _ = no_pwam(states, features(), image(), text_states=words.flip(0))
    assert torch.allclose(c, d, atol=1e-5) and not torch.allclose(c, e, atol=1e-4)
