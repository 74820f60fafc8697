"""Stage 3: multimodal pretraining with segmentation-aware alignment (FOCUS, arXiv 2506.16806,
§3.5 stage 3, Fig. 2). The inference behind `FocusModel.segment` / `understand`: grounding.py.

What the paper says: after the adapters are warmed up (stage 2), the LLM is unfrozen and
trained on a mix of understanding and grounding tasks at once, so that its hidden states carry
*where* things are as well as *what* they are: captions, visual questions, referring
segmentation (one `<seg>` per target; several targets or none, gRefCOCO / GRES), interactive
region prompts (a click / box / scribble / mask becomes region tokens, UniPixel) and the
prediction of the image's own visual tokens (Janus / ILLUME+). Losses: text cross-entropy,
mask BCE + Dice, visual-token cross-entropy, weighted by cfg.train.w_*.

The task mix, one ShapesWorld sample -> one example (prompt -> answer):
    refseg   "<image> segment: the red circle"        -> "<seg>" (one per target, left to
             right); no target -> one "<seg>" whose presence label is 0 (GRES: "empty")
    region   "<image> <region> segment this"          -> "<seg>"   (+ the prompt as SAM's
             dense prompt of the mask decoder)
    what     "<image> <region> what is this?"         -> "red circle"
    vqa      "<image> how many circles are there?"    -> "2"; with grounded_answers (UniPixel's
             mask-grounded answers, `grounded`) "<image> what color is the square?" ->
             "<seg><region> red": the square's <seg>, then its mask's region tokens
    caption  "<image>"                                -> the caption (as stage 2)
    visual   "generate: <caption>"                    -> <boi> s_1 .. s_N <eoi>, the image's
             N semantic codes (the tokenizer's semantic branch; editing.SemanticHead)
The `<seg>` state is the hidden state one position *before* each `<seg>` (LISA); with the
prompt's words (`word_prompts`: each word's LLM input embedding, word-level features as in
CRIS / LAVT, and their mean added to every `<seg>` state) it prompts the
SegmentationPredictor, which returns a full-resolution mask and a presence score. Why the
embeddings (measured, issue #5): this tiny LLM's last-layer states of different expressions
nearly coincide (mean cosine 0.98), so alone they barely say which object; with them as the
prompt, held-out referring cIoU after stage 3 was 0.22, with the embeddings 0.45. The mask
decoder arrives from stage 0d (`standins.stage0_seg`, SAM's part in LISA) already segmenting
one named or pointed-at object; here it learns to read the `<seg>` state. The ConvNeXt
branch trains too (segmentation-aware alignment of the features the predictor reads); the ViT
and the tokenizer stay frozen, so the semantic codes keep their meaning for stage 4.
Why "no target" is the predictor's call and not the LLM's words (measured, issue #5): with
absent objects worded as present ones are ("the triangle", "the red object"), the LLM, which
does not yet ground its words in the image at this scale (VQA at chance), answered "no target"
to 39% of expressions that had one (T-acc 0.61, refseg cIoU 0.19); the presence head reads the
image and the words.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from focus_ref.config import FocusConfig
from focus_ref.editing import GENERATE, SLOT
from focus_ref.llm import IGNORE, REGION, SEG, next_token_loss
from focus_ref.segmentation import PROMPT_KINDS
from focus_ref.train import Stage, _train_only, fit, pooled

SEGMENT, SEGMENT_REGION = "<image> segment: {}", "<image> <region> segment this"
MAX_TARGETS = 8  # <seg>s one expression may get at inference
QUESTION, REGION_QUESTION, CAPTION = "<image> {}", "<image> <region> {}", "<image>"
WHAT = REGION_QUESTION.format("what is this?")  # UniPixel: a region, asked about without words
TASK_SHARES = {"refseg": 0.4, "region": 0.12, "what": 0.12, "vqa": 0.28, "caption": 0.03,
               "visual": 0.05}  # the stage-3 task mix (shares of a batch, in expectation).
#   The mix before (refseg 0.6 / region 0.15 / what 0.05 / vqa 0.12) gave "what is this?" ~750
#   rows and it read 0.11; 200 steps of 32 of its rows alone took it to 0.91. With grounded
#   answers, from one stage-2 snapshot (50 dev scenes): this mix VQA 0.62, "what" 0.86; the mix
#   before 0.45, 0.09 (lab notes, session 28); the main job with it: 0.68, 0.91 (200 val)
GROUNDED_COUNTS = False  # grounded_answers: a count as "<seg><region>" per match + a <seg> that
#   finds nothing. Stage 3 from one stage-2 snapshot (50 dev scenes): with it refseg cIoU
#   0.505, T-acc 0.85; counts in words 0.548, 0.93 (count 0.56 both): the last <seg>s, their
#   words naming present objects, teach the decoder that those may get an empty mask
PARTIAL_MASK = 0.0  # share of training mask prompts cut to a part of the object (a first guess
#   to complete: what segment()'s second pass feeds back). 0 -> 0.5, held out: stages 0d + 3
#   from one stage-2 checkpoint (100 scenes) refseg cIoU 0.627 -> 0.646, region mIoU 0.867 ->
#   0.880; but the whole main job (200 scenes) 0.625 -> 0.629 and 0.837 -> 0.839, within one
#   run's noise. Off, so the shipped checkpoint is what the code trains.


# ----- examples ----------------------------------------------------------------------------
def target_masks(inst: np.ndarray, targets: list[int]) -> list[np.ndarray]:
    """One visible mask per target, left to right (the order the `<seg>`s are written in);
    a fully hidden target has no pixels and gets no `<seg>`."""
    masks = [inst == k for k in targets if (inst == k).any()]
    return sorted(masks, key=lambda m: (np.nonzero(m)[1].mean(), np.nonzero(m)[0].mean()))


def partial_mask(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The part of an object's mask within 2-10 px of one of its pixels: what a first guess
    from a click or words often is (a blob around a point)."""
    ys, xs = np.nonzero(mask)
    i, r = int(rng.integers(len(ys))), rng.uniform(2, 10)
    yy, xx = np.mgrid[:mask.shape[0], :mask.shape[1]]
    return mask & ((yy - ys[i]) ** 2 + (xx - xs[i]) ** 2 <= r * r)


