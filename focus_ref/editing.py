"""Region-controlled editing and generation (FOCUS, arXiv 2506.16806, §3.4, §3.5 stage 4, Fig. 2).

What the paper says: for "make the red circle blue" the LLM reads the image and the
instruction and writes a `<seg>` token and the visual tokens of the result. The `<seg>`
hidden state drives the segmentation predictor; the predicted mask goes to the diffusion
decoder as an explicit *spatial prompt* (where), the generated visual tokens as its content
condition (what). Text-to-image generation is the same path without a source image or mask.

    "<image> edit: make the red circle blue"
        LLM ─► <seg> ─► SegmentationPredictor ─► mask (the region the edit may change)
            └► <boi> s_1 … s_N <eoi>   N semantic codes of the edited image (greedy)
    DiffusionDecoder(source latent ⊕ mask, context = codes + their LLM states) ─► latent
        ─► MoVQ decode ─► keep the source outside the mask

Choice at this scale (measured, see notebooks 07/08): the LLM writes the N = 16 compact
*semantic-level* codes of the target (the tokenizer's semantic branch), ILLUME+/Janus-style,
through its own generation embedding and head (`SemanticHead`, Janus's gen_embed / gen_head),
not the 256 pixel codes: 256 autoregressive steps per edit cost most of the one-second
latency budget and are too hard to learn in a few CPU minutes, while the decoder already
holds every source pixel (source latent) and only needs *what* to change. The decoder reads
the generated codes and the LLM's hidden states at their positions (projected, as Emu / the
decoder's `llm_proj`), so the diffusion loss trains the LLM end to end, and the codes alone
need not carry every detail. Generation uses classifier-free guidance on the code logits.

The mask the `<seg>` predicts is the *edit region* (ShapesWorld's `edit["region"]`): the
object for recolour and remove, old and new silhouette for replace and move, the background
for a background change. Outside it the source pixels are kept exactly (`composite`).

Bad input: an instruction naming nothing in the image -> the mask decoder finds nothing (its
mask is empty or its presence score says so; stage 4 trains this) or the LLM answers "no such
object", and the image comes back unchanged with "no such object" as `EditResult.reason` (a
warning from `FocusModel.edit`); text that is no edit instruction -> "not an edit
instruction", likewise; an empty or overlong instruction, an unreadable image, a bad region
prompt -> one ValueError / TypeError naming the fix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from focus_ref.config import FocusConfig
from focus_ref.encoder import num_image_tokens
from focus_ref.llm import BOI, EOI, IGNORE, cache_kwargs, kv_cache

EDIT, EDIT_REGION = "<image> edit: {}", "<image> <region> edit: {}"
GENERATE = "generate: {}"
EDITED, NO_OBJECT, NOT_AN_EDIT = "edited", "no such object", "not an edit instruction"
SLOT = "<v0>"  # marks a semantic-code position; its embedding is replaced (SemanticHead.embed)
PROMPT_RMS, POSITION_NORM = 0.05, 0.5  # the decoder's view of the prompt (context_states):
# each embedding scaled to RMS 0.05 (length 0.8 at D = 256, a word's), plus an order code of length 0.5


class SemanticHead(nn.Module):
    """Janus-style generation adaptor: semantic codes into the LLM (embed) and out (head)."""

    def __init__(self, cfg: FocusConfig):
        super().__init__()
        D, K = cfg.llm.hidden_size, cfg.tokenizer.sem_codebook_size
        self.num_tokens, self.num_codes = num_image_tokens(cfg), K  # N codes of K per image
        self.embed = nn.Embedding(K, D)  # code -> LLM input embedding (Janus gen_embed)
        self.head = nn.Sequential(nn.Linear(D, D), nn.GELU(), nn.Linear(D, K))  # gen_head

    def slots(self) -> str:
        return BOI + SLOT * self.num_tokens + EOI  # the answer part that holds the codes


# ----- instructions from ShapesWorld samples (stage 4: instruct.py) ------------------------------------------------------------------
def describe_target(sample: dict) -> str | None:
    """The words an edit instruction uses for its object ("the red circle"), if any."""
    from focus_ref.scenegraph import phrase, unique_attrs

    k = sample["edit"]["target_object"]
    if k < 0 or sample["edit"]["kind"] == "background":  # a background edit names no object
        return None
    return f"the {phrase(unique_attrs(sample['scene'], k))}"


def absent_instruction(sample: dict) -> str:
    """The sample's edit instruction with its object swapped for one that is not there."""
    absent = next(r["text"] for r in sample["refs"] if r["type"] == "none")
    return sample["edit"]["instruction"].replace(describe_target(sample), absent)


