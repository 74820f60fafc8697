"""Evaluation: the metrics of DESIGN §5, `evaluate_model`, and the GRES operating point.

FOCUS (arXiv 2506.16806, §4) reports referring segmentation in cIoU, generalised referring
(several targets or none, after InstanceVG / GRES) in gIoU, N-acc and T-acc, understanding
as answer accuracy, editing as success inside the region and preservation outside it, and
the visual tokenizer by reconstruction quality and codebook use. The definitions are fixed
here once, so every notebook, test and `python -m focus_ref eval` computes the same numbers.

Masks are boolean arrays: a stacked (N, H, W) array / tensor, or a list of (H, W) masks of
different sizes (real datasets). Images are float tensors (B, 3, H, W) in [-1, 1], so the
PSNR data range is 2. Everything is vectorised over pixels; the only Python loop is over
samples of different sizes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

# ----- segmentation: cIoU, gIoU ----------------------------------------------------------------


def _as_bool(mask) -> np.ndarray:
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    mask = np.asarray(mask)
    if mask.dtype != bool:
        mask = mask > 0.5  # probabilities or {0, 1} masks: threshold at one half
    return mask


def intersection_union(preds, targets) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample pixel counts |P_i ∩ G_i| and |P_i ∪ G_i|, each an int64 array (N,).

    `preds` / `targets`: (N, H, W) arrays or tensors, or equally long lists of (H, W) masks.
    Non-boolean masks are thresholded at 0.5.
    """
    if len(preds) != len(targets):
        raise ValueError(f"got {len(preds)} predicted masks but {len(targets)} targets: "
                         "pass one prediction per target")
    if isinstance(preds, (np.ndarray, torch.Tensor)) and isinstance(
            targets, (np.ndarray, torch.Tensor)):
        p, g = _as_bool(preds), _as_bool(targets)  # (N, H, W) each
        pairs = [(p, g)]
    else:
        pairs = [(_as_bool(p)[None], _as_bool(g)[None]) for p, g in zip(preds, targets)]
    inter, union = [], []
    for p, g in pairs:
        if p.shape != g.shape:
            raise ValueError(f"prediction of shape {p.shape[1:]} does not match its target "
                             f"{g.shape[1:]}: resize the predicted mask to the image size")
        p, g = p.reshape(len(p), -1), g.reshape(len(g), -1)  # (N, H*W)
        inter.append((p & g).sum(1))  # (N,)
        union.append((p | g).sum(1))  # (N,)
    if not inter:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(inter).astype(np.int64), np.concatenate(union).astype(np.int64)


def mask_iou(preds, targets) -> np.ndarray:
    """Per-sample IoU_i = |P_i ∩ G_i| / |P_i ∪ G_i|, float array (N,).

    An empty target with an empty prediction scores 1 (a correct "no target" answer);
    an empty target with any predicted pixel scores 0.
    """
    inter, union = intersection_union(preds, targets)
    return np.where(union == 0, 1.0, inter / np.maximum(union, 1))


def ciou(preds, targets) -> float:
    """Cumulative IoU over the split: cIoU = Σ_i |P_i ∩ G_i| / Σ_i |P_i ∪ G_i|.

    Large objects weigh more (the RefCOCO convention, LISA's "cIoU"). If every target and
    every prediction is empty the union is 0 and cIoU is defined as 1; NaN for an empty split.
    """
    inter, union = intersection_union(preds, targets)
    if len(union) == 0:
        return math.nan
    return 1.0 if union.sum() == 0 else float(inter.sum() / union.sum())


def giou(preds, targets) -> float:
    """Generalised IoU: the mean of per-sample IoU, gIoU = (1/N) Σ_i IoU_i.

    Empty target + empty prediction = 1 (LISA / InstanceVG), so a model that correctly
    answers "no target" is rewarded. NaN for an empty split.
    """
    iou = mask_iou(preds, targets)
    return float(iou.mean()) if len(iou) else math.nan


# ----- generalised referring (GRES): N-acc, T-acc ------------------------------------------------


def has_target(masks) -> np.ndarray:
    """Boolean (N,): whether each mask has at least one pixel (the "has target" decision)."""
    if isinstance(masks, (np.ndarray, torch.Tensor)):
        return _as_bool(masks).reshape(len(masks), -1).any(1)  # (N,)
    return np.array([_as_bool(m).any() for m in masks], dtype=bool)  # (N,)


