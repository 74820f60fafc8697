"""LLM glue: tokenizer, special tokens, sequence building, heads and generation (FOCUS §3).

The LLM (paper: Qwen2.5-3B) is the centre of FOCUS. It reads visual tokens, region-prompt
tokens and text; it writes text, `<seg>` tokens (whose hidden state drives the mask decoder,
as in LISA) and discrete visual tokens (rendered by the diffusion decoder, as in Janus /
ILLUME+). This file wires a transformers causal LM to those inputs and outputs.

Vocabulary layout (ids), the same at every scale:
    [0, V_text)                  text: tiny = byte-level BPE trained on ShapesWorld (padded
                                 with <|reserved_i|> up to cfg.llm.text_vocab_size, like
                                 Llama 3's reserved tokens); paper = the Qwen2.5 tokenizer
    V_text + 0..4                <image> <region> <seg> <boi> <eoi>
    visual_token_range           <v0> ... <v{K-1}>: K = cfg.tokenizer.num_vq_embeddings codes
The extra tokens are added the transformers way (`add_special_tokens`) and the embeddings
resized (`resize_token_embeddings`). Byte-level BPE encodes any text, so words the tokenizer
never saw are split into bytes rather than refused.

Sequences (`encode`): "<eos>" + prompt + target + "<eos>". Each <image> in the prompt grows
to N placeholders (N = encoder tokens per image), each <region> to R placeholders
(R = cfg.segmentation.num_region_tokens); `embed` splices the image / region tokens into
those positions (LLaVA's masked scatter). labels = -100 on the prompt, placeholders and
padding: only the target (and its closing <eos>) is predicted.

    llm = FocusLLM(cfg)
    batch = llm.encode(["<image>"], ["a small red circle ..."])       # ids, mask, labels
    out = llm(batch, image_tokens=enc(pixels).tokens)                # loss, logits, hidden
    h = llm.seg_hidden(out.hidden, batch["input_ids"])               # state before <seg>
    llm.generate(llm.encode(["<image>"], padding_side="left"), image_tokens=...)["texts"]
"""

from __future__ import annotations

import functools
import inspect
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import AddedToken
from torch import nn
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from focus_ref.config import FocusConfig
from focus_ref.encoder import num_image_tokens

IMAGE, REGION, SEG, BOI, EOI = "<image>", "<region>", "<seg>", "<boi>", "<eoi>"
SPECIALS = [IMAGE, REGION, SEG, BOI, EOI]
IGNORE = -100  # label of positions nothing is predicted at (CrossEntropyLoss ignore_index)


def train_text_tokenizer(cfg: FocusConfig, n_scenes: int = 40) -> PreTrainedTokenizerFast:
    """Tiny scale: byte-level BPE on the ShapesWorld corpus; deterministic, about a second."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    from focus_ref.shapesworld import ShapesWorld

    corpus = ShapesWorld(cfg.data, split="train").corpus(n_scenes)  # captions, Q&A, ...
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2 / Qwen style
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.llm.text_vocab_size, special_tokens=["<pad>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def _pretrained_tokenizer(path: str, offline: bool = True):
    """The tokenizer at `path` (a folder or a hub id); offline: only from disk, else None."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=offline)
    except (OSError, ValueError):
        return None


@dataclass
class LLMOutput:
    loss: torch.Tensor | None  # mean cross-entropy over labelled positions
    logits: torch.Tensor  # (B, T, V)
    hidden: torch.Tensor  # (B, T, D) last-layer hidden states (after the final norm)
    accuracy: float | None = None  # share of labelled tokens predicted exactly (greedy)


