"""Visual tokenizer: MoVQ pixel codes + semantic codes (FOCUS, arXiv 2506.16806, §3.2).

FOCUS turns an image into discrete tokens at two levels, so the LLM can *write* images:
semantic-level tokens that quantise the vanilla encoder's global features, and pixel-level
tokens from MoVQGAN, a VQ autoencoder whose decoder modulates every normalisation layer
with the quantised vectors (MoVQ, arXiv 2209.09002: "spatially conditioned normalisation",
diffusers' `SpatialNorm`). The pixel latent is also the space the diffusion decoder works in
(diffusion.py), the way Kandinsky 2.2 pairs its UNet with MoVQ.

    pixel branch     x (B, 3, H, W) in [-1, 1] ─► VQModel.encoder ─► z (B, C, h, w)
                     ─► nearest codebook entry ─► codes (B, h, w) in [0, num_vq_embeddings)
                     codes ─► latent (B, C, h, w) ─► VQModel.decoder(latent, zq=latent) ─► x̂
    semantic branch  global_feats (B, N, C_vit) from DualEncoder.vanilla ─► Linear ─► cosine
                     nearest entry ─► semantic codes (B, N); a Linear maps the codes back to
                     C_vit so the codes must keep what the features say.

h = H / f with f = 2 ** (len(block_out_channels) - 1) (tiny: 64 / 4 = 16). The diffusion
decoder conditions on both levels (it embeds pixel and semantic codes as its cross-attention
context, diffusion.py); the pixel decoder here stays a plain diffusers `VQModel`, so a pixel
branch saved with `save_pixel_branch(dir)` loads in `VQModel.from_pretrained(dir)` and
decodes the same codes to the same image (tests/test_tokenizer.py checks it).

Training (stage 1, train.py): reconstruction (MSE + L1) + codebook + beta * commitment
(VQ-VAE), with dead codes restarted from encoder outputs of the batch so most of the
codebook stays in use. `perceptual_weight` (feature distance in a frozen network, e.g. the
ConvNeXt of the DualEncoder) and `adversarial_weight` (a PatchGAN with the hinge loss, VQGAN)
switch on the larger presets' extra terms.

Bad input: a side not divisible by f, a value range outside [-1, 1] (uint8 images: use
`focus_ref.data.image_to_tensor`), code ids outside the codebook -> one ValueError each.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import VQModel
from torch import nn
from torch.func import functional_call

from focus_ref.config import FocusConfig


def build_vqmodel(cfg: FocusConfig) -> VQModel:
    """The MoVQ pixel branch as a diffusers VQModel (paper preset: Kandinsky 2.2's MoVQGAN)."""
    t = cfg.tokenizer
    n = len(t.block_out_channels)
    if t.vq_embed_dim != t.latent_channels:
        raise ValueError("tokenizer.vq_embed_dim must equal latent_channels: MoVQ's SpatialNorm "
                         "feeds the quantised vectors to a decoder built for latent_channels")
    down = ("DownEncoderBlock2D",) * (n - 1) + (
        "AttnDownEncoderBlock2D" if t.attn_at_lowest else "DownEncoderBlock2D",)
    up = ("AttnUpDecoderBlock2D" if t.attn_at_lowest else "UpDecoderBlock2D",) + (
        "UpDecoderBlock2D",) * (n - 1)
    return VQModel(
        in_channels=3, out_channels=3, down_block_types=down, up_block_types=up,
        block_out_channels=tuple(t.block_out_channels), layers_per_block=t.layers_per_block,
        latent_channels=t.latent_channels, num_vq_embeddings=t.num_vq_embeddings,
        vq_embed_dim=t.vq_embed_dim, norm_num_groups=t.norm_num_groups,
        sample_size=cfg.data.image_size,
        norm_type="spatial")  # MoVQ: the decoder's norms are modulated by the quantised latent


def nearest(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest codebook row for every row of z: (M, C), (K, C) -> (M,)."""
    return torch.cdist(z, codebook).argmin(1)  # the same rule as diffusers' VectorQuantizer


def vq_losses(z: torch.Tensor, zq: torch.Tensor, beta: float) -> torch.Tensor:
    """VQ-VAE: codebook term ||sg(z) - e||² + beta * commitment ||z - sg(e)||²."""
    return F.mse_loss(zq, z.detach()) + beta * F.mse_loss(z, zq.detach())


class PatchDiscriminator(nn.Module):
    """VQGAN's PatchGAN: a real/fake logit per patch (only built when adversarial_weight > 0)."""

    def __init__(self, width: int = 64, layers: int = 3):
        super().__init__()
        mods, c = [nn.Conv2d(3, width, 4, 2, 1), nn.LeakyReLU(0.2)], width
        for _ in range(layers - 1):
            mods += [nn.Conv2d(c, 2 * c, 4, 2, 1), nn.GroupNorm(8, 2 * c), nn.LeakyReLU(0.2)]
            c *= 2
        self.net = nn.Sequential(*mods, nn.Conv2d(c, 1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (B, 1, H / 2**layers, W / 2**layers)


class VisualTokenizer(nn.Module):
    def __init__(self, cfg: FocusConfig):
        super().__init__()
        t = self.tcfg = cfg.tokenizer
        self.vq = build_vqmodel(cfg)  # pixel branch (a plain diffusers VQModel)
        self.factor = 2 ** (len(t.block_out_channels) - 1)  # f: pixels per code side
        self.grid = cfg.data.image_size // self.factor  # h = w at the training size
        self.num_codes = t.num_vq_embeddings  # K
        # semantic branch: quantise the vanilla encoder's features (cosine codebook)
        self.sem_in = nn.Linear(cfg.encoder.vit_dim, t.sem_dim)
        self.sem_codebook = nn.Embedding(t.sem_codebook_size, t.sem_dim)
        self.sem_out = nn.Linear(t.sem_dim, cfg.encoder.vit_dim)
        self.num_sem_codes = t.sem_codebook_size
        # running code counts for restarting dead codes (training only); starting at zero,
        # the first batch initialises the codebooks from encoder outputs
        self.register_buffer("usage", torch.zeros(t.num_vq_embeddings))
        self.register_buffer("sem_usage", torch.zeros(t.sem_codebook_size))
        self.discriminator = PatchDiscriminator() if t.adversarial_weight > 0 else None

    @property
    def codebook(self) -> torch.Tensor:
        return self.vq.quantize.embedding.weight  # (K, C)

    # ----- checks ------------------------------------------------------------------------
    def _check_image(self, x: torch.Tensor) -> None:
        if not torch.is_tensor(x) or x.dim() != 4 or x.shape[1] != 3 or not x.is_floating_point():
            raise ValueError(
                f"VisualTokenizer expects a float tensor (B, 3, H, W) in [-1, 1], got "
                f"{getattr(x, 'dtype', type(x))} {tuple(getattr(x, 'shape', ()))}; convert "
                "images with focus_ref.data.image_to_tensor(...) and stack them")
        H, W = x.shape[-2:]
        if H % self.factor or W % self.factor:
            raise ValueError(
                f"image size {H}x{W} is not divisible by the tokenizer's downsampling factor "
                f"{self.factor}: resize or crop it to a multiple of {self.factor} (e.g. "
                f"{H // self.factor * self.factor}x{W // self.factor * self.factor})")
        if x.device.type != "meta" and (x.min() < -1.01 or x.max() > 1.01):
            raise ValueError(
                f"image values span [{x.min().item():.2f}, {x.max().item():.2f}] but the "
                "tokenizer works in [-1, 1]: convert uint8 images with "
                "focus_ref.data.image_to_tensor")

    def _check_codes(self, codes: torch.Tensor, size: int, what: str) -> None:
        if codes.is_floating_point():
            raise ValueError(f"{what} must be integer ids, got {codes.dtype}: pass .long() ids")
        if codes.numel() and (codes.min() < 0 or codes.max() >= size):
            raise ValueError(
                f"{what} ids must lie in [0, {size}), got [{int(codes.min())}, "
                f"{int(codes.max())}]: ids outside the codebook (e.g. text-token ids that "
                "were not shifted back) cannot be decoded")

    # ----- pixel branch: image <-> codes <-> latent ----------------------------------------
    def encode_latent(self, x: torch.Tensor) -> torch.Tensor:
        """Image -> continuous (not yet quantised) latent z (B, C, h, w)."""
        self._check_image(x)
        return self.vq.encode(x).latents  # (B, C, h, w): encoder + quant_conv

    def latent_to_codes(self, z: torch.Tensor) -> torch.Tensor:
        """Any latent (B, C, h, w) -> ids of the nearest codebook entries (B, h, w)."""
        B, C, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, C)  # (B*h*w, C)
        return nearest(flat, self.codebook).reshape(B, h, w)  # (B, h, w)

    def codes_to_latent(self, codes: torch.Tensor) -> torch.Tensor:
        """Ids (B, h, w) -- or (B, h*w) on a square grid -- -> quantised latent (B, C, h, w)."""
        self._check_codes(codes, self.num_codes, "pixel code")
        if codes.dim() == 2:  # flat LLM token order (row-major) back onto the grid
            side = int(round(codes.shape[1] ** 0.5))
            if side * side != codes.shape[1]:
                raise ValueError(f"{codes.shape[1]} flat codes do not form a square grid: "
                                 "pass codes as (B, h, w)")
            codes = codes.reshape(len(codes), side, side)  # (B, h, w)
        return self.codebook[codes].permute(0, 3, 1, 2)  # (B, C, h, w)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Image (B, 3, H, W) in [-1, 1] -> pixel codes (B, H/f, W/f) long in [0, K)."""
        return self.latent_to_codes(self.encode_latent(x))  # (B, h, w)

    def quantized_latent(self, x: torch.Tensor) -> torch.Tensor:
        """Image -> the quantised latent (B, C, h, w) the diffusion decoder works in."""
        return self.codes_to_latent(self.encode(x))  # (B, C, h, w)

    def decode_latent(self, latent: torch.Tensor) -> torch.Tensor:
        """Latent (B, C, h, w) -> image (B, 3, H, W); continuous latents are decoded as they are
        (Kandinsky-style), call latent_to_codes first to snap them to the codebook."""
        zq = self.vq.post_quant_conv(latent)  # (B, C, h, w)
        return self.vq.decoder(zq, latent)  # (B, 3, H, W); SpatialNorm reads `latent` (MoVQ)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Pixel codes (B, h, w) -> image (B, 3, H, W) in about [-1, 1]."""
        return self.decode_latent(self.codes_to_latent(codes))  # (B, 3, H, W)

    # ----- semantic branch ----------------------------------------------------------------
    def _sem_project(self, feats: torch.Tensor) -> torch.Tensor:
        if feats.dim() != 3 or feats.shape[-1] != self.sem_in.in_features:
            raise ValueError(f"semantic features must be (B, N, {self.sem_in.in_features}) "
                             f"(DualEncoder global_feats), got {tuple(feats.shape)}")
        return F.normalize(self.sem_in(feats), dim=-1)  # (B, N, D_sem) on the unit sphere

    def encode_semantic(self, feats: torch.Tensor) -> torch.Tensor:
        """Vanilla-encoder features (B, N, C_vit) -> semantic codes (B, N) long."""
        z = self._sem_project(feats)  # (B, N, D_sem)
        cb = F.normalize(self.sem_codebook.weight, dim=-1)  # (K_sem, D_sem)
        return (z @ cb.T).argmax(-1)  # (B, N): cosine nearest entry

    def semantic_embedding(self, codes: torch.Tensor) -> torch.Tensor:
        """Semantic codes (B, N) -> unit code vectors (B, N, D_sem)."""
        self._check_codes(codes, self.num_sem_codes, "semantic code")
        return F.normalize(self.sem_codebook(codes), dim=-1)  # (B, N, D_sem)

    # ----- training -----------------------------------------------------------------------
    @torch.no_grad()
    def _restart_dead(self, codebook: torch.Tensor, usage: torch.Tensor, z: torch.Tensor,
                      codes: torch.Tensor) -> None:
        """Codes unused for a while jump to random encoder outputs of this batch, a standard
        VQ fix against codebook collapse (e.g. Jukebox, ViT-VQGAN)."""
        counts = torch.bincount(codes.flatten(), minlength=len(usage)).float()  # (K,)
        usage.mul_(0.95).add_(0.05 * counts)  # running count per step
        dead = (usage < 0.03).nonzero().flatten()  # (D,)
        if len(dead):
            pick = torch.randint(0, len(z), (len(dead),), device=z.device)  # (D,)
            codebook[dead] = z[pick].detach() + 1e-3 * torch.randn_like(codebook[dead])
            usage[dead] = 1.0  # give them time before judging again

    def pixel_loss(self, x: torch.Tensor, feature_net=None) -> tuple[torch.Tensor, dict]:
        """Reconstruction + VQ terms (+ perceptual, adversarial) on images (B, 3, H, W)."""
        t = self.tcfg
        z = self.encode_latent(x)  # (B, C, h, w)
        B, C, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, C)  # (B*h*w, C)
        codes = nearest(flat.detach(), self.codebook)  # (B*h*w,)
        zq = self.codebook[codes]  # (B*h*w, C)
        vq = vq_losses(flat, zq, t.commitment_beta)
        zq = flat + (zq - flat).detach()  # straight-through estimator (VQ-VAE)
        latent = zq.reshape(B, h, w, C).permute(0, 3, 1, 2)  # (B, C, h, w)
        rec = self.decode_latent(latent)  # (B, 3, H, W)
        mse, l1 = F.mse_loss(rec, x), F.l1_loss(rec, x)
        loss = mse + l1 + vq
        logs = {"mse": mse.item(), "vq": vq.item(),
                "batch_usage": codes.unique().numel() / self.num_codes}  # share of K in use
        if t.perceptual_weight > 0:  # LPIPS-style: distance of frozen deep features
            if feature_net is None:
                raise ValueError("tokenizer.perceptual_weight > 0 needs a feature_net (e.g. "
                                 "DualEncoder.hierarchical); pass it or set the weight to 0")
            per = sum(F.mse_loss(F.normalize(a, dim=1), F.normalize(b, dim=1))
                      for a, b in zip(_maps(feature_net(rec)), _maps(feature_net(x))))
            loss = loss + t.perceptual_weight * per
            logs["perceptual"] = float(per.detach())
        if self.discriminator is not None:  # VQGAN hinge loss; D and G in one backward pass:
            frozen = {k: v.detach() for k, v in self.discriminator.named_parameters()}
            g_adv = -functional_call(self.discriminator, frozen, (rec,)).mean()  # G only
            d_real, d_fake = self.discriminator(x), self.discriminator(rec.detach())
            d_loss = F.relu(1 - d_real).mean() + F.relu(1 + d_fake).mean()  # D only
            loss = loss + t.adversarial_weight * g_adv + d_loss
            logs.update(g_adv=g_adv.item(), d_loss=d_loss.item())
        if self.training:
            self._restart_dead(self.codebook.data, self.usage, flat, codes)
        return loss, logs

    def semantic_loss(self, feats: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Feature reconstruction from semantic codes + VQ terms; feats (B, N, C_vit) frozen."""
        z = self._sem_project(feats.detach()).reshape(-1, self.sem_codebook.embedding_dim)
        cb = F.normalize(self.sem_codebook.weight, dim=-1)  # (K_sem, D_sem)
        codes = (z @ cb.T).argmax(-1)  # (B*N,)
        zq = cb[codes]  # (B*N, D_sem)
        vq = vq_losses(z, zq, self.tcfg.commitment_beta)
        zq = z + (zq - z).detach()  # straight-through
        target = F.layer_norm(feats.detach(), feats.shape[-1:]).reshape(len(z), -1)
        rec = F.mse_loss(self.sem_out(zq), target)  # (B*N, C_vit) vs normalised features
        if self.training:
            self._restart_dead(self.sem_codebook.weight.data, self.sem_usage, z, codes)
        return rec + vq, {"sem_rec": rec.item()}

    def loss(self, x: torch.Tensor, feats: torch.Tensor | None = None,
             feature_net=None) -> tuple[torch.Tensor, dict]:
        """Stage-1 tokenizer loss: pixel branch on x, semantic branch on feats if given."""
        loss, logs = self.pixel_loss(x, feature_net)
        if feats is not None:
            sem, sem_logs = self.semantic_loss(feats)
            loss, logs = loss + sem, {**logs, **sem_logs}
        return loss, logs

    # ----- diffusers interop ----------------------------------------------------------------
    def save_pixel_branch(self, path) -> None:
        """The pixel branch as a plain diffusers VQModel folder (config.json + safetensors)."""
        self.vq.save_pretrained(path)

    def load_pixel_branch(self, path: str | None = None) -> VisualTokenizer:
        """Load a diffusers VQModel whose layout matches cfg.tokenizer: a folder, or a hub id
        with its subfolder (default cfg.tokenizer.pretrained, Kandinsky 2.2's MoVQGAN)."""
        repo, sub = split_subfolder(path or self.tcfg.pretrained)
        new = VQModel.from_pretrained(repo, subfolder=sub)
        mine = {k: v.shape for k, v in self.vq.state_dict().items()}
        got = {k: v.shape for k, v in new.state_dict().items()}
        if mine != got:
            bad = sorted(k for k in set(mine) | set(got) if mine.get(k) != got.get(k))[:3]
            raise ValueError(f"VQModel at {path} does not match cfg.tokenizer (first "
                             f"differences: {bad}); set the tokenizer sizes to the checkpoint's")
        self.vq.load_state_dict(new.state_dict())
        return self


def split_subfolder(path: str) -> tuple[str, str | None]:
    """"org/repo/sub" (a hub id + subfolder) -> ("org/repo", "sub"); local folders as they are."""
    from pathlib import Path

    parts = path.split("/")
    if Path(path).exists() or len(parts) <= 2:
        return path, None
    return "/".join(parts[:2]), "/".join(parts[2:])


def _maps(out) -> list:
    """Feature maps from a feature_net output: a list, or (list, pooled) as DualEncoder gives."""
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def reconstruction_metrics(tokenizer: VisualTokenizer, images: torch.Tensor,
                           batch_size: int = 64) -> dict:
    """Held-out PSNR (dB), codebook usage (share of K used) and perplexity on images."""
    from focus_ref.evaluate import codebook_perplexity, codebook_usage, psnr

    psnrs, codes = [], []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size]  # (b, 3, H, W)
        c = tokenizer.encode(x)  # (b, h, w)
        psnrs.append(psnr(tokenizer.decode(c).clamp(-1, 1), x))  # (b,)
        codes.append(c)
    codes = torch.cat(codes)  # (N, h, w)
    K = tokenizer.num_codes
    return {"psnr": float(torch.cat(psnrs).mean()), "code_usage": codebook_usage(codes, K),
            "perplexity": codebook_perplexity(codes, K)}
