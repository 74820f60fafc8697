"""Progressive training (paper §3.5): one loop, every stage.

FOCUS trains in four stages: (1) the visual tokenizer and the diffusion decoder; (2) a
warm-up of the vision-language adapters; (3) multimodal pretraining with
segmentation-aware alignment; (4) instruction tuning for region-controlled editing. At the
tiny scale no pretrained backbones exist, so a stage 0 trains stand-ins on ShapesWorld.

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
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm  # plain text bars: no widget state in notebooks

from focus_ref.config import StageConfig

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
    acc = accelerator or Accelerator(cpu=pick_device().type == "cpu")
    opt = torch.optim.AdamW(params, lr=stage.cfg.lr, weight_decay=stage.cfg.weight_decay)
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
    for step in bar:
        for g in opt_p.param_groups:
            g["lr"] = lr_at(step, stage.cfg)
        batch = _to(stage.batch_fn(step), acc.device)
        with acc.autocast():
            loss, logs = stage.loss_fn(batch)
        if not torch.isfinite(loss):  # NaN guard: stop, keep the last good checkpoint
            raise FloatingPointError(
                f"{stage.name}: loss is {loss.item()} at step {step}; nothing was saved past "
                f"the last good checkpoint in {ckpt}. Lower train.{stage.name[:6]}.lr or "
                "check the batch, then rerun with --resume.")
        opt_p.zero_grad(set_to_none=True)
        acc.backward(loss)
        acc.clip_grad_norm_(params, 1.0)
        opt_p.step()
        if step % stage.cfg.log_every == 0 or step == stage.cfg.steps - 1:
            rec = {"step": step, "loss": loss.item(), "lr": lr_at(step, stage.cfg),
                   "time_s": round(time.time() - t0, 2), **logs}
            history.append(rec)
            bar.set_postfix(loss=f"{rec['loss']:.4f}")
        if (step + 1) % stage.cfg.ckpt_every == 0 or step == stage.cfg.steps - 1:
            _save(acc.unwrap_model(model_p), opt, params, step + 1, history, ckpt)
    model.eval()
    return history


def _to(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


# ----- checkpoints: safetensors only, nothing is unpickled -------------------------------
def _save(model: nn.Module, opt: torch.optim.Optimizer, params: list, step: int,
          history: list, ckpt: Path) -> None:
    ckpt.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
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
    model.load_state_dict(load_file(str(ckpt / "model.safetensors")))
    flat = load_file(str(ckpt / "optimizer.safetensors"))
    torch.set_rng_state(flat.pop("rng"))
    for key, v in flat.items():
        i, name = key.split(".", 1)
        p = params[int(i)]
        opt.state[p][name] = v.reshape(()) if name == "step" else v.to(p.device)
    return meta["step"], meta["history"]