def n_acc(pred_has, true_has) -> float:
    """N-acc = #(predicted "no target" and truly no target) / #(truly no target).

    `pred_has`, `true_has`: boolean (N,) "has target" flags (e.g. `has_target(masks)`).
    NaN when no sample lacks a target.
    """
    pred_has, true_has = np.asarray(pred_has, bool), np.asarray(true_has, bool)
    none = ~true_has
    return float((~pred_has & none).sum() / none.sum()) if none.any() else math.nan


def t_acc(pred_has, true_has) -> float:
    """T-acc = #(predicted "has target" and truly has one) / #(truly has a target).

    NaN when no sample has a target.
    """
    pred_has, true_has = np.asarray(pred_has, bool), np.asarray(true_has, bool)
    return float((pred_has & true_has).sum() / true_has.sum()) if true_has.any() else math.nan


def refseg_scores(preds, targets) -> dict[str, float]:
    """All segmentation metrics at once: cIoU, gIoU, N-acc, T-acc and the sample count."""
    pred_has, true_has = has_target(preds), has_target(targets)
    return {"ciou": ciou(preds, targets), "giou": giou(preds, targets),
            "n_acc": n_acc(pred_has, true_has), "t_acc": t_acc(pred_has, true_has),
            "n": len(targets)}


# ----- editing and reconstruction: PSNR and L1 inside / outside a region -------------------------


def _images_and_weights(pred, target, mask):
    """(B, C, H, W) float tensors + a (B, 1, H, W) 0/1 weight selecting the pixels to score."""
    pred, target = torch.as_tensor(pred).float(), torch.as_tensor(target).float()
    if pred.dim() == 3:
        pred, target = pred[None], target[None]  # (1, C, H, W)
    if pred.shape != target.shape or pred.dim() != 4:
        raise ValueError(f"images must both be (B, C, H, W) or (C, H, W) of the same shape, "
                         f"got {tuple(pred.shape)} and {tuple(target.shape)}")
    b, _, h, w = pred.shape
    if mask is None:
        weight = torch.ones(b, 1, h, w)  # the whole image
    else:
        weight = torch.as_tensor(_as_bool(mask)).float()
        if weight.dim() == 2:
            weight = weight.expand(b, h, w)  # one region for the whole batch
        if tuple(weight.shape) != (b, h, w):
            raise ValueError(f"mask of shape {tuple(weight.shape)} does not match images "
                             f"{tuple(pred.shape)}: pass (B, H, W) or (H, W)")
        weight = weight[:, None]  # (B, 1, H, W)
    return pred, target, weight.to(pred.device)


def psnr(pred, target, mask=None, data_range: float = 2.0, max_db: float = 100.0) -> torch.Tensor:
    """Per-image PSNR over the pixels of `mask` (all pixels if None), a tensor (B,).

    PSNR_i = 10 · log10(R² / MSE_i),  MSE_i = Σ_p m_ip ||x_ip - y_ip||² / (C · Σ_p m_ip),
    with R = data_range (2 for images in [-1, 1]). Identical pixels give `max_db` instead
    of infinity; an empty region gives NaN (nothing to score). Average over a split with
    `nanmean`.
    """
    pred, target, weight = _images_and_weights(pred, target, mask)
    sq = ((pred - target) ** 2 * weight).sum((1, 2, 3))  # (B,)
    count = weight.sum((1, 2, 3)) * pred.shape[1]  # (B,) scored values
    mse = sq / count.clamp(min=1)  # (B,)
    floor = data_range ** 2 / 10 ** (max_db / 10)  # the MSE at which PSNR = max_db
    out = 10 * torch.log10(data_range ** 2 / mse.clamp(min=floor))  # (B,)
    return torch.where(count > 0, out, torch.full_like(out, math.nan))


