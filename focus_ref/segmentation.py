"""Segmentation predictor and region-prompt encoder (FOCUS, arXiv 2506.16806, §3.3 and Fig. 2).

What the paper says: the LLM writes a `<seg>` token wherever an answer refers to a region; the
hidden state of that token, projected, prompts a SAM-style mask decoder over the hierarchical
(ConvNeXt) encoder's multi-scale features (the LISA recipe). One `<seg>` per target, so several
targets give several masks; "no target" (GRES) is no `<seg>`, or a presence score saying empty.
The other way round, a click, a scribble, a box or a mask becomes region tokens spliced into
the LLM input (UniPixel), so a user may point instead of (or as well as) speaking.

  SegmentationPredictor  <seg> states (B, K, D_llm) + features [(B, C_i, H/s_i, W/s_i)]
                         + the image (B, 3, H, W) [+ region maps (B, K, H, W)]
                         -> mask logits (B, K, H, W) + presence logits (B, K)
  rasterize_prompt       click / scribble / box / mask -> a (H, W) map, with input checks
  RegionPromptEncoder    a rasterised prompt + the features -> (B, T, D_llm) region tokens
  segmentation_loss      mask BCE on all (empty for an absent target), Dice on present
                         targets, presence BCE on all
Built from transformers' SAM parts (`SamTwoWayTransformer`, `SamFeedForward`, `SamMaskEmbedding`,
`SamPositionalEmbedding`). Written here: the `<seg>` projection; the expression's words *in
order* (learned positions: else "the circle left of the square" reads as "the square left of
the circle") through LAVT's pixel-word attention and as prompt tokens of the two-way
transformer (MDETR); positions added to the image tokens themselves ("leftmost", "left of");
an FPN over the ConvNeXt stages; SAM-2-style x2 upsampling with the finer stage (below
stride 4, the image) added at each step; a CRIS-style coarse prior (mask token . image token);
a CascadePSP-style refinement of the logits from the image's pixels. Why not `SamMaskDecoder`
as is: its x4 upsampling has no skips, and on ShapesWorld even the *true* masks pooled to 16x16
and upsampled score cIoU 0.89, so a 64 px mask needs pixel-level input. Measurements behind
each part: docs/lab_notes.md.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import SamMaskDecoderConfig, SamPromptEncoderConfig
from transformers.models.sam.modeling_sam import (SamFeedForward, SamLayerNorm,
                                                    SamMaskEmbedding, SamPositionalEmbedding,
                                                    SamTwoWayTransformer)

from focus_ref.config import FocusConfig

PROMPT_KINDS = ("click", "scribble", "box", "mask")


def _positional(dim: int) -> SamPositionalEmbedding:
    """SAM's random-Fourier position encoding of (x, y) in [0, 1]; fixed, as in SAM."""
    pe = SamPositionalEmbedding(SimpleNamespace(scale=1.0, num_pos_feats=dim // 2))
    pe.positional_embedding.requires_grad_(False)
    return pe


# ----- the predictor ---------------------------------------------------------------------
class SegmentationPredictor(nn.Module):
    """`<seg>` hidden states + multi-scale features -> full-resolution masks and presence."""

    def __init__(self, cfg: FocusConfig):
        super().__init__()
        s, dims = cfg.segmentation, tuple(cfg.encoder.convnext_dims)
        self.strides = tuple(4 * 2 ** i for i in range(len(dims)))  # ConvNeXt: 4, 8, 16, 32
        if s.decoder_stride not in self.strides:
            raise ValueError(f"segmentation.decoder_stride={s.decoder_stride} is not a feature "
                             f"stride of the ConvNeXt encoder {self.strides}: pick one of them")
        self.level = self.strides.index(s.decoder_stride)  # the pyramid level the decoder reads
        self.image_size, self.dim = cfg.encoder.high_res, s.dim
        h = cfg.llm.hidden_size
        # LISA's text_hidden_fcs: the <seg> hidden state, projected to the decoder width
        self.seg_proj = nn.Sequential(nn.Linear(h, h), nn.ReLU(), nn.Linear(h, s.dim))
        # the expression's words, pooled: a second sparse prompt (the states before <seg> nearly
        # coincide at this scale); normed: word embeddings are ~30x smaller than LLM states
        self.text_proj = nn.Sequential(nn.LayerNorm(h), nn.Linear(h, h), nn.ReLU(),
                                       nn.Linear(h, s.dim))
        # word-level features (CRIS / LAVT): LAVT's pixel-word attention (PWAM) lets every image
        # cell gather the words about it, fused by an element-wise product
        self.word_proj = nn.Sequential(nn.LayerNorm(h), nn.Linear(h, s.dim))
        self.word_attn = nn.MultiheadAttention(s.dim, s.num_heads, batch_first=True)
        self.word_fuse = nn.Sequential(nn.Linear(s.dim, s.dim), nn.GELU(),
                                       nn.Linear(s.dim, s.dim))
        # word order: a learned position per word (a bag of words cannot tell the target of
        # "the circle left of the square" from its anchor; relations IoU 0.35 -> 0.72)
        self.word_pos = nn.Embedding(s.max_words, s.dim)
        # the ordered words as prompt tokens of the two-way transformer too (MDETR): fixed
        # slots, unused ones a learned pad, so a mask never depends on the batch's other rows
        self.word_slots = s.word_tokens
        if s.word_tokens:
            with torch.random.fork_rng(devices=[]):  # every other weight starts as before
                self.word_pad = nn.Parameter(torch.randn(s.word_tokens, s.dim) * 0.02)
                self.word_type = nn.Parameter(torch.randn(s.dim) * 0.02)
        # feature pyramid (FPN): 1x1 laterals, coarse-to-fine top-down sum, SAM's neck norm
        self.lateral = nn.ModuleList(nn.Conv2d(c, s.dim, 1) for c in dims[self.level:])
        # + the image's own colours at the decoder grid ("the red object" without the ConvNeXt)
        self.pixel_lateral = nn.Conv2d(3, s.dim, 1)
        self.norm = SamLayerNorm(s.dim, data_format="channels_first")
        self.pos = _positional(s.dim)  # dense positional encoding of the image tokens
        # SAM's dense prompt: a rasterised region prompt (click / scribble / box / mask) at 4x
        # the decoder grid, embedded and added to the image tokens; "no region" is learned
        self.mask_embed = SamMaskEmbedding(SamPromptEncoderConfig(
            hidden_size=s.dim, mask_input_channels=16, image_size=self.image_size,
            patch_size=s.decoder_stride))
        self.no_mask_embed = nn.Parameter(torch.zeros(s.dim))
        dec = SamMaskDecoderConfig(hidden_size=s.dim, mlp_dim=s.mlp_dim,
                                   num_hidden_layers=s.num_layers, num_attention_heads=s.num_heads)
        dec._attn_implementation = "sdpa"
        # SAM's two-way transformer: prompt tokens attend to the image and the image to them
        self.transformer = SamTwoWayTransformer(dec)
        self.presence_token = nn.Embedding(1, s.dim)  # SAM's IoU token, here "is it there?"
        self.mask_token = nn.Embedding(1, s.dim)
        # upsampling to full resolution: SAM's x2 transposed convs, one per octave, each with
        # SAM 2's high-resolution skip (the finer ConvNeXt stage, or the image below stride 4)
        n_up = s.decoder_stride.bit_length() - 1  # log2(stride) steps of x2
        ch = [max(s.dim >> i, 8) for i in range(n_up + 1)]  # dim, dim/2, ..., >= 8 channels
        self.up = nn.ModuleList(nn.ConvTranspose2d(ch[i], ch[i + 1], 2, stride=2)
                                for i in range(n_up))
        self.up_norm = nn.ModuleList(SamLayerNorm(ch[i + 1], data_format="channels_first")
                                     for i in range(n_up))
        self.skip_stride = [s.decoder_stride >> (i + 1) for i in range(n_up)]
        self.skip = nn.ModuleList(
            nn.Conv2d(dims[self.strides.index(st)], ch[i + 1], 1) if st in self.strides
            else nn.Conv2d(3, ch[i + 1], 3, padding=1)  # pixel skip: exact edges at stride 1
            for i, st in enumerate(self.skip_stride))
        self.hyper = SamFeedForward(s.dim, s.dim, ch[-1], 3)  # mask token -> per-pixel weights
        # coarse prior (CRIS-style text-to-pixel alignment): mask token . image token, per cell
        self.prior_q, self.prior_k = nn.Linear(s.dim, s.dim), nn.Linear(s.dim, s.dim)
        self.presence_head = SamFeedForward(s.dim, s.dim, 1, 3)
        # refinement at full resolution (CascadePSP): logits + last features + the image's
        # pixels -> a zero-initialised residual on the logits (receptive field 9 px) that cuts
        # masks along colour edges; a forked RNG keeps every other weight's initial value
        self.fine, w = None, s.fine_width
        if w:
            with torch.random.fork_rng(devices=[]):
                self.fine = nn.Sequential(nn.Conv2d(ch[-1] + 4, w, 3, padding=1), nn.GELU(),
                                          nn.Conv2d(w, w, 3, padding=2, dilation=2), nn.GELU(),
                                          nn.Conv2d(w, 1, 3, padding=1))
            nn.init.zeros_(self.fine[-1].weight)
            nn.init.zeros_(self.fine[-1].bias)

    def pyramid(self, features: list[torch.Tensor], image: torch.Tensor) -> torch.Tensor:
        """FPN top-down path: the coarser stages and the image summed into the decoder level."""
        x = self.lateral[-1](features[-1])  # (B, dim, H/32, W/32)
        for lat, f in zip(reversed(self.lateral[:-1]), reversed(features[self.level:-1])):
            x = lat(f) + F.interpolate(x, size=f.shape[-2:], mode="nearest")  # (B, dim, h, w)
        x = x + self.pixel_lateral(F.adaptive_avg_pool2d(image, x.shape[-2:]))  # (B, dim, h, w)
        # instance norm before SAM's per-cell norm: the CLIP-trained features are mostly one
        # image-wide vector (channel mean 3.4 vs spatial std 0.28), so after the per-cell norm
        # alone every cell looked alike and words could not pick an object
        x = F.instance_norm(x)  # (B, dim, h, w): zero mean, unit spread over the cells
        return self.norm(x)  # (B, dim, h, w), h = H / decoder_stride

    def dense_pe(self, h: int, w: int, like: torch.Tensor) -> torch.Tensor:
        ys = (torch.arange(h, device=like.device, dtype=like.dtype) + 0.5) / h  # (h,)
        xs = (torch.arange(w, device=like.device, dtype=like.dtype) + 0.5) / w  # (w,)
        grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1)  # (h, w, 2) as (x, y)
        return self.pos(grid).permute(2, 0, 1)[None]  # (1, dim, h, w)

    def _check(self, seg_states, features, image, region_maps):
        D = self.seg_proj[0].in_features
        if seg_states.dim() != 3 or seg_states.shape[-1] != D:
            raise ValueError(f"seg_states must be (B, K, {D}) <seg> hidden states, got "
                             f"{tuple(seg_states.shape)}")
        if len(features) != len(self.strides):
            raise ValueError(f"expected {len(self.strides)} feature maps (the ConvNeXt stages, "
                             f"strides {self.strides}), got {len(features)}")
        B, K, S = *seg_states.shape[:2], self.image_size
        if image is None or tuple(image.shape) != (B, 3, S, S):
            got = None if image is None else tuple(image.shape)
            raise ValueError(f"image must be the encoder's high-res input (B, 3, {S}, {S}) in "
                             f"[-1, 1], got {got}: pass the image the features came from")
        if region_maps is not None and (region_maps.dim() != 4 or region_maps.shape[:2] != (B, K)):
            raise ValueError(f"region_maps must be (B, K, H, W) = ({B}, {K}, H, W), one map per "
                             f"<seg>, got {tuple(region_maps.shape)}")

    def forward(self, seg_states: torch.Tensor, features: list[torch.Tensor], image: torch.Tensor,
                region_maps: torch.Tensor | None = None, out_size: int | None = None,
                text_states: torch.Tensor | None = None, text_mask: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """<seg> states (B, K, D_llm), features [(B, C_i, H_i, W_i)], image (B, 3, H, W)
        -> mask logits (B, K, H, W), presence logits (B, K).

        region_maps (B, K, H, W), optional: each <seg>'s rasterised region prompt (zeros for
        words only), SAM's dense prompt. text_states, optional: the row's prompt words
        (B, L, D_llm) with text_mask (B, L) (True = a word), or their mean (B, D_llm): the mean
        is a second sparse prompt; per-word states also feed LAVT's PWAM and the word slots.
        """
        self._check(seg_states, features, image, region_maps)
        B, K = seg_states.shape[:2]
        size = out_size or self.image_size
        if K == 0:  # the LLM wrote no <seg>: no target, no mask (GRES)
            return seg_states.new_zeros(B, 0, size, size), seg_states.new_zeros(B, 0)
        img = self.pyramid(features, image)  # (B, dim, h, w)
        h, w = img.shape[-2:]
        img = img.repeat_interleave(K, 0)  # (B*K, dim, h, w): SAM decodes each prompt alone
        dense = self.no_mask_embed.view(1, -1, 1, 1).expand_as(img)  # (B*K, dim, h, w)
        if region_maps is not None:
            maps = region_maps.flatten(0, 1)[:, None].to(img.dtype)  # (B*K, 1, H, W)
            maps = F.adaptive_avg_pool2d(maps, (4 * h, 4 * w))  # (B*K, 1, 4h, 4w)
            has = maps.flatten(1).amax(1).gt(0).view(-1, 1, 1, 1)  # (B*K, 1, 1, 1)
            dense = torch.where(has, self.mask_embed(maps), dense)  # (B*K, dim, h, w)
        pe = self.dense_pe(h, w, img).expand(B * K, -1, -1, -1)  # (B*K, dim, h, w)
        mean = text_states
        if text_states is not None and text_states.dim() == 3:  # per-word states (B, L, D)
            keep = torch.ones(text_states.shape[:2], dtype=torch.bool, device=img.device) \
                if text_mask is None else text_mask.bool()  # (B, L)
            wm = keep[..., None].to(text_states.dtype)  # (B, L, 1)
            mean = (text_states * wm).sum(1) / wm.sum(1).clamp_min(1)  # (B, D)
            L = text_states.shape[1]
            pos = self.word_pos(torch.arange(L, device=img.device).clamp_max(
                self.word_pos.num_embeddings - 1))  # (L, dim)
            v = self.word_proj(text_states) + pos  # (B, L, dim) ordered words
            img = img + self._pwam(img, pe[:1], v, keep, K)  # (B*K, dim, h, w)
        prompt = self.seg_proj(seg_states).flatten(0, 1)[:, None, None]  # (B*K, 1, 1, dim)
        out = torch.cat([self.presence_token.weight, self.mask_token.weight])  # (2, dim)
        tokens = torch.cat([out.expand(B * K, 1, 2, -1), prompt], 2)  # (B*K, 1, 3, dim)
        if mean is not None:  # + the expression's words, pooled (B, D) -> (B*K, 1, 1, dim)
            text = self.text_proj(mean).repeat_interleave(K, 0)[:, None, None]
            tokens = torch.cat([tokens, text], 2)  # (B*K, 1, 4, dim)
        if self.word_slots and text_states is not None and text_states.dim() == 3:
            tokens = torch.cat([tokens, self._word_slots(v, keep, K)], 2)  # (B*K, 1, 4+S, dim)
        # + positions in the image tokens themselves (SAM: queries and keys only), so values
        # carry *where* for "the leftmost ..." and "left of ..." (superlatives 0.51 -> 0.61)
        tokens, keys = self.transformer(tokens, img + dense + pe, pe, attention_similarity=None)
        keys, mask_tok = keys[:, 0], tokens[:, 0, 1]  # (B*K, h*w, dim), (B*K, dim)
        prior = torch.einsum("nd,npd->np", self.prior_q(mask_tok), self.prior_k(keys))
        prior = (prior / self.dim ** 0.5).view(B * K, 1, h, w)  # (B*K, 1, h, w)
        x = keys.transpose(1, 2).reshape(B * K, self.dim, h, w)  # (B*K, dim, h, w)
        for up, norm, skip, st in zip(self.up, self.up_norm, self.skip, self.skip_stride):
            src = features[self.strides.index(st)] if st in self.strides else \
                F.avg_pool2d(image, st) if st > 1 else image  # (B, C, H/st, W/st)
            x = up(x) + skip(src).repeat_interleave(K, 0)  # (B*K, c, H/st, W/st)
            x = F.gelu(norm(x))
        weights = self.hyper(mask_tok)  # (B*K, c): SAM's hypernetwork on the mask token
        masks = torch.einsum("nc,nchw->nhw", weights, x)[:, None]  # (B*K, 1, H, W) fine detail
        masks = masks + F.interpolate(prior, size=x.shape[-2:], mode="bilinear",
                                      align_corners=False)  # + the coarse prior, upsampled
        if self.fine is not None:  # + the refinement's residual, (B*K, 1, H, W)
            masks = masks + self.fine(torch.cat([x, image.repeat_interleave(K, 0), masks], 1))
        masks = masks.view(B, K, *x.shape[-2:])  # (B, K, H, W)
        if masks.shape[-1] != size:
            masks = F.interpolate(masks, size=(size, size), mode="bilinear",
                                  align_corners=False)  # (B, K, size, size)
        presence = self.presence_head(tokens[:, 0, 0]).view(B, K)  # (B, K)
        return masks, presence

    def _word_slots(self, words, keep, K: int) -> torch.Tensor:
        """Ordered words (B, L, dim) + mask (B, L) -> S word prompt tokens (B*K, 1, S, dim):
        the first S words, the rest of the slots the learned pad."""
        S, L = self.word_slots, keep.shape[1]
        w = F.pad(words, (0, 0, 0, max(S - L, 0)))[:, :S]  # (B, S, dim)
        k = F.pad(keep, (0, max(S - L, 0)))[:, :S, None]  # (B, S, 1)
        w = torch.where(k, w + self.word_type, self.word_pad.to(w.dtype))  # (B, S, dim)
        return w.repeat_interleave(K, 0)[:, None]  # (B*K, 1, S, dim)

    def _pwam(self, img, pe, words, keep, K: int) -> torch.Tensor:
        """LAVT's pixel-word attention: image (B*K, dim, h, w) cells attend to the words
        (B, L, dim) (padding masked); the gathered language feature times the visual one,
        projected, is the residual to add, (B*K, dim, h, w)."""
        n, c, h, w = img.shape
        q = (img + pe).flatten(2).transpose(1, 2)  # (B*K, h*w, dim)
        v = words.repeat_interleave(K, 0)  # (B*K, L, dim) projected, ordered words
        pad = (~keep).repeat_interleave(K, 0)  # (B*K, L) True = ignore
        lang, _ = self.word_attn(q, v, v, key_padding_mask=pad, need_weights=False)
        fused = self.word_fuse(lang * img.flatten(2).transpose(1, 2))  # (B*K, h*w, dim)
        return fused.transpose(1, 2).reshape(n, c, h, w)

    @staticmethod
    def to_masks(mask_logits: torch.Tensor, presence_logits: torch.Tensor,
                 threshold: float = 0.0) -> torch.Tensor:
        """Boolean masks (B, K, H, W); a <seg> whose presence score says empty gives none."""
        present = presence_logits > threshold  # (B, K)
        return (mask_logits > 0) & present[..., None, None]  # (B, K, H, W)


# ----- region prompts --------------------------------------------------------------------
def _point(p, size: int, what: str) -> tuple[float, float]:
    try:
        x, y = (float(v) for v in p)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be an (x, y) pixel pair, got {p!r}") from None
    if not (0 <= x <= size - 1 and 0 <= y <= size - 1):
        raise ValueError(f"{what} ({x:g}, {y:g}) lies outside the {size}x{size} image: "
                         f"use pixel coordinates with 0 <= x, y <= {size - 1}")
    return x, y


def rasterize_prompt(kind: str, value, size: int, radius: float = 2.0) -> torch.Tensor:
    """A region prompt -> a float (size, size) map in {0, 1}; one clear error per bad input.

    click (x, y): a disc; scribble [(x, y), ...]: a polyline of that width; box (x0, y0, x1, y1),
    both ends inclusive: the filled rectangle; mask: a boolean (size, size) array.
    Coordinates are pixels, x = column, y = row (the ShapesWorld convention).
    """
    yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5,
                            indexing="ij")  # (H, W) pixel centres
    if kind == "click":
        x, y = _point(value, size, "click")
        return (((xx - x - 0.5) ** 2 + (yy - y - 0.5) ** 2) <= radius ** 2).float()  # (H, W)
    if kind == "scribble":
        pts = list(value) if value is not None else []
        if len(pts) < 2:
            raise ValueError(f"a scribble needs at least 2 points, got {len(pts)}: draw a "
                             "line, or use a click for a single point")
        p = torch.tensor([_point(q, size, "scribble point") for q in pts]) + 0.5  # (P, 2)
        a, b = p[:-1, None, None], p[1:, None, None]  # (P-1, 1, 1, 2) segment ends
        q = torch.stack([xx, yy], -1)  # (H, W, 2)
        ab = b - a
        t = (((q - a) * ab).sum(-1) / (ab * ab).sum(-1).clamp_min(1e-6)).clamp(0, 1)
        d = (q - (a + t[..., None] * ab)).norm(dim=-1)  # (P-1, H, W) distance to each segment
        return (d.min(0).values <= radius).float()  # (H, W)
    if kind == "box":
        try:
            x0, y0, x1, y1 = (float(v) for v in value)
        except (TypeError, ValueError):
            raise ValueError(f"a box must be (x0, y0, x1, y1), got {value!r}") from None
        _point((x0, y0), size, "box corner")
        _point((x1, y1), size, "box corner")
        if x0 > x1 or y0 > y1:
            raise ValueError(f"box ({x0:g}, {y0:g}, {x1:g}, {y1:g}) has swapped corners: pass "
                             "(x0, y0, x1, y1) with x0 <= x1 and y0 <= y1 (top-left first)")
        return ((xx >= x0) & (xx <= x1 + 1) & (yy >= y0) & (yy <= y1 + 1)).float()  # (H, W)
    if kind == "mask":
        m = torch.as_tensor(np.asarray(value.cpu() if torch.is_tensor(value) else value))
        if m.shape != (size, size):
            raise ValueError(f"mask of shape {tuple(m.shape)} does not match the {size}x{size} "
                             "image: pass a boolean H x W mask of the image's size")
        m = m.bool() if m.dtype == torch.bool else m > 0.5
        if not m.any():
            raise ValueError("the mask prompt is empty: mark at least one pixel of the region")
        return m.float()  # (H, W)
    raise ValueError(f"unknown region prompt kind {kind!r}: choose one of {PROMPT_KINDS}")


class RegionPromptEncoder(nn.Module):
    """A rasterised click / scribble / box / mask -> `num_region_tokens` LLM-input tokens.

    UniPixel-style: *what* is there (the encoder features averaged under the prompt, every
    scale), *where* it is (SAM's Fourier encoding of the prompt's extent), its *shape* (the map
    on a coarse grid) and *which kind* of prompt it was (a learned embedding per kind).
    """

    def __init__(self, cfg: FocusConfig):
        super().__init__()
        s, h = cfg.segmentation, cfg.llm.hidden_size
        self.size, self.grid, self.radius = cfg.encoder.high_res, s.region_grid, s.prompt_radius
        self.num_tokens, self.hidden = s.num_region_tokens, h
        self.what = nn.Linear(sum(cfg.encoder.convnext_dims), s.dim)  # pooled features
        self.pos = _positional(s.dim)  # the prompt's box corners, as SAM encodes a box prompt
        self.where = nn.Linear(2 * s.dim, s.dim)
        self.shape = nn.Linear(s.region_grid ** 2, s.dim)  # the map on a grid x grid raster
        self.mix = nn.Sequential(nn.LayerNorm(3 * s.dim), nn.Linear(3 * s.dim, s.dim), nn.GELU(),
                                 nn.Linear(s.dim, s.num_region_tokens * h))
        self.kind = nn.Embedding(len(PROMPT_KINDS), h)  # a learned embedding per prompt kind
        self.token = nn.Embedding(s.num_region_tokens, h)  # which of the T tokens this is
        self.empty = nn.Parameter(torch.zeros(s.num_region_tokens, h)) if s.grounded_answers \
            else None  # grounded answers: what a <seg> that found nothing becomes

    def rasterize(self, prompts: list[tuple[str, object]], size: int | None = None):
        """[(kind, value), ...] -> maps (B, H, W) and kind ids (B,), checking every prompt."""
        size = size or self.size
        maps = torch.stack([rasterize_prompt(k, v, size, self.radius) for k, v in prompts])
        kinds = torch.tensor([PROMPT_KINDS.index(k) for k, _ in prompts])  # (B,)
        return maps, kinds  # (B, H, W), (B,)

    def forward(self, features: list[torch.Tensor], maps: torch.Tensor,
                kinds: torch.Tensor) -> torch.Tensor:
        """features [(B, C_i, H_i, W_i)], maps (B, H, W) in [0, 1], kinds (B,) -> (B, T, D_llm)."""
        B = maps.shape[0]
        if maps.dim() != 3 or maps.flatten(1).sum(1).eq(0).any():
            raise ValueError("region maps must be (B, H, W) with at least one marked pixel each: "
                             "build them with RegionPromptEncoder.rasterize")
        m = maps[:, None].to(features[0].dtype)  # (B, 1, H, W)
        pooled = []
        for f in features:  # masked average pooling of every scale under the prompt
            w = F.adaptive_avg_pool2d(m, f.shape[-2:])  # (B, 1, H_i, W_i) share covered
            pooled.append((f * w).sum((2, 3)) / w.sum((2, 3)).clamp_min(1e-6))  # (B, C_i)
        what = self.what(torch.cat(pooled, 1))  # (B, dim)
        H, W = maps.shape[-2:]
        rows, cols = maps.amax(2) > 0, maps.amax(1) > 0  # (B, H), (B, W)
        ar_h, ar_w = torch.arange(H, device=m.device), torch.arange(W, device=m.device)
        y0 = torch.where(rows, ar_h, H).amin(1); y1 = torch.where(rows, ar_h, -1).amax(1) + 1
        x0 = torch.where(cols, ar_w, W).amin(1); x1 = torch.where(cols, ar_w, -1).amax(1) + 1
        corners = torch.stack([torch.stack([x0 / W, y0 / H], -1),
                               torch.stack([x1 / W, y1 / H], -1)], 1).to(m.dtype)  # (B, 2, 2)
        where = self.where(self.pos(corners).flatten(1))  # (B, 2, dim) -> (B, dim)
        shape = self.shape(F.adaptive_avg_pool2d(m, self.grid).flatten(1))  # (B, dim)
        tokens = self.mix(torch.cat([what, where, shape], 1))  # (B, T * D_llm)
        tokens = tokens.view(B, self.num_tokens, self.hidden)  # (B, T, D_llm)
        return tokens + self.kind(kinds.to(m.device))[:, None] + self.token.weight  # (B, T, D_llm)

    def found(self, features: list[torch.Tensor], masks: torch.Tensor) -> torch.Tensor:
        """Mask-grounded answers (UniPixel): the masks (K, H, W) K `<seg>`s found, over their
        rows' features [(K, C_i, H_i, W_i)] -> region tokens (K, T, D_llm); an empty mask (the
        predictor found nothing) -> the learned `empty` tokens."""
        hit = masks.flatten(1).any(1)  # (K,)
        out = self.empty.to(features[0].dtype).expand(len(masks), -1, -1).clone()  # (K, T, D)
        if hit.any():
            kinds = torch.full((int(hit.sum()),), PROMPT_KINDS.index("mask"), device=hit.device)
            out[hit] = self([f[hit] for f in features], masks[hit].float(), kinds)
        return out  # (K, T, D_llm)


# ----- losses ----------------------------------------------------------------------------
def dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - soft Dice per mask: logits, target (N, H, W) -> (N,)."""
    p, g = logits.sigmoid().flatten(1), target.float().flatten(1)  # (N, H*W)
    return 1 - (2 * (p * g).sum(1) + 1) / (p.sum(1) + g.sum(1) + 1)  # (N,)


def segmentation_loss(mask_logits: torch.Tensor, presence_logits: torch.Tensor,
                      target_masks: torch.Tensor, present: torch.Tensor, cfg: FocusConfig,
                      valid: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Mask BCE on every <seg> (a no-target one learns the empty mask, as in GRES / ReLA, so
    the decoder itself must find nothing when the named object is absent), Dice (LISA) on the
    <seg>s that have a target, presence BCE on all of them.

    mask_logits (B, K, H, W); presence_logits (B, K); target_masks (B, K, H, W) bool;
    present (B, K) bool (False = "no target" for that <seg>); valid (B, K) marks real (not
    padding) <seg> slots. Weights: cfg.train.w_mask_bce, w_mask_dice, cfg.segmentation.w_presence.
    """
    if target_masks.shape != mask_logits.shape:
        raise ValueError(f"target masks {tuple(target_masks.shape)} do not match the predicted "
                         f"{tuple(mask_logits.shape)}: resize targets to the predictor's output")
    valid = torch.ones_like(present, dtype=torch.bool) if valid is None else valid.bool()
    sel = valid & present.bool()  # (B, K) slots with a mask to learn
    logits, target = mask_logits[sel], target_masks[sel].float()  # (N, H, W)
    zero = mask_logits.sum() * 0  # keeps the graph when a batch has no target at all
    empty_if_absent = target_masks & present.bool()[..., None, None]  # (B, K, H, W)
    bce = F.binary_cross_entropy_with_logits(mask_logits[valid], empty_if_absent[valid].float()
                                             ) if valid.any() else zero
    dice = dice_loss(logits, target).mean() if len(logits) else zero
    pres = F.binary_cross_entropy_with_logits(presence_logits[valid],
                                              present[valid].float()) if valid.any() else zero
    t, s = cfg.train, cfg.segmentation
    loss = t.w_mask_bce * bce + t.w_mask_dice * dice + s.w_presence * pres
    return loss, {"mask_bce": bce.item(), "mask_dice": dice.item(), "presence": pres.item()}
