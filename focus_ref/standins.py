"""Stage 0: stand-ins for the pretrained backbones (FOCUS, arXiv 2506.16806, §3.5 and §4.1).

The paper starts from released weights: Qwen2.5-3B, a Qwen2.5-VL ViT and a CLIP ConvNeXt-L.
None exist at the tiny scale, so stage 0 makes stand-ins on ShapesWorld, each a short
`train.Stage`:

    (a) stage0_lm     the LLM learns ShapesWorld text (next-token prediction on packed text)
    (b) stage0_clip   both encoders learn CLIP-style to pick each image's caption, against
                      the frozen LLM's pooled caption states (a locked text tower, LiT)
    (c) stage0_dense  the ConvNeXt learns each pixel's object colour, shape and size from the
                      renderer's exact masks: what a pretrained ConvNeXt's maps already hold,
                      and what the mask decoder reads (a CLIP loss alone left shape out)
    (d) stage0_seg    the mask decoder learns to segment what a region prompt points at or
                      what words name, on the frozen ConvNeXt and the LLM's word embeddings:
                      the stand-in for the SAM decoder LISA starts from (SAM: promptable
                      segmentation; the words: its text-grounding counterpart)
    (e) stage0_read   the LLM learns to *read*: "<caption> <question>" -> answer, the loss on
                      the answer only, at a low rate. A released LLM already answers questions
                      about a passage; a look-up our stand-in does not learn from (a) alone,
                      and the skill stage 3 asks of it with image tokens in the caption's place

with the held-out checks `clip_retrieval` (image -> caption), `dense_accuracy` (pixels) and
`reading_accuracy` (questions from the caption).
At paper scale `stage0` loads the released weights instead (`load_pretrained`); the mask
decoder there starts from scratch (no SAM loader is written: its layout is not SAM's).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from focus_ref.train import Stage, _picker, _to, _train_only, caption_pool, fit, pooled


def dense_pool(cfg, split: str, n: int):
    """n ShapesWorld scenes as images (n, 3, H, W) and per-pixel labels (n, 3, H, W): colour,
    shape and size class of the visible object (background = the last class of each)."""
    from focus_ref import shapesworld as sw
    from focus_ref.data import image_to_tensor

    vocab = (list(sw.COLORS), list(sw.SHAPES), list(sw.SIZES))
    if tuple(cfg.encoder.dense_heads) != tuple(len(v) + 1 for v in vocab):
        raise ValueError(f"encoder.dense_heads = {tuple(cfg.encoder.dense_heads)} does not match "
                         f"ShapesWorld's colours / shapes / sizes + background "
                         f"{tuple(len(v) + 1 for v in vocab)}: set it to those")
    def make():
        world = sw.ShapesWorld(cfg.data, split)
        images, labels = [], torch.zeros(n, 3, cfg.data.image_size, cfg.data.image_size,
                                         dtype=torch.long)
        for i in range(n):
            scene = world.scene(i)
            image, inst = sw.render(scene)
            images.append(image_to_tensor(image))
            for a, v in enumerate(vocab):
                table = [v.index(getattr(o, ("color", "shape", "size")[a]))
                         for o in scene.objects] + [len(v)]  # object k -> class; -1 -> background
                labels[i, a] = torch.tensor(table)[torch.from_numpy(inst.astype("int64"))]
        return torch.stack(images), labels

    return pooled("dense", cfg, split, n, make)


def text_pool(cfg, split: str, n: int) -> list:
    """Every text of n ShapesWorld scenes: captions, questions, answers, expressions, edits."""
    from focus_ref.shapesworld import ShapesWorld

    return pooled("text", cfg, split, n, lambda: ShapesWorld(cfg.data, split).corpus(n))


def stage0_lm(model: nn.Module, cfg) -> Stage:
    """(a) Text pretraining of the LLM on captions, questions, answers, expressions, edits."""
    llm, sc, L = model.llm, cfg.train.stage0, cfg.train.lm_seq_len
    texts = text_pool(cfg, "train", cfg.train.text_scenes)
    eos = llm.tokenizer.eos_token_id
    ids = llm.tokenizer(texts, add_special_tokens=False)["input_ids"]
    stream = torch.tensor([i for t in ids for i in [eos] + t] + [eos])  # GPT-style packing

    def batch_fn(step):
        starts = _picker(cfg, len(stream) - L, step, sc.batch_size)  # (B,)
        x = stream[starts[:, None] + torch.arange(L)]  # (B, L) windows of the text stream
        return {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x}

    def loss_fn(batch):
        out = llm(batch)
        return cfg.train.w_text * out.loss, {"acc": out.accuracy}

    return Stage("stage0_lm", _train_only(model, [llm]), loss_fn, batch_fn, sc, cfg.train.seed)


def reading_rows(cfg, split: str, n: int) -> list[tuple[str, str, str]]:
    """(prompt "<caption> <question>", answer, question kind) of n scenes' questions, without
    "where" (a caption does not say where things are)."""
    from focus_ref.evaluate import question_kind
    from focus_ref.pretrain import sample_pool

    return [(f"{s['caption']} {q}", a, question_kind(q)) for s in sample_pool(cfg, split, n)
            for q, a in s["qa"] if question_kind(q) != "where"]


def stage0_read(model: nn.Module, cfg) -> Stage:
    """(e) Reading: answer a question from the caption before it, the loss on the answer only.
    Text-only measurement (a fresh tiny LLM, 150 dev scenes): at 1e-4, 0.72 after 1,000 steps of
    16; at 1e-3 with 20 warm-up steps colour stays near chance, with 200 warm-up steps and
    batches of 32 it reads 0.61 after 600 steps: no faster per question (lab notes)."""
    llm, sc = model.llm, cfg.train.stage0_read
    rows = reading_rows(cfg, "train", cfg.train.stage3_scenes)

    def batch_fn(step):
        idx = _picker(cfg, len(rows), step + 5 * 10**6, sc.batch_size).tolist()  # (B,)
        return llm.encode([rows[i][0] for i in idx], [rows[i][1] for i in idx])

    def loss_fn(batch):
        out = llm(batch)  # next-token loss where labels != -100: the answer and its <eos>
        return cfg.train.w_text * out.loss, {"acc": out.accuracy}

    return Stage("stage0_read", _train_only(model, [llm]), loss_fn, batch_fn, sc, cfg.train.seed)


def stage0_clip(model: nn.Module, cfg) -> Stage:
    """(b) CLIP-style contrastive pretraining of the ViT and ConvNeXt against captions."""
    enc, sc = model.encoder, cfg.train.stage0_clip
    images, caps = caption_pool(cfg, "train", cfg.train.scene_pool)
    model.llm.eval()
    text = model.llm.text_features(caps).cpu()  # (n, D) the locked text tower, computed once

    def batch_fn(step):
        idx = _picker(cfg, len(caps), step + 10**6, sc.batch_size)  # (B,)
        return {"image": images[idx], "text": text[idx]}

    def loss_fn(batch):
        return enc.contrastive_loss(batch["image"], batch["text"])

    params = _train_only(model, [enc.vit, enc.convnext, enc.clip_head])
    return Stage("stage0_clip", params, loss_fn, batch_fn, sc, cfg.train.seed)


def stage0_dense(model: nn.Module, cfg) -> Stage:
    """(c) The ConvNeXt learns each pixel's object attributes (a stand-in for the object-aware
    maps of a pretrained ConvNeXt). Measured with a linear probe of the stride-8 map, share of
    object cells whose shape it reads: 0.35 after stage 0b, 0.84 after 0c (colour: 0.97 both)."""
    enc, sc = model.encoder, cfg.train.stage0_dense
    images, labels = dense_pool(cfg, "train", cfg.train.dense_scenes)

    def batch_fn(step):
        idx = _picker(cfg, len(images), step + 2 * 10**6, sc.batch_size)  # (B,)
        return {"image": images[idx], "labels": labels[idx]}

    def loss_fn(batch):
        return enc.dense_loss(batch["image"], batch["labels"])

    parts = [enc.convnext, enc.dense_head]
    if enc.vit_dense_head is not None:  # encoder.vit_dense: the ViT learns it too
        parts += [enc.vit, enc.vit_dense_head]
    params = _train_only(model, parts)
    return Stage("stage0_dense", params, loss_fn, batch_fn, sc, cfg.train.seed)


def stage0_seg(model: nn.Module, cfg) -> Stage:
    """(d) The mask decoder learns, before stage 3, to segment the object a region prompt
    points at (click / box / scribble / mask: SAM's promptable segmentation) or that words
    name (one target or none), from the frozen ConvNeXt's maps and the LLM's frozen word
    embeddings: what a pretrained SAM decoder brings to LISA. No LLM runs in a step, so a step
    of 32 costs a third of a stage-3 step of 16. The `<seg>` state the decoder gets from
    stage 3 on is stood in for by states the LLM writes before `<seg>` now, one drawn at
    random per example: the decoder learns to find the object from the words and the region,
    and meets states of the right scale when stage 3 begins. Several targets wait for stage 3:
    which target a `<seg>` means is the LLM's to say. `train.stage0_seg_colour` of the word rows
    name a present object by its colour: ShapesWorld names objects by shape first, so without
    them most colour words stage 0d sees are in no-target rows, and a decoder can learn that a
    colour word means "nothing there" (lab notes, session 30). Measured, stage 3 from one stage-2
    checkpoint with and without it (lr 1e-3; 100 held-out scenes): refseg cIoU 0.44 -> 0.63,
    N-acc / T-acc 0.77 / 0.88 -> 0.92 / 0.95, region mIoU 0.79 -> 0.83; the main job before
    and after (200 scenes; stage 1a also went 2000 -> 1500 steps): refseg 0.49 -> 0.61,
    N / T 0.73 / 0.94 -> 0.81 / 0.98, region 0.77 -> 0.81. 600 steps, 0.8 min on 2 cores."""
    from focus_ref.pretrain import (collate, make_example, sample_pool, seg_loss, target_masks,
                                    word_prompts)
    from focus_ref.scenegraph import colour_ref

    enc, llm, sc = model.encoder, model.llm, cfg.train.stage0_seg
    pool = sample_pool(cfg, "train", cfg.train.stage3_scenes)

    def example(s, rng):  # SAM's prompts 40%, else words naming one object or none
        refs = [r for r in s["refs"] if len(target_masks(s["inst"], r["targets"])) <= 1]
        if rng.random() < 0.4 or not refs:
            return make_example(s, rng, "region")
        share = cfg.train.stage0_seg_colour  # (0: no draw, the batches are as without it)
        if share and rng.random() < share:  # a present object named by its colour
            refs = [r] if (r := colour_ref(s["scene"], s["inst"], rng)) else refs
        return make_example({**s, "refs": refs}, rng, "refseg")

    def batch_fn(step):
        rng = np.random.default_rng([cfg.train.seed, step, 30])
        idx = rng.choice(len(pool), size=sc.batch_size, replace=len(pool) < sc.batch_size)
        batch = collate([example(pool[i], rng) for i in idx], model)
        return {**batch, "pick": torch.from_numpy(rng.integers(0, 1 << 30, sc.batch_size))}

    states = seg_states(model, [batch_fn(10**6 + i) for i in range(4)])  # (P, D) stand-ins

    def loss_fn(batch):
        enc.eval()
        llm.eval()
        with torch.no_grad():  # frozen: the ConvNeXt maps and the words' input embeddings
            features = enc.hierarchical(batch["image"])[0]  # [(B, C_i, H_i, W_i)]
            emb = llm.model.get_input_embeddings()(batch["input_ids"])  # (B, T, D)
        words, keep, mean = word_prompts(llm, emb, batch)  # (B, L, D), (B, L), (B, D)
        seg = states.to(mean)[batch["pick"] % len(states)] + mean  # (B, D) as in stage 3
        rows = torch.arange(len(seg), device=seg.device)  # one <seg> per row
        return seg_loss(model, cfg, batch, features, seg, rows, ~batch["no_target"], words,
                        keep)

    return Stage("stage0_seg", _train_only(model, [model.segmentation]), loss_fn, batch_fn,
                 sc, cfg.train.seed)


@torch.no_grad()
def seg_states(model: nn.Module, batches: list) -> torch.Tensor:
    """The states the LLM writes `<seg>` from, over stage-3-style batches: (P, D)."""
    from focus_ref.pretrain import input_embeddings

    enc, llm, out = model.encoder.eval(), model.llm.eval(), []
    for b in batches:
        b = _to(b, next(llm.parameters()).device)
        emb = input_embeddings(model, b, enc(b["image"]))  # (B, T, D)
        hidden = llm.model.model(inputs_embeds=emb, attention_mask=b["attention_mask"]
                                 ).last_hidden_state  # (B, T, D)
        out.append(llm.seg_hidden(hidden, b["input_ids"])[0])  # (S, D)
    return torch.cat(out)  # (P, D)


def stage0(model: nn.Module, cfg, out_dir, resume: bool = False, progress: bool = True) -> dict:
    """Stage 0: (a), (b), (c), (d) then (e) at tiny / small scale; at paper scale, load the
    released weights. (c) runs when the config has dense heads, (d) and (e) when they have
    steps."""
    if cfg.llm.pretrained or cfg.encoder.vit_pretrained or cfg.encoder.convnext_pretrained:
        if cfg.llm.pretrained:
            model.llm.load_pretrained()
        model.encoder.load_pretrained()
        return {"lm": [], "clip": []}
    hist_lm = fit(model, stage0_lm(model, cfg), out_dir, resume, progress)
    hist_clip = fit(model, stage0_clip(model, cfg), out_dir, resume, progress)  # reads (a)'s LLM
    hist = {"lm": hist_lm, "clip": hist_clip}
    if cfg.encoder.dense_heads:
        hist["dense"] = fit(model, stage0_dense(model, cfg), out_dir, resume, progress)
    if cfg.train.stage0_seg.steps:  # reads (a)'s words and (c)'s maps
        hist["seg"] = fit(model, stage0_seg(model, cfg), out_dir, resume, progress)
    if cfg.train.stage0_read.steps:  # last, so (b) and (d) read the same LLM as without it
        hist["read"] = fit(model, stage0_read(model, cfg), out_dir, resume, progress)
    return hist


@torch.no_grad()
def clip_retrieval(model: nn.Module, cfg, n: int = 256, split: str = "val") -> dict:
    """Held-out image -> caption retrieval top-1 among n captions, per branch and both."""
    enc, llm = model.encoder, model.llm
    enc.eval()
    llm.eval()
    images, caps = caption_pool(cfg, split, n)
    dev = next(enc.parameters()).device
    t = enc.clip_head.embed_text(llm.text_features(caps))  # (n, d)
    v, c = [], []
    for i in range(0, n, 64):
        out = enc(images[i:i + 64].to(dev), return_pooled=True)
        vi, ci = enc.clip_head.embed_images(out, out.pooled)  # (b, d), (b, d)
        v.append(vi)
        c.append(ci)
    v, c = torch.cat(v), torch.cat(c)  # (n, d)
    same = torch.tensor([[a == b for b in caps] for a in caps], device=dev)  # (n, n) equal text
    res = {"chance": same.float().mean().item(), "n": n}  # a random caption is a right one
    for name, sim in (("vit", v @ t.T), ("cnn", c @ t.T), ("both", (v + c) @ t.T)):
        res[f"top1_{name}"] = same[torch.arange(n), sim.argmax(1)].float().mean().item()
    return res


@torch.no_grad()
def dense_accuracy(model: nn.Module, cfg, n: int = 200, split: str = "val") -> dict:
    """Held-out share of object pixels whose colour / shape / size the stage-0c heads read
    right (the ConvNeXt's stride-8 head; `vit_*`: the ViT tokens' head), and the share of
    background pixels called background."""
    enc = model.encoder.eval()
    images, labels = dense_pool(cfg, split, n)
    dev, sizes = next(enc.parameters()).device, list(cfg.encoder.dense_heads)
    readers = {"": lambda x, f: enc.dense_head[1](f)}  # the map the mask decoder reads
    if enc.vit_dense_head is not None:  # encoder.vit_dense: (b, sum K_a, G*M, G*M)
        readers["vit_"] = lambda x, f: enc.vit_dense_map(enc.vanilla(x))
    hits, total, bg_hits, bg_total = {p: torch.zeros(len(sizes)) for p in readers}, 0, 0, 0
    for i in range(0, n, 64):
        x, y = images[i:i + 64].to(dev), labels[i:i + 64].to(dev)  # (b, 3, H, W), (b, A, H, W)
        f = enc.hierarchical(x)[0][1]  # (b, C_2, H/8, W/8)
        obj = y[:, 0] < sizes[0] - 1  # (b, H, W) pixels of an object
        for p, read in readers.items():
            logits = F.interpolate(read(x, f), size=y.shape[-2:], mode="bilinear",
                                   align_corners=False)  # (b, sum K_a, H, W)
            pred = torch.stack([lg.argmax(1) for lg in logits.split(sizes, 1)], 1)  # (b, A, H, W)
            hits[p] += ((pred == y) & obj[:, None]).sum((0, 2, 3)).float().cpu()
            if not p:  # background: the ConvNeXt head's call
                bg_hits += int(((pred == y) & ~obj[:, None]).all(1).sum())
        total += int(obj.sum())
        bg_total += int((~obj).sum())
    names = ("color", "shape", "size")[:len(sizes)]
    return {**{p + k: (h[a] / max(total, 1)).item() for p, h in hits.items()
               for a, k in enumerate(names)},
            "background": bg_hits / max(bg_total, 1), "n": n}


@torch.no_grad()
def reading_accuracy(model: nn.Module, cfg, n: int = 150, split: str = "val") -> dict:
    """Held-out text-only reading: exact-match answers to n scenes' questions (not "where")
    asked after the scene's caption, overall and per question kind (chance: colour ~0.17)."""
    llm, rows, hits = model.llm, reading_rows(cfg, split, n), {}
    llm.eval()
    for i in range(0, len(rows), 100):
        chunk = rows[i:i + 100]
        b = _to(llm.encode([p for p, _, _ in chunk], [a for _, a, _ in chunk]),
                next(llm.parameters()).device)
        pred, lab = llm(b).logits[:, :-1].argmax(-1), b["labels"][:, 1:]  # (B, T-1)
        right = ((pred == lab) | (lab == -100)).all(1)  # (B,) every answer token right
        for (_, _, kind), ok in zip(chunk, right.tolist()):
            hits.setdefault(kind, []).append(ok)
    every = [x for v in hits.values() for x in v]
    return {"all": float(np.mean(every)), **{k: float(np.mean(v)) for k, v in sorted(hits.items())}}