def context_states(code_states, prompt_embeds, prompt_mask) -> torch.Tensor:
    """What the decoder reads beside the codes: the prompt's LLM input embeddings (padding
    zeroed; the image's tokens and the instruction's words) and the LLM's states at the
    generated codes (Emu-style conditioning), (R, T + N, D). Why the prompt's embeddings and
    not its last-layer states (issue #6, measured): this tiny LLM's last-layer states of
    different prompts nearly coincide, so "make it blue" barely reached the decoder; a decoder
    alone, given the true mask, passed 0.47 of held-out edits with the instruction's token
    embeddings and 0.30 with those last-layer states.

    Two things make the prompt readable to the decoder (measured, issue #6: 100 held-out
    edits 0.18 -> 0.26, region given 0.22 -> 0.30): input embeddings carry no order (the LLM's
    positions are rotary, inside attention), so "make the red circle blue" and "make the blue
    circle red" would reach it as the same bag of words; and the image's tokens are ~60x
    longer than a word's embedding, which drowns the words in the projection they share."""
    rev = prompt_mask.flip(1).cumsum(1).flip(1) - 1  # (R, T): prompt tokens after this one
    pos = sincos_1d(rev.clamp(min=0), prompt_embeds.shape[-1])  # (R, T, D) 0 = the last word
    prompt = F.rms_norm(prompt_embeds, prompt_embeds.shape[-1:], eps=1e-6) * PROMPT_RMS  # same length
    prompt = prompt + POSITION_NORM * pos.to(prompt.dtype)  # + order, counted from the end:
    # left padding (inference) and right padding (training) agree on it
    return torch.cat([prompt * prompt_mask[..., None], code_states], 1)  # (R, T+N, D), padding 0


