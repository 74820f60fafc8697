"""Diffusion decoder: renders visual tokens, edits the region a mask names (FOCUS §3.4).

FOCUS's LLM writes discrete visual tokens; a diffusion decoder (initialised from SDXL)
turns them into pixels. For region-controlled editing the segmentation mask the model
predicted is given to the decoder as an explicit *spatial prompt*, so the edit lands where
the user pointed and the rest of the picture is kept. The paper's ablation compares this
with feeding the mask as learned token embeddings; explicit masks localise better.

This file builds it on diffusers, in the MoVQ latent space of tokenizer.py (the way
Kandinsky 2.2 pairs a UNet with MoVQ):

    input channels   noisy latent (C) ⊕ source-image latent (C) ⊕ region mask (1)
                     = 2C + 1 (tiny: 33), all on the h x w latent grid (tiny 16 x 16)
    cross-attention  context (B, L, D): embeddings of the target's pixel codes (h*w, 2-D
                     positions) and semantic codes (N), and / or projected LLM states
    UNet             `UNet2DConditionModel` under a DDPM schedule, predicting x0 ("sample",
                     fastest to learn here), v or noise (`prediction_type`)
    sampler          a few-step DPM-Solver++ (or DDIM) with classifier-free guidance on the
                     token context and a torch.Generator for determinism

Two inductive biases make it learn in CPU minutes: pixel tokens are read *locally* (a latent
cell cross-attends to the pixel tokens of its own footprint and to every other token,
`LocalPixelAttention`), and a learned position map is added to the UNet's first features
so cells know where they are (for the semantic tokens and LLM states, read globally).
`mask_condition = "tokens"` (the ablation) zeroes the mask channel and appends the mask as
h*w token embeddings to the context instead. In training the token context is swapped for
a learned null context with probability `cond_dropout` (classifier-free guidance); source
and mask are always given. Latents are scaled to unit variance by `latent_scale` (set in
stage 1 from the tokenizer's latents, like SD's 0.18215). Sampling can keep the background
in latent space (`blend_latents`: outside the mask, the noised source after every step,
Blended Latent Diffusion); `edit_image` can also paste the source pixels back outside the
mask (`composite`).

Stage 1 (train.py): (a) render from tokens (source = zeros, mask = everywhere); (b) edit
(source = the image, mask = the edit region, tokens = the target image's).

Bad input: masks of the wrong size or empty, latents that do not match the grid, an unknown
`mask_condition` -> one ValueError each, naming the fix.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler,
                       UNet2DConditionModel)
from diffusers.models.attention_processor import AttnProcessor2_0
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

from focus_ref.config import FocusConfig

_UP = {"DownBlock2D": "UpBlock2D", "CrossAttnDownBlock2D": "CrossAttnUpBlock2D"}


def sincos_2d(n: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """2-D sine-cosine position embeddings (MAE): rows in the first half of the channels,
    columns in the second; returns (row (n, dim), col (n, dim)), row[i] + col[j] = cell (i, j)."""
    half = dim // 2
    pos = torch.arange(n, dtype=torch.float32)[:, None]  # (n, 1)
    freq = 2.5 * torch.exp(-torch.arange(half // 2) / max(1, half // 2 - 1) * 3.2)  # (half/2,)
    emb = torch.cat([(pos * freq).sin(), (pos * freq).cos()], 1)  # (n, half)
    pad = torch.zeros(n, dim - half)
    return torch.cat([emb, pad], 1), torch.cat([pad, emb], 1)[:, :dim]  # (n, dim) x 2


def build_unet(cfg: FocusConfig) -> UNet2DConditionModel:
    """The denoiser: a diffusers UNet with 2C + 1 input channels (paper: SDXL's sizes)."""
    d, t = cfg.diffusion, cfg.tokenizer
    factor = 2 ** (len(t.block_out_channels) - 1)
    down = tuple(d.down_block_types) or ("CrossAttnDownBlock2D",) * len(d.block_out_channels)
    if len(down) != len(d.block_out_channels) or any(b not in _UP for b in down):
        raise ValueError(f"diffusion.down_block_types {down} must name one of {sorted(_UP)} per "
                         f"entry of block_out_channels {d.block_out_channels}")
    layers = d.transformer_layers_per_block or (1,) * len(down)
    return UNet2DConditionModel(
        sample_size=cfg.data.image_size // factor, in_channels=2 * t.vq_embed_dim + 1,
        out_channels=t.vq_embed_dim, down_block_types=down,
        up_block_types=tuple(_UP[b] for b in reversed(down)),
        block_out_channels=tuple(d.block_out_channels), layers_per_block=d.layers_per_block,
        transformer_layers_per_block=tuple(layers), cross_attention_dim=d.cross_attention_dim,
        # diffusers' `attention_head_dim` is really the number of heads (diffusers#2011):
        attention_head_dim=tuple(c // d.attention_head_dim for c in d.block_out_channels),
        use_linear_projection=d.use_linear_projection, norm_num_groups=d.norm_num_groups)


@functools.lru_cache(maxsize=64)
def local_mask(side: int, grid: int, n_pixel: int, length: int, device: str) -> torch.Tensor:
    """(side², length) bool: query cell q of a side x side feature map may read pixel token k
    only if k lies in q's footprint on the grid x grid token map; every later token always."""
    k = torch.arange(n_pixel)  # pixel tokens, row-major on the grid
    cell = (k // grid) * side // grid * side + (k % grid) * side // grid  # (n_pixel,)
    pix = cell[None, :] == torch.arange(side * side)[:, None]  # (side², n_pixel)
    rest = torch.ones(side * side, length - n_pixel, dtype=torch.bool)  # (side², L - n_pixel)
    return torch.cat([pix, rest], 1).to(device)  # (side², L)


class LocalPixelAttention(AttnProcessor2_0):
    """Cross-attention with a locality prior for pixel tokens: they form a grid aligned with
    the latent, so a cell reads the pixel tokens of its own footprint (and every semantic /
    LLM / mask token). Without it each cell must first learn *where* it is to find its token,
    which takes far longer than the CPU minutes of the tiny preset. No pixel tokens in the
    context (stage 4: semantic codes + LLM states) -> plain attention."""

    def __init__(self, grid: int, state: dict):
        self.grid, self.state = grid, state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs):
        n_pixel = self.state.get("pixel_tokens", 0)
        if encoder_hidden_states is None or n_pixel == 0 or hidden_states.dim() != 3:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask,
                                    temb)
        B, N, _ = hidden_states.shape  # N = side² latent cells at this UNet level
        q = attn.to_q(hidden_states)  # (B, N, inner)
        k, v = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)  # (B, L, inner)
        q, k, v = (x.view(B, x.shape[1], attn.heads, -1).transpose(1, 2)
                   for x in (q, k, v))  # (B, heads, N or L, d)
        allowed = local_mask(math.isqrt(N), self.grid, n_pixel, k.shape[2], str(q.device))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)  # (B, heads, N, d)
        out = out.transpose(1, 2).reshape(B, N, -1)  # (B, N, inner)
        return attn.to_out[1](attn.to_out[0](out))  # (B, N, C)


