"""Stage 3 (focus_ref/pretrain.py), FocusModel.segment / understand and their CLI commands."""

import numpy as np
import pytest
import torch
from PIL import Image

from focus_ref import grounding, pretrain
from focus_ref.__main__ import main
from focus_ref.config import FocusConfig
from focus_ref.llm import SEG
from focus_ref.model import FocusModel
from focus_ref.scenegraph import question_objects
from focus_ref.segmentation import PROMPT_KINDS
from focus_ref.shapesworld import COLORS, SHAPES, ShapesWorld

CFG = FocusConfig.tiny()
H = CFG.data.image_size


@pytest.fixture(scope="module")
def model():
    """A random tiny FocusModel, run on one thread (faster on a shared 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield FocusModel(CFG).eval()
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def sample():
    return ShapesWorld(CFG.data, "val").sample(3)


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    model.save_pretrained(path)
    return path


def forced_segs(model, monkeypatch, n: int):
    """Make the LLM answer with n <seg> tokens (its real states kept): the wiring under test."""
    real = model.llm.generate

    def fake(batch, **kw):
        out = real(batch, **kw)
        h = out["hidden"].repeat(1, n + 1, 1)[:, :max(n, 1)]  # (1, n, D) real states
        ids = [model.llm.seg_id] * n if n else model.llm.tokenizer("no target")["input_ids"]
        return {"ids": [ids], "texts": ["?"], "hidden": h}

    monkeypatch.setattr(model.llm, "generate", fake)


# ----- examples and the task mix --------------------------------------------------------
def test_partial_mask_prompts_lie_inside_the_object_and_are_off_by_default(sample,
                                                                          monkeypatch):
    """What segment()'s second pass feeds back is a first guess: PARTIAL_MASK = 0.5 shows the
    decoder half its mask prompts as a part of the object (never outside it, never empty), the
    whole object the target. Off by default (pretrain.PARTIAL_MASK says why)."""
    assert pretrain.PARTIAL_MASK == 0
    monkeypatch.setattr(pretrain, "PARTIAL_MASK", 0.5)
    rng, n, part = np.random.default_rng(0), 0, 0
    for _ in range(300):
        ex = pretrain.make_example(sample, rng, "region")
        if ex["region"][0] != "mask":
            continue
        given, whole = ex["region"][1], ex["masks"][0]
        assert given.any() and not (given & ~whole).any()
        n, part = n + 1, part + int(given.sum() < whole.sum())
    assert n > 40 and 0.25 < part / n < 0.7, (part, n)


def test_every_task_builds_an_example_with_one_mask_per_seg(model, sample):
    rng = np.random.default_rng(0)
    exs = [pretrain.make_example(sample, rng, t) for t in pretrain.TASK_SHARES]
    for ex in exs:  # one mask per <seg>; a no-target expression's one <seg> has none
        absent = ex["task"] == "refseg" and not ex["masks"]
        assert (ex["answer"] or "").count(SEG) == len(ex["masks"]) + absent, ex["task"]
    batch = pretrain.collate(exs, model)
    assert int((batch["input_ids"] == model.llm.seg_id).sum()) == len(batch["masks"]) + int(
        batch["no_target"].sum())
    assert batch["visual"].tolist() == [t == "visual" for t in pretrain.TASK_SHARES]
    assert batch["region_maps"].shape == (2, H, H)  # region + what


def test_several_targets_get_one_seg_each_left_to_right_and_none_one_absent_seg(sample):
    refs = {r["type"]: r for r in sample["refs"]}
    masks = pretrain.target_masks(sample["inst"], refs["multi"]["targets"])
    assert len(masks) >= 2
    xs = [np.nonzero(m)[1].mean() for m in masks]
    assert xs == sorted(xs)  # the <seg>s are written left to right
    assert pretrain.target_masks(sample["inst"], refs["none"]["targets"]) == []
    s = {**sample, "refs": [refs["none"]]}
    ex = pretrain.make_example(s, np.random.default_rng(0), "refseg")
    assert ex["answer"] == SEG and ex["masks"] == []  # one <seg>; its presence label is 0


@pytest.fixture(scope="module")
def grounded_model():
    """A random tiny FocusModel that answers questions through their objects' masks."""
    cfg = FocusConfig.tiny()
    cfg.segmentation.grounded_answers = True
    torch.manual_seed(0)
    return FocusModel(cfg).eval()