def l1(pred, target, mask=None) -> torch.Tensor:
    """Per-image mean absolute error over the pixels of `mask`, a tensor (B,).

    L1_i = Σ_p m_ip |x_ip - y_ip|₁ / (C · Σ_p m_ip); NaN for an empty region.
    """
    pred, target, weight = _images_and_weights(pred, target, mask)
    err = ((pred - target).abs() * weight).sum((1, 2, 3))  # (B,)
    count = weight.sum((1, 2, 3)) * pred.shape[1]  # (B,)
    return torch.where(count > 0, err / count.clamp(min=1), torch.full_like(err, math.nan))


def region_scores(pred, target, region) -> dict[str, float]:
    """PSNR and L1 inside and outside `region`, averaged over the batch (nanmean).

    For an edit, "outside" is background preservation (edit.bg_psnr); "inside" compares
    the edited region with the exact target of ShapesWorld.
    """
    inside = torch.as_tensor(_as_bool(region))
    outside = ~inside
    return {"psnr_in": float(psnr(pred, target, inside).nanmean()),
            "psnr_out": float(psnr(pred, target, outside).nanmean()),
            "l1_in": float(l1(pred, target, inside).nanmean()),
            "l1_out": float(l1(pred, target, outside).nanmean())}


# ----- understanding: answer accuracy ------------------------------------------------------------


def normalize_answer(text: str) -> str:
    """The comparison form of an answer: surrounding whitespace stripped, lower-cased."""
    return str(text).strip().lower()


def answer_accuracy(preds: Sequence[str], answers: Sequence[str]) -> float:
    """Exact-match accuracy = (1/N) Σ_i [norm(pred_i) == norm(answer_i)]; NaN if N = 0."""
    if len(preds) != len(answers):
        raise ValueError(f"got {len(preds)} predictions for {len(answers)} answers")
    if not answers:
        return math.nan
    return float(np.mean([normalize_answer(p) == normalize_answer(a)
                          for p, a in zip(preds, answers)]))


QUESTION_KINDS = {"how many": "count", "what color": "color", "what shape": "shape",
                  "is there": "exist", "where is": "where"}  # ShapesWorld's question openings


def question_kind(question: str) -> str:
    """The kind of a ShapesWorld question, from its opening words ("other" if none fits)."""
    q = normalize_answer(question)
    return next((kind for start, kind in QUESTION_KINDS.items() if q.startswith(start)), "other")


def blind_answers(qa: Sequence[tuple[str, str]]) -> dict[str, str]:
    """The most common answer of each question kind in (question, answer) pairs: the best a
    model that never looks at the image can do per kind (VQA's blind, language-only baseline)."""
    from collections import Counter

    counts: dict[str, Counter] = {}
    for q, a in qa:
        counts.setdefault(question_kind(q), Counter())[normalize_answer(a)] += 1
    return {kind: c.most_common(1)[0][0] for kind, c in counts.items()}


# ----- visual tokenizer: codebook usage and perplexity ------------------------------------------


def code_histogram(codes, codebook_size: int) -> torch.Tensor:
    """Counts of each code over all positions of `codes` (any shape of ints), (K,)."""
    codes = torch.as_tensor(codes).long().flatten()  # (N,)
    if codes.numel() and (codes.min() < 0 or codes.max() >= codebook_size):
        raise ValueError(f"codes must lie in [0, {codebook_size}), got range "
                         f"[{int(codes.min())}, {int(codes.max())}]: check codebook_size")
    return torch.bincount(codes, minlength=codebook_size)  # (K,)


def codebook_usage(codes, codebook_size: int) -> float:
    """Share of the codebook used: |{k : count_k > 0}| / K."""
    return float((code_histogram(codes, codebook_size) > 0).float().mean())


def codebook_perplexity(codes, codebook_size: int) -> float:
    """Perplexity of the empirical code distribution: exp(-Σ_k p_k log p_k).

    1 when a single code is used, K when all K codes are used equally often.
    """
    counts = code_histogram(codes, codebook_size).double()  # (K,)
    if counts.sum() == 0:
        return math.nan
    p = counts / counts.sum()  # (K,)
    entropy = -(p * torch.log(p.clamp(min=1e-300))).sum()  # 0 · log 0 = 0
    return float(torch.exp(entropy))


# ----- evaluation report ------------------------------------------------------------------------
# The report over a checkpoint (`python -m focus_ref eval`, DESIGN §6 flat keys) builds on the
# metrics above; it lives below this line.