class FocusLLM(nn.Module):
    def __init__(self, cfg: FocusConfig, text_tokenizer: PreTrainedTokenizerFast | None = None):
        super().__init__()
        self.cfg, c = cfg, cfg.llm
        self.num_image_tokens = num_image_tokens(cfg)  # N placeholders per <image>
        self.num_region_tokens = cfg.segmentation.num_region_tokens  # R per <region>
        self.tokenizer = self._with_specials(text_tokenizer or self._base_tokenizer())
        self.model = Qwen2ForCausalLM(Qwen2Config(  # built from config (weights: load_pretrained)
            vocab_size=c.text_vocab_size, hidden_size=c.hidden_size,
            intermediate_size=c.intermediate_size, num_hidden_layers=c.num_layers,
            num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
            max_position_embeddings=c.max_position, tie_word_embeddings=c.tie_word_embeddings,
            rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
            pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id))
        self.model.resize_token_embeddings(len(self.tokenizer), mean_resizing=False)  # + specials
        if c.tie_word_embeddings:  # re-tie directly: accelerate's init_empty_weights patches
            #                        register_parameter, which would leave two meta copies
            self.model.lm_head._parameters["weight"] = self.model.get_input_embeddings().weight

    # ----- tokenizer and special tokens ----------------------------------------------------
    def _base_tokenizer(self):
        if not self.cfg.llm.pretrained:
            return train_text_tokenizer(self.cfg)
        tok = _pretrained_tokenizer(self.cfg.llm.pretrained)  # building never downloads
        if tok is None:  # offline paper-scale build (e.g. on the meta device for shape checks)
            warnings.warn(f"tokenizer {self.cfg.llm.pretrained!r} is not available locally: "
                          "using a ShapesWorld stand-in with the same vocabulary size",
                          stacklevel=3)
            tok = train_text_tokenizer(self.cfg)
        return tok

    def _with_specials(self, tok):
        """Pad the text vocabulary to V_text, then add the FOCUS tokens after it."""
        v_text, K = self.cfg.llm.text_vocab_size, self.cfg.tokenizer.num_vq_embeddings
        visual = [f"<v{k}>" for k in range(K)]
        if IMAGE not in tok.get_vocab():  # a fresh text tokenizer (not one saved with ours)
            if len(tok) > v_text:
                raise ValueError(f"the text tokenizer has {len(tok)} tokens but "
                                 f"llm.text_vocab_size is {v_text}; set llm.text_vocab_size "
                                 f"to {len(tok)}")
            if tok.pad_token is None:  # Qwen2.5 base: pad with <|endoftext|>
                tok.pad_token = tok.eos_token
            tok.backend_tokenizer.add_special_tokens([  # reserved ids, never produced
                AddedToken(f"<|reserved_{i}|>", special=True, normalized=False)
                for i in range(v_text - len(tok))])
            tok.add_special_tokens({"additional_special_tokens": SPECIALS + visual},
                                   replace_extra_special_tokens=False)
        ids = tok.convert_tokens_to_ids(SPECIALS + visual)
        if ids != list(range(v_text, v_text + len(ids))):
            raise ValueError(f"tokenizer layout does not match the config: expected the FOCUS "
                             f"tokens at ids {v_text}..{v_text + len(ids) - 1}; rebuild the "
                             "tokenizer or fix llm.text_vocab_size / tokenizer.num_vq_embeddings")
        self.image_id, self.region_id, self.seg_id, self.boi_id, self.eoi_id = ids[:5]
        self.visual_token_range = range(ids[5], ids[5] + K)  # contiguous pixel-code ids
        return tok

    def visual_token_id(self, code: int | torch.Tensor):
        """Pixel code k of the visual tokenizer -> its LLM token id."""
        return self.visual_token_range.start + code

    def save_text_tokenizer(self, path: str | Path) -> None:
        self.tokenizer.save_pretrained(str(path))

    @staticmethod
    def load_text_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
        if not Path(path, "tokenizer.json").is_file():
            raise FileNotFoundError(f"no text tokenizer in {path} (expected tokenizer.json): "
                                    "pass the checkpoint folder written by save_pretrained")
        return PreTrainedTokenizerFast.from_pretrained(str(path))

    # ----- sequence building -----------------------------------------------------------------
    def _ids(self, text: str) -> list[int]:
        """Tokenise, growing each <image> to N and each <region> to R placeholders."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        out = []
        for i in ids:
            out += [i] * {self.image_id: self.num_image_tokens,
                          self.region_id: self.num_region_tokens}.get(i, 1)
        return out

    def encode(self, prompts: list[str], targets: list[str] | None = None,
               padding_side: str = "right") -> dict:
        """Token ids, attention mask and labels (-100 outside the targets) for a batch."""
        if isinstance(prompts, str):
            raise TypeError("encode takes a list of prompts: wrap a single one as [prompt]")
        targets = targets if targets is not None else [None] * len(prompts)
        if len(targets) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        rows = []
        for p, t in zip(prompts, targets):
            src = [eos] + self._ids(p)  # <eos> opens every sequence (a start marker)
            tgt = [] if t is None else self._ids(t) + [eos]
            rows.append((src + tgt, [IGNORE] * len(src) + tgt))
        T = max(len(r[0]) for r in rows)
        if T > self.cfg.llm.max_position:
            raise ValueError(f"sequence of {T} tokens exceeds llm.max_position "
                             f"({self.cfg.llm.max_position}): shorten the text")
        ids = torch.full((len(rows), T), pad)  # (B, T)
        mask = torch.zeros(len(rows), T, dtype=torch.long)  # (B, T)
        labels = torch.full((len(rows), T), IGNORE)  # (B, T)
        for b, (x, y) in enumerate(rows):
            s = slice(0, len(x)) if padding_side == "right" else slice(T - len(x), T)
            ids[b, s], mask[b, s], labels[b, s] = torch.tensor(x), 1, torch.tensor(y)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def embed(self, input_ids, image_tokens=None, region_tokens=None) -> torch.Tensor:
        """Text embeddings with image / region tokens spliced in at their placeholders."""
        emb = self.model.get_input_embeddings()(input_ids)  # (B, T, D)
        for name, tid, tokens in (("image", self.image_id, image_tokens),
                                  ("region", self.region_id, region_tokens)):
            where = input_ids == tid  # (B, T)
            got = 0 if tokens is None else tokens.shape[0] * tokens.shape[1]
            n = got if where.is_meta else int(where.sum())  # meta: shape checks only
            if n != got:
                raise ValueError(f"the text has {n} <{name}> placeholder positions but {got} "
                                 f"{name} tokens were given: pass one ({name} count, tokens, D) "
                                 f"tensor per <{name}> in the prompts, in order")
            if n:  # LLaVA-style splice: placeholders are filled row by row, in order
                emb = emb.masked_scatter(where.unsqueeze(-1), tokens.to(emb.dtype))  # (B, T, D)
        return emb

    # ----- forward, heads, <seg> -----------------------------------------------------------
    def forward(self, batch: dict, image_tokens=None, region_tokens=None) -> LLMOutput:
        emb = self.embed(batch["input_ids"], image_tokens, region_tokens)  # (B, T, D)
        hidden = self.model.model(inputs_embeds=emb, attention_mask=batch["attention_mask"],
                                  use_cache=False).last_hidden_state  # (B, T, D)
        logits = self.model.lm_head(hidden)  # (B, T, V)
        loss = acc = None
        if batch.get("labels") is not None:
            loss, acc = next_token_loss(logits, batch["labels"])
        return LLMOutput(loss=loss, logits=logits, hidden=hidden, accuracy=acc)

    @torch.no_grad()
    def text_features(self, texts: list[str], chunk: int = 256) -> torch.Tensor:
        """Mean last-layer state over each text's tokens (B, D): stage 0's caption embedding."""
        device, feats = self.model.lm_head.weight.device, []
        for i in range(0, len(texts), chunk):
            batch = {k: v.to(device) for k, v in self.encode([""] * len(texts[i:i + chunk]),
                                                              texts[i:i + chunk]).items()}
            keep = (batch["labels"] != IGNORE).unsqueeze(-1).float()  # (b, T, 1) text positions
            hidden = self(batch).hidden  # (b, T, D)
            feats.append((hidden * keep).sum(1) / keep.sum(1))  # (b, D)
        return torch.cat(feats)  # (B, D)

    def visual_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits over the K pixel codes only: the head that writes images (Janus-style)."""
        r = self.visual_token_range
        return F.linear(hidden, self.model.lm_head.weight[r.start:r.stop])  # (..., K)

    def seg_hidden(self, hidden: torch.Tensor, input_ids: torch.Tensor):
        """Hidden states that predict each <seg>: position p-1 for a <seg> at p (LISA).

        Returns (states (S, D), batch index (S,)) over the S <seg> tokens, in reading order.
        """
        b, p = (input_ids == self.seg_id).nonzero(as_tuple=True)  # (S,), (S,)
        if (p == 0).any():
            raise ValueError("a <seg> token at position 0 has no state before it")
        return hidden[b, p - 1], b  # the state one before <seg> is the one that emits it

    # ----- generation ------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, batch: dict, image_tokens=None, region_tokens=None,
                 max_new_tokens: int = 48, allow_visual: bool = False,
                 stop_after: tuple[int, int] | None = None) -> dict:
        """Greedy decoding with a KV cache (each step feeds only the newest token).

        `batch` from encode(..., padding_side="left"). Returns the generated ids, the decoded
        texts, and `hidden` (B, T_new, D): the state that emitted each generated token (so the
        state behind a generated <seg> is hidden[b, t] where ids[b][t] == seg_id).
        stop_after (token id, n): a row is done once it has written that token n times (what
        comes after cannot change the states before it: a causal LM).
        """
        if (batch["attention_mask"][:, -1] == 0).any():
            raise ValueError("generation needs left padding: encode(..., padding_side='left')")
        block = torch.zeros(self.model.lm_head.out_features, device=batch["input_ids"].device)
        reserved = [i for t, i in self.tokenizer.get_vocab().items() if t.startswith("<|reserved_")]
        never = reserved + [self.image_id, self.region_id]  # inputs only, never written
        if self.tokenizer.pad_token_id != self.tokenizer.eos_token_id:
            never.append(self.tokenizer.pad_token_id)
        block[never] = -torch.inf  # (V,) added to the logits
        if not allow_visual:
            block[self.visual_token_range.start:self.visual_token_range.stop] = -torch.inf
        mask = batch["attention_mask"]  # (B, T)
        out = self.model.model(inputs_embeds=self.embed(batch["input_ids"], image_tokens,
                                                        region_tokens),
                               attention_mask=mask, use_cache=True)
        B, eos = mask.shape[0], self.tokenizer.eos_token_id
        done = torch.zeros(B, dtype=torch.bool, device=mask.device)
        stop_id, stop_n = stop_after or (eos, 1)
        written = torch.zeros(B, dtype=torch.long, device=mask.device)  # stop_id so far
        ids, states = [], []
        for _ in range(max_new_tokens):
            h = out.last_hidden_state[:, -1]  # (B, D) the newest position's state
            nxt = (self.model.lm_head(h) + block).argmax(-1)  # (B,) greedy
            nxt = torch.where(done, torch.full_like(nxt, eos), nxt)
            ids.append(nxt)
            states.append(h)
            written += (nxt == stop_id) & ~done
            done |= (nxt == eos) | (written >= stop_n)
            if done.all():
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)  # (B, T+1)
            out = self.model.model(input_ids=nxt[:, None], attention_mask=mask, use_cache=True,
                                   **cache_kwargs(self.model.model, kv_cache(out)))
        ids = torch.stack(ids, 1)  # (B, T_new)
        rows = [r[: (r == eos).nonzero()[0].item()] if (r == eos).any() else r for r in ids]
        texts = [self.tokenizer.decode(r, skip_special_tokens=False).strip() for r in rows]
        return {"ids": [r.tolist() for r in rows], "texts": texts,
                "hidden": torch.stack(states, 1)}  # (B, T_new, D)

    # ----- paper scale: stage 0 = load the released weights -------------------------------
    def load_pretrained(self, path: str | None = None) -> FocusLLM:
        """Load a Qwen2-family checkpoint (hub id or folder) into this LLM, then add our tokens."""
        path = path or self.cfg.llm.pretrained
        if not path:
            raise ValueError("no pretrained LLM given: set llm.pretrained (e.g. Qwen/Qwen2.5-3B)")
        model = Qwen2ForCausalLM.from_pretrained(path, dtype=torch.float32)
        c, mc = self.cfg.llm, model.config
        want = (c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads, c.intermediate_size)
        got = (mc.hidden_size, mc.num_hidden_layers, mc.num_attention_heads,
               mc.num_key_value_heads, mc.intermediate_size)
        if want != got:
            raise ValueError(f"pretrained LLM {path} has (hidden, layers, heads, kv_heads, mlp) "
                             f"= {got} but cfg.llm says {want}: set cfg.llm to the checkpoint's "
                             "sizes")
        tok = _pretrained_tokenizer(path, offline=False)
        if tok is None:
            raise FileNotFoundError(f"no tokenizer next to the weights at {path}: load_pretrained "
                                    "needs the checkpoint's tokenizer files too")
        self.tokenizer = self._with_specials(tok)
        model.resize_token_embeddings(c.text_vocab_size, mean_resizing=False)  # drop pad rows
        model.resize_token_embeddings(len(self.tokenizer))  # mean-initialised FOCUS tokens
        self.model = model
        return self


@functools.cache
def _cache_keyword(model_type: type) -> str:
    """`cache` (transformers 5.2x on) or `past_key_values` (earlier 5.x; removed in 5.40),
    read once per model class from its forward's signature."""
    return "cache" if "cache" in inspect.signature(model_type.forward).parameters \
        else "past_key_values"


def cache_kwargs(model: nn.Module, cache) -> dict:
    """The KV cache as the keyword this transformers version takes."""
    return {_cache_keyword(type(model)): cache}


def kv_cache(out):
    """The KV cache a forward returned (`cache` on newer, `past_key_values` on older 5.x)."""
    return out.cache if "cache" in out else out.past_key_values


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor):
    """Cross-entropy of position t predicting token t+1, and the greedy token accuracy."""
    pred, gold = logits[:, :-1], labels[:, 1:]  # (B, T-1, V), (B, T-1): shift by one
    loss = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), gold.reshape(-1),
                           ignore_index=IGNORE)  # mean over labelled positions
    keep = gold != IGNORE  # (B, T-1)
    acc = (pred.argmax(-1)[keep] == gold[keep]).float().mean().item() if keep.any() else 0.0
    return loss, acc
