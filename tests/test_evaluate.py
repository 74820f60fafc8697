"""Metrics of DESIGN §5 on hand-computed cases, and parity with the reference libraries."""

import math

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from focus_ref import evaluate as ev


def _four_cases():
    """4 x 4 masks whose scores are worked out by hand in the tests below."""
    p = np.zeros((4, 4, 4), bool)
    g = np.zeros((4, 4, 4), bool)
    p[0, 0, 0:2] = True  # 2 px
    g[0, 0, 1:3] = True  # 2 px, overlap 1 -> inter 1, union 3, IoU 1/3
    p[1, 1:3, 1:3] = True
    g[1, 1:3, 1:3] = True  # identical 4 px -> inter 4, union 4, IoU 1
    # case 2: both empty -> IoU 1 (a correct "no target")
    p[3, 2, 2] = True  # case 3: target empty, one predicted pixel -> IoU 0
    return p, g


def test_iou_ciou_giou_by_hand():
    p, g = _four_cases()
    inter, union = ev.intersection_union(p, g)
    assert inter.tolist() == [1, 4, 0, 0] and union.tolist() == [3, 4, 0, 1]
    np.testing.assert_allclose(ev.mask_iou(p, g), [1 / 3, 1, 1, 0])
    assert ev.ciou(p, g) == pytest.approx(5 / 8)  # (1 + 4) / (3 + 4 + 1)
    assert ev.giou(p, g) == pytest.approx((1 / 3 + 1 + 1 + 0) / 4)
    assert ev.ciou(p[2:3], g[2:3]) == 1.0  # only a correct "no target": nothing to miss
    assert math.isnan(ev.ciou([], [])) and math.isnan(ev.giou([], []))


def test_lists_of_different_sizes_and_tensors_agree():
    p, g = _four_cases()
    pl = [np.pad(m, ((0, i), (0, 2 * i))) for i, m in enumerate(p)]  # (4+i, 4+2i)
    gl = [np.pad(m, ((0, i), (0, 2 * i))) for i, m in enumerate(g)]
    assert ev.ciou(pl, gl) == pytest.approx(5 / 8)
    assert ev.giou(pl, gl) == pytest.approx(7 / 12)
    probs = torch.from_numpy(p).float() * 0.9  # probabilities are thresholded at 0.5
    assert ev.ciou(probs, torch.from_numpy(g)) == pytest.approx(5 / 8)


def test_gres_n_acc_t_acc_by_hand():
    p, g = _four_cases()
    pred_has, true_has = ev.has_target(p), ev.has_target(g)
    assert pred_has.tolist() == [True, True, False, True]
    assert true_has.tolist() == [True, True, False, False]
    assert ev.n_acc(pred_has, true_has) == pytest.approx(1 / 2)  # case 2 right, case 3 wrong
    assert ev.t_acc(pred_has, true_has) == pytest.approx(1.0)
    assert ev.t_acc([False, True, True], [True, True, False]) == pytest.approx(1 / 2)
    assert math.isnan(ev.n_acc([True], [True]))  # no sample without a target
    s = ev.refseg_scores(p, g)
    assert s["n"] == 4 and s["ciou"] == pytest.approx(5 / 8) and s["n_acc"] == 0.5


def test_operating_point_balances_n_acc_and_t_acc_by_hand():
    # presence scores of 4 expressions without a target and 4 with one (-inf: no <seg>)
    scores = [-math.inf, 0.1, 0.6, 1.2, 0.4, 1.5, 2.0, 3.0]
    truth = [False] * 4 + [True] * 4
    op = ev.operating_point(scores, truth, grid=np.arange(0.0, 3.0, 0.5))
    # t = 0.5: N 2/4, T 3/4; t = 1.0: N 3/4, T 3/4 (the best minimum); t = 1.5: N 1, T 2/4
    assert op == {"threshold": 1.0, "n_acc": 0.75, "t_acc": 0.75, "n": 8}


def test_iou_matches_pycocotools_on_rle():
    rng = np.random.default_rng(0)
    p = rng.random((6, 23, 17)) < 0.4
    g = rng.random((6, 23, 17)) < 0.3
    p[2] = g[2]  # one perfect prediction

    def rle(m):
        return mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))

    ref = np.array([mask_utils.iou([rle(a)], [rle(b)], [0])[0, 0] for a, b in zip(p, g)])
    np.testing.assert_allclose(ev.mask_iou(p, g), ref, rtol=1e-12)
    inter = sum(mask_utils.area(rle(a & b)) for a, b in zip(p, g))
    union = sum(mask_utils.area(rle(a | b)) for a, b in zip(p, g))
    assert ev.ciou(p, g) == pytest.approx(inter / union)