def what_answer(obj) -> str:
    """The answer to "what is this?" about a ShapesWorld object: "<color> <shape>"."""
    return f"{obj.color} {obj.shape}"


def grounded(sample: dict, question: str, answer: str) -> dict:
    """A mask-grounded answer (UniPixel's PixelQA): a "<seg><region>" for each object the
    question is about, then the answer. Colour / shape: the object; "where": the object, then
    the reference; existence: the first match, or one `<seg>` that finds nothing (presence 0,
    its <region> = RegionPromptEncoder.empty) for "no"; a count: every match left to right, then
    one that finds nothing (the count is the `<seg>`s before it: the predictor, which sees the
    image, says when the objects run out). Teacher forcing fills each <region> with the tokens
    of the object's true mask. Counts only with GROUNDED_COUNTS, else in words."""
    from focus_ref.scenegraph import question_objects

    ks, kind = question_objects(sample["scene"], question), question.split()[0]
    if kind == "how" and not GROUNDED_COUNTS:
        return {"prompt": QUESTION.format(question), "answer": answer}
    masks = [sample["inst"] == k for k in ks] if kind == "where" else \
        target_masks(sample["inst"], ks)[:1 if kind in ("what", "is") else None]
    present = [True] * len(masks) + [False] * (kind == "how" or not masks)  # one per <seg>
    empty = np.zeros_like(sample["inst"], dtype=bool)
    return {"prompt": QUESTION.format(question), "masks": masks, "present": present,
            "found": masks + [empty] * (len(present) - len(masks)),
            "answer": (SEG + REGION) * len(present) + " " + answer}


