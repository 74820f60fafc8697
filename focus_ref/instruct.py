"""Stage 4: instruction tuning for region-controlled editing (FOCUS, arXiv 2506.16806, §3.5
stage 4, Fig. 2), and the paper's ablation of the decoder's region condition (§4.4).

What the paper says: the LLM, the segmentation predictor and the diffusion decoder learn
together on edit instructions. The LLM writes `<seg>` (its state -> the edit region) and the
visual tokens of the edited image; the decoder renders them conditioned on the PREDICTED
mask, so it learns to work with the masks it will get at inference (editing.py is the
inference side of the same path).

The task mix, one ShapesWorld sample -> one example (cfg.edit.share_*):
    edit      "<image> edit: make the red circle blue"      -> <seg> <boi> s_1 .. s_N <eoi>
    region    "<image> <region> edit: make this blue" + a click / box / scribble / mask
    generate  "generate: <caption>" (caption dropped sometimes, for CFG) -> <boi> codes <eoi>
    absent    an absent object -> "<seg>", whose mask must come back empty (the mask decoder
              sees the image; inference then answers "no such object"), as in stage 3
    refuse    a question or a caption given as an edit -> "not an edit instruction"
plus, every step, a few stage-3 examples (`cfg.train.stage4_rehearsal`: referring and region
segmentation, questions, captions) so the LLM and the predictor keep what stage 3 taught them
while they learn to edit (rehearsal against forgetting; the paper trains stage 4 on a mix of
editing and understanding data too). Losses: text CE, semantic-code CE, mask BCE + Dice on the
edit region, and the decoder's denoising loss; + the stage-3 loss on the rehearsal examples.
Encoders and tokenizer stay frozen. Examples come from fresh scenes, a function of the step.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from focus_ref import pretrain
from focus_ref.config import FocusConfig
from focus_ref.editing import (EDIT, EDIT_REGION, GENERATE, NOT_AN_EDIT, SLOT,
                               absent_instruction, context_states, describe_target)
from focus_ref.llm import IGNORE, SEG, next_token_loss
from focus_ref.train import Stage, _train_only, fit


# ----- examples ----------------------------------------------------------------------------
def make_example(sample: dict, rng: np.random.Generator, cfg: FocusConfig) -> dict:
    """One stage-4 example from a ShapesWorld sample: an edit (by words or by a region
    prompt), an edit naming an absent object, a text that is no edit, or a generation."""
    e, ec = sample["edit"], cfg.edit
    ex = {"source": sample["image"], "goal": e["target_image"], "region": e["region"],
          "prompt_region": None, "task": "edit"}
    desc, u = describe_target(sample), rng.random()
    if u < ec.share_generate:  # text -> image; the caption is dropped sometimes (CFG)
        cap = "" if rng.random() < ec.caption_dropout else sample["caption"]
        return {**ex, "task": "generate", "prompt": GENERATE.format(cap), "goal": sample["image"],
                "region": np.ones_like(e["region"])}
    u = (u - ec.share_generate) / (1 - ec.share_generate)
    if desc and u < ec.share_absent:  # the instruction names an object that is not there
        return {**ex, "task": "absent", "prompt": EDIT.format(absent_instruction(sample)),
                "answer": SEG}  # its <seg> learns the empty mask (GRES), no codes follow
    if u < ec.share_absent + ec.share_not_edit:  # a question or a caption is no edit
        text = sample["caption"] if rng.random() < 0.5 else sample["qa"][0][0]
        return {**ex, "task": "refuse", "prompt": EDIT.format(text), "answer": NOT_AN_EDIT}
    if desc and rng.random() < ec.share_region:  # "make this blue" + a click / box / ...
        kind = ("click", "box", "scribble", "mask")[int(rng.integers(4))]
        p = sample["prompts"][e["target_object"]][kind]
        return {**ex, "prompt": EDIT_REGION.format(e["instruction"].replace(desc, "this")),
                "prompt_region": (kind, p)}
    return {**ex, "prompt": EDIT.format(e["instruction"])}


def collate(examples: list[dict], model) -> dict:
    """Examples -> token ids (slots marked), images, regions and region prompts."""
    from focus_ref.data import image_to_tensor

    head, llm = model.semantic_head, model.llm
    answers = {"edit": SEG + head.slots(), "generate": head.slots()}
    batch = llm.encode([x["prompt"] for x in examples],
                       [answers.get(x["task"]) or x["answer"] for x in examples])
    reg = [x["prompt_region"] for x in examples if x["prompt_region"] is not None]
    maps, kinds = model.region_encoder.rasterize(reg) if reg else (None, None)
    return {**batch,
            "task": [x["task"] for x in examples],
            "source": torch.stack([image_to_tensor(x["source"]) for x in examples]),
            "goal": torch.stack([image_to_tensor(x["goal"]) for x in examples]),
            "region": torch.stack([torch.from_numpy(x["region"]) for x in examples]),
            "region_rows": torch.tensor([x["prompt_region"] is not None for x in examples]),
            "region_maps": maps, "region_kinds": kinds}  # (B, T) ids..., (B, 3, H, W) x2


# ----- the loss: text + semantic codes + segmentation + diffusion, jointly -----------------
def edit_loss(model, batch: dict, cfg: FocusConfig) -> tuple[torch.Tensor, dict]:
    """One joint step: text CE (incl. <seg> / refusals), semantic-code CE, mask BCE + Dice on
    the edit region, and the decoder's denoising loss conditioned on the PREDICTED mask."""
    from focus_ref.segmentation import segmentation_loss

    enc, llm, tok, dec, head = (model.encoder, model.llm, model.visual_tokenizer,
                                model.diffusion, model.semantic_head)
    ids, task = batch["input_ids"], batch["task"]
    has_img = torch.tensor([t != "generate" for t in task], device=ids.device)  # (B,)
    slot_rows = torch.tensor([t in ("edit", "generate") for t in task], device=ids.device)
    edit_rows = torch.tensor([t == "edit" for t in task], device=ids.device)
    with torch.no_grad():  # frozen encoder and tokenizer: inputs and targets
        src = enc(batch["source"])  # tokens (B, N, D), features [(B, C_i, H_i, W_i)]
        codes = tok.encode_semantic(enc.vanilla(batch["goal"]))  # (B, N) the goal's codes
    feats = [f[has_img] for f in src.features]
    region = None
    if batch["region_maps"] is not None:  # UniPixel-style region tokens at <region>
        rf = [f[batch["region_rows"]] for f in src.features]
        region = model.region_encoder(rf, batch["region_maps"], batch["region_kinds"])
    emb = llm.embed(ids, src.tokens[has_img], region)  # (B, T, D)
    slots = ids == llm.tokenizer.convert_tokens_to_ids(SLOT)  # (B, T) code positions
    emb = emb.masked_scatter(slots[..., None], head.embed(codes[slot_rows]))  # (B, T, D)
    hidden = llm.model.model(inputs_embeds=emb, attention_mask=batch["attention_mask"]
                             ).last_hidden_state  # (B, T, D)
    labels = batch["labels"].masked_fill(slots, IGNORE)  # codes are scored by the head below
    text, acc = next_token_loss(llm.model.lm_head(hidden), labels)
    prev = F.pad(slots[:, 1:], (0, 1))  # (B, T): the state one before each slot predicts it
    sem_logits = head.head(hidden[prev])  # (S, K)
    sem = F.cross_entropy(sem_logits, codes[slot_rows].flatten())
    sem_acc = (sem_logits.argmax(-1) == codes[slot_rows].flatten()).float().mean().item()
    loss = cfg.train.w_text * text + cfg.train.w_visual * sem
    logs = {"text": text.item(), "acc": acc, "sem": sem.item(), "sem_acc": sem_acc}
    seg_rows = edit_rows | torch.tensor([t == "absent" for t in task], device=ids.device)
    if seg_rows.any():  # the <seg> state -> the edit region (LISA: the state before <seg>),
        # or, for an absent object, the empty mask and presence 0 (GRES, as in stage 3)
        s_states, _ = llm.seg_hidden(hidden[seg_rows], ids[seg_rows])  # (E, D)
        e_img = seg_rows[has_img]  # <seg> rows among the rows with an image
        maps = pretrain.region_prompt_maps(batch, seg_rows)  # (E, 1, H, W) or None
        words, keep, mean = pretrain.word_prompts(llm, emb, batch)  # (B, L, D), (B, L), (B, D)
        s_states = s_states + mean[seg_rows]  # (E, D) as in stage 3
        logits, presence = model.segmentation(
            s_states[:, None], [f[e_img] for f in feats], batch["source"][seg_rows], maps,
            text_states=words[seg_rows], text_mask=keep[seg_rows])  # (E, 1, H, W), (E, 1)
        present = edit_rows[seg_rows][:, None]  # (E, 1) False: an absent object
        gt = batch["region"][seg_rows][:, None] & present[..., None, None]  # (E, 1, H, W)
        seg, seg_logs = segmentation_loss(logits, presence, gt, present, cfg)
        loss, logs = loss + seg, {**logs, **seg_logs}
    # the decoder: goal latent from source latent + mask + (codes, the prompt's embeddings,
    # the LLM states at the codes); right padding: each prompt fills its row's first positions
    states = hidden[slots].view(-1, head.num_tokens, hidden.shape[-1])  # (R, N, D)
    prompt = (batch["labels"] == IGNORE) & batch["attention_mask"].bool()  # (B, T)
    Tp = int(prompt.sum(1).max())
    ctx = dec.make_context(sem_codes=codes[slot_rows], llm_states=context_states(
        states, emb[slot_rows, :Tp], prompt[slot_rows, :Tp]))  # (R, L, D_ctx)
    mask = batch["region"][slot_rows].float()  # (R, H, W) generation: everywhere
    if edit_rows.any():  # edits: the PREDICTED mask is the spatial prompt (GT only if empty)
        pred = (logits[present[:, 0], 0] > 0).detach().float()  # (E', H, W) edits only
        empty = pred.flatten(1).amax(1) == 0
        pred[empty] = batch["region"][edit_rows][empty].float()
        mask[edit_rows[slot_rows]] = pred
    with torch.no_grad():
        goal = tok.quantized_latent(batch["goal"][slot_rows])  # (R, C, h, w)
        source = tok.quantized_latent(batch["source"][slot_rows])  # (R, C, h, w)
        source = source * has_img[slot_rows, None, None, None]  # generation: no source
    diff, dlogs = dec.loss(goal, source, mask, ctx)
    loss = loss + cfg.edit.w_diffusion * diff
    return loss, {**logs, **{f"dec_{k}": v for k, v in dlogs.items()}}