class DiffusionDecoder(nn.Module):
    def __init__(self, cfg: FocusConfig):
        super().__init__()
        d, t = cfg.diffusion, cfg.tokenizer
        self.dcfg = d
        if d.mask_condition not in ("explicit", "tokens"):
            raise ValueError(f"diffusion.mask_condition={d.mask_condition!r} is unknown: use "
                             "'explicit' (mask channel, the paper) or 'tokens' (the ablation)")
        self.unet = build_unet(cfg)
        self.factor = 2 ** (len(t.block_out_channels) - 1)  # pixels per latent cell
        self.grid = cfg.data.image_size // self.factor  # h = w
        self.latent_channels = t.vq_embed_dim  # C
        D = d.cross_attention_dim
        # context: embeddings of visual tokens at both levels, with their positions
        self.pixel_embed = nn.Embedding(t.num_vq_embeddings, D)
        self.sem_embed = nn.Embedding(t.sem_codebook_size, D)
        row, col = sincos_2d(self.grid, D)
        self.row_embed = nn.Parameter(row)  # 2-D positions of the h x w grid: (h, D), (w, D)
        self.col_embed = nn.Parameter(col)
        # The UNet's convolutions are translation-equivariant: to read the token meant for
        # its place (e.g. of the 4 x 4 semantic grid) a cell must know where it is, so a
        # learned position map is added to the first feature map (as ViT's position embeddings)
        row, col = sincos_2d(self.grid, d.block_out_channels[0])
        self.unet_pos = nn.Parameter(0.5 * (row[:, None] + col[None]))  # (h, w, C_0)
        self.unet.conv_in.register_forward_hook(
            lambda m, i, out: out + self.unet_pos.permute(2, 0, 1).to(out.dtype))  # (B, C_0, h, w)
        self._attn_state = {"pixel_tokens": 0}  # read by the cross-attention processors
        self.unet.set_attn_processor({
            name: LocalPixelAttention(self.grid, self._attn_state) if ".attn2." in name
            else AttnProcessor2_0() for name in self.unet.attn_processors})
        self.sem_pos = nn.Parameter(torch.randn(d.max_sem_tokens, D) * 0.02)
        self.level_embed = nn.Parameter(torch.zeros(3, D))  # pixel / semantic / LLM
        self.llm_proj = nn.Linear(cfg.llm.hidden_size, D)  # later stages: LLM states
        self.mask_embed = nn.Linear(1, D)  # the ablation: the mask as tokens
        self.context_norm = nn.LayerNorm(D)
        self.null_context = nn.Parameter(torch.zeros(1, 1, D))  # CFG: "no condition"
        self.register_buffer("latent_scale", torch.ones(()))  # 1 / std of tokenizer latents
        self.scheduler = DDPMScheduler(num_train_timesteps=d.num_train_timesteps,
                                       beta_schedule=d.beta_schedule,
                                       prediction_type=d.prediction_type)

    def load_pretrained(self, path: str | None = None) -> DiffusionDecoder:
        """Initialise the UNet from a pretrained one (default cfg.diffusion.pretrained, SDXL's):
        every matching tensor is copied; conv_in gains the source and mask channels with zero
        weights (the InstructPix2Pix recipe), so training starts from the pretrained model."""
        from focus_ref.tokenizer import split_subfolder

        repo, sub = split_subfolder(path or self.dcfg.pretrained)
        ref = UNet2DConditionModel.from_pretrained(repo, subfolder=sub)
        own, skipped = self.unet.state_dict(), []
        for k, v in ref.state_dict().items():
            if k == "conv_in.weight" and k in own and own[k].shape[1] > v.shape[1]:
                own[k].zero_()
                own[k][:, :v.shape[1]] = v  # (C_0, 2C + 1, 3, 3): the latent channels
            elif k in own and own[k].shape == v.shape:
                own[k].copy_(v)
            else:
                skipped.append(k)  # e.g. SDXL's text-time add_embedding
        missing = sorted(set(own) - set(ref.state_dict()))
        if missing:
            raise ValueError(f"pretrained UNet at {path} lacks {len(missing)} tensors of "
                             f"cfg.diffusion's UNet (first: {missing[:3]}); match the sizes")
        self.unet.load_state_dict(own)
        self.skipped_pretrained = skipped
        return self

    # ----- conditions ----------------------------------------------------------------------
    def grid_pos(self) -> torch.Tensor:
        """2-D position of every latent cell, row-major: (h*w, D)."""
        return (self.row_embed[:, None] + self.col_embed[None]).flatten(0, 1)  # (h*w, D)

    def mask_to_grid(self, mask: torch.Tensor, batch: int) -> torch.Tensor:
        """Region mask (B, H, W) / (B, 1, H, W) at image or latent size -> (B, 1, h, w) 0/1.

        The paper's spatial prompt: a latent cell is editable if any of its pixels is.
        """
        m = torch.as_tensor(mask)
        m = m[:, None] if m.dim() == 3 else m  # (B, 1, H, W)
        H = self.grid * self.factor
        if m.dim() != 4 or m.shape[0] != batch or m.shape[1] != 1 or m.shape[-1] != m.shape[-2] \
                or m.shape[-1] not in (H, self.grid):
            raise ValueError(f"mask must be (B, H, W) with B = {batch} and a side of {H} (image) "
                             f"or {self.grid} (latent grid), got {tuple(m.shape)}; resize the "
                             "mask to the image (nearest) before editing")
        m = m.float()
        if m.shape[-1] == H:
            m = F.max_pool2d(m, self.factor)  # (B, 1, h, w): any covered pixel -> editable
        if m.device.type != "meta" and (m.flatten(1).amax(1) <= 0).any():
            raise ValueError("empty mask: an edit needs a region to change; pass the object's "
                             "mask (or an all-ones mask to render the whole image)")
        return (m > 0).float()  # (B, 1, h, w)

    def make_context(self, pixel_codes: torch.Tensor | None = None,
                     sem_codes: torch.Tensor | None = None,
                     llm_states: torch.Tensor | None = None) -> torch.Tensor:
        """Visual tokens (and / or LLM states) -> cross-attention context (B, L, D)."""
        parts = []
        if pixel_codes is not None:  # (B, h, w) or (B, h*w), row-major
            c = pixel_codes.reshape(len(pixel_codes), -1)  # (B, h*w)
            if c.shape[1] != self.grid ** 2:
                raise ValueError(f"pixel codes must cover the {self.grid}x{self.grid} grid, got "
                                 f"{tuple(pixel_codes.shape)}")
            _check_ids(c, self.pixel_embed.num_embeddings, "pixel code")
            parts.append(self.pixel_embed(c) + self.grid_pos() + self.level_embed[0])  # (B,h*w,D)
        if sem_codes is not None:  # (B, N)
            if sem_codes.shape[1] > len(self.sem_pos):
                raise ValueError(f"{sem_codes.shape[1]} semantic codes exceed "
                                 f"diffusion.max_sem_tokens = {len(self.sem_pos)}")
            _check_ids(sem_codes, self.sem_embed.num_embeddings, "semantic code")
            parts.append(self.sem_embed(sem_codes) + self.sem_pos[:sem_codes.shape[1]]
                         + self.level_embed[1])  # (B, N, D)
        if llm_states is not None:  # (B, L, D_llm)
            parts.append(self.llm_proj(llm_states) + self.level_embed[2])  # (B, L, D)
        if not parts:
            raise ValueError("make_context needs pixel_codes, sem_codes or llm_states")
        return self.context_norm(torch.cat(parts, 1))  # (B, L, D)

    def forward(self, noisy: torch.Tensor, t: torch.Tensor, source: torch.Tensor,
                mask: torch.Tensor, context: torch.Tensor, pixel_tokens: int = 0) -> torch.Tensor:
        """One denoiser call on scaled latents; mask (B, 1, h, w) from mask_to_grid;
        pixel_tokens = how many leading context tokens are pixel codes (read locally)."""
        if noisy.shape != source.shape or noisy.shape[1:] != (self.latent_channels,) + (
                self.grid,) * 2:
            raise ValueError(f"latents must be (B, {self.latent_channels}, {self.grid}, "
                             f"{self.grid}) (tokenizer.quantized_latent), got "
                             f"{tuple(noisy.shape)} and {tuple(source.shape)}")
        if self.dcfg.mask_condition == "tokens":  # ablation: the mask through cross-attention
            m = mask.flatten(2).transpose(1, 2)  # (B, h*w, 1)
            context = torch.cat([context, self.mask_embed(m) + self.grid_pos()], 1)  # (B,L+hw,D)
            mask = torch.zeros_like(mask)  # (B, 1, h, w): the channel carries nothing
        x = torch.cat([noisy, source, mask], 1)  # (B, 2C + 1, h, w) explicit spatial prompt
        self._attn_state["pixel_tokens"] = pixel_tokens
        return self.unet(x, t, encoder_hidden_states=context).sample  # (B, C, h, w)

    # ----- training -------------------------------------------------------------------------
    def loss(self, target: torch.Tensor, source: torch.Tensor, mask: torch.Tensor,
             context: torch.Tensor, pixel_tokens: int = 0) -> tuple[torch.Tensor, dict]:
        """Denoising loss; target / source are tokenizer latents (B, C, h, w), mask at any
        size mask_to_grid accepts, context (B, L, D) from make_context."""
        B = len(target)
        m = self.mask_to_grid(mask, B)  # (B, 1, h, w)
        x0, src = target * self.latent_scale, source * self.latent_scale  # unit variance
        noise = torch.randn_like(x0)  # (B, C, h, w)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (B,), device=x0.device)
        noisy = self.scheduler.add_noise(x0, noise, t)  # (B, C, h, w) forward process q(x_t|x_0)
        drop = torch.rand(B, 1, 1, device=x0.device) < self.dcfg.cond_dropout  # CFG dropout
        context = torch.where(drop, self.null_context.to(context.dtype), context)  # (B, L, D)
        pred = self(noisy, t, src, m, context, pixel_tokens)  # (B, C, h, w)
        kind = self.dcfg.prediction_type
        goal = {"v_prediction": lambda: self.scheduler.get_velocity(x0, noise, t),
                "epsilon": lambda: noise, "sample": lambda: x0}[kind]()  # (B, C, h, w)
        err = (pred - goal) ** 2  # (B, C, h, w)
        inside = (err * m).sum() / (m.sum() * err.shape[1]).clamp(min=1)
        loss = err.mean() + self.dcfg.mask_loss_weight * inside  # stress the edited cells
        return loss, {"mse": err.mean().item(), "mse_in": inside.item()}

    # ----- sampling -------------------------------------------------------------------------
    def make_sampler(self, kind: str | None = None):
        kind = kind or self.dcfg.sampler
        if kind == "dpm":  # DPM-Solver++ (2nd order): good images in ~10 steps
            return DPMSolverMultistepScheduler.from_config(self.scheduler.config)
        if kind == "ddim":
            return DDIMScheduler.from_config(self.scheduler.config, timestep_spacing="trailing")
        raise ValueError(f"unknown sampler {kind!r}: use 'dpm' or 'ddim'")

    @torch.no_grad()
    def sample(self, source: torch.Tensor, mask: torch.Tensor, context: torch.Tensor,
               generator: torch.Generator | None = None, steps: int | None = None,
               guidance_scale: float | None = None, sampler: str | None = None,
               pixel_tokens: int = 0, blend: bool | None = None,
               trajectory: list | None = None) -> torch.Tensor:
        """Generate a latent (B, C, h, w) (tokenizer scale) for source latent + mask + context.

        Classifier-free guidance: pred = uncond + g * (cond - uncond); g = 1 turns it off.
        `blend` (default cfg.diffusion.blend_latents): after every step the cells outside the
        mask are reset to the source noised to the same level (Blended Latent Diffusion), so
        the background ends exactly as the source latent. Pass a list as `trajectory` to
        collect x_t after every step (tokenizer scale).
        """
        B = len(source)
        g = self.dcfg.guidance_scale if guidance_scale is None else guidance_scale
        blend = self.dcfg.blend_latents if blend is None else blend
        m = self.mask_to_grid(mask, B)  # (B, 1, h, w)
        src = source * self.latent_scale  # (B, C, h, w)
        sched = self.make_sampler(sampler)
        sched.set_timesteps(steps or self.dcfg.num_inference_steps, device=source.device)
        x = randn_tensor(source.shape, generator=generator, device=source.device,
                         dtype=source.dtype)  # (B, C, h, w) x_T ~ N(0, I)
        noise = randn_tensor(source.shape, generator=generator, device=source.device,
                             dtype=source.dtype)  # (B, C, h, w) for the blended background
        null = self.null_context.expand_as(context)  # (B, L, D)
        ts = sched.timesteps
        for i, t in enumerate(ts):
            tt = t.expand(B).to(source.device)  # (B,)
            if g == 1.0:
                pred = self(x, tt, src, m, context, pixel_tokens)  # (B, C, h, w)
            else:  # one batched call for the conditional and the unconditional branch
                both = self(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([src, src]),
                            torch.cat([m, m]), torch.cat([context, null]),
                            pixel_tokens)  # (2B, C, h, w)
                cond, uncond = both.chunk(2)
                pred = uncond + g * (cond - uncond)  # classifier-free guidance
            x = sched.step(pred, t, x).prev_sample  # (B, C, h, w)
            if blend:  # outside the mask: the source at the next step's noise level
                known = src if i == len(ts) - 1 else self.scheduler.add_noise(
                    src, noise, ts[i + 1].expand(B))  # (B, C, h, w)
                x = m * x + (1 - m) * known
            if trajectory is not None:
                trajectory.append(x / self.latent_scale)
        return x / self.latent_scale  # (B, C, h, w) back in tokenizer units


