"""FocusLLM (focus_ref/llm.py): tokenizer and special tokens, sequence building and labels,
the splice, <seg> extraction, KV-cached generation, the visual head, pretrained loading."""

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from focus_ref.config import FocusConfig
from focus_ref.encoder import num_image_tokens
from focus_ref.llm import IGNORE, SPECIALS, FocusLLM, train_text_tokenizer


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = FocusConfig.tiny()
    return cfg, FocusLLM(cfg).eval()


def test_vocabulary_layout(tiny):
    cfg, llm = tiny
    V, K = cfg.llm.text_vocab_size, cfg.tokenizer.num_vq_embeddings
    assert llm.tokenizer.convert_tokens_to_ids(SPECIALS) == list(range(V, V + len(SPECIALS)))
    assert llm.visual_token_range == range(V + len(SPECIALS), V + len(SPECIALS) + K)
    assert llm.visual_token_id(0) == llm.visual_token_range.start
    assert llm.tokenizer.convert_ids_to_tokens(llm.visual_token_id(K - 1)) == f"<v{K - 1}>"
    assert len(llm.tokenizer) == V + len(SPECIALS) + K
    assert llm.model.get_input_embeddings().num_embeddings == len(llm.tokenizer)
    assert llm.model.lm_head.out_features == len(llm.tokenizer)


def test_tokenizer_is_deterministic_and_round_trips_through_disk(tiny, tmp_path):
    cfg, llm = tiny
    again = train_text_tokenizer(cfg)
    text = "a large red circle left of a small blue square on a plain white background"
    assert again(text)["input_ids"] == llm.tokenizer(text)["input_ids"]
    llm.save_text_tokenizer(tmp_path / "tok")
    loaded = FocusLLM.load_text_tokenizer(tmp_path / "tok")
    probe = "what color is the <seg> diamond? <image> <v3>"
    assert loaded(probe)["input_ids"] == llm.tokenizer(probe)["input_ids"]
    rebuilt = FocusLLM(cfg, text_tokenizer=loaded)  # what FocusModel.from_pretrained does
    assert (rebuilt.seg_id, rebuilt.visual_token_range) == (llm.seg_id, llm.visual_token_range)
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        FocusLLM.load_text_tokenizer(tmp_path / "nothing")


def test_words_outside_the_corpus_do_not_crash(tiny):
    _, llm = tiny
    text = "zebra xylophone über 42 🙂"
    ids = llm.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert all(i < llm.image_id for i in ids)  # byte-level BPE: plain text ids only
    assert llm.tokenizer.decode(ids) == text
    batch = llm.encode(["how many " + text], ["3"])
    assert torch.isfinite(llm(batch).loss)


def test_encode_expands_placeholders_and_masks_labels(tiny):
    cfg, llm = tiny
    N, R = num_image_tokens(cfg), cfg.segmentation.num_region_tokens
    b = llm.encode(["<image>what color is <region>?", "<image>"], ["red", "a small red circle"])
    ids, mask, labels = b["input_ids"], b["attention_mask"], b["labels"]
    assert ids.shape == labels.shape == mask.shape and ids.shape[0] == 2
    assert ((ids == llm.image_id).sum(1) == N).all()
    assert (ids[0] == llm.region_id).sum() == R and (ids[1] == llm.region_id).sum() == 0
    eos = llm.tokenizer.eos_token_id
    for row in range(2):
        tgt = ["red", "a small red circle"][row]
        want = llm.tokenizer(tgt, add_special_tokens=False)["input_ids"] + [eos]
        got = labels[row][labels[row] != IGNORE].tolist()
        assert got == want  # only the answer and its closing <eos> are predicted
        n = int(mask[row].sum())
        assert ids[row, 0] == eos  # every sequence opens with <eos>
        assert (labels[row, n:] == IGNORE).all() and (mask[row, n:] == 0).all()  # right padding
        assert ids[row, n - len(want):n].tolist() == want  # the target ends the sequence


