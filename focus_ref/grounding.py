"""Inference behind `FocusModel.segment` and `understand` (FOCUS, arXiv 2506.16806, §3.3;
LISA; SAM; UniPixel): what the `<seg>` token does once training is over.

    segment:    "<image> segment: the red circle" -> the LLM writes one `<seg>` per target;
                the hidden state that wrote each (LISA), plus the prompt's words, prompts the
                SegmentationPredictor -> a mask, or none where its presence logit says
                "empty" (GRES); SAM's loop feeds a click's or the words' mask back in as a
                mask prompt (`segmentation.refine`), and a click / scribble keeps what joins
                its points, a box what lies inside it
    understand: "<image> what color is the square?" -> with `grounded_answers` (UniPixel's
                mask-grounded answers) the LLM opens with `<seg>`, the predictor segments it,
                the mask's region tokens (or `empty`) follow, and the LLM reads them before
                it answers; a region prompt ("what is this?" at a click) becomes region
                tokens after the image's
Training of all of it: pretrain.py (stage 3).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from focus_ref.llm import IGNORE, REGION, SEG
from focus_ref.pretrain import (MAX_TARGETS, QUESTION, REGION_QUESTION, SEGMENT,
                                SEGMENT_REGION, word_prompts)
from focus_ref.segmentation import rasterize_prompt


@torch.no_grad()
def segment_masks(model, image: torch.Tensor, expression: str | None = None,
                  region: tuple | None = None, max_targets: int = MAX_TARGETS) -> torch.Tensor:
    """image (1, 3, H, W) in [-1, 1] + words or a (kind, value) region prompt -> boolean
    masks (K, H, W), one per `<seg>` the LLM writes whose presence score says "there";
    K = 0 is the "no target" answer. A prompt kind listed n times in segmentation.refine
    ("expression" for words) gets n more passes, each feeding the last mask back as a mask
    prompt (SAM's interactive loop): a click marks a point, words a guess; the first mask
    marks the object, and its region tokens say what it looks like. A box bounds its object,
    so with segmentation.clip_box nothing outside the box is kept."""
    out = model.encoder(image)  # tokens (1, N, D), features: encoded once for every pass
    masks, _ = segment_once(model, image, out, expression, region, max_targets)  # (K, H, W)
    kind, sc = "expression" if region is None else region[0], model.config.segmentation
    passes = sc.refine.count(kind)
    for k in range(len(masks)):
        for _ in range(passes):  # SAM's iterative refinement
            again, _ = segment_once(model, image, out, None, ("mask", masks[k].cpu().numpy()), 1)
            masks[k] = again[0] if len(again) else masks[k]  # an empty answer keeps the last
            if kind in sc.connected:  # the prompt's points lie on the object: what joins them
                masks[k] = connected_part(masks[k], region)
        if kind in sc.connected and not passes:
            masks[k] = connected_part(masks[k], region)
    if kind == "box" and sc.clip_box and len(masks):  # the box prompt bounds the object
        masks &= rasterize_prompt("box", region[1], masks.shape[-1]).bool().to(masks.device)
    return masks


def cleaned_up_by_segment(kind: str, sc) -> bool:
    """Whether segment_masks changes a `kind` prompt's first mask (refinement passes, the
    connectivity clean-up, the box clip), so that an edit by that prompt should use it."""
    return kind in sc.refine or kind in sc.connected or (kind == "box" and sc.clip_box)


def connected_part(mask: torch.Tensor, region: tuple) -> torch.Tensor:
    """What of a (H, W) mask joins a click's or scribble's points (all of it if nothing does)."""
    part = connected_to(mask, [region[1]] if region[0] == "click" else region[1])
    return part if part.any() else mask


def connected_to(mask: torch.Tensor, points: list) -> torch.Tensor:
    """The parts of a boolean (H, W) mask 8-connected to any of the (x, y) points: a flood
    fill by repeated 3 x 3 dilation inside the mask."""
    seed = torch.zeros_like(mask)
    for x, y in points:
        seed[y, x] = mask[y, x]
    while True:
        grown = F.max_pool2d(seed[None, None].float(), 3, 1, 1)[0, 0].bool() & mask  # (H, W)
        if torch.equal(grown, seed):
            return seed
        seed = grown


def region_inputs(model, image, out, region):
    """A (kind, value) region prompt -> its map (1, H, W), the decoder's dense prompt, and
    its region tokens (1, R, D) for the LLM (UniPixel); (None, None) without one."""
    if region is None:
        return None, None
    maps, kinds = model.region_encoder.rasterize([region], image.shape[-1])
    maps = maps.to(image)  # (1, H, W)
    return maps, model.region_encoder(out.features, maps, kinds.to(image.device))


def segment_once(model, image, out, expression, region, max_targets, threshold=None):
    """One pass: the LLM writes its <seg>s, the predictor their masks; a <seg> whose presence
    logit is not above `threshold` (default: the config's) gives none. Returns the kept masks
    (K', H, W) and their presence logits (K',)."""
    llm = model.llm
    rmaps, rtok = region_inputs(model, image, out, region)  # (1, H, W), (1, R, D) or None
    prompt = SEGMENT_REGION if region is not None else SEGMENT.format(expression)
    batch = {k: v.to(image.device) for k, v in llm.encode([prompt], padding_side="left").items()}
    gen = llm.generate(batch, image_tokens=out.tokens, region_tokens=rtok,
                       max_new_tokens=max_targets + 1, stop_after=(llm.seg_id, max_targets))
    pos = [t for t, i in enumerate(gen["ids"][0]) if i == llm.seg_id][:max_targets]
    if not pos:  # the LLM answered in words: "no target"
        none = torch.zeros(0, *image.shape[-2:], dtype=torch.bool, device=image.device)
        return none, torch.zeros(0, device=image.device)
    states = gen["hidden"][:, pos]  # (1, K, D): the state that wrote each <seg> (LISA)
    maps = None if rmaps is None else rmaps[:, None].expand(1, len(pos), -1, -1)  # (1, K, H, W)
    masks, presence = seg_predict(model, image, out, batch, rtok, states, maps, threshold)
    keep = masks.flatten(1).any(1)  # drop empty answers
    return masks[keep], presence[keep]  # (K', H, W), (K',)


def seg_predict(model, image, out, batch, rtok, states, maps=None, threshold=None):
    """The predictor's masks for the <seg> states (1, K, D) of a prompt `batch` (its words
    prompt the decoder too): masks (K, H, W), empty where the presence logit is not above
    `threshold` (default: the config's), and the presence logits (K,)."""
    llm = model.llm
    batch = {**batch, "labels": torch.full_like(batch["input_ids"], IGNORE)}  # the prompt only
    words, keep, mean = word_prompts(llm, llm.embed(batch["input_ids"], out.tokens, rtok),
                                     batch)  # (1, L, D), (1, L), (1, D)
    states = states + mean[:, None]  # (1, K, D) as in training
    logits, presence = model.segmentation(states, out.features, image, maps, text_states=words,
                                          text_mask=keep)  # (1, K, H, W), (1, K)
    thr = model.config.segmentation.presence_threshold if threshold is None else threshold
    return model.segmentation.to_masks(logits, presence, thr)[0], presence[0]  # (K, H, W), (K,)


@torch.no_grad()
def answer(model, image: torch.Tensor, question: str, region: tuple | None = None,
           max_new_tokens: int = 24) -> str:
    """image (1, 3, H, W) + a question [+ a (kind, value) region prompt the question is
    about, as region tokens after the image's] -> the LLM's greedy answer."""
    llm, out = model.llm, model.encoder(image)
    rtok = region_inputs(model, image, out, region)[1]  # "what is this?" about a click ...
    prompt = (QUESTION if region is None else REGION_QUESTION).format(question)
    batch = {k: v.to(image.device) for k, v in llm.encode([prompt], padding_side="left").items()}
    if region is None and model.config.segmentation.grounded_answers:
        return grounded_answer(model, image, out, prompt, batch, max_new_tokens)
    return llm.generate(batch, image_tokens=out.tokens, region_tokens=rtok,
                        max_new_tokens=max_new_tokens)["texts"][0]


def grounded_answer(model, image, out, prompt, batch, max_new_tokens):
    """UniPixel's mask-grounded answer: while the LLM opens its answer with `<seg>`, the
    predictor segments what that `<seg>` means, its mask becomes region tokens (or `empty`)
    after it, and the LLM goes on reading them; its first words are the answer."""
    llm, found, ids = model.llm, [], batch  # region tokens of each <seg> so far: [(1, T_r, D)]
    for _ in range(MAX_TARGETS + 1):
        gen = llm.generate(ids, image_tokens=out.tokens,
                           region_tokens=torch.cat(found) if found else None,
                           max_new_tokens=max_new_tokens, stop_after=(llm.seg_id, 1))
        if not gen["ids"][0] or gen["ids"][0][0] != llm.seg_id or len(found) == MAX_TARGETS:
            return gen["texts"][0].replace(SEG, "").strip()  # the answer in words
        mask, _ = seg_predict(model, image, out, batch, None, gen["hidden"][:, :1])  # (1, H, W)
        found.append(model.region_encoder.found(out.features, mask))  # (1, T_r, D)
        prompt += SEG + REGION  # the <seg> it wrote, then what it found
        ids = {k: v.to(image.device) for k, v in llm.encode([prompt], padding_side="left").items()}
    return ""