# ----- the stage and the ablation -------------------------------------------------------------
def stage4_edit(model: nn.Module, cfg, parts: list | None = None, name: str = "stage4_edit",
                rehearse: bool = True) -> Stage:
    """Stage 4 as a `train.Stage` (parts: the modules that train; rehearse: mix in stage-3
    examples, off for the ablation, which trains the decoder only)."""
    from focus_ref.shapesworld import ShapesWorld

    sc, world = cfg.train.stage4, ShapesWorld(cfg.data, "train")
    grounded = cfg.segmentation.grounded_answers

    def batch_fn(step):
        rng = np.random.default_rng([cfg.train.seed, step, 4])
        idx = range(step * sc.batch_size, (step + 1) * sc.batch_size)  # fresh scenes
        batch = collate([make_example(world.sample(i), rng, cfg) for i in idx], model)
        n = cfg.train.stage4_rehearsal if rehearse else 0
        if n:  # stage-3 examples from the stage-3 scene range (rehearsal against forgetting)
            scenes = rng.integers(cfg.train.stage3_scenes, size=n)
            batch["rehearsal"] = pretrain.collate(
                [pretrain.make_example(world.sample(int(i)), rng, grounded_answers=grounded)
                 for i in scenes], model)
        return batch

    def loss_fn(batch):
        model.encoder.eval()  # frozen parts stay in inference mode
        model.visual_tokenizer.eval()
        loss, logs = edit_loss(model, batch, cfg)
        if "rehearsal" in batch:  # + the stage-3 loss on the rehearsal examples
            old, old_logs = pretrain.stage3_loss(model, batch["rehearsal"], cfg)
            loss, logs = loss + old, {**logs, **{f"s3_{k}": v for k, v in old_logs.items()}}
        return loss, logs

    parts = parts or [model.llm, model.semantic_head, model.segmentation, model.region_encoder,
                      model.diffusion]
    return Stage(name, _train_only(model, parts), loss_fn, batch_fn, sc, cfg.train.seed,
                 slow=list(model.llm.parameters()), slow_mult=cfg.train.llm_lr_mult)


