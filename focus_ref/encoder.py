"""Dual-branch visual encoder (FOCUS, arXiv 2506.16806, §3.1 and Fig. 2).

FOCUS sees an image twice. A *vanilla* ViT (QwenViT) reads a low-resolution copy and gives
global, semantic tokens; a *hierarchical* ConvNeXt-L reads a high-resolution copy and gives
multi-scale detail. Mini-Gemini-style windowed cross-attention lets every global token look
at the high-resolution features of its own window, and the result is added through a gate
that starts at zero, so training begins from the plain ViT tokens. An MLP adapter maps the
fused tokens to the LLM width. The ConvNeXt maps also feed the segmentation predictor.

    pixel_values (B, 3, H, W) in [-1, 1] at cfg.encoder.high_res
      |- resized to low_res -> ViT -> global_feats (B, N, C_vit) ............ queries
      |- ConvNeXt -> features [(B, C_i, H/4, W/4) ... (B, C_4, H/32, W/32)] .. keys/values
    fused  = global_feats + tanh(gate) * WindowCrossAttention(queries, keys/values)
    tokens = MLP adapter(fused)  (B, N, D_llm)

What this file builds, on transformers classes:
  vanilla branch   `SiglipVisionModel` (tiny / small) or the Qwen2.5-VL vision tower
                   `Qwen2_5_VisionTransformerPretrainedModel` (paper; its 2x2 patch merger
                   included, so N = (low_res / patch / 2)^2 and C_vit = cfg.encoder.vit_dim)
  hierarchical     `ConvNextModel`; its four stage outputs are `features` (strides 4-32)
  fusion           `GatedWindowFusion` (nn.MultiheadAttention over each token's window of
                   Mini-Gemini's high-res map: all four stages upsampled to stride 4, concatenated)
  adapter          Linear-GELU-Linear, as LLaVA-1.5
  stage 0 heads    `ContrastiveHead`: CLIP-style image/caption embeddings for both branches;
                   `dense_head`: per-pixel object attributes from the stride-4 and -8 maps
                   (with encoder.vit_dense also `vit_dense_head`: from each ViT token)

Sizes (tiny): low_res 32 / patch 8 -> N = 16 tokens; high_res 64 -> maps 16, 8, 4, 2 px;
each token's window is 4 x 4 positions of the stride-4 map. Images of another size are
resized to high_res (bilinear, antialiased); anything but a (B, 3, H, W) float tensor is
refused with an error naming the fix (use `focus_ref.data.image_to_tensor`).
Pretrained weights (paper scale, "stage 0 = load the released weights") come through
`DualEncoder.load_pretrained()`, which calls the transformers `from_pretrained` of each branch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import ConvNextConfig, ConvNextModel, SiglipVisionConfig, SiglipVisionModel
from transformers.vision_utils import get_vision_position_ids

from focus_ref.config import FocusConfig

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ConvNeXt
CLIP_MEAN, CLIP_STD = (0.4815, 0.4578, 0.4082), (0.2686, 0.2613, 0.2758)  # QwenViT


@dataclass
class EncoderOutput:
    tokens: torch.Tensor  # (B, N, D_llm)  fused + adapted: spliced into the LLM at <image>
    features: list  # [(B, C_i, H_i, W_i)] ConvNeXt stages, strides 4, 8, 16, 32
    global_feats: torch.Tensor  # (B, N, C_vit)  vanilla ViT tokens before fusion
    fused: torch.Tensor  # (B, N, C_vit)  after the gated window cross-attention


def _normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """[-1, 1] -> the normalisation a pretrained branch was trained with."""
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return ((x + 1) / 2 - m) / s  # (B, 3, H, W)


def num_image_tokens(cfg: FocusConfig) -> int:
    """N: visual tokens per image = (low_res / patch / merge)^2; the LLM expands <image> to N."""
    e = cfg.encoder
    merge = 2 if e.vit_kind == "qwen2_5_vl" else 1  # Qwen2.5-VL merges 2 x 2 patches
    return (e.low_res // e.vit_patch // merge) ** 2


# ----- the vanilla branch: a ViT on the low-resolution image -------------------------------
def build_vit(cfg: FocusConfig) -> nn.Module:
    e = cfg.encoder
    if e.vit_kind == "siglip":
        return SiglipVisionModel(SiglipVisionConfig(
            hidden_size=e.vit_hidden, intermediate_size=e.vit_mlp,
            num_hidden_layers=e.vit_layers, num_attention_heads=e.vit_heads,
            image_size=e.low_res, patch_size=e.vit_patch, vision_use_head=False))
    if e.vit_kind == "qwen2_5_vl":
        from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
            Qwen2_5_VisionTransformerPretrainedModel)
        return Qwen2_5_VisionTransformerPretrainedModel(Qwen2_5_VLVisionConfig(
            depth=e.vit_layers, hidden_size=e.vit_hidden, intermediate_size=e.vit_mlp,
            num_heads=e.vit_heads, patch_size=e.vit_patch, out_hidden_size=e.vit_dim))
    raise ValueError(f"encoder.vit_kind={e.vit_kind!r} is unknown: use 'siglip' or 'qwen2_5_vl'")


def qwen_patchify(x: torch.Tensor, patch: int, merge: int = 2, temporal: int = 2):
    """(B, 3, H, W) -> flat patches in the order Qwen2-VL's image processor writes them.

    A still image is repeated `temporal` times (Qwen2-VL's 3-D patches); patches are grouped
    by the 2 x 2 merge window so the patch merger can concatenate neighbours.
    """
    B, C, H, W = x.shape
    gh, gw = H // patch, W // patch
    x = x.unsqueeze(1).expand(B, temporal, C, H, W)  # (B, T, 3, H, W)
    x = x.reshape(B, temporal, C, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # (B, gh/m, gw/m, m, m, 3, T, p, p)
    flat = x.reshape(B * gh * gw, C * temporal * patch * patch)  # (B * gh * gw, 3 T p p)
    grid_thw = torch.tensor([[1, gh, gw]] * B)  # (B, 3) on the CPU: only used for indexing
    return flat, grid_thw


# ----- the fusion: Mini-Gemini windowed cross-attention with a zero-initialised gate -----
class GatedWindowFusion(nn.Module):
    """Each global token (query) attends to the high-res features inside its own window."""

    def __init__(self, dim: int, hr_dim: int, heads: int, window: int):
        super().__init__()
        self.window = window  # M: a token's window is M x M positions of the high-res map
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(hr_dim)
        self.attn = nn.MultiheadAttention(dim, heads, kdim=hr_dim, vdim=hr_dim, batch_first=True)
        self.gate = nn.Parameter(torch.zeros(1))  # tanh(0) = 0: fusion starts switched off

    def forward(self, q: torch.Tensor, hr: torch.Tensor, return_attn: bool = False):
        B, N, C = q.shape  # q: (B, N, C_vit); hr: (B, C_hr, G*M, G*M)
        G, M = math.isqrt(N), self.window
        kv = hr.reshape(B, hr.shape[1], G, M, G, M).permute(0, 2, 4, 3, 5, 1)  # (B,G,G,M,M,C_hr)
        kv = self.norm_kv(kv.reshape(B * N, M * M, -1))  # (B*N, M*M, C_hr): one window per token
        qq = self.norm_q(q).reshape(B * N, 1, C)  # (B*N, 1, C_vit): one query per window
        out, w = self.attn(qq, kv, kv, need_weights=return_attn)  # (B*N, 1, C_vit)
        fused = q + torch.tanh(self.gate) * out.reshape(B, N, C)  # gated residual (B, N, C_vit)
        if return_attn:
            return fused, w.reshape(B, G, G, M, M)  # where each token looked inside its window
        return fused


# ----- stage 0 stand-in: CLIP-style contrastive head ---------------------------------------
class ContrastiveHead(nn.Module):
    """Projects each branch's pooled image feature and a caption embedding to one space."""

    def __init__(self, cfg: FocusConfig, vit_dim: int, cnn_dim: int):
        super().__init__()
        d = cfg.encoder.clip_dim
        self.vit_proj = nn.Linear(vit_dim, d)
        self.cnn_proj = nn.Linear(cnn_dim, d)
        self.text_proj = nn.Linear(cfg.llm.hidden_size, d)  # caption = pooled LLM state
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's init

    def embed_images(self, out: EncoderOutput, pooled_cnn: torch.Tensor):
        v = F.normalize(self.vit_proj(out.global_feats.mean(1)), dim=-1)  # (B, d)
        c = F.normalize(self.cnn_proj(pooled_cnn), dim=-1)  # (B, d)
        return v, c

    def embed_text(self, text_feats: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(text_feats), dim=-1)  # (B, d)


def clip_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP): the i-th image matches the i-th caption in the batch."""
    logits = logit_scale.clamp(max=math.log(100)).exp() * img @ txt.T  # (B, B)
    target = torch.arange(len(img), device=img.device)  # (B,)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


# ----- the whole encoder ---------------------------------------------------------------------
class DualEncoder(nn.Module):
    def __init__(self, cfg: FocusConfig):
        super().__init__()
        e = self.ecfg = cfg.encoder
        self.vit = build_vit(cfg)  # vanilla branch
        self.convnext = ConvNextModel(ConvNextConfig(  # hierarchical branch
            depths=list(e.convnext_depths), hidden_sizes=list(e.convnext_dims),
            image_size=e.high_res))
        merge = 2 if e.vit_kind == "qwen2_5_vl" else 1  # Qwen2.5-VL merges 2 x 2 patches
        self.num_tokens = num_image_tokens(cfg)  # N
        self.grid = math.isqrt(self.num_tokens)  # G: tokens per side
        self.vit_dim = e.vit_dim  # C_vit
        finest = e.high_res // 4  # the stride-4 ConvNeXt map
        if e.low_res % (e.vit_patch * merge) or finest % self.grid:
            raise ValueError(
                f"encoder sizes do not tile: low_res {e.low_res} must be a multiple of "
                f"vit_patch*{merge} and high_res/4 = {finest} a multiple of the token grid "
                f"{self.grid}; change encoder.low_res / vit_patch / high_res")
        hr_dim = sum(e.convnext_dims)  # all four stages, upsampled and concatenated
        self.fusion = GatedWindowFusion(self.vit_dim, hr_dim, e.fusion_heads, finest // self.grid)
        self.adapter = nn.Sequential(  # LLaVA-1.5 MLP adapter to the LLM width
            nn.Linear(self.vit_dim, e.adapter_hidden), nn.GELU(),
            nn.Linear(e.adapter_hidden, cfg.llm.hidden_size))
        self.clip_head = ContrastiveHead(cfg, self.vit_dim, e.convnext_dims[-1])
        # stage 0c stand-in (tiny / small): 1x1 classifiers of each pixel's object attributes
        # on the two finest maps, the ones the mask decoder reads (dense_loss)
        self.dense_head = nn.ModuleList(nn.Conv2d(c, sum(e.dense_heads), 1)
                                        for c in e.convnext_dims[:2]) if e.dense_heads else None
        # ... and, with encoder.vit_dense, on each ViT token: the attributes at its window's
        # M x M stride-4 positions (vit_dense_map)
        self.vit_dense_head = nn.Linear(self.vit_dim, sum(e.dense_heads) * self.fusion.window ** 2
                                        ) if e.dense_heads and e.vit_dense else None

    def _check(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = pixel_values
        if not torch.is_tensor(x) or x.dim() != 4 or x.shape[1] != 3 or not x.is_floating_point():
            raise ValueError(
                f"DualEncoder expects a float tensor (B, 3, H, W) in [-1, 1], got "
                f"{getattr(x, 'dtype', type(x))} {tuple(getattr(x, 'shape', ()))}; convert "
                "images with focus_ref.data.image_to_tensor(...) and stack them")
        if x.shape[-2:] != (self.ecfg.high_res,) * 2:  # any size: resized to the high-res input
            x = F.interpolate(x, size=(self.ecfg.high_res,) * 2, mode="bilinear",
                              antialias=True, align_corners=False)  # (B, 3, HR, HR)
        return x

    def vanilla(self, x: torch.Tensor) -> torch.Tensor:
        """The ViT on the low-resolution image -> global tokens (B, N, C_vit)."""
        low = F.interpolate(x, size=(self.ecfg.low_res,) * 2, mode="bilinear", antialias=True,
                            align_corners=False)  # (B, 3, LR, LR)
        if self.ecfg.vit_kind == "siglip":
            return self.vit(pixel_values=low).last_hidden_state  # (B, N, C_vit); SigLIP: [-1, 1]
        flat, grid_thw = qwen_patchify(_normalize(low, CLIP_MEAN, CLIP_STD), self.ecfg.vit_patch)
        pos = get_vision_position_ids(grid_thw, 2).to(x.device)  # (B*gh*gw, 2) rotary (row, col)
        merged = self.vit(flat, grid_thw=grid_thw, position_ids=pos).pooler_output  # (B*N, C_vit)
        return merged.reshape(len(x), self.num_tokens, -1)  # (B, N, C_vit)

    def hierarchical(self, x: torch.Tensor):
        """ConvNeXt on the high-resolution image -> four stage maps and the pooled feature."""
        out = self.convnext(_normalize(x, IMAGENET_MEAN, IMAGENET_STD), output_hidden_states=True)
        return list(out.hidden_states[1:]), out.pooler_output  # [(B, C_i, H_i, W_i)], (B, C_4)

    def forward(self, pixel_values: torch.Tensor, return_attn: bool = False,
                return_pooled: bool = False):
        x = self._check(pixel_values)  # (B, 3, HR, HR)
        global_feats = self.vanilla(x)  # (B, N, C_vit)
        features, pooled = self.hierarchical(x)  # [(B, C_i, H_i, W_i)], (B, C_4)
        size = features[0].shape[-2:]  # the stride-4 map: G*M per side
        hr = torch.cat([F.interpolate(f, size=size, mode="bilinear", align_corners=False)
                        for f in features], dim=1)  # (B, sum C_i, G*M, G*M) Mini-Gemini's HR map
        fused = self.fusion(global_feats, hr, return_attn=return_attn)  # (B, N, C_vit)
        attn = None
        if return_attn:
            fused, attn = fused
        tokens = self.adapter(fused)  # (B, N, D_llm)
        out = EncoderOutput(tokens=tokens, features=features, global_feats=global_feats,
                            fused=fused)
        if return_pooled:
            out.pooled = pooled  # (B, C_4) for the stage-0 contrastive head
        if return_attn:
            out.attn = attn  # (B, G, G, M, M)
        return out

    def contrastive_loss(self, pixel_values: torch.Tensor, text_feats: torch.Tensor):
        """Stage 0: CLIP loss of each branch against caption features (B, D_llm)."""
        out = self(pixel_values, return_pooled=True)
        v, c = self.clip_head.embed_images(out, out.pooled)  # (B, d), (B, d)
        t = self.clip_head.embed_text(text_feats)  # (B, d)
        scale = self.clip_head.logit_scale
        loss_v, loss_c = clip_loss(v, t, scale), clip_loss(c, t, scale)
        return (loss_v + loss_c) / 2, {"clip_vit": loss_v.item(), "clip_cnn": loss_c.item()}

    def dense_loss(self, pixel_values: torch.Tensor, labels: torch.Tensor):
        """Stage 0c: cross-entropy of each pixel's colour / shape / size class (background = the
        last class of each) from the stride-4 and stride-8 ConvNeXt maps; labels (B, A, H, W).

        Why (issue #5, measured with a linear probe per cell): after CLIP pretraining the maps
        tell colours apart (98% of object cells) but not shapes (33%, chance 25%), so the mask
        decoder could not find "the circle"; after stage 0c, 84%. Pretrained ConvNeXts bring
        shape from large data; the stand-in learns it from ShapesWorld's exact masks (train
        scenes only).
        """
        if self.dense_head is None:
            raise ValueError("this encoder has no dense heads (encoder.dense_heads = ()): stage "
                             "0c is for stand-in encoders; pretrained ones skip it")
        x = self._check(pixel_values)  # (B, 3, HR, HR)
        features, _ = self.hierarchical(x)
        sizes, losses = list(self.ecfg.dense_heads), []
        for f, head in zip(features, self.dense_head):  # strides 4, 8
            logits = F.interpolate(head(f), size=labels.shape[-2:], mode="bilinear",
                                   align_corners=False)  # (B, sum K_a, H, W)
            for a, lg in enumerate(logits.split(sizes, 1)):  # (B, K_a, H, W) per attribute
                losses.append(F.cross_entropy(lg, labels[:, a]))
        n = len(sizes)  # per attribute: both ConvNeXt maps (and the ViT's)
        logs = {k: (losses[i].item() + losses[i + n].item()) / 2
                for i, k in enumerate(("dense_color", "dense_shape", "dense_size")[:n])}
        if self.vit_dense_head is not None:
            vit = self.vit_dense_map(self.vanilla(x))  # (B, sum K_a, G*M, G*M) the ViT tokens'
            s = labels.shape[-1] // vit.shape[-1]  # the labels at the centre of each position
            for a, lg in enumerate(vit.split(sizes, 1)):
                losses.append(F.cross_entropy(lg, labels[:, a, s // 2::s, s // 2::s]))
            logs["dense_vit"] = sum(v.item() for v in losses[2 * n:]) / n
        return sum(losses) / len(losses), logs

    def vit_dense_map(self, global_feats: torch.Tensor) -> torch.Tensor:
        """Stage 0c on the ViT: each token's logits for the M x M stride-4 positions of its
        window, laid out as a map (B, N, C_vit) -> (B, sum K_a, G*M, G*M)."""
        B, G, M = len(global_feats), self.grid, self.fusion.window
        out = self.vit_dense_head(global_feats).reshape(B, G, G, M, M, -1)  # (B, G, G, M, M, K)
        return out.permute(0, 5, 1, 3, 2, 4).reshape(B, -1, G * M, G * M)  # (B, K, G*M, G*M)

    # ----- paper scale: stage 0 = load the released weights -------------------------------
    def load_pretrained(self, vit_path: str | None = None, convnext_path: str | None = None):
        """Load each branch with transformers' from_pretrained (a hub id or a local folder)."""
        e = self.ecfg
        vit_path = vit_path or e.vit_pretrained
        convnext_path = convnext_path or e.convnext_pretrained
        if vit_path:
            if e.vit_kind == "siglip":
                vit = SiglipVisionModel.from_pretrained(vit_path)
            else:  # the vision tower of a full Qwen2.5-VL checkpoint
                from transformers import Qwen2_5_VLForConditionalGeneration
                vit = Qwen2_5_VLForConditionalGeneration.from_pretrained(vit_path).model.visual
            self._swap("vit", vit, vit_path)
        if convnext_path:
            self._swap("convnext", ConvNextModel.from_pretrained(convnext_path), convnext_path)
        return self

    def _swap(self, name: str, new: nn.Module, path: str) -> None:
        old = getattr(self, name)
        shapes = {k: v.shape for k, v in old.state_dict().items()}
        got = {k: v.shape for k, v in new.state_dict().items()}
        if shapes != got:
            bad = sorted(k for k in set(shapes) | set(got) if shapes.get(k) != got.get(k))[:3]
            raise ValueError(f"pretrained {name} at {path} does not match cfg.encoder (first "
                             f"differences: {bad}); set the encoder sizes of the config to "
                             "those of the checkpoint")
        old.load_state_dict(new.state_dict())