def test_grounded_answers_segment_each_named_object_then_answer(grounded_model, sample,
                                                                monkeypatch):
    """UniPixel's mask-grounded answers: "<seg><region>" per object the question names, the
    true masks fill the <region>s (given, never predicted), then the answer; a count goes on to
    one <seg> that finds nothing (the predictor says when the objects run out), as does an
    absent object's one <seg>; such a <seg> is trained to say "empty" and its <region> is the
    learned `empty` tokens. Off (the shipped recipe), a question is answered in words alone."""
    m, rng = grounded_model, np.random.default_rng(0)
    qa = dict(sample["qa"])
    count = next(q for q in qa if q.startswith("how many"))
    plain = pretrain.make_example({**sample, "qa": [(count, qa[count])]}, rng, "vqa")
    assert plain["answer"] == qa[count] and plain["masks"] == [] and plain["found"] == []
    assert pretrain.make_example({**sample, "qa": [(count, qa[count])]}, rng, "vqa",
                                 True)["answer"] == qa[count]  # counts in words by default
    where = next(q for q in qa if q.startswith("where"))  # the object, then the reference
    ex = pretrain.make_example({**sample, "qa": [(where, qa[where])]}, rng, "vqa", True)
    named = [sample["inst"] == k for k in question_objects(sample["scene"], where)]
    assert ex["answer"] == "<seg><region><seg><region> " + qa[where]
    assert ex["present"] == [True, True]
    assert all(np.array_equal(a, b) for a, b in zip(ex["masks"], named, strict=True))
    monkeypatch.setattr(pretrain, "GROUNDED_COUNTS", True)
    absent = next(f"is there a {c} {s}?" for c in COLORS for s in SHAPES if not any(
        o.color == c and o.shape == s for o in sample["scene"].objects))
    exs = [pretrain.make_example({**sample, "qa": [(q, a)]}, rng, "vqa", grounded_answers=True)
           for q, a in [(count, qa[count]), (absent, "no")]]
    n = int(qa[count])
    assert exs[0]["answer"] == "<seg><region>" * (n + 1) + " " + qa[count]
    assert len(exs[0]["masks"]) == n and exs[0]["present"] == [True] * n + [False]
    assert exs[1]["answer"] == "<seg><region> no" and exs[1]["present"] == [False]
    batch = pretrain.collate(exs, m)
    assert batch["seg_present"].tolist() == [True] * n + [False, False]
    region = batch["input_ids"] == m.llm.region_id
    assert (batch["labels"][region] == pretrain.IGNORE).all()  # region tokens are inputs only
    assert batch["found_rows"].tolist() == [0] * (n + 1) + [1]
    assert not batch["found_maps"][n:].any()  # the <seg>s that find nothing
    for k, f in enumerate(exs[0]["masks"]):
        assert torch.equal(batch["found_maps"][k], torch.from_numpy(f))
    out = m.encoder(batch["image"])
    emb = pretrain.input_embeddings(m, batch, out)  # (B, T, D)
    R = m.llm.num_region_tokens
    assert torch.allclose(emb[1][region[1]], m.region_encoder.empty)  # nothing found
    assert torch.allclose(emb[0][region[0]][-R:], m.region_encoder.empty)
    assert not torch.allclose(emb[0][region[0]][:R], emb[0][region[0]][R:2 * R])  # two objects
    m.requires_grad_(True)
    loss, _ = pretrain.stage3_loss(m, batch, m.config)
    loss.backward()
    assert m.region_encoder.empty.grad.abs().sum() > 0
    m.zero_grad(set_to_none=True)
    m.requires_grad_(False)


def test_a_grounded_answer_reads_the_mask_each_seg_found(grounded_model, sample, monkeypatch):
    """At inference the LLM writes <seg>, the predictor segments it, the mask's region tokens
    (or `empty` when nothing is found) follow it, and the LLM answers after reading them."""
    m, llm, calls = grounded_model, grounded_model.llm, []
    real = llm.generate

    def fake(batch, region_tokens=None, **kw):
        out = real(batch, region_tokens=region_tokens, **kw)
        calls.append(region_tokens)
        seg = len(calls) <= 2  # two <seg>s, then the answer in words
        ids = [llm.seg_id] if seg else llm.tokenizer("left")["input_ids"]
        return {"ids": [ids], "texts": ["<seg>" if seg else "left"], "hidden": out["hidden"]}

    monkeypatch.setattr(llm, "generate", fake)
    bias = m.segmentation.presence_head.proj_out.bias
    for shift, empty in ((20.0, False), (-40.0, True)):  # presence: "there", then "empty"
        calls.clear()
        with torch.no_grad():
            bias += shift
        assert m.understand(sample["image"], "where is the circle relative to the square?") \
            == "left"
        assert calls[0] is None and calls[1].shape == (1, m.llm.num_region_tokens,
                                                         m.config.llm.hidden_size)
        assert calls[2].shape[0] == 2  # both <seg>s' tokens, in order
        assert torch.allclose(calls[2][1], m.region_encoder.empty) == empty
    with torch.no_grad():
        bias += 20