def make_example(sample: dict, rng: np.random.Generator, task: str | None = None,
                 grounded_answers: bool = False) -> dict:
    """One stage-3 example of `task` (drawn from TASK_SHARES when None) from a sample;
    `grounded_answers`: questions are answered through their objects' masks (`grounded`)."""
    if task is None:
        task = str(rng.choice(list(TASK_SHARES), p=list(TASK_SHARES.values())))
    ex = {"task": task, "image": sample["image"], "region": None, "masks": [], "found": [],
          "present": []}  # present: one flag per <seg> of the answer, False = finds nothing
    objs = [k for k in range(len(sample["prompts"])) if (sample["inst"] == k).any()]
    if task in ("region", "what") and objs:
        k, kind = objs[int(rng.integers(len(objs)))], PROMPT_KINDS[int(rng.integers(4))]
        o, value = sample["scene"].objects[k], sample["prompts"][k][kind]
        if kind == "mask" and task == "region" and PARTIAL_MASK and rng.random() < PARTIAL_MASK:
            value = partial_mask(value, rng)
        return {**ex, "region": (kind, value),
                "prompt": SEGMENT_REGION if task == "region" else WHAT,
                "answer": SEG if task == "region" else what_answer(o),
                "masks": [sample["inst"] == k] if task == "region" else [],
                "present": [True] if task == "region" else []}
    if task == "vqa":
        q, a = sample["qa"][int(rng.integers(len(sample["qa"])))]
        if grounded_answers:
            return {**ex, **grounded(sample, q, a)}
        return {**ex, "prompt": QUESTION.format(q), "answer": a}
    if task == "caption":
        return {**ex, "prompt": CAPTION, "answer": sample["caption"]}
    if task == "visual":
        return {**ex, "prompt": GENERATE.format(sample["caption"]), "answer": None}
    r = sample["refs"][int(rng.integers(len(sample["refs"])))]  # refseg (also the fallback)
    masks = target_masks(sample["inst"], r["targets"])
    return {**ex, "task": "refseg", "prompt": SEGMENT.format(r["text"]), "masks": masks,
            "answer": SEG * max(len(masks), 1),  # no target: one <seg>, presence 0 (GRES)
            "present": [True] * len(masks) or [False]}


def collate(examples: list[dict], model) -> dict:
    """Examples -> token ids and labels, images, region prompts and the flat list of target
    masks, one per `<seg>` in reading order (the order of `FocusLLM.seg_hidden`); grounded
    answers' masks (`found`, zeros: nothing) fill the <region>s of the answers, not predicted."""
    from focus_ref.data import image_to_tensor

    llm, head = model.llm, model.semantic_head
    batch = llm.encode([x["prompt"] for x in examples],
                       [x["answer"] if x["answer"] is not None else head.slots()
                        for x in examples])  # (B, T) ids, mask, labels
    reg = [x["region"] for x in examples if x["region"] is not None]
    maps, kinds = model.region_encoder.rasterize(reg) if reg else (None, None)
    batch["labels"][batch["input_ids"] == llm.region_id] = IGNORE  # region tokens are given
    masks = [torch.from_numpy(m) for x in examples for m in x["masks"]]
    found = [(b, torch.from_numpy(m)) for b, x in enumerate(examples) for m in x["found"]]
    H = examples[0]["image"].shape[0]
    return {**batch, "image": torch.stack([image_to_tensor(x["image"]) for x in examples]),
            "masks": torch.stack(masks) if masks else torch.zeros(0, H, H, dtype=torch.bool),
            "has_image": torch.tensor([x["task"] != "visual" for x in examples]),
            "visual": torch.tensor([x["task"] == "visual" for x in examples]),
            "no_target": torch.tensor([bool(x["present"]) and not any(x["present"])
                                       for x in examples]),  # (B,) its <seg>s find nothing
            "seg_present": torch.tensor([p for x in examples for p in x["present"]],
                                        dtype=torch.bool),  # (S,) in reading order
            "region_rows": torch.tensor([x["region"] is not None for x in examples]),
            "region_maps": maps, "region_kinds": kinds,  # (S, H, W) masks, (B,) flags
            "found_rows": torch.tensor([b for b, _ in found], dtype=torch.long),  # (F,)
            "found_maps": torch.stack([m for _, m in found]) if found else None}  # (F, H, W)


# ----- the loss ------------------------------------------------------------------------------
def _words(llm, batch: dict) -> torch.Tensor:
    """(B, T) True at each row's prompt words (not image / region placeholders, not the
    opening <eos>, not the answer, not padding)."""
    ids = batch["input_ids"]
    return batch["attention_mask"].bool() & (batch["labels"] == IGNORE) & (
        ids != llm.image_id) & (ids != llm.region_id) & (ids != llm.tokenizer.eos_token_id)