def _check_ids(ids: torch.Tensor, size: int, what: str) -> None:
    if ids.is_floating_point():
        raise ValueError(f"{what}s must be integer ids, got {ids.dtype}")
    if ids.numel() and ids.device.type != "meta" and (ids.min() < 0 or ids.max() >= size):
        raise ValueError(f"{what} ids must lie in [0, {size}), got [{int(ids.min())}, "
                         f"{int(ids.max())}]: shift LLM vocabulary ids back to codebook ids")


def composite(edited: torch.Tensor, source: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Keep the untouched background: source pixels outside the mask, edited ones inside."""
    m = torch.as_tensor(mask).to(edited.device).float()
    m = m[:, None] if m.dim() == 3 else m  # (B, 1, H, W)
    return m * edited + (1 - m) * source  # (B, 3, H, W)


@torch.no_grad()
def edit_image(decoder: DiffusionDecoder, tokenizer, source: torch.Tensor | None,
               mask: torch.Tensor | None, pixel_codes: torch.Tensor | None = None,
               sem_codes: torch.Tensor | None = None, llm_states: torch.Tensor | None = None,
               generator: torch.Generator | None = None, steps: int | None = None,
               guidance_scale: float | None = None, composite_background: bool = True,
               snap_to_codes: bool = True) -> torch.Tensor:
    """Pixels in, pixels out: source (B, 3, H, W) in [-1, 1] (None = render from tokens),
    mask (B, H, W) (None = everywhere) -> edited image (B, 3, H, W) in [-1, 1]."""
    context = decoder.make_context(pixel_codes, sem_codes, llm_states)  # (B, L, D)
    B, H = len(context), decoder.grid * decoder.factor
    dev = context.device
    if source is None:  # (a) render: nothing to keep
        src_lat = torch.zeros(B, decoder.latent_channels, decoder.grid, decoder.grid, device=dev)
    else:  # (b) edit
        src_lat = tokenizer.quantized_latent(source)  # (B, C, h, w)
    if mask is None:
        mask = torch.ones(B, H, H, device=dev)  # (B, H, W)
    n_pix = decoder.grid ** 2 if pixel_codes is not None else 0  # leading pixel tokens
    lat = decoder.sample(src_lat, mask, context, generator, steps, guidance_scale,
                         pixel_tokens=n_pix)  # (B, C, h, w)
    if snap_to_codes:  # back onto the codebook: the decoder's output is a token grid again
        lat = tokenizer.codes_to_latent(tokenizer.latent_to_codes(lat))  # (B, C, h, w)
    out = tokenizer.decode_latent(lat).clamp(-1, 1)  # (B, 3, H, W)
    if composite_background and source is not None:
        out = composite(out, source, mask)  # (B, 3, H, W) outside the mask = source
    return out


@torch.no_grad()
def edit_metrics(decoder: DiffusionDecoder, tokenizer, samples: list, encoder=None,
                 seed: int = 0, steps: int | None = None, guidance_scale: float | None = None,
                 batch_size: int = 32) -> dict:
    """Held-out edits with ground-truth target tokens and mask, judged by the oracle.

    samples: world.sample(i)s. One sampling pass, judged with the source pasted back outside
    the region (success, inside_acc = share of region pixels of the right palette colour,
    bg_psnr in dB capped at 100) and as it is (raw_success, raw_bg_psnr).
    """
    from focus_ref.data import image_to_tensor, tensor_to_image
    from focus_ref.evaluate import psnr
    from focus_ref.oracle import judge_edit

    dev = next(decoder.parameters()).device
    g = torch.Generator(dev).manual_seed(seed)
    res = {k: [] for k in ("success", "inside_acc", "bg_psnr", "raw_success", "raw_bg_psnr")}
    for i in range(0, len(samples), batch_size):
        chunk = samples[i:i + batch_size]
        src = torch.stack([image_to_tensor(s["image"]) for s in chunk]).to(dev)  # (b, 3, H, W)
        tgt = torch.stack([image_to_tensor(s["edit"]["target_image"]) for s in chunk]).to(dev)
        region = torch.stack([torch.from_numpy(s["edit"]["region"]) for s in chunk]).to(dev)
        codes = tokenizer.encode(tgt)  # (b, h, w) the ground-truth target tokens
        sem = tokenizer.encode_semantic(encoder.vanilla(tgt)) if encoder is not None else None
        raw = edit_image(decoder, tokenizer, src, region, codes, sem, generator=g, steps=steps,
                         guidance_scale=guidance_scale, composite_background=False)
        for pre, out in (("", composite(raw, src, region)), ("raw_", raw)):  # (b, 3, H, W)
            res[pre + "bg_psnr"].append(psnr(out, tgt, ~region))  # (b,)
            verdicts = [judge_edit(tensor_to_image(o), s["edit"]) for s, o in zip(chunk, out)]
            res[pre + "success"] += [v["success"] for v in verdicts]
        res["inside_acc"] += [v["inside_acc"] for v in verdicts]  # inside: raw = pasted
    return {**{k: float(torch.cat(v).nanmean()) if "psnr" in k else sum(v) / len(v)
               for k, v in res.items()}, "n": len(samples)}