def test_a_no_target_seg_is_trained_to_say_empty(model, sample, seg_targets):
    """GRES by the predictor: the <seg> of an absent object gets presence label 0 and no mask,
    the <seg>s of present targets label 1 and their masks, in order."""
    refs = {r["type"]: r for r in sample["refs"]}
    rng, got = np.random.default_rng(0), seg_targets
    exs = [pretrain.make_example({**sample, "refs": [refs[t]]}, rng, "refseg")
           for t in ("none", "multi")]
    pretrain.stage3_loss(model, pretrain.collate(exs, model), FocusConfig.tiny())
    n = len(exs[1]["masks"])
    assert got["present"][:, 0].tolist() == [False] + [True] * n
    assert not got["gt"][0].any() and all(torch.equal(got["gt"][1 + i, 0], torch.from_numpy(m))
                                          for i, m in enumerate(exs[1]["masks"]))


def test_stage3_loss_has_every_term_and_trains_the_right_parts(model, sample):
    cfg = FocusConfig.tiny()
    cfg.train.stage3_scenes, cfg.train.stage3.batch_size = 16, 12
    stage = pretrain.stage3_multitask(model, cfg)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith("llm.") for n in names) and any("convnext" in n for n in names)
    assert not any(n.startswith(("encoder.vit.", "visual_tokenizer.", "diffusion."))
                   for n in names)  # frozen: the semantic codes keep their meaning
    rng = np.random.default_rng(0)
    batch = pretrain.collate([pretrain.make_example(sample, rng, t)
                              for t in pretrain.TASK_SHARES], model)  # every task once
    loss, logs = stage.loss_fn(batch)
    assert torch.isfinite(loss)
    assert {"text", "visual", "mask_bce", "mask_dice", "presence"} <= set(logs)
    assert torch.equal(stage.batch_fn(5)["input_ids"], stage.batch_fn(5)["input_ids"])
    model.requires_grad_(False)


def test_a_few_dozen_stage3_steps_lower_the_loss_on_a_fixed_batch(model):
    import copy

    m = copy.deepcopy(model).train()
    cfg = FocusConfig.tiny()
    cfg.train.stage3_scenes, cfg.train.stage3.batch_size = 8, 8
    stage = pretrain.stage3_multitask(m, cfg)
    losses, _ = fit_batch(stage, stage.batch_fn(0), 25)
    assert losses[-1] < 0.6 * losses[0], losses