def word_prompts(llm, emb: torch.Tensor, batch: dict):
    """The expression as the mask decoder reads it: each prompt word's LLM input embedding,
    packed (B, L, D) with mask (B, L), and their mean (B, D), which is added to every `<seg>`
    state of the row (the `<seg>` state says which target, in reading order; the words say
    what is named)."""
    words, keep = word_tokens(llm, emb, batch)  # (B, L, D), (B, L)
    k = keep[..., None].to(words.dtype)  # (B, L, 1)
    return words, keep, (words * k).sum(1) / k.sum(1).clamp_min(1)  # ..., (B, D)


def word_tokens(llm, hidden: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's prompt-word states, packed to the front (word-level features, CRIS / LAVT:
    a mean loses which word says colour, shape or "left of"): (B, T, D) -> states (B, L, D),
    mask (B, L) with L the most words in a row; the same for left or right padding."""
    words = _words(llm, batch)  # (B, T)
    L = max(int(words.sum(1).max()), 1)
    order = torch.argsort((~words).int(), dim=1, stable=True)[:, :L]  # (B, L) words first
    states = hidden.gather(1, order[..., None].expand(-1, -1, hidden.shape[-1]))  # (B, L, D)
    return states, words.gather(1, order)  # (B, L, D), (B, L)


def stage3_loss(model, batch: dict, cfg: FocusConfig) -> tuple[torch.Tensor, dict]:
    """Text CE + visual-token CE + (mask BCE + Dice + presence BCE) on the `<seg>` states."""
    enc, llm, head, t = model.encoder, model.llm, model.semantic_head, cfg.train
    ids, vis = batch["input_ids"], batch["visual"]
    out = enc(batch["image"])  # tokens (B, N, D), features [(B, C_i, H_i, W_i)]
    with torch.no_grad():  # the frozen ViT's tokens + semantic codebook: visual-token targets
        codes = model.visual_tokenizer.encode_semantic(out.global_feats[vis]) if vis.any() \
            else ids.new_zeros(0, head.num_tokens)  # (V, N)
    emb = input_embeddings(model, batch, out)  # (B, T, D)
    slots = ids == llm.tokenizer.convert_tokens_to_ids(SLOT)  # (B, T) code positions
    emb = emb.masked_scatter(slots[..., None], head.embed(codes))  # Janus gen_embed
    hidden = llm.model.model(inputs_embeds=emb, attention_mask=batch["attention_mask"]
                             ).last_hidden_state  # (B, T, D)
    text, acc = next_token_loss(llm.model.lm_head(hidden), batch["labels"].masked_fill(
        slots, IGNORE))  # the codes are scored by the semantic head below
    loss, logs = t.w_text * text, {"text": text.item(), "acc": acc}
    if vis.any():  # visual-token prediction: the state one before each slot predicts it
        prev = F.pad(slots[:, 1:], (0, 1))  # (B, T)
        sem = F.cross_entropy(head.head(hidden[prev]), codes.flatten())
        loss, logs = loss + t.w_visual * sem, {**logs, "visual": sem.item()}
    # segmentation-aware alignment: every <seg> state -> its target's mask (LISA); the <seg>
    # of a no-target expression -> presence 0 (GRES: the predictor, which sees the image,
    # says "empty")
    states, b = llm.seg_hidden(hidden, ids)  # (S, D), (S,) in row and reading order
    if len(b) == 0:
        return loss, logs
    present = batch["seg_present"].to(b.device)  # (S,) False: this <seg> finds nothing
    words, keep, mean = word_prompts(llm, emb, batch)  # (B, L, D), (B, L), (B, D) the words
    seg, seg_logs = seg_loss(model, cfg, batch, out.features, states + mean[b], b, present,
                             words, keep)  # each <seg> state + what its expression names
    return loss + seg, {**logs, **seg_logs}


def input_embeddings(model, batch: dict, out) -> torch.Tensor:
    """The LLM's input: text embeddings with the image tokens of each image row (out: the
    encoder's output for batch["image"]) and UniPixel-style region tokens spliced in, (B, T, D):
    a prompt's region first, then a grounded answer's, row by row."""
    rows, tokens, owner = batch["region_rows"], [], []
    if rows.any():  # region tokens of the prompts' regions: (R, T_r, D)
        tokens.append(model.region_encoder([f[rows] for f in out.features],
                                           batch["region_maps"], batch["region_kinds"]))
        owner.append(rows.nonzero()[:, 0])
    if batch.get("found_maps") is not None:  # grounded answers' masks: (F, T_r, D)
        f_rows = batch["found_rows"]
        tokens.append(model.region_encoder.found([f[f_rows] for f in out.features],
                                                 batch["found_maps"]))
        owner.append(f_rows)
    region = None
    if tokens:  # in row order, a row's prompt region before its answer's (a stable sort)
        region = torch.cat(tokens)[torch.argsort(torch.cat(owner), stable=True)]
    return model.llm.embed(batch["input_ids"], out.tokens[batch["has_image"]], region)


def seg_loss(model, cfg, batch, features, states, b, present, words, keep):
    """Mask BCE + Dice + presence of S `<seg>`s: states (S, D) of rows b (S,); present (S,)
    False for a no-target `<seg>` (empty mask, presence 0); the row's region prompt, if any,
    is the decoder's dense prompt (SAM); words (B, L, D) with keep (B, L) its word prompts."""
    from focus_ref.segmentation import segmentation_loss

    H = batch["image"].shape[-1]
    gt = torch.zeros(len(b), H, H, dtype=torch.bool, device=b.device)
    gt[present] = batch["masks"]  # (S, H, W) one mask per present <seg>, in order
    logits, presence = model.segmentation(
        states[:, None], [f[b] for f in features], batch["image"][b],
        region_prompt_maps(batch, b), text_states=words[b], text_mask=keep[b])  # (S, 1, H, W)
    return segmentation_loss(logits, presence, gt[:, None], present[:, None], cfg)