def test_embed_splices_image_and_region_tokens_in_order(tiny):
    cfg, llm = tiny
    N, R, D = num_image_tokens(cfg), cfg.segmentation.num_region_tokens, cfg.llm.hidden_size
    b = llm.encode(["<image>is <region> red?", "<image>"], ["yes", "no"])
    img, reg = torch.randn(2, N, D), torch.randn(1, R, D)
    emb = llm.embed(b["input_ids"], img, reg)  # (B, T, D)
    ids = b["input_ids"]
    for row in range(2):
        assert torch.equal(emb[row][ids[row] == llm.image_id], img[row])
    assert torch.equal(emb[0][ids[0] == llm.region_id], reg[0])
    plain = (ids != llm.image_id) & (ids != llm.region_id)
    assert torch.equal(emb[plain], llm.model.get_input_embeddings()(ids)[plain])
    with pytest.raises(ValueError, match="<image> placeholder"):
        llm.embed(ids, img[:1], reg)
    with pytest.raises(ValueError, match="<region> placeholder"):
        llm.embed(ids, img, None)


def test_seg_hidden_is_the_state_one_before_seg(tiny):
    _, llm = tiny
    b = llm.encode(["segment the red circle", "find them"], ["<seg>", "here <seg> and <seg>"])
    ids = b["input_ids"]
    T = ids.shape[1]
    hidden = torch.arange(2 * T, dtype=torch.float).view(2, T, 1)  # hidden[b, t] = b*T + t
    states, rows = llm.seg_hidden(hidden, ids)
    where = (ids == llm.seg_id).nonzero().tolist()  # [[b, p], ...]
    assert len(where) == 3 and rows.tolist() == [w[0] for w in where]
    assert states.view(-1).tolist() == [w[0] * T + w[1] - 1 for w in where]
    out = llm(b)  # and on a real forward the state before <seg> is the one that predicts it
    s, _ = llm.seg_hidden(out.hidden, ids)
    emitted = out.logits[ids.roll(-1, 1) == llm.seg_id]  # logits at the positions before <seg>
    assert torch.allclose(llm.model.lm_head(s), emitted, atol=1e-5)