def test_shape_mismatch_is_one_clear_error():
    with pytest.raises(ValueError, match="resize the predicted mask"):
        ev.ciou([np.zeros((4, 4), bool)], [np.zeros((4, 5), bool)])
    with pytest.raises(ValueError, match="one prediction per target"):
        ev.giou(np.zeros((2, 4, 4), bool), np.zeros((3, 4, 4), bool))


def test_psnr_and_l1_by_hand():
    x = torch.zeros(1, 3, 4, 4)
    y = torch.full((1, 3, 4, 4), 0.5)
    assert ev.psnr(x, y).item() == pytest.approx(10 * math.log10(4 / 0.25))  # 12.04 dB
    region = torch.zeros(4, 4, dtype=torch.bool)
    region[:2] = True
    y = x.clone()
    y[..., :2, :] = 1.0  # differs by 1 inside the region only
    assert ev.psnr(x, y, region).item() == pytest.approx(10 * math.log10(4))  # 6.02 dB
    assert ev.psnr(x, y, ~region).item() == pytest.approx(100.0)  # untouched: capped
    assert ev.l1(x, y, region).item() == pytest.approx(1.0)
    assert ev.l1(x, y, ~region).item() == 0.0
    assert math.isnan(ev.psnr(x, y, torch.zeros(4, 4, dtype=torch.bool)).item())
    s = ev.region_scores(x, y, region)
    assert s["psnr_out"] == pytest.approx(100.0) and s["l1_in"] == pytest.approx(1.0)


def test_psnr_matches_direct_formula():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 8, 9, generator=g) * 2 - 1
    y = (x + 0.1 * torch.randn(3, 3, 8, 9, generator=g)).clamp(-1, 1)
    m = torch.rand(3, 8, 9, generator=g) < 0.5
    a, b, mm = x.numpy().astype(np.float64), y.numpy().astype(np.float64), m.numpy()
    for i in range(3):
        full = 10 * np.log10(4 / np.mean((a[i] - b[i]) ** 2))
        inside = 10 * np.log10(4 / np.mean((a[i][:, mm[i]] - b[i][:, mm[i]]) ** 2))
        assert ev.psnr(x, y)[i].item() == pytest.approx(full, rel=1e-5)
        assert ev.psnr(x, y, m)[i].item() == pytest.approx(inside, rel=1e-5)
        assert ev.l1(x, y, m)[i].item() == pytest.approx(
            np.abs(a[i][:, mm[i]] - b[i][:, mm[i]]).mean(), rel=1e-5)
    with pytest.raises(ValueError, match="same shape"):
        ev.psnr(x, y[:, :, :4])


def test_answer_accuracy_normalises():
    assert ev.answer_accuracy([" Red", "3 ", "yes"], ["red", "3", "no"]) == pytest.approx(2 / 3)
    assert ev.answer_accuracy(["LEFT"], ["left"]) == 1.0
    assert math.isnan(ev.answer_accuracy([], []))
    with pytest.raises(ValueError):
        ev.answer_accuracy(["a"], [])


def test_codebook_usage_and_perplexity_by_hand():
    assert ev.codebook_usage([0, 0, 1, 1], 4) == 0.5
    assert ev.codebook_perplexity([0, 0, 1, 1], 4) == pytest.approx(2.0)
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert ev.codebook_perplexity(torch.tensor([[0, 0], [0, 1]]), 4) == pytest.approx(math.exp(h))
    assert ev.codebook_perplexity([3] * 10, 4) == pytest.approx(1.0)
    assert ev.codebook_perplexity(torch.arange(8).repeat(5), 8) == pytest.approx(8.0)
    assert ev.codebook_usage(torch.arange(8), 8) == 1.0
    with pytest.raises(ValueError, match="codebook_size"):
        ev.codebook_usage([0, 4], 4)


def test_every_shapesworld_question_has_a_kind_and_the_blind_answer_is_the_commonest():
    from focus_ref.config import FocusConfig
    from focus_ref.shapesworld import ShapesWorld

    w = ShapesWorld(FocusConfig.tiny().data, "train")
    qa = [x for i in range(40) for x in w.sample(i)["qa"]]
    kinds = {ev.question_kind(q) for q, _ in qa}
    assert kinds == {"count", "color", "shape", "exist", "where"}  # a new template needs a kind
    assert ev.question_kind("Why is the sky blue?") == "other"
    blind = ev.blind_answers([("is there a red circle?", "no"), ("Is there a blue square?", "No "),
                              ("is there a green star?", "yes"), ("how many objects are there?", "3"),
                              ("what color is the circle?", "red")])
    assert blind == {"exist": "no", "count": "3", "color": "red"}
