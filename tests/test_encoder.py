"""DualEncoder (focus_ref/encoder.py): shapes at tiny and paper scale, the zero gate, the
windowed fusion, the contrastive loss, bad input and pretrained loading."""

import pytest
import torch
from accelerate import init_empty_weights

from focus_ref.config import FocusConfig
from focus_ref.encoder import DualEncoder, clip_loss, num_image_tokens


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = FocusConfig.tiny()
    return cfg, DualEncoder(cfg).eval()


def test_tiny_shapes(tiny):
    cfg, enc = tiny
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    out = enc(x)
    N = num_image_tokens(cfg)
    assert N == (cfg.encoder.low_res // cfg.encoder.vit_patch) ** 2
    assert out.tokens.shape == (2, N, cfg.llm.hidden_size)
    assert out.global_feats.shape == (2, N, cfg.encoder.vit_dim)
    assert [tuple(f.shape) for f in out.features] == [
        (2, c, 64 // s, 64 // s) for c, s in zip(cfg.encoder.convnext_dims, (4, 8, 16, 32))]


def test_gate_is_zero_at_init_so_fusion_starts_switched_off(tiny):
    _, enc = tiny
    assert enc.fusion.gate.item() == 0.0
    out = enc(torch.rand(2, 3, 64, 64) * 2 - 1)
    assert torch.equal(out.fused, out.global_feats)  # tanh(0) * attention = 0


def test_each_token_attends_only_to_its_own_window(tiny):
    _, enc = tiny
    fusion = enc.fusion
    torch.manual_seed(1)
    N, G, M = enc.num_tokens, enc.grid, fusion.window
    q = torch.randn(1, N, enc.vit_dim)
    hr = torch.randn(1, fusion.norm_kv.normalized_shape[0], G * M, G * M)
    with torch.no_grad():
        fusion.gate.fill_(1.0)
        base = fusion(q, hr)
        hr2 = hr.clone()
        hr2[..., :M, :M] += 3 * torch.randn(hr.shape[1], M, M)  # only token 0's window
        changed = (fusion(q, hr2) - base).abs().amax(-1)[0]  # (N,)
        fusion.gate.zero_()
    assert changed[0] > 1e-3
    assert torch.all(changed[1:] < 1e-6)


def test_any_image_size_is_resized_and_bad_input_is_refused(tiny):
    cfg, enc = tiny
    out = enc(torch.zeros(1, 3, 40, 90))
    assert out.tokens.shape[1] == num_image_tokens(cfg)
    with pytest.raises(ValueError, match="image_to_tensor"):
        enc(torch.zeros(1, 64, 64, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="image_to_tensor"):
        enc(torch.zeros(3, 64, 64))


def test_clip_loss_prefers_matching_pairs():
    torch.manual_seed(0)
    e = torch.nn.functional.normalize(torch.randn(8, 16), dim=-1)
    scale = torch.tensor(4.0)
    matched = clip_loss(e, e, scale)
    shuffled = clip_loss(e, e.roll(1, 0), scale)
    assert matched < 0.1 < shuffled


def test_contrastive_loss_trains_both_branches(tiny):
    cfg, enc = tiny
    enc.zero_grad()
    loss, logs = enc.contrastive_loss(torch.rand(4, 3, 64, 64) * 2 - 1,
                                      torch.randn(4, cfg.llm.hidden_size))
    loss.backward()
    assert set(logs) == {"clip_vit", "clip_cnn"}
    assert enc.vit.embeddings.patch_embedding.weight.grad.abs().sum() > 0
    assert enc.convnext.embeddings.patch_embeddings.weight.grad.abs().sum() > 0
    enc.zero_grad()


def test_dense_pool_labels_each_pixel_with_its_object():
    from focus_ref import shapesworld as sw
    from focus_ref.standins import dense_pool

    cfg = FocusConfig.tiny()
    images, labels = dense_pool(cfg, "train", 4)
    assert images.shape == (4, 3, 64, 64) and labels.shape == (4, 3, 64, 64)
    scene = sw.ShapesWorld(cfg.data, "train").scene(2)
    inst = torch.from_numpy(sw.render(scene)[1].astype("int64"))
    for k, o in enumerate(scene.objects):
        pix = labels[2][:, inst == k]  # (3, n) the classes at object k's visible pixels
        if pix.numel():
            assert (pix[0] == list(sw.COLORS).index(o.color)).all()
            assert (pix[1] == sw.SHAPES.index(o.shape)).all()
            assert (pix[2] == list(sw.SIZES).index(o.size)).all()
    bg = labels[2][:, inst == -1]
    assert (bg == torch.tensor(cfg.encoder.dense_heads)[:, None] - 1).all()  # background class
    cfg.encoder.dense_heads = (3, 3, 3)
    with pytest.raises(ValueError, match="dense_heads"):
        dense_pool(cfg, "train", 4)


def test_dense_loss_trains_the_convnext_only(tiny):
    cfg, enc = tiny
    enc.zero_grad()
    labels = torch.stack([torch.randint(k, (2, 64, 64)) for k in cfg.encoder.dense_heads], 1)
    loss, logs = enc.dense_loss(torch.rand(2, 3, 64, 64) * 2 - 1, labels)  # (B, 3, H, W)
    loss.backward()
    assert set(logs) == {"dense_color", "dense_shape", "dense_size"}
    assert abs(loss.item() - sum(logs.values()) / 3) < 1e-5  # all six terms, both maps
    assert enc.convnext.embeddings.patch_embeddings.weight.grad.abs().sum() > 0
    assert enc.vit.embeddings.patch_embedding.weight.grad is None
    assert enc.vit_dense_head is None  # encoder.vit_dense is off by default
    enc.zero_grad()


@pytest.fixture(scope="module")
def vit_dense():
    torch.manual_seed(0)
    cfg = FocusConfig.tiny()
    cfg.encoder.vit_dense = True
    return cfg, DualEncoder(cfg).eval()


def test_vit_dense_trains_both_branches(vit_dense):
    cfg, enc = vit_dense
    labels = torch.stack([torch.randint(k, (2, 64, 64)) for k in cfg.encoder.dense_heads], 1)
    loss, logs = enc.dense_loss(torch.rand(2, 3, 64, 64) * 2 - 1, labels)  # (B, 3, H, W)
    loss.backward()
    assert set(logs) == {"dense_color", "dense_shape", "dense_size", "dense_vit"}
    convnext = logs["dense_color"] + logs["dense_shape"] + logs["dense_size"]  # each: 2 maps
    assert abs(loss.item() - (2 * convnext + 3 * logs["dense_vit"]) / 9) < 1e-5  # all 9 terms
    assert enc.convnext.embeddings.patch_embeddings.weight.grad.abs().sum() > 0
    assert enc.vit.embeddings.patch_embedding.weight.grad.abs().sum() > 0
    assert enc.fusion.gate.grad is None  # the fusion is FOCUS's own: stage 2 trains it


def test_vit_dense_map_puts_each_token_over_its_window(vit_dense):
    cfg, enc = vit_dense
    G, M, K = enc.grid, enc.fusion.window, sum(cfg.encoder.dense_heads)
    feats = torch.zeros(1, G * G, enc.vit_dim)
    feats[0, :, 0] = torch.arange(G * G) + 1.0  # token n (row-major) carries n + 1
    head = enc.vit_dense_head
    with torch.no_grad():
        old = head.weight.clone(), head.bias.clone()
        head.weight.zero_()
        head.weight[:, 0] = 1
        head.bias.copy_(1000 * torch.arange(M * M).repeat_interleave(K).float())  # (M*M*K,)
        out = enc.vit_dense_map(feats)  # (1, K, G*M, G*M)
        head.weight.copy_(old[0])
        head.bias.copy_(old[1])
    r, c = torch.meshgrid(torch.arange(G * M), torch.arange(G * M), indexing="ij")
    want = (r // M) * G + c // M + 1 + 1000 * ((r % M) * M + c % M)  # token + place in window
    assert out.shape == (1, K, G * M, G * M)
    assert (out[0] == want.float()).all()


def test_paper_preset_on_meta_device():
    cfg = FocusConfig.paper()
    with init_empty_weights():
        enc = DualEncoder(cfg)
    assert enc.dense_head is None  # pretrained ConvNeXt-L: no stage 0c
    with pytest.raises(ValueError, match="dense heads"):
        enc.dense_loss(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8, dtype=torch.long))
    sizes = {n: sum(p.numel() for p in m.parameters()) for n, m in enc.named_children()}
    assert 660e6 < sizes["vit"] < 680e6  # Qwen2.5-VL-3B vision tower (~669M)
    assert 190e6 < sizes["convnext"] < 200e6  # ConvNeXt-L backbone (~196M)
    out = enc(torch.empty(1, 3, cfg.encoder.high_res, cfg.encoder.high_res, device="meta"))
    N = num_image_tokens(cfg)  # (448 / 14 / 2)^2 = 256 after the 2 x 2 patch merger
    assert N == 256
    assert out.tokens.shape == (1, N, cfg.llm.hidden_size)
    assert out.global_feats.shape == (1, N, cfg.encoder.vit_dim)
    assert [f.shape[-1] for f in out.features] == [192, 96, 48, 24]


def test_load_pretrained_branches_from_saved_folders(tmp_path):
    from transformers import ConvNextConfig, ConvNextModel, SiglipVisionConfig, SiglipVisionModel

    cfg = FocusConfig.tiny()
    e = cfg.encoder
    torch.manual_seed(3)
    vit = SiglipVisionModel(SiglipVisionConfig(
        hidden_size=e.vit_hidden, intermediate_size=e.vit_mlp, num_hidden_layers=e.vit_layers,
        num_attention_heads=e.vit_heads, image_size=e.low_res, patch_size=e.vit_patch,
        vision_use_head=False))
    cnx = ConvNextModel(ConvNextConfig(depths=list(e.convnext_depths),
                                       hidden_sizes=list(e.convnext_dims)))
    vit.save_pretrained(tmp_path / "vit")
    cnx.save_pretrained(tmp_path / "cnx")
    enc = DualEncoder(cfg).load_pretrained(str(tmp_path / "vit"), str(tmp_path / "cnx"))
    for a, b in ((enc.vit, vit), (enc.convnext, cnx)):
        for k, v in b.state_dict().items():
            assert torch.equal(a.state_dict()[k], v), k
    wrong = ConvNextModel(ConvNextConfig(depths=[1, 1, 1, 1], hidden_sizes=[8, 16, 24, 32]))
    wrong.save_pretrained(tmp_path / "wrong")
    with pytest.raises(ValueError, match="does not match cfg.encoder"):
        enc.load_pretrained(convnext_path=str(tmp_path / "wrong"))


def test_stage0_dense_trains_and_reads_the_vit_only_with_vit_dense():
    from focus_ref import FocusModel, standins

    for on in (False, True):
        cfg = FocusConfig.tiny()
        cfg.encoder.vit_dense, cfg.train.dense_scenes = on, 8
        torch.manual_seed(0)
        model = FocusModel(cfg)
        trained = {id(p) for p in standins.stage0_dense(model, cfg).params}
        assert all((id(p) in trained) == on for p in model.encoder.vit.parameters())
        acc = standins.dense_accuracy(model, cfg, n=8)
        assert ({"vit_color", "vit_shape", "vit_size"} <= set(acc)) == on
        assert all(0 <= v <= 1 for k, v in acc.items() if k != "n")
