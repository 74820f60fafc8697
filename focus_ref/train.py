"""Progressive training (paper §3.5): one loop, every stage.

FOCUS trains in four stages: (1) the visual tokenizer and the diffusion decoder; (2) a
warm-up of the vision-language adapters; (3) multimodal pretraining with
segmentation-aware alignment; (4) instruction tuning for region-controlled editing. At the
tiny scale no pretrained backbones exist, so a stage 0 trains stand-ins on ShapesWorld
(standins.py; stages 3 and 4 live in pretrain.py and instruct.py).

Every stage is a `Stage`: which parameters train, a loss, and a batch function that is
deterministic in the step number. `fit` runs it with accelerate (CPU, one GPU, or
`accelerate launch` for DDP / FSDP / DeepSpeed), shows a progress bar, checkpoints to
safetensors, stops on a NaN loss keeping the last good checkpoint, and resumes to the same
result as an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.utils.deterministic as td
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm  # plain text bars: no widget state in notebooks

from focus_ref.config import StageConfig, TrainConfig

Batch = dict
LossFn = Callable[[Batch], "tuple[torch.Tensor, dict[str, float]]"]


@dataclass
class Stage:
    name: str  # folder name under the run directory, e.g. "stage0_lm"
    params: list  # the trainable parameters (everything else stays frozen)
    loss_fn: LossFn  # batch -> (scalar loss, {name: float} logs)
    batch_fn: Callable[[int], Batch]  # step -> batch; deterministic in step (resumable)
    cfg: StageConfig
    seed: int = 0
    slow: list = field(default_factory=list)  # of params: these train at slow_mult x the rate
    slow_mult: float = 1.0


def pick_device() -> torch.device:
    """cuda -> mps -> cpu (STYLE 9); fp32 on CPU, no torch.compile."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def lr_at(step: int, cfg: StageConfig) -> float:
    """Linear warm-up, then cosine decay to 10 % of the peak rate."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def fit(model: nn.Module, stage: Stage, out_dir: str | Path, resume: bool = False,
        progress: bool = True, accelerator=None) -> list[dict]:
    """Train `stage.params` of `model`; checkpoints go to out_dir/stage.name/.

    Returns the history: one dict per logged step ({"step", "loss", "lr", ...logs}).
    """
    from accelerate import Accelerator

    ckpt = Path(out_dir) / stage.name
    params = [p for p in stage.params if p.requires_grad]
    if not params:
        raise ValueError(f"{stage.name}: no trainable parameters were given")
    # the model's FocusConfig.train (the defaults for a bare module): grad_clip, mixed_precision
    tc = getattr(getattr(model, "config", None), "train", None) or TrainConfig()
    on_cpu = pick_device().type == "cpu"  # fp32 on CPU (STYLE 9); bf16 where the preset says
    acc = accelerator or Accelerator(cpu=on_cpu,
                                     mixed_precision="no" if on_cpu else tc.mixed_precision)
    slow = {id(p) for p in stage.slow} if stage.slow_mult != 1 else set()  # train.llm_lr_mult
    groups = [{"params": [p for p in params if (id(p) in slow) == is_slow],
               "scale": stage.slow_mult if is_slow else 1.0} for is_slow in (False, True)]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=stage.cfg.lr,
                            weight_decay=stage.cfg.weight_decay)
    torch.manual_seed(stage.seed)
    start, history = 0, []
    if resume and (ckpt / "state.json").is_file():
        start, history = _load(model, opt, params, ckpt)
    if start >= stage.cfg.steps:
        return history
    model_p, opt_p = acc.prepare(model, opt)
    model_p.train()
    bar = tqdm(range(start, stage.cfg.steps), desc=stage.name, disable=not progress,
               initial=start, total=stage.cfg.steps, dynamic_ncols=True)
    t0, step = time.time(), start
    with deterministic():  # same seed, same numbers: also across processes and --resume
        for step in bar:
            for g in opt_p.param_groups:
                g["lr"] = lr_at(step, stage.cfg) * g["scale"]
            # accelerate launch (DDP): process r of W trains on batch step*W + r, so the W
            # processes see different samples and a step's batch is W x batch_size
            batch = _to(stage.batch_fn(step * acc.num_processes + acc.process_index), acc.device)
            with acc.autocast():
                loss, logs = stage.loss_fn(batch)
            if not torch.isfinite(loss):  # NaN guard: stop, keep the last good checkpoint
                raise FloatingPointError(
                    f"{stage.name}: loss is {loss.item()} at step {step}; nothing was saved past "
                    f"the last good checkpoint in {ckpt}. Lower train.{stage.name[:6]}.lr or "
                    "check the batch, then rerun with --resume.")
            opt_p.zero_grad(set_to_none=True)
            acc.backward(loss)
            if tc.grad_clip > 0:  # max gradient norm; 0 = no clipping
                acc.clip_grad_norm_(params, tc.grad_clip)
            opt_p.step()
            if step % stage.cfg.log_every == 0 or step == stage.cfg.steps - 1:
                rec = {"step": step, "loss": loss.item(), "lr": lr_at(step, stage.cfg),
                       "time_s": round(time.time() - t0, 2), **logs}
                history.append(rec)
                bar.set_postfix(loss=f"{rec['loss']:.4f}")
            if (step + 1) % stage.cfg.ckpt_every == 0 or step == stage.cfg.steps - 1:
                if acc.is_main_process:  # one writer; every process has the same weights
                    _save(acc.unwrap_model(model_p), opt, params, step + 1, history, ckpt)
                acc.wait_for_everyone()
    model.eval()
    return history


@contextmanager
def deterministic():
    """torch's deterministic kernels while training, the caller's setting restored after.

    On a multi-threaded CPU the backward pass of an indexing gather (`codebook[codes]` in the
    VQ losses) accumulates with atomic adds in thread order, so two runs of one seed drift
    apart after a few hundred steps (all 156 tokenizer tensors of stage 1 differed between
    two identical 300-step runs on 2 cores). The deterministic kernels cost 5-12 % here (stage
    1 of the main job: 6.5 -> 7.3 min).
    warn_only: ops without a deterministic kernel (some on CUDA) warn instead of failing.
    Deterministic mode also fills every fresh tensor with NaN (a guard against kernels that
    read memory they never wrote); no kernel here does, so that fill is switched off: it was
    4-9 % of a training step in torch.profiler (stages 1a, 0d, 4), and the weights a run ends
    with are the same bit for bit with or without it (tests/test_train.py)."""
    was, warn = (torch.are_deterministic_algorithms_enabled(),
                 torch.is_deterministic_algorithms_warn_only_enabled())
    fill = td.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    td.fill_uninitialized_memory = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was, warn_only=warn)
        td.fill_uninitialized_memory = fill


def _to(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device) if torch.is_tensor(v) else _to(v, device) if isinstance(v, dict)
            else v for k, v in batch.items()}  # nested: stage 4's rehearsal batch


# ----- checkpoints: safetensors only, nothing is unpickled -------------------------------
def tied_aliases(model: nn.Module) -> dict[str, str]:
    """{name: first name} for state-dict entries that are the same tensor as an earlier one
    (tied weights, e.g. Qwen2.5-3B's lm_head = embed_tokens). Stored once on disk."""
    first, out = {}, {}
    for k, v in model.state_dict(keep_vars=True).items():
        out.update({k: first[id(v)]} if id(v) in first else {})
        first.setdefault(id(v), k)
    return out


def saveable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict for safetensors: on CPU, contiguous, tied weights once."""
    skip = tied_aliases(model)
    return {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()
            if k not in skip}


def _save(model: nn.Module, opt: torch.optim.Optimizer, params: list, step: int,
          history: list, ckpt: Path) -> None:
    ckpt.mkdir(parents=True, exist_ok=True)
    state = saveable_state(model)
    save_file(state, str(ckpt / "model.safetensors.tmp"))
    flat = {"rng": torch.get_rng_state()}
    for i, p in enumerate(params):  # AdamW moments, keyed by the parameter's position
        for k, v in opt.state.get(p, {}).items():
            flat[f"{i}.{k}"] = v.detach().reshape(-1).cpu() if v.dim() == 0 else v.detach().cpu()
    save_file(flat, str(ckpt / "optimizer.safetensors.tmp"))
    # rename last: an interrupted save never leaves a half-written checkpoint behind
    (ckpt / "model.safetensors.tmp").replace(ckpt / "model.safetensors")
    (ckpt / "optimizer.safetensors.tmp").replace(ckpt / "optimizer.safetensors")
    (ckpt / "state.json").write_text(json.dumps({"step": step, "history": history}))


def _load(model: nn.Module, opt: torch.optim.Optimizer, params: list,
          ckpt: Path) -> tuple[int, list]:
    meta = json.loads((ckpt / "state.json").read_text())
    state = load_file(str(ckpt / "model.safetensors"))
    model.load_state_dict({**state, **{k: state[v] for k, v in tied_aliases(model).items()}})
    flat = load_file(str(ckpt / "optimizer.safetensors"))
    torch.set_rng_state(flat.pop("rng"))
    for key, v in flat.items():
        i, name = key.split(".", 1)
        p = params[int(i)]
        opt.state[p][name] = v.reshape(()) if name == "step" else v.to(p.device)
    return meta["step"], meta["history"]


# ===== Shared by the stages: what trains, which samples, rendered pools =====================
def _train_only(model: nn.Module, modules: list) -> list:
    """Freeze everything, then unfreeze `modules`; returns their parameters."""
    model.requires_grad_(False)
    for m in modules:
        m.requires_grad_(True)
    return [p for m in modules for p in m.parameters()]


def _picker(cfg, n: int, step: int, size: int) -> torch.Tensor:
    """The batch indices of `step`: a function of (seed, step) only, so resuming repeats them."""
    import numpy as np

    rng = np.random.default_rng([cfg.train.seed, step])
    return torch.from_numpy(rng.choice(n, size=min(n, size), replace=False))  # (B,)


_POOLS: dict = {}  # (kind, data config, split, n) -> rendered data, made once per process


def pooled(kind: str, cfg, split: str, n: int, make: Callable):
    """make() once per process for n scenes of `split` under cfg.data; the same object after
    (the stages that share a pool render it once)."""
    key = (kind, json.dumps(vars(cfg.data)), split, n)
    if key not in _POOLS:
        _POOLS[key] = make()
    return _POOLS[key]


def caption_pool(cfg, split: str, n: int):
    """n ShapesWorld scenes as (images (n, 3, H, W) in [-1, 1], captions)."""
    from focus_ref import shapesworld
    from focus_ref.data import image_to_tensor

    def make():
        world = shapesworld.ShapesWorld(cfg.data, split)
        scenes = [world.scene(i) for i in range(n)]  # scene i of world.sample(i), no extras
        images = torch.stack([image_to_tensor(shapesworld.render(s)[0]) for s in scenes])
        return images, [shapesworld.caption(s) for s in scenes]  # (n, 3, H, W), [str]

    return pooled("caption", cfg, split, n, make)


# ===== Stage 1: visual tokenizer, then diffusion decoder ===================================
# Paper §3.5 stage 1: (a) the MoVQ tokenizer learns to turn ShapesWorld images into pixel
# codes and back, and the vanilla encoder's features into semantic codes; (b) with the
# tokenizer frozen, the diffusion decoder learns to render an image from its codes and to
# edit a region given the target's codes and the ground-truth mask (ShapesWorld edit pairs).
# Losses live in tokenizer.py / diffusion.py; batches are a function of the step (resumable).
def _stage1_images(cfg, step: int, batch_size: int) -> torch.Tensor:
    from focus_ref.data import image_to_tensor
    from focus_ref.shapesworld import ShapesWorld, render

    world = ShapesWorld(cfg.data, "train")  # scene i renders the image of world.sample(i)
    idx = range(step * batch_size, (step + 1) * batch_size)  # fresh scenes every step
    return torch.stack([image_to_tensor(render(world.scene(i))[0]) for i in idx])  # (B,3,H,W)


def _semantic_feats(model: nn.Module, images: torch.Tensor):
    """Frozen vanilla-encoder features (B, N, C_vit) for the semantic codes, if an encoder."""
    enc = getattr(model, "encoder", None)
    if enc is None:
        return None
    with torch.no_grad():
        return enc.vanilla(images)  # (B, N, C_vit): the ViT on the low-res copy


def stage1_tokenizer(model: nn.Module, cfg) -> Stage:
    """(a) MoVQ pixel codes (reconstruction + VQ) and semantic codes (feature reconstruction)."""
    tok, sc = model.visual_tokenizer, cfg.train.stage1
    feature_net = model.encoder.hierarchical if cfg.tokenizer.perceptual_weight > 0 else None

    def batch_fn(step):
        return {"image": _stage1_images(cfg, step, sc.batch_size)}

    def loss_fn(batch):
        feats = _semantic_feats(model, batch["image"])
        return tok.loss(batch["image"], feats, feature_net=feature_net)

    return Stage("stage1_tokenizer", _train_only(model, [tok]), loss_fn, batch_fn, sc,
                 cfg.train.seed)


def _edit_batch(cfg, step: int, batch_size: int) -> dict:
    """Half renders (no source, mask everywhere), half ShapesWorld edits (source, target, GT
    region); which is which is a function of (seed, step)."""
    import numpy as np

    from focus_ref.data import image_to_tensor
    from focus_ref.shapesworld import ShapesWorld

    world = ShapesWorld(cfg.data, "train")
    rng = np.random.default_rng([cfg.train.seed, step, 1])
    src, tgt, masks, has_src = [], [], [], []
    for i in range(step * batch_size, (step + 1) * batch_size):
        s = world.sample(i)
        render_only = rng.random() < cfg.diffusion.render_share
        tgt.append(image_to_tensor(s["image"] if render_only else s["edit"]["target_image"]))
        src.append(image_to_tensor(s["image"]))
        masks.append(torch.ones(s["inst"].shape) if render_only
                     else torch.from_numpy(s["edit"]["region"]).float())
        has_src.append(0.0 if render_only else 1.0)
    return {"source": torch.stack(src), "target": torch.stack(tgt), "mask": torch.stack(masks),
            "has_source": torch.tensor(has_src)}  # (B,3,H,W) x2, (B,H,W), (B,)


@torch.no_grad()
def decoder_inputs(model: nn.Module, batch: dict) -> dict:
    """GT target codes (pixel + semantic) and latents from the frozen tokenizer."""
    tok = model.visual_tokenizer
    tok.eval()
    codes = tok.encode(batch["target"])  # (B, h, w)
    feats = _semantic_feats(model, batch["target"])
    sem = tok.encode_semantic(feats) if feats is not None else None  # (B, N)
    source = tok.quantized_latent(batch["source"]) * batch["has_source"][:, None, None, None]
    return {"codes": codes, "sem": sem, "target": tok.codes_to_latent(codes),
            "source": source}  # latents (B, C, h, w); no source -> zeros


def stage1_decoder(model: nn.Module, cfg) -> Stage:
    """(b) Diffusion decoder: render from tokens, edit a region given GT tokens and mask."""
    dec, sc = model.diffusion, cfg.train.stage1_decoder
    with torch.no_grad():  # unit-variance latents for the diffusion (like SD's 0.18215)
        lat = model.visual_tokenizer.eval().quantized_latent(_stage1_images(cfg, 10**6, 64))
        dec.latent_scale.fill_(1.0 / lat.std().item())

    def batch_fn(step):
        return _edit_batch(cfg, step, sc.batch_size)

    def loss_fn(batch):
        x = decoder_inputs(model, batch)
        context = dec.make_context(x["codes"], x["sem"])  # (B, h*w + N, D): pixel codes first
        return dec.loss(x["target"], x["source"], batch["mask"], context, dec.grid ** 2)

    return Stage("stage1_decoder", _train_only(model, [dec]), loss_fn, batch_fn, sc,
                 cfg.train.seed)


def stage1(model: nn.Module, cfg, out_dir, resume: bool = False, progress: bool = True) -> dict:
    """Stage 1: (a) the tokenizer, then (b) the diffusion decoder on the frozen tokenizer."""
    hist_tok = fit(model, stage1_tokenizer(model, cfg), out_dir, resume, progress)
    hist_dec = fit(model, stage1_decoder(model, cfg), out_dir, resume, progress)
    return {"tokenizer": hist_tok, "decoder": hist_dec}


# ===== Stage 2: adapter warm-up =============================================================
# Paper §3.5 stage 2: the encoders and the LLM stay frozen; only the vision-language glue
# (the gated window fusion and the MLP adapter) learns, on captioning: the LLM must write an
# image's caption from the visual tokens spliced in at <image>.
IMAGE_PROMPT = "<image>"  # the captioning prompt: the image alone, then the caption


def stage2_adapter(model: nn.Module, cfg) -> Stage:
    enc, llm, sc = model.encoder, model.llm, cfg.train.stage2
    images, caps = caption_pool(cfg, "train", cfg.train.scene_pool)

    def batch_fn(step):
        idx = _picker(cfg, len(caps), step + 2 * 10**6, sc.batch_size)  # (B,)
        batch = llm.encode([IMAGE_PROMPT] * len(idx), [caps[i] for i in idx])
        return {**batch, "image": images[idx]}

    def loss_fn(batch):
        out = llm(batch, image_tokens=enc(batch["image"]).tokens)  # (B, N, D) at <image>
        gate = torch.tanh(enc.fusion.gate).item()  # how far the fusion gate has opened
        return cfg.train.w_text * out.loss, {"acc": out.accuracy, "gate": gate}

    params = _train_only(model, [enc.fusion, enc.adapter])
    return Stage("stage2_adapter", params, loss_fn, batch_fn, sc, cfg.train.seed)


def stage2(model: nn.Module, cfg, out_dir, resume: bool = False, progress: bool = True) -> list:
    return fit(model, stage2_adapter(model, cfg), out_dir, resume, progress)


@torch.no_grad()
def caption_accuracy(model: nn.Module, cfg, n: int = 256, split: str = "val",
                     with_image: bool = True, n_generate: int = 0) -> dict:
    """Held-out caption token accuracy (teacher forced) with or without the image; exact
    match of greedy captions on the first n_generate scenes. Without the image this is the
    text-only baseline: the same LLM guessing the caption from language alone."""
    enc, llm = model.encoder, model.llm
    enc.eval()
    llm.eval()
    images, caps = caption_pool(cfg, split, n)
    dev = next(llm.parameters()).device
    prompt = IMAGE_PROMPT if with_image else ""
    hits = total = 0
    for i in range(0, n, 64):
        batch = {k: v.to(dev) for k, v in llm.encode([prompt] * len(caps[i:i + 64]),
                                                      caps[i:i + 64]).items()}
        tokens = enc(images[i:i + 64].to(dev)).tokens if with_image else None
        logits = llm(batch, image_tokens=tokens).logits  # (b, T, V)
        keep = batch["labels"][:, 1:] != -100  # (b, T-1) positions that predict caption tokens
        hits += (logits[:, :-1].argmax(-1) == batch["labels"][:, 1:])[keep].sum().item()
        total += keep.sum().item()
    res = {"token_acc": hits / total, "n": n}
    if n_generate:
        batch = {k: v.to(dev) for k, v in llm.encode([prompt] * n_generate,
                                                      padding_side="left").items()}
        tokens = enc(images[:n_generate].to(dev)).tokens if with_image else None
        res["captions"] = llm.generate(batch, image_tokens=tokens, max_new_tokens=64)["texts"]
        res["exact_match"] = sum(a == b for a, b in zip(res["captions"], caps)) / n_generate
    return res