def fit_batch(stage, batch, steps: int):
    """`steps` AdamW steps of a stage on one fixed batch: the losses and the last logs."""
    opt = torch.optim.AdamW(stage.params, lr=1e-3)
    losses = []
    for _ in range(steps):
        loss, logs = stage.loss_fn(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, logs


def test_stage0_seg_trains_only_the_mask_decoder_on_one_target_or_none(model):
    import copy

    from focus_ref import standins

    m = copy.deepcopy(model).train()
    cfg = FocusConfig.tiny()
    cfg.train.stage3_scenes, cfg.train.stage0_seg.batch_size = 16, 12
    stage = standins.stage0_seg(m, cfg)
    assert {n.split(".")[0] for n, p in m.named_parameters() if p.requires_grad} == \
        {"segmentation"}
    batch = stage.batch_fn(0)
    assert torch.equal(batch["input_ids"], stage.batch_fn(0)["input_ids"])  # resumable
    assert ((batch["input_ids"] == m.llm.seg_id).sum(1) == 1).all()  # one <seg> a row
    assert len(batch["masks"]) == int((~batch["no_target"]).sum())  # a mask, or none
    assert batch["region_rows"].any() and (~batch["region_rows"]).any()  # prompts and words
    before = {k: v.clone() for k, v in m.state_dict().items()}
    losses, logs = fit_batch(stage, batch, 15)
    assert {"mask_bce", "mask_dice", "presence"} <= set(logs)
    assert losses[-1] < 0.7 * losses[0], losses
    changed = {k.split(".")[0] for k, v in m.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"segmentation"}


@pytest.mark.parametrize("share", [0.0, 1.0])
def test_stage0_seg_practises_colour_words_at_its_share(model, share):
    """train.stage0_seg_colour: that share of stage 0d's word rows name a present object by its
    colour ("the red object"); at 0 the rows are the scenes' own expressions."""
    from focus_ref import standins
    from focus_ref.shapesworld import COLORS

    cfg = FocusConfig.tiny()
    cfg.train.stage3_scenes, cfg.train.stage0_seg.batch_size = 16, 48
    cfg.train.stage0_seg_colour = share
    batch = standins.stage0_seg(model, cfg).batch_fn(0)
    words = ~batch["region_rows"]
    texts = [model.llm.tokenizer.decode(ids[m.bool()]) for ids, m in
             zip(batch["input_ids"][words], batch["attention_mask"][words])]
    coloured = [any(c in t.split() for c in COLORS) for t in texts]
    present_colour = sum(c and not n for c, n in zip(coloured, batch["no_target"][words]))
    if share:
        assert present_colour >= 0.8 * len(texts), texts
    else:
        assert present_colour < 0.6 * len(texts), texts
        # and at 0 no random number is drawn for it: the rows are the ones drawn before the
        # practice existed (a region prompt 40 %, else one of the scene's own expressions)
        pool = pretrain.sample_pool(cfg, "train", cfg.train.stage3_scenes)
        rng = np.random.default_rng([cfg.train.seed, 0, 30])
        idx = rng.choice(len(pool), size=48, replace=len(pool) < 48)
        want = []
        for i in idx:
            refs = [r for r in pool[i]["refs"]
                    if len(pretrain.target_masks(pool[i]["inst"], r["targets"])) <= 1]
            region = rng.random() < 0.4 or not refs
            want.append(pretrain.make_example(pool[i] if region else {**pool[i], "refs": refs},
                                              rng, "region" if region else "refseg"))
        assert torch.equal(pretrain.collate(want, model)["input_ids"], batch["input_ids"])


def test_word_tokens_are_the_same_words_at_train_and_inference(model, sample):
    """The per-word prompt of the mask decoder: only the expression's words (no image, no
    opening <eos>, no answer, no padding), and the same states whether the row is padded
    right in a training batch or encoded alone, left-padded, at inference."""
    llm, rng = model.llm, np.random.default_rng(0)
    exs = [pretrain.make_example({**sample, "refs": [r]}, rng, "refseg") for r in sample["refs"]]
    exs.sort(key=lambda x: -len(x["prompt"]))  # the short prompt last: its row is padded
    batch = pretrain.collate(exs, model)
    with torch.no_grad():
        x = model.encoder(batch["image"])
        train_w, train_k = pretrain.word_tokens(llm, llm(batch, x.tokens).hidden, batch)
        one = llm.encode([exs[-1]["prompt"]], padding_side="left")
        one["labels"] = torch.full_like(one["input_ids"], -100)
        inf_w, inf_k = pretrain.word_tokens(llm, llm(one, x.tokens[-1:]).hidden, one)
    words = llm.tokenizer(exs[-1]["prompt"].replace("<image>", ""),
                          add_special_tokens=False)["input_ids"]
    n = int(train_k[-1].sum())
    assert n == int(inf_k.sum()) == len(words) and train_k[0].all()
    assert torch.allclose(train_w[-1, :n], inf_w[0], atol=1e-4)



def test_word_prompts_are_the_expression_word_embeddings_and_their_mean(model, sample):
    """What the mask decoder reads of the words (issue #5: the LLM's input embeddings, since
    its last-layer states barely differ between expressions): exactly the expression's word
    embeddings, in order, and their mean, padded rows included."""
    llm, rng = model.llm, np.random.default_rng(0)
    exs = [pretrain.make_example({**sample, "refs": [r]}, rng, "refseg") for r in sample["refs"]]
    exs.sort(key=lambda x: -len(x["prompt"]))  # the short prompt last: its row is padded
    batch = pretrain.collate(exs, model)
    with torch.no_grad():
        emb = llm.model.get_input_embeddings()(batch["input_ids"])  # (B, T, D)
        words, keep, mean = pretrain.word_prompts(llm, emb, batch)
        ids = llm.tokenizer(exs[-1]["prompt"].replace("<image>", ""),
                            add_special_tokens=False)["input_ids"]
        own = llm.model.get_input_embeddings()(torch.tensor(ids))  # (n, D)
    n = len(ids)
    assert int(keep[-1].sum()) == n and torch.equal(words[-1, :n], own)
    assert torch.allclose(mean[-1], own.mean(0), atol=1e-6)

# ----- FocusModel.segment / understand ----------------------------------------------------
def test_several_targets_give_several_masks_and_no_target_none(model, sample, monkeypatch):
    seg = model.segmentation
    bias = seg.presence_head.proj_out.bias
    with torch.no_grad():
        bias += 20  # presence says "there" for any state
    try:
        forced_segs(model, monkeypatch, 3)
        masks = model.segment(sample["image"], expression="all circles")
        assert len(masks) == 3 and all(m.shape == (H, H) and m.dtype == bool for m in masks)
        forced_segs(model, monkeypatch, 0)
        assert model.segment(sample["image"], expression="the pink star") == []
        with torch.no_grad():
            bias -= 40  # presence says "empty": the <seg>s give no mask (GRES)
        forced_segs(model, monkeypatch, 2)
        assert model.segment(sample["image"], expression="all circles") == []
    finally:
        with torch.no_grad():
            bias += 20


@pytest.mark.parametrize("kind", PROMPT_KINDS)
def test_each_region_prompt_kind_reaches_the_llm_and_the_decoder(model, sample, kind,
                                                                  monkeypatch):
    seen = {}
    enc, seg = model.region_encoder, model.segmentation
    real_enc, real_seg = enc.forward, seg.forward

    def spy_enc(features, maps, kinds):
        seen.setdefault("kind", PROMPT_KINDS[int(kinds[0])])  # the first pass (clicks refine)
        return real_enc(features, maps, kinds)

    def spy_seg(states, features, image, region_maps=None, **kw):
        seen["dense"] = None if region_maps is None else region_maps.sum().item()
        return real_seg(states, features, image, region_maps, **kw)

    monkeypatch.setattr(enc, "forward", spy_enc)
    monkeypatch.setattr(seg, "forward", spy_seg)
    forced_segs(model, monkeypatch, 1)
    masks = model.segment(sample["image"], **{kind: sample["prompts"][0][kind]})
    assert seen["kind"] == kind and seen["dense"] > 0  # region tokens + SAM's dense prompt
    assert len(masks) <= 1 and all(m.shape == (H, H) for m in masks)


@pytest.mark.parametrize("kind", ["click", "expression"])
def test_clicks_and_words_are_refined_by_their_own_mask(model, sample, kind, monkeypatch):
    """SAM's interactive loop: the answer to a click (or words) is the answer to its first
    mask as a mask prompt; with refinement switched off it is that first mask."""
    forced_segs(model, monkeypatch, 1)
    prompt = {"click": sample["prompts"][0]["click"]} if kind == "click" else {
        "expression": "the red circle"}
    sc, bias = model.config.segmentation, model.segmentation.presence_head.proj_out.bias
    refine, connected = sc.refine, sc.connected
    try:
        with torch.no_grad():
            bias += 20  # "there": a random decoder's presence score would often say empty
        sc.refine, sc.connected = (), ()  # the clean-up by connectivity has its own test
        first = model.segment(sample["image"], **prompt)
        again = model.segment(sample["image"], mask=first[0]) if first else []
        third = model.segment(sample["image"], mask=again[0]) if again else []
        model.config.segmentation.refine = (kind,)
        refined = model.segment(sample["image"], **prompt)
        model.config.segmentation.refine = (kind, kind)  # listed twice: two passes
        twice = model.segment(sample["image"], **prompt)
    finally:
        sc.refine, sc.connected = refine, connected
        with torch.no_grad():
            bias -= 20
    assert len(first) == 1 and len(refined) == 1 and len(twice) == 1
    want = again[0] if again else first[0]
    assert np.array_equal(refined[0], want) and not np.array_equal(first[0], want)
    assert np.array_equal(twice[0], third[0] if third else want)


def test_a_box_prompt_keeps_only_the_mask_inside_the_box(model, sample, monkeypatch):
    """segmentation.clip_box: the box bounds its object, so pixels outside it are dropped."""
    H = model.config.data.image_size
    full = torch.ones(1, H, H, dtype=torch.bool)  # a decoder that spills everywhere
    monkeypatch.setattr(grounding, "segment_once", lambda *a, **k: (full.clone(), torch.ones(1)))
    sc = model.config.segmentation
    inside = np.zeros((H, H), bool)
    inside[10:21, 5:31] = True  # rows y0..y1, columns x0..x1, both ends inclusive
    try:
        sc.clip_box = True
        assert np.array_equal(model.segment(sample["image"], box=(5, 10, 30, 20))[0], inside)
        sc.clip_box = False
        assert model.segment(sample["image"], box=(5, 10, 30, 20))[0].all()
    finally:
        sc.clip_box = True


def test_connected_to_keeps_the_parts_joined_to_the_points():
    m = torch.zeros(8, 8, dtype=torch.bool)
    m[0:2, 0:2] = m[2, 2] = m[5:7, 5:7] = True  # a blob, a pixel joined diagonally, a blob
    got = grounding.connected_to(m, [(0, 0)])
    assert got[0:2, 0:2].all() and got[2, 2] and not got[5:7, 5:7].any()
    assert not grounding.connected_to(m, [(4, 4)]).any()  # a point off the mask
    assert torch.equal(grounding.connected_to(m, [(0, 0), (6, 6)]), m)


@pytest.mark.parametrize("kind", ["click", "scribble"])
def test_a_click_or_scribble_keeps_only_the_mask_parts_joined_to_its_points(model, sample, kind,
                                                                            monkeypatch):
    """The decoder answers two blobs, one under the prompt's points and one elsewhere: the
    mask segment() returns is the first alone (words keep both)."""
    forced_segs(model, monkeypatch, 1)
    prompt = sample["prompts"][0][kind]
    pts = [prompt] if kind == "click" else prompt
    under = torch.from_numpy(sample["prompts"][0]["mask"])
    elsewhere = torch.zeros_like(under)
    elsewhere[:3, :3] = True  # a corner blob, apart from the object (checked below)
    assert not (elsewhere & under).any() and all(under[y, x] for x, y in pts)
    both = under | elsewhere

    def fake_segment(states, feats, image, maps=None, **text):  # (K, 1, H, W), present
        return torch.where(both, 5.0, -5.0).expand(len(states), 1, *both.shape).clone(), \
            torch.ones(len(states), 1)

    monkeypatch.setattr(model.segmentation, "forward", fake_segment)
    got = model.segment(sample["image"], **{kind: prompt})
    assert len(got) == 1 and np.array_equal(got[0], under.numpy())
    words = model.segment(sample["image"], expression="the red circle")
    assert np.array_equal(words[0], both.numpy())


def test_save_and_load_give_identical_segment_and_understand(model, saved, sample,
                                                            monkeypatch):
    loaded = FocusModel.from_pretrained(saved)
    assert model.understand(sample["image"], "how many objects are there?") == \
        loaded.understand(sample["image"], "how many objects are there?")
    for m in (model, loaded):
        with torch.no_grad():
            m.segmentation.presence_head.proj_out.bias += 20
    try:
        outs = []
        for m in (model, loaded):
            forced_segs(m, monkeypatch, 2)
            outs.append(m.segment(sample["image"], expression="all circles")
                        + m.segment(sample["image"], click=sample["prompts"][0]["click"]))
        assert len(outs[0]) == len(outs[1]) >= 1
        assert all(np.array_equal(a, b) for a, b in zip(*outs))
    finally:
        with torch.no_grad():
            model.segmentation.presence_head.proj_out.bias -= 20


BAD = [
    ({"click": (70, 3)}, "outside"),
    ({"box": (0, 0, 64, 10)}, "outside"),
    ({"box": (30, 30, 10, 10)}, "swapped corners"),
    ({"scribble": [(3, 3)]}, "at least 2 points"),
    ({"mask": np.zeros((H, H), bool)}, "empty"),
    ({"mask": np.ones((8, 8), bool)}, "does not match"),
    ({"expression": "  "}, "empty expression"),
    ({"expression": "x", "click": (3, 3)}, "exactly one"),
    ({}, "exactly one"),
]


@pytest.mark.parametrize("kwargs,words", BAD)
def test_bad_region_input_is_one_clear_error(model, sample, kwargs, words):
    with pytest.raises(ValueError, match=words):
        model.segment(sample["image"], **kwargs)


def test_unreadable_image_and_empty_question_are_clear_errors(model, sample, tmp_path):
    bad = tmp_path / "not_an_image.png"
    bad.write_text("hello")
    with pytest.raises(ValueError, match="cannot read the image"):
        model.segment(str(bad), expression="the red circle")
    with pytest.raises(ValueError, match="uint8"):
        model.understand(np.zeros((4, 4)), "how many?")
    with pytest.raises(ValueError, match="empty question"):
        model.understand(sample["image"], "")
    with pytest.raises(ValueError, match="region must be one of"):
        model.understand(sample["image"], "what is this?", {"circle": (3, 3)})
    with pytest.raises(ValueError, match="outside"):
        model.understand(sample["image"], "what is this?", {"click": (99, 3)})


def test_a_question_about_a_region_reads_its_region_tokens(model, sample, monkeypatch):
    seen = []
    real = model.llm.generate

    def spy(batch, image_tokens=None, region_tokens=None, **kw):
        seen.append((model.llm.tokenizer.decode(batch["input_ids"][0]), region_tokens))
        return real(batch, image_tokens, region_tokens, **kw)

    monkeypatch.setattr(model.llm, "generate", spy)
    for kind in PROMPT_KINDS:
        region = {kind: sample["prompts"][0][kind]}
        assert isinstance(model.understand(sample["image"], "what is this?", region), str)
        prompt, tokens = seen[-1]
        assert "<region> what is this?" in prompt and tokens is not None
        maps, kinds = model.region_encoder.rasterize([(kind, region[kind])], H)
        out = model.encoder(model._input(sample["image"]))
        torch.testing.assert_close(tokens, model.region_encoder(out.features, maps, kinds))
    model.understand(sample["image"], "how many objects are there?")
    assert "<region>" not in seen[-1][0] and seen[-1][1] is None  # no region, no tokens


# ----- CLI --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def image_file(sample, tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "scene.png"
    Image.fromarray(sample["image"]).save(path)
    return path


def test_cli_segment_and_understand(saved, image_file, sample, tmp_path, capsys):
    out = tmp_path / "mask.png"
    for opt in (["--expression", "the red circle"], ["--click", "20,30"],
                ["--box", "10,10,30,30"], ["--scribble", "10,10;20,20"]):
        assert main(["segment", "--checkpoint", str(saved), "--image", str(image_file),
                     *opt, "--out", str(out)]) == 0
        assert np.asarray(Image.open(out)).shape == (H, H)
    mask_png = tmp_path / "prompt.png"
    Image.fromarray((sample["inst"] == 0).astype(np.uint8) * 255).save(mask_png)
    assert main(["segment", "--checkpoint", str(saved), "--image", str(image_file),
                 "--mask", str(mask_png), "--out", str(out)]) == 0
    assert main(["understand", "--checkpoint", str(saved), "--image", str(image_file),
                 "--question", "how many objects are there?"]) == 0
    assert main(["understand", "--checkpoint", str(saved), "--image", str(image_file),
                 "--question", "what is this?", "--click", "20,30"]) == 0
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize("opt,words", [
    (["--click", "99,3"], "outside"), (["--box", "30,30,10,10"], "swapped"),
    (["--scribble", "3,3"], "at least 2 points"), (["--expression", ""], "empty expression"),
    (["--click", "a,b"], "integers")])
def test_cli_bad_input_is_one_line_and_exit_2(saved, image_file, tmp_path, capsys, opt, words):
    code = main(["segment", "--checkpoint", str(saved), "--image", str(image_file), *opt,
                 "--out", str(tmp_path / "m.png")])
    err = capsys.readouterr().err
    assert code == 2 and words in err and "Traceback" not in err and err.count("\n") == 1
    assert not (tmp_path / "m.png").exists()


def test_cli_missing_checkpoint_and_image_name_the_fix(saved, image_file, tmp_path, capsys):
    assert main(["understand", "--checkpoint", str(tmp_path / "none"), "--image",
                 str(image_file), "--question", "how many?"]) == 2
    assert "python -m focus_ref train --preset tiny" in capsys.readouterr().err
    assert main(["understand", "--checkpoint", str(saved), "--image", str(tmp_path / "x.png"),
                 "--question", "how many?"]) == 2
    assert "not found" in capsys.readouterr().err


def test_cli_help_lists_segment_and_understand(capsys):
    with pytest.raises(SystemExit):
        main(["segment", "--help"])
    assert "--scribble" in capsys.readouterr().out