def _union(masks, shape) -> np.ndarray:
    """segment() output (K, H, W) or (H, W) -> one (H, W) mask: the union of its objects."""
    m = np.asarray(masks, bool)
    return m.reshape(-1, *shape).any(0) if m.size else np.zeros(shape, bool)


def evaluate_model(model, split: str = "val", n: int = 200, progress: bool = True,
                   tasks: Sequence[str] = ("refseg", "region", "vqa", "tokenizer", "edit", "gen"),
                   ) -> dict[str, float]:
    """Every DESIGN §5 metric of a FocusModel on n held-out ShapesWorld scenes, as flat keys.

    Calls only the public methods (segment / understand / edit / generate), so what is
    measured is what a user gets. Edits and generation use min(n, 100) and min(n, 50) scenes
    (they are the slow calls). `vqa.blind_acc` answers every question with its kind's most
    common answer on n train scenes: what reading the image adds is the distance to it.
    `vqa.what.acc`: "what is this?" about the region-prompt object, by each prompt kind,
    answered "<color> <shape>" (not in vqa.acc).
    """
    from tqdm import tqdm

    from focus_ref import oracle
    from focus_ref.data import image_to_tensor
    from focus_ref.pretrain import what_answer
    from focus_ref.segmentation import PROMPT_KINDS
    from focus_ref.shapesworld import ShapesWorld

    world = ShapesWorld(model.config.data, split)
    samples = [world.sample(i) for i in range(n)]
    shape = samples[0]["inst"].shape
    out: dict[str, float] = {"n_scenes": n}
    bar = (lambda it, d: tqdm(it, desc=d, leave=False)) if progress else (lambda it, d: it)
    if "refseg" in tasks:  # words -> masks; several / no target included (GRES)
        preds, targets = [], []
        for s in bar(samples, "refseg"):
            for r in s["refs"]:
                preds.append(_union(model.segment(s["image"], expression=r["text"]), shape))
                targets.append(np.isin(s["inst"], r["targets"]))
        preds, targets = np.stack(preds), np.stack(targets)
        has = has_target(targets)  # refseg.*: expressions with a target (RefCOCO convention)
        sc, g = refseg_scores(preds[has], targets[has]), refseg_scores(preds, targets)
        out.update({"refseg.ciou": sc["ciou"], "refseg.giou": sc["giou"], "refseg.n": sc["n"],
                    "gres.ciou": g["ciou"], "gres.giou": g["giou"], "gres.n_acc": g["n_acc"],
                    "gres.t_acc": g["t_acc"], "gres.n": g["n"]})
    if "region" in tasks:  # click / box / scribble / mask -> mask, one object per scene
        ious: dict[str, list] = {k: [] for k in PROMPT_KINDS}
        for s in bar(samples, "region"):
            k = s["index"] % len(s["prompts"])
            for kind in ious:
                pred = _union(model.segment(s["image"], **{kind: s["prompts"][k][kind]}), shape)
                ious[kind].append(float(mask_iou(pred[None], (s["inst"] == k)[None])[0]))
        for kind, v in ious.items():
            out[f"region.{kind}.miou"] = float(np.mean(v))
        out["region.miou"] = float(np.mean([np.mean(v) for v in ious.values()]))
    if "vqa" in tasks:
        qa = [(s, q, a) for s in samples for q, a in s["qa"]]
        preds = [model.understand(s["image"], q) for s, q, _ in bar(qa, "vqa")]
        answers, kinds = [a for *_, a in qa], [question_kind(q) for _, q, _ in qa]
        out.update({"vqa.acc": answer_accuracy(preds, answers), "vqa.n": len(qa)})
        for kind in sorted(set(kinds)):  # per kind: count, color, shape, exist, where
            i = [j for j, k in enumerate(kinds) if k == kind]
            out[f"vqa.{kind}.acc"] = answer_accuracy([preds[j] for j in i], [answers[j] for j in i])
        what = [(model.understand(s["image"], "what is this?", {kind: s["prompts"][k][kind]}),
                 what_answer(s["scene"].objects[k]))  # the answer stage 3 trains
                for s in bar(samples, "what") for k in [s["index"] % len(s["prompts"])]
                for kind in PROMPT_KINDS]  # a region, no words (UniPixel)
        out.update({"vqa.what.acc": answer_accuracy(*zip(*what)), "vqa.what.n": len(what)})
        train = ShapesWorld(model.config.data, "train")  # blind baseline: each kind's most
        blind = blind_answers([x for i in range(n) for x in train.sample(i)["qa"]])  # common
        out["vqa.blind_acc"] = answer_accuracy([blind.get(k, "") for k in kinds], answers)
    if "tokenizer" in tasks:
        tok = model.visual_tokenizer
        x = torch.stack([image_to_tensor(s["image"]) for s in samples]).to(model.device)
        with torch.no_grad():
            codes = torch.cat([tok.encode(x[i:i + 64]) for i in range(0, len(x), 64)])
            rec = torch.cat([tok.decode(codes[i:i + 64]) for i in range(0, len(x), 64)])
        out["tokenizer.psnr"] = float(psnr(rec.clamp(-1, 1), x).mean())
        out["tokenizer.code_usage"] = codebook_usage(codes, model.config.tokenizer.num_vq_embeddings)
    if "edit" in tasks:
        judged = [oracle.judge_edit(np.asarray(model.edit(s["image"], s["edit"]["instruction"])),
                                    s["edit"]) for s in bar(samples[:100], "edit")]
        out.update({"edit.success": float(np.mean([j["success"] for j in judged])),
                    "edit.bg_psnr": float(np.mean([min(j["bg_psnr"], 100.0) for j in judged])),
                    "edit.n": len(judged)})
    if "gen" in tasks:
        accs = [oracle.attribute_accuracy(np.asarray(model.generate(s["caption"], seed=i)),
                                          s["scene"]) for i, s in enumerate(bar(samples[:50], "gen"))]
        out.update({"gen.attr_acc": float(np.mean(accs)), "gen.n": len(accs)})
    return out