def stage4(model: nn.Module, cfg, out_dir, resume: bool = False, progress: bool = True) -> list:
    return fit(model, stage4_edit(model, cfg), out_dir, resume, progress)


def mask_ablation(model: nn.Module, cfg, out_dir, n_val: int = 64, resume: bool = False,
                  progress: bool = True, models: dict | None = None) -> dict:
    """The paper's ablation in miniature: the decoder's region condition as an explicit mask
    channel vs learned mask-token embeddings (cfg.diffusion.mask_condition). For each, a fresh
    decoder (same seed) learns edits for cfg.train.stage4_ablation steps from the frozen LLM's
    codes and states and the PREDICTED masks; judged on held-out edits without compositing, so
    change leaking outside the region shows. Returns {mode: edit_quality(...)}; pass a dict
    as `models` to get the two trained copies back in it."""
    from focus_ref.diffusion import DiffusionDecoder
    from focus_ref.editing import edit_quality
    from focus_ref.shapesworld import ShapesWorld

    val = [ShapesWorld(cfg.data, "val").sample(i) for i in range(n_val)]
    res = {}
    for mode in ("explicit", "tokens"):
        c = copy.deepcopy(cfg)
        c.diffusion.mask_condition, c.train.stage4 = mode, cfg.train.stage4_ablation
        c.edit.share_generate = c.edit.share_absent = c.edit.share_not_edit = 0.0  # edits only
        m = copy.deepcopy(model)
        torch.manual_seed(cfg.train.seed)  # the same initial weights for both
        m.diffusion = DiffusionDecoder(c).to(m.device)
        m.diffusion.latent_scale.copy_(model.diffusion.latent_scale)
        fit(m, stage4_edit(m, c, [m.diffusion], f"ablation_{mode}", rehearse=False), out_dir,
            resume, progress)
        res[mode] = edit_quality(m, val, seed=cfg.train.seed, composite=False)
        if models is not None:  # the trained copies, for figures
            models[mode] = m
    return res