def region_prompt_maps(batch: dict, rows: torch.Tensor) -> torch.Tensor | None:
    """SAM's dense prompt for the mask decoder: the rasterised region prompt of each selected
    row (zeros where the row has words only), (S, 1, H, W); None when no row has one."""
    if batch["region_maps"] is None:
        return None
    H = batch["region_maps"].shape[-1]
    full = torch.zeros(len(batch["input_ids"]), H, H, device=rows.device)  # (B, H, W)
    full[batch["region_rows"]] = batch["region_maps"].to(full)
    return full[rows][:, None]  # (S, 1, H, W)


def sample_pool(cfg: FocusConfig, split: str, n: int) -> list:
    """n ShapesWorld samples (scene, image, masks, texts, prompts), made once per process and
    shared by stage 0d and stage 3."""
    from focus_ref.shapesworld import ShapesWorld

    def make():
        world = ShapesWorld(cfg.data, split)
        return [world.sample(i) for i in range(n)]

    return pooled("samples", cfg, split, n, make)


# ----- the stage -----------------------------------------------------------------------------
def stage3_multitask(model, cfg: FocusConfig) -> Stage:
    """Stage 3 as a `train.Stage`: LLM, ConvNeXt, fusion, adapter, region encoder, predictor
    and semantic head train; batches come from a pool of rendered train scenes, a function of
    (seed, step) only, so a resumed run repeats them."""
    sc, pool = cfg.train.stage3, sample_pool(cfg, "train", cfg.train.stage3_scenes)
    grounded = cfg.segmentation.grounded_answers

    def batch_fn(step):
        rng = np.random.default_rng([cfg.train.seed, step, 3])
        idx = rng.choice(len(pool), size=sc.batch_size, replace=len(pool) < sc.batch_size)
        return collate([make_example(pool[i], rng, grounded_answers=grounded) for i in idx],
                       model)

    def loss_fn(batch):
        model.encoder.vit.eval()  # frozen parts stay in inference mode
        model.visual_tokenizer.eval()
        return stage3_loss(model, batch, cfg)

    enc = model.encoder
    parts = [model.llm, enc.convnext, enc.fusion, enc.adapter, model.region_encoder,
             model.segmentation, model.semantic_head]
    return Stage("stage3_pretrain", _train_only(model, parts), loss_fn, batch_fn, sc,
                 cfg.train.seed, slow=list(model.llm.parameters()),
                 slow_mult=cfg.train.llm_lr_mult)  # the LLM slower: to keep stage 0e's reading


def stage3(model, cfg: FocusConfig, out_dir, resume: bool = False, progress: bool = True):
    return fit(model, stage3_multitask(model, cfg), out_dir, resume, progress)
