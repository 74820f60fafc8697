"""Visual tokenizer (MoVQ pixel codes + semantic codes): shapes, parity, losses, bad input."""

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import VQModel

from focus_ref.config import FocusConfig
from focus_ref.data import image_to_tensor
from focus_ref.shapesworld import ShapesWorld
from focus_ref.tokenizer import VisualTokenizer, reconstruction_metrics

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def cfg():
    return FocusConfig.tiny()


@pytest.fixture(scope="module")
def tok(cfg):
    torch.manual_seed(0)
    t = VisualTokenizer(cfg).eval()
    with torch.no_grad():  # a spread-out codebook, so different codes decode differently
        t.codebook.normal_()
    return t


@pytest.fixture(scope="module")
def images(cfg):
    world = ShapesWorld(cfg.data, "train")
    return torch.stack([image_to_tensor(world.sample(i)["image"]) for i in range(4)])


def test_encode_decode_shapes_and_code_range(tok, images, cfg):
    codes = tok.encode(images)
    f = 2 ** (len(cfg.tokenizer.block_out_channels) - 1)
    assert codes.shape == (4, 64 // f, 64 // f) and codes.dtype == torch.long
    assert 0 <= codes.min() and codes.max() < cfg.tokenizer.num_vq_embeddings
    latent = tok.codes_to_latent(codes)
    assert latent.shape == (4, cfg.tokenizer.vq_embed_dim, 64 // f, 64 // f)
    assert torch.equal(tok.latent_to_codes(latent), codes)  # codes <-> latent round trip
    assert torch.equal(tok.quantized_latent(images), latent)
    assert tok.decode(codes).shape == images.shape
    flat = codes.reshape(4, -1)  # the LLM's row-major order decodes the same
    assert torch.allclose(tok.decode(flat), tok.decode(codes))


def test_semantic_codes(tok, cfg):
    feats = torch.randn(2, 16, cfg.encoder.vit_dim)
    codes = tok.encode_semantic(feats)
    assert codes.shape == (2, 16) and codes.dtype == torch.long
    assert 0 <= codes.min() and codes.max() < cfg.tokenizer.sem_codebook_size
    assert tok.semantic_embedding(codes).shape == (2, 16, cfg.tokenizer.sem_dim)


def test_pixel_branch_loads_in_plain_diffusers(tok, images, tmp_path):
    tok.save_pixel_branch(tmp_path)
    ref = VQModel.from_pretrained(tmp_path).eval()
    assert ref.config.norm_type == "spatial"  # MoVQ
    codes = tok.encode(images)
    with torch.no_grad():
        ref_latent = ref.quantize(ref.encode(images).latents)[2][2]  # diffusers' own codes
        assert torch.equal(ref_latent.reshape(codes.shape), codes)
        B, h, w = codes.shape
        q = ref.quantize.get_codebook_entry(codes.flatten(), (B, h, w, ref.config.vq_embed_dim))
        ref_img = ref.decode(q, force_not_quantize=True).sample
        ours = tok.decode(codes)
    assert (ours - ref_img).abs().max() < 1e-4, (ours - ref_img).abs().max()  # float order only
    assert not torch.allclose(ours[0], ours[1], atol=1e-3)  # different codes, different images


def test_training_steps_lower_the_loss(cfg, images):
    """On one fixed batch, ten Adam steps cut the reconstruction error (pixel branch) and the
    feature reconstruction error (semantic branch). The VQ term is not monotone this early:
    the encoder's outputs move faster than the codebook follows."""
    torch.manual_seed(0)
    t = VisualTokenizer(cfg).train()
    feats = torch.randn(2, 16, cfg.encoder.vit_dim)
    opt = torch.optim.Adam(t.parameters(), lr=2e-3)
    logs = []
    for _ in range(10):
        loss, log = t.loss(images[:2], feats)
        logs.append(log)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert logs[-1]["mse"] < 0.5 * logs[0]["mse"], [x["mse"] for x in logs]
    assert logs[-1]["sem_rec"] < logs[0]["sem_rec"] - 0.02, [x["sem_rec"] for x in logs]


def test_dead_codes_are_restarted(cfg, images):
    torch.manual_seed(0)
    t = VisualTokenizer(cfg).train()
    before = t.codebook.detach().clone()
    t.pixel_loss(images)  # after one batch most codes are unused -> moved to encoder outputs
    moved = (t.codebook.detach() - before).norm(dim=1) > 0
    assert moved.float().mean() > 0.5


def test_adversarial_and_perceptual_terms(images):
    cfg = FocusConfig.from_dict({"tokenizer": {"adversarial_weight": 0.1,
                                               "perceptual_weight": 1.0}})
    t = VisualTokenizer(cfg).train()
    assert t.discriminator is not None
    feature_net = lambda x: [torch.nn.functional.avg_pool2d(x, 2)]  # noqa: E731 (stand-in)
    loss, logs = t.loss(images[:2], feature_net=feature_net)
    loss.backward()
    assert torch.isfinite(loss) and {"g_adv", "d_loss", "perceptual"} <= set(logs)
    assert all(p.grad is not None for p in t.discriminator.parameters())
    with pytest.raises(ValueError, match="feature_net"):
        t.loss(images[:2])


def test_reconstruction_metrics_keys(tok, images):
    m = reconstruction_metrics(tok, images)
    assert set(m) == {"psnr", "code_usage", "perplexity"}
    assert 0 < m["code_usage"] <= 1 and m["perplexity"] >= 1


def test_bad_input(tok, images):
    with pytest.raises(ValueError, match="not divisible"):
        tok.encode(torch.zeros(1, 3, 62, 62))
    with pytest.raises(ValueError, match="image_to_tensor"):
        tok.encode(images * 127.5 + 127.5)  # a uint8-range float image
    with pytest.raises(ValueError, match="image_to_tensor"):
        tok.encode(torch.zeros(1, 64, 64, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"lie in \[0, 256\)"):
        tok.decode(torch.full((1, 16, 16), 256))
    with pytest.raises(ValueError, match=r"lie in \[0, 256\)"):
        tok.decode(torch.full((1, 16, 16), -1))
    with pytest.raises(ValueError, match="square grid"):
        tok.decode(torch.zeros(1, 15, dtype=torch.long))
    with pytest.raises(ValueError, match="global_feats"):
        tok.encode_semantic(torch.zeros(1, 64, 7))


def test_paper_preset_is_movqgan_67m_on_meta():
    cfg = FocusConfig.paper()
    with init_empty_weights():
        t = VisualTokenizer(cfg)
    n = sum(p.numel() for p in t.vq.parameters())
    assert 67e6 < n < 68.5e6, n  # MoVQGAN-67M (Kandinsky 2.2's movq)
    assert t.factor == 8 and t.vq.config.norm_type == "spatial"
    assert t.vq.config.down_block_types[-1] == "AttnDownEncoderBlock2D"
    assert t.vq.config.num_vq_embeddings == 16384
    assert t.codebook.device.type == "meta"


def test_load_pixel_branch_checks_the_layout(tok, tmp_path):
    tok.save_pixel_branch(tmp_path)
    other = VisualTokenizer(FocusConfig.tiny()).load_pixel_branch(str(tmp_path))
    assert torch.equal(other.codebook, tok.codebook)
    small = FocusConfig.from_dict({"tokenizer": {"num_vq_embeddings": 128}})
    with pytest.raises(ValueError, match="does not match cfg.tokenizer"):
        VisualTokenizer(small).load_pixel_branch(str(tmp_path))