def sincos_1d(pos: torch.Tensor, dim: int) -> torch.Tensor:
    """Transformer sine-cosine codes of integer positions (...,) -> (..., dim), norm 1."""
    freq = torch.exp(-torch.arange(dim // 2, device=pos.device) / (dim // 2) * math.log(100.0))
    ang = pos[..., None].float() * freq  # (..., dim/2)
    return torch.cat([ang.sin(), ang.cos()], -1) / math.sqrt(dim // 2)  # (..., dim)


# ----- inference ---------------------------------------------------------------------------
def to_input(image, size: int) -> torch.Tensor:
    """A uint8 H x W x 3 array or PIL image -> (1, 3, size, size) in [-1, 1]; other modes
    (grey, RGBA) and sizes are converted, anything else is refused naming the fix."""
    from PIL import Image

    from focus_ref.data import image_to_tensor

    if isinstance(image, Image.Image):
        image = image.convert("RGB")
    elif isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim in (2, 3):
        image = Image.fromarray(image).convert("RGB")  # grey / RGBA arrays -> RGB
    else:
        raise TypeError(f"cannot read an image from {type(image).__name__} "
                        f"{getattr(image, 'dtype', '')} {getattr(image, 'shape', '')}: pass a "
                        "uint8 H x W x 3 array or a PIL image (e.g. PIL.Image.open(path))")
    if image.size != (size, size):  # the model's resolution; regions refer to this size
        image = image.resize((size, size), Image.BILINEAR)
    return image_to_tensor(image)[None]  # (1, 3, H, W)


def check_instruction(llm, text, max_tokens: int, what: str = "instruction") -> None:
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"empty {what}: say what to do, e.g. 'make the red circle blue'"
                         if what == "instruction" else f"empty {what}: describe the image, e.g. "
                         "'a large red circle on a plain white background'")
    n = len(llm.tokenizer(text, add_special_tokens=False)["input_ids"])
    if n > max_tokens:
        raise ValueError(f"the {what} is {n} tokens long, more than the {max_tokens} this "
                         f"model reads (cfg.edit.max_instruction_tokens): shorten it")


def check_region(region) -> dict | None:
    """None or {kind: value} with one kind of click / box / scribble / mask."""
    from focus_ref.segmentation import PROMPT_KINDS

    if region is None:
        return None
    if not isinstance(region, dict) or len(region) != 1 or next(iter(region)) not in PROMPT_KINDS:
        raise ValueError(f"region must be one of {{kind: value}} with kind in {PROMPT_KINDS}, "
                         f"e.g. {{'click': (20, 31)}}; got {region!r}")
    return region


@dataclass
class EditResult:
    image: np.ndarray  # uint8 (H, W, 3): the edit, or the input unchanged when refused
    mask: np.ndarray | None  # bool (H, W): the predicted edit region (None when refused)
    reason: str  # EDITED, or the model's answer ("no such object", ...) when refused
    codes: list | None = None  # the N generated semantic codes


def _step(llm, emb: torch.Tensor, mask: torch.Tensor, past=None):
    """One cached LLM call on input embeddings (B, t, D) -> (states (B, t, D), cache)."""
    out = llm.model.model(inputs_embeds=emb, attention_mask=mask, use_cache=True,
                          **cache_kwargs(llm.model.model, past))
    return out.last_hidden_state, kv_cache(out)  # (B, t, D), the KV cache


def write_codes(model, emb, mask, guidance: float = 1.0, generator=None,
                temperature: float = 0.0, top_k: int = 0):
    """Prefill `emb` (B or 2B rows: cond [+ uncond]), then write N semantic codes.

    Classifier-free guidance on the logits (Janus): l = l_u + g (l_c - l_u) when g != 1
    and the batch holds the unconditional rows after the conditional ones. temperature 0 is
    greedy. Returns codes (B, N) and the LLM states at the code positions (B, N, D).
    """
    llm, head = model.llm, model.semantic_head
    prefill, past = _step(llm, emb, mask)  # (B', T, D)
    h = prefill[:, -1]  # (B', D) the state that predicts code 1
    B = len(emb) // 2 if guidance != 1.0 else len(emb)
    codes, states = [], []
    for _ in range(head.num_tokens):
        logits = head.head(h)  # (B', K)
        if guidance != 1.0:
            cond, uncond = logits[:B], logits[B:]
            logits = uncond + guidance * (cond - uncond)  # (B, K) CFG on the logits
        if temperature > 0:
            logits = logits / temperature
            if top_k:
                kth = logits.topk(top_k, -1).values[:, -1:]  # (B, 1)
                logits = logits.masked_fill(logits < kth, -torch.inf)
            c = torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]  # (B,)
        else:
            c = logits.argmax(-1)  # (B,)
        codes.append(c)
        c2 = c.repeat(len(emb) // B)  # (B',) the same code in both branches
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)  # (B', T+1)
        h, past = _step(llm, head.embed(c2)[:, None], mask, past)  # (B', 1, D)
        h = h[:, -1]  # (B', D)
        states.append(h[:B])  # the state at the code's position (as in training)
    return torch.stack(codes, 1), torch.stack(states, 1)  # (B, N), (B, N, D)


@torch.no_grad()
def run_edits(model, images: torch.Tensor, instructions: list[str], regions=None,
              generator=None, composite: bool = True) -> list[EditResult]:
    """Batched editing: images (B, 3, H, W) in [-1, 1], one instruction (and optionally one
    region prompt {kind: value}) each. Refused rows come back unchanged with the reason."""
    from focus_ref.data import tensor_to_image
    from focus_ref.diffusion import edit_image
    from focus_ref.pretrain import word_prompts

    enc, llm = model.encoder, model.llm
    dev, B = images.device, len(images)
    regions = regions or [None] * B
    out = enc(images)  # tokens (B, N, D), features
    prompts = [(EDIT_REGION if r else EDIT).format(t) for t, r in zip(instructions, regions)]
    batch = {k: v.to(dev) for k, v in llm.encode(prompts, padding_side="left").items()}
    rtok, rmaps = None, torch.zeros(B, 1, *images.shape[-2:], device=dev)
    rows = [i for i, r in enumerate(regions) if r]
    if rows:
        maps, kinds = model.region_encoder.rasterize([next(iter(regions[i].items())) for i in rows])
        maps = maps.to(dev)
        rtok = model.region_encoder([f[rows] for f in out.features], maps, kinds.to(dev))
        rmaps[rows] = maps[:, None]  # (B, 1, H, W) SAM's dense prompt for the mask decoder
    emb = llm.embed(batch["input_ids"], out.tokens, rtok)  # (B, T, D)
    mask = batch["attention_mask"]
    h = _step(llm, emb, mask)[0][:, -1]  # (B, D) the state that writes <seg> (or an answer)
    first = llm.model.lm_head(h)[:, :llm.visual_token_range.start].argmax(-1)  # (B,)
    wants = first == llm.seg_id  # (B,) the LLM chose to edit
    results: list = [None] * B
    if (~wants).any():  # the LLM answered in words instead: "no such object", ...
        idx = (~wants).nonzero()[:, 0].tolist()
        sub = {k: v[idx] for k, v in batch.items()}
        texts = llm.generate(sub, image_tokens=out.tokens[idx], region_tokens=(
            _rows_of(rtok, regions, idx)), max_new_tokens=12)["texts"]
        for i, t in zip(idx, texts):
            results[i] = EditResult(tensor_to_image(images[i]), None, t or NO_OBJECT)
    idx = wants.nonzero()[:, 0].tolist()
    if idx:
        ids = torch.tensor([[llm.seg_id, llm.boi_id]] * B, device=dev)  # forced after <seg>
        emb2 = torch.cat([emb, llm.model.get_input_embeddings()(ids)], 1)  # (B, T + 2, D)
        mask2 = torch.cat([mask, torch.ones_like(ids)], 1)
        codes, states = write_codes(model, emb2[idx], mask2[idx])  # (E, N), (E, N, D)
        states = context_states(states, emb[idx], mask[idx])  # (E, T + N, D)
        sub = {"input_ids": batch["input_ids"][idx], "attention_mask": mask[idx],
               "labels": torch.full_like(mask[idx], IGNORE)}  # the prompt only
        words, keep, mean = word_prompts(llm, emb[idx], sub)  # (E, L, D), (E, L), (E, D)
        logits, presence = model.segmentation((h[idx] + mean)[:, None],
                                              [f[idx] for f in out.features],
                                              images[idx], rmaps[idx] if rows else None,
                                              text_states=words, text_mask=keep)
        thr = model.config.segmentation.presence_threshold  # GRES operating point (dev)
        pred = model.segmentation.to_masks(logits, presence, thr)[:, 0]  # (E, H, W)
        empty = ~pred.flatten(1).any(1)  # nothing to edit: no mask, or presence says absent
        pred[empty] = True  # placeholder so the batch can run; these rows are refused below
        edited = edit_image(model.diffusion, model.visual_tokenizer, images[idx], pred,
                            sem_codes=codes, llm_states=states, generator=generator,
                            composite_background=composite)  # (E, 3, H, W)
        for j, i in enumerate(idx):
            if empty[j]:
                results[i] = EditResult(tensor_to_image(images[i]), None, NO_OBJECT,
                                        codes[j].tolist())
            else:
                results[i] = EditResult(tensor_to_image(edited[j]), pred[j].cpu().numpy(),
                                        EDITED, codes[j].tolist())
    return results


def _rows_of(rtok, regions, idx):
    """Region tokens of the rows `idx` (rtok holds only the rows that have a region)."""
    if rtok is None:
        return None
    have = [i for i, r in enumerate(regions) if r]
    keep = [have.index(i) for i in idx if i in have]
    return rtok[keep] if keep else None


@torch.no_grad()
def run_generate(model, prompts: list[str], generator=None, guidance: float | None = None,
                 temperature: float | None = None) -> torch.Tensor:
    """Text -> semantic codes (CFG on the logits) -> decoder -> images (B, 3, H, W)."""
    from focus_ref.diffusion import edit_image

    llm, ec = model.llm, model.config.edit
    g = ec.gen_guidance if guidance is None else guidance
    t = ec.gen_temperature if temperature is None else temperature
    dev, B = model.device, len(prompts)
    texts = [GENERATE.format(p) + BOI for p in prompts] + [GENERATE.format("") + BOI] * B
    batch = llm.encode(texts if g != 1.0 else texts[:B], padding_side="left")
    ids, mask = batch["input_ids"].to(dev), batch["attention_mask"].to(dev)
    emb = llm.model.get_input_embeddings()(ids)  # (B' , T, D) text only
    codes, states = write_codes(model, emb, mask, g, generator, t, ec.gen_top_k)
    prompt = mask[:B].clone()
    prompt[:, -1] = 0  # <boi> belongs to the answer (as in training)
    return edit_image(model.diffusion, model.visual_tokenizer, None, None, sem_codes=codes,
                      llm_states=context_states(states, emb[:B], prompt),
                      generator=generator)  # (B, 3, H, W)


# ----- held-out quality ------------------------------------------------------------------
@torch.no_grad()
def edit_quality(model, samples: list[dict], seed: int = 0, composite: bool = True,
                 batch_size: int = 16) -> dict:
    """Edits of held-out ShapesWorld samples judged by the oracle: success, background PSNR
    outside the true region, change leaking outside it (mean |Δ| in 0-255 units, measured
    before any compositing is the ablation's number), mask IoU, refusals; per edit kind."""
    from focus_ref.data import image_to_tensor
    from focus_ref.oracle import judge_edit

    g = torch.Generator(model.device).manual_seed(seed)
    rec = []
    for i in range(0, len(samples), batch_size):
        chunk = samples[i:i + batch_size]
        x = torch.stack([image_to_tensor(s["image"]) for s in chunk]).to(model.device)
        res = run_edits(model, x, [s["edit"]["instruction"] for s in chunk], generator=g,
                        composite=composite)
        for s, r in zip(chunk, res):
            e, v = s["edit"], judge_edit(r.image, s["edit"])
            out = ~e["region"]
            leak = np.abs(r.image[out].astype(np.float32) - e["target_image"][out]).mean()
            iou = 0.0 if r.mask is None else (r.mask & e["region"]).sum() / (
                r.mask | e["region"]).sum()
            rec.append({"kind": e["kind"], "success": v["success"], "bg_psnr": min(
                v["bg_psnr"], 100.0), "leak": float(leak), "iou": float(iou),
                "refused": r.reason != EDITED})
    return _by_kind(rec, ("success", "bg_psnr", "leak", "iou", "refused"))


def _by_kind(rec: list[dict], keys: tuple) -> dict:
    """Per-edit records {"kind", "success", ...} -> the mean of each key, success per kind, n."""
    mean = lambda key, rs: float(np.mean([r[key] for r in rs]))  # noqa: E731
    res = {k: mean(k, rec) for k in keys}
    for kind in sorted({r["kind"] for r in rec}):
        res[f"success.{kind}"] = mean("success", [r for r in rec if r["kind"] == kind])
    return {**res, "n": len(rec)}


@torch.no_grad()
def edit_ceiling(model, samples: list[dict]) -> dict:
    """What a perfect decoder could score: each edit's exact target image through the
    tokenizer (the decoder can only hand back what MoVQ decodes), pasted into the source
    inside the true region and judged by edit_quality's oracle; per edit kind. The tokenizer
    blurs an edge by about a pixel, and the oracle wants 90 % of the region's pixels right."""
    from focus_ref.data import image_to_tensor, tensor_to_image
    from focus_ref.diffusion import composite
    from focus_ref.oracle import judge_edit

    tok, rec, dev = model.visual_tokenizer.eval(), [], model.device
    for i in range(0, len(samples), 64):
        chunk = samples[i:i + 64]
        goal = torch.stack([image_to_tensor(s["edit"]["target_image"]) for s in chunk]).to(dev)
        source = torch.stack([image_to_tensor(s["image"]) for s in chunk]).to(dev)  # (B, 3, H, W)
        out = tok.decode(tok.encode(goal)).clamp(-1, 1)  # (B, 3, H, W) what MoVQ hands back
        region = np.stack([s["edit"]["region"] for s in chunk])  # (B, H, W)
        for s, im in zip(chunk, composite(out, source, region)):  # the true region pasted
            rec.append({"kind": s["edit"]["kind"],
                        "success": judge_edit(tensor_to_image(im), s["edit"])["success"]})
    return _by_kind(rec, ("success",))


@torch.no_grad()
def refusal_quality(model, samples: list[dict], batch_size: int = 16) -> dict:
    """Edits that name an absent object: the share refused (answered "no such object")."""
    from focus_ref.data import image_to_tensor

    rows = [(s, absent_instruction(s)) for s in samples if describe_target(s)]
    hits = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        x = torch.stack([image_to_tensor(s["image"]) for s, _ in chunk]).to(model.device)
        hits += [r.reason != EDITED for r in run_edits(model, x, [t for _, t in chunk])]
    return {"refused": float(np.mean(hits)), "n": len(hits)}


@torch.no_grad()
def generation_quality(model, scenes_and_captions: list, seed: int = 0,
                       batch_size: int = 16) -> dict:
    """Oracle attribute accuracy of images generated from held-out captions."""
    from focus_ref.data import tensor_to_image
    from focus_ref.oracle import attribute_accuracy

    g = torch.Generator(model.device).manual_seed(seed)
    accs = []
    for i in range(0, len(scenes_and_captions), batch_size):
        chunk = scenes_and_captions[i:i + batch_size]
        imgs = run_generate(model, [c for _, c in chunk], generator=g)
        accs += [attribute_accuracy(tensor_to_image(im), s) for im, (s, _) in zip(imgs, chunk)]
    return {"attr_acc": float(np.mean(accs)), "n": len(accs)}