# ----- the GRES operating point, chosen on dev scenes ---------------------------------------
@torch.no_grad()
def calibrate_presence(model, n: int = 300, progress: bool = True) -> dict[str, float]:
    """Set the presence threshold (a logit) above which a `<seg>` counts as "there": the one
    that makes GRES's N-acc and T-acc as high as they can be together (the largest minimum
    of the two; ties: the larger mean) on the expressions of n scenes of split "dev" (never
    trained on, never reported). The presence head learns its scores from ~one absent
    expression in eight, so 0 (probability one half) need not be where the two accuracies
    balance. Sets model.config.segmentation.presence_threshold; returns what dev measured."""
    from tqdm import tqdm

    from focus_ref.data import image_to_tensor
    from focus_ref.grounding import MAX_TARGETS, segment_once
    from focus_ref.shapesworld import ShapesWorld

    world, model = ShapesWorld(model.config.data, "dev"), model.eval()
    scores, truth = [], []  # per expression: its best <seg>'s presence logit; has a target
    for i in tqdm(range(n), desc="calibrate", leave=False, disable=not progress):
        s = world.sample(i)
        x = image_to_tensor(s["image"])[None].to(model.device)  # (1, 3, H, W)
        out = model.encoder(x)
        for r in s["refs"]:
            _, p = segment_once(model, x, out, r["text"], None, MAX_TARGETS, -math.inf)
            scores.append(p.max().item() if len(p) else -math.inf)  # no <seg>: "no target"
            truth.append(len(r["targets"]) > 0)
    res = operating_point(np.array(scores), np.array(truth))
    model.config.segmentation.presence_threshold = res["threshold"]
    return res


def operating_point(scores, true_has, grid=None) -> dict[str, float]:
    """The threshold t of `grid` (default -4 to 8 in steps of 1/4) whose decisions
    `scores > t` give the largest min(N-acc, T-acc) (ties: the larger sum); scores (N,),
    -inf for "no <seg> at all"."""
    best, scores = None, np.asarray(scores)
    for t in np.arange(-4.0, 8.01, 0.25) if grid is None else grid:
        has = scores > t
        na, ta = n_acc(has, true_has), t_acc(has, true_has)
        if best is None or (min(na, ta), na + ta) > best[0]:
            best = ((min(na, ta), na + ta), {"threshold": float(t), "n_acc": na, "t_acc": ta})
    return {**best[1], "n": len(scores)}