def test_generation_with_kv_cache_matches_full_recompute(tiny):
    cfg, llm = tiny
    N, D = num_image_tokens(cfg), cfg.llm.hidden_size
    torch.manual_seed(2)
    b = llm.encode(["<image>", "<image>how many circles are there?"], padding_side="left")
    img = torch.randn(2, N, D)
    g = llm.generate(b, image_tokens=img, max_new_tokens=6)
    emb, mask = llm.embed(b["input_ids"], img), b["attention_mask"]
    never = [i for t, i in llm.tokenizer.get_vocab().items() if t.startswith("<|reserved_")]
    never += [llm.image_id, llm.region_id, llm.tokenizer.pad_token_id]
    for step in range(6):  # the slow way: the whole sequence again at every step
        h = llm.model.model(inputs_embeds=emb, attention_mask=mask).last_hidden_state[:, -1]
        logits = llm.model.lm_head(h)
        logits[:, llm.visual_token_range.start:] = -torch.inf  # text generation: no codes
        logits[:, never] = -torch.inf  # nor input-only tokens
        nxt = logits.argmax(-1)
        for row in range(2):
            if step < len(g["ids"][row]):
                assert nxt[row].item() == g["ids"][row][step]
                assert torch.allclose(h[row], g["hidden"][row, step], atol=1e-4)
        emb = torch.cat([emb, llm.model.get_input_embeddings()(nxt)[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    assert len(g["texts"]) == 2
    for row in range(2):  # stop_after (token, n): each row ends at its n-th such token
        first = g["ids"][row][0]
        n = g["ids"][row].count(first)  # (every generated row is non-empty here)
        early = llm.generate(b, image_tokens=img, max_new_tokens=6, stop_after=(first, 1))
        assert early["ids"][row] == [first]
        assert torch.equal(early["hidden"][row, 0], g["hidden"][row, 0])
        late = llm.generate(b, image_tokens=img, max_new_tokens=6, stop_after=(first, n + 1))
        assert late["ids"] == g["ids"]  # never reached: unchanged
    with pytest.raises(ValueError, match="left padding"):
        llm.generate(llm.encode(["<image>", "<image>a b c"]), image_tokens=img)


def test_visual_logits_are_the_code_slice_of_the_full_head(tiny):
    cfg, llm = tiny
    h = torch.randn(3, cfg.llm.hidden_size)
    full = llm.model.lm_head(h)
    r = llm.visual_token_range
    vis = llm.visual_logits(h)
    assert vis.shape == (3, cfg.tokenizer.num_vq_embeddings)
    assert torch.allclose(vis, full[:, r.start:r.stop])


def test_paper_scale_loading_code_on_a_tiny_saved_qwen2(tiny, tmp_path):
    cfg, llm = tiny
    c = cfg.llm
    tok = train_text_tokenizer(cfg)  # a "released" tokenizer: text only, no FOCUS tokens
    tok.add_tokens(["<|endoftext|>"], special_tokens=True)  # Qwen2Tokenizer expects it
    tok.add_special_tokens({"additional_special_tokens": [
        f"<|extra_{i}|>" for i in range(c.text_vocab_size - len(tok))]})
    torch.manual_seed(5)
    released = Qwen2ForCausalLM(Qwen2Config(  # like Qwen2.5: more embedding rows than tokens
        vocab_size=c.text_vocab_size + 64, hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size, num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
        tie_word_embeddings=True))
    released.save_pretrained(tmp_path / "qwen")
    tok.save_pretrained(tmp_path / "qwen")

    cfg2 = FocusConfig.tiny()
    cfg2.llm.pretrained = str(tmp_path / "qwen")
    mine = FocusLLM(cfg2).load_pretrained()
    K = cfg.tokenizer.num_vq_embeddings
    assert len(mine.tokenizer) == c.text_vocab_size + len(SPECIALS) + K
    assert mine.model.get_input_embeddings().num_embeddings == len(mine.tokenizer)
    ids = mine.tokenizer(["a red circle on a plain white background"], return_tensors="pt")
    ids = ids["input_ids"]  # (1, T)
    want = released(input_ids=ids).logits[..., : c.text_vocab_size]
    got = mine.model(input_ids=ids).logits[..., : c.text_vocab_size]
    assert torch.allclose(got, want, atol=1e-5)  # the released weights, unchanged

    cfg2.llm.num_layers = c.num_layers + 1
    with pytest.raises(ValueError, match="set cfg.llm to the checkpoint"):
        FocusLLM(cfg2).load_pretrained()


def test_tied_embeddings_stay_tied_on_the_meta_device():
    from accelerate import init_empty_weights

    cfg = FocusConfig.tiny()
    cfg.llm.tie_word_embeddings = True  # as Qwen2.5-3B at paper scale
    with init_empty_weights():
        llm = FocusLLM(cfg)
    assert llm.model.lm_head.weight is llm.model.get_input_embeddings().weight
    n = sum(p.numel() for p in llm.parameters())
    assert n == sum(p.numel() for p in FocusLLM(cfg).parameters())  # counted once, as on CPU


def test_tied_embeddings_survive_save_and_load(tmp_path):
    from focus_ref import FocusModel

    cfg = FocusConfig.tiny()
    cfg.llm.tie_word_embeddings = True
    torch.manual_seed(0)
    m = FocusModel(cfg)
    m.save_pretrained(tmp_path)  # safetensors refuses shared tensors: stored once
    back = FocusModel.from_pretrained(tmp_path)
    head, emb = back.llm.model.lm_head.weight, back.llm.model.get_input_embeddings().weight
    assert head is emb and torch.equal(emb, m.llm.model.get_input_embeddings().weight)
