"""Diffusion decoder: channel layout, mask handling, a learning step, determinism, presets."""

import pytest
import torch
from accelerate import init_empty_weights

from focus_ref.config import FocusConfig
from focus_ref.diffusion import DiffusionDecoder, composite, edit_image
from focus_ref.tokenizer import VisualTokenizer

torch.set_num_threads(1)


def tiny(**diffusion):
    return FocusConfig.from_dict({"diffusion": diffusion})


@pytest.fixture(scope="module")
def dec():
    torch.manual_seed(0)
    return DiffusionDecoder(tiny()).eval()


def batch(B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(B, 16, 16, 16, generator=g)
    source = torch.randn(B, 16, 16, 16, generator=g)
    mask = torch.zeros(B, 64, 64)
    mask[:, 8:30, 20:44] = 1  # a box on the image grid
    codes = torch.randint(0, 256, (B, 16, 16), generator=g)
    sem = torch.randint(0, 256, (B, 16), generator=g)  # N = 16 semantic codes (tiny)
    return target, source, mask, codes, sem


def capture_unet_input(dec, *args):
    seen = {}

    def hook(module, a, kw):
        seen["x"], seen["ctx"] = a[0], kw["encoder_hidden_states"]
    h = dec.unet.register_forward_pre_hook(hook, with_kwargs=True)
    with torch.no_grad():
        dec(*args)
    h.remove()
    return seen["x"], seen["ctx"]


def test_input_channel_layout_noisy_source_mask(dec):
    target, source, mask, codes, sem = batch()
    assert dec.unet.config.in_channels == 2 * 16 + 1
    m = dec.mask_to_grid(mask, 2)
    ctx = dec.make_context(codes, sem)
    assert ctx.shape == (2, 16 * 16 + 16, 128)
    x, seen_ctx = capture_unet_input(dec, target, torch.tensor([10, 500]), source, m, ctx)
    assert torch.equal(x[:, :16], target)  # noisy latent
    assert torch.equal(x[:, 16:32], source)  # source-image latent
    assert torch.equal(x[:, 32:], m)  # the explicit spatial prompt
    assert torch.equal(seen_ctx, ctx)


def test_mask_as_tokens_ablation():
    torch.manual_seed(0)
    d = DiffusionDecoder(tiny(mask_condition="tokens")).eval()
    target, source, mask, codes, sem = batch()
    m = d.mask_to_grid(mask, 2)
    ctx = d.make_context(codes, sem)
    x, seen_ctx = capture_unet_input(d, target, torch.tensor([10, 500]), source, m, ctx)
    assert torch.all(x[:, 32:] == 0)  # the mask channel carries nothing
    assert seen_ctx.shape == (2, ctx.shape[1] + 16 * 16, 128)  # mask tokens appended
    with pytest.raises(ValueError, match="mask_condition"):
        DiffusionDecoder(tiny(mask_condition="channel"))


def test_mask_to_grid_any_covered_pixel_counts(dec):
    mask = torch.zeros(1, 64, 64)
    mask[0, 5, 9] = 1  # one pixel in latent cell (1, 2)
    g = dec.mask_to_grid(mask, 1)
    assert g.shape == (1, 1, 16, 16) and g.sum() == 1 and g[0, 0, 1, 2] == 1
    assert torch.equal(dec.mask_to_grid(g[:, 0], 1), g)  # latent-size masks pass through


def test_bad_masks_and_ids(dec):
    target, source, mask, codes, sem = batch()
    with pytest.raises(ValueError, match="mask must be"):
        dec.mask_to_grid(torch.ones(2, 48, 48), 2)
    with pytest.raises(ValueError, match="mask must be"):
        dec.mask_to_grid(torch.ones(3, 64, 64), 2)
    with pytest.raises(ValueError, match="empty mask"):
        dec.mask_to_grid(torch.zeros(2, 64, 64), 2)
    with pytest.raises(ValueError, match=r"lie in \[0, 256\)"):
        dec.make_context(codes + 256)
    with pytest.raises(ValueError, match="integer ids"):
        dec.make_context(codes.float())
    with pytest.raises(ValueError, match="latents must be"):
        dec.loss(target[:, :4], source[:, :4], mask, dec.make_context(codes))


def test_training_steps_lower_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    d = DiffusionDecoder(tiny(cond_dropout=0.0)).train()
    target, source, mask, codes, sem = batch(4)
    opt = torch.optim.Adam(d.parameters(), lr=1e-3)

    def fixed_loss():  # the same noise and timesteps every call: one fixed batch
        torch.manual_seed(123)
        return d.loss(target, source, mask, d.make_context(codes, sem))[0]

    with torch.no_grad():
        before = fixed_loss().item()
    for _ in range(10):
        loss = fixed_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = fixed_loss().item()
    assert after < 0.7 * before, (before, after)


def test_sampler_is_deterministic_under_a_seed(dec):
    _, source, mask, codes, sem = batch()
    ctx = dec.make_context(codes, sem)
    run = lambda seed: dec.sample(source, mask, ctx, torch.Generator().manual_seed(seed),  # noqa
                                  steps=3, guidance_scale=2.0)
    a, b, c = run(0), run(0), run(1)
    assert a.shape == source.shape and torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    ddim = dec.sample(source, mask, ctx, torch.Generator().manual_seed(0), steps=3,
                      sampler="ddim")
    assert ddim.shape == source.shape


def test_edit_image_composites_the_background():
    cfg = tiny()
    torch.manual_seed(0)
    tok, d = VisualTokenizer(cfg).eval(), DiffusionDecoder(cfg).eval()
    src = torch.rand(2, 3, 64, 64) * 2 - 1
    mask = torch.zeros(2, 64, 64, dtype=torch.bool)
    mask[:, 10:20, 10:30] = True
    codes = tok.encode(src)
    out = edit_image(d, tok, src, mask, codes, generator=torch.Generator().manual_seed(0),
                     steps=2)
    assert out.shape == src.shape
    assert torch.equal(out[:, :, ~mask[0]], src[:, :, ~mask[0]])  # outside: exactly the source
    raw = edit_image(d, tok, src, mask, codes, generator=torch.Generator().manual_seed(0),
                     steps=2, composite_background=False)
    assert not torch.equal(raw[:, :, ~mask[0]], src[:, :, ~mask[0]])
    rendered = edit_image(d, tok, None, None, codes, steps=2)  # (a) render from tokens
    assert rendered.shape == src.shape
    assert torch.equal(composite(out, src, mask), out)


def test_paper_preset_is_sdxl_sized_with_extra_channels_on_meta():
    cfg = FocusConfig.paper()
    with init_empty_weights():
        d = DiffusionDecoder(cfg)
    c = d.unet.config
    assert c.in_channels == 2 * cfg.tokenizer.vq_embed_dim + 1 == 9  # latent ⊕ source ⊕ mask
    assert tuple(c.block_out_channels) == (320, 640, 1280)
    assert tuple(c.transformer_layers_per_block) == (1, 2, 10)
    assert tuple(c.attention_head_dim) == (5, 10, 20)  # SDXL's heads (64 channels each)
    assert c.cross_attention_dim == 2048  # = Qwen2.5-3B's hidden size
    n = sum(p.numel() for p in d.unet.parameters())
    assert 2.5e9 < n < 2.6e9, n  # SDXL's UNet is 2.57B with its text-time embedding


def test_load_pretrained_unet_widens_conv_in_with_zeros(tmp_path):
    from diffusers import UNet2DConditionModel

    cfg = tiny()
    torch.manual_seed(0)
    d = DiffusionDecoder(cfg)
    conf = dict(d.unet.config)
    conf["in_channels"] = 16  # a latent-only UNet, as SDXL's takes just its 4 latent channels
    ref = UNet2DConditionModel.from_config(conf)
    ref.save_pretrained(tmp_path)
    d.load_pretrained(str(tmp_path))
    w = d.unet.conv_in.weight
    assert torch.equal(w[:, :16], ref.conv_in.weight)  # the pretrained latent channels
    assert torch.all(w[:, 16:] == 0)  # source + mask channels start switched off
    key = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    assert torch.equal(d.unet.state_dict()[key], ref.state_dict()[key])


def test_local_mask_lets_a_cell_read_only_its_own_pixel_tokens():
    from focus_ref.diffusion import local_mask

    m = local_mask(16, 16, 256, 256 + 16, "cpu")  # full-resolution level, + 16 other tokens
    assert m.shape == (256, 272)
    assert torch.equal(m[:, :256], torch.eye(256, dtype=torch.bool))  # cell q <-> token q
    assert m[:, 256:].all()  # semantic / LLM tokens: read everywhere
    half = local_mask(8, 16, 256, 256, "cpu")  # an 8 x 8 level: each cell covers 2 x 2 tokens
    assert half.sum(1).eq(4).all()
    assert half[0].nonzero().flatten().tolist() == [0, 1, 16, 17]


def test_pixel_tokens_are_read_locally(dec):
    """With the locality prior, the first cross-attention output at cell 0 ignores a change of
    the pixel token of another cell; without it (pixel_tokens=0) it does not."""
    target, source, mask, codes, sem = batch(1)
    m = dec.mask_to_grid(mask, 1)
    other = codes.clone()
    other[0, 5, 5] = (codes[0, 5, 5] + 1) % 256
    block = next(mod for name, mod in dec.unet.named_modules() if name.endswith("attn2"))
    seen = []
    h = block.register_forward_hook(lambda mod, a, out: seen.append(out[0, 0].clone()))
    with torch.no_grad():
        for n_pix in (256, 0):
            for c in (codes, other):
                dec(target, torch.tensor([500]), source, m, dec.make_context(c, sem), n_pix)
    h.remove()
    assert torch.allclose(seen[0], seen[1])  # local: cell 0 never read token (5, 5)
    assert not torch.allclose(seen[2], seen[3])  # global attention reads every token


def test_stage1_runs_both_parts_and_resumes(tmp_path):
    from torch import nn

    from focus_ref import train
    from focus_ref.encoder import DualEncoder

    cfg = FocusConfig.from_dict({"train": {
        "stage1": {"steps": 2, "batch_size": 2, "warmup": 1, "log_every": 1, "ckpt_every": 2},
        "stage1_decoder": {"steps": 2, "batch_size": 2, "warmup": 1, "log_every": 1,
                           "ckpt_every": 2}}})

    class Parts(nn.Module):  # what stage 1 reads of FocusModel
        def __init__(self):
            super().__init__()
            self.encoder = DualEncoder(cfg)
            self.visual_tokenizer = VisualTokenizer(cfg)
            self.diffusion = DiffusionDecoder(cfg)

    torch.manual_seed(0)
    parts = Parts()
    hist = train.stage1(parts, cfg, tmp_path, progress=False)
    assert [h["step"] for h in hist["tokenizer"]] == [0, 1]
    assert [h["step"] for h in hist["decoder"]] == [0, 1]
    assert {"mse", "sem_rec", "batch_usage"} <= set(hist["tokenizer"][0])
    assert parts.diffusion.latent_scale.item() != 1.0  # set from the tokenizer's latents
    again = train.stage1(Parts(), cfg, tmp_path, resume=True, progress=False)
    assert again == hist  # finished stages are loaded, not retrained
