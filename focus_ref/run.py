"""The main job: every training stage end to end, then evaluation and a run report.

    python -m focus_ref train --preset tiny --out runs/tiny

builds FocusModel(FocusConfig.tiny()), runs stage 0 (stand-ins for the pretrained backbones),
stage 1 (tokenizer + diffusion decoder), stage 2 (adapter warm-up), stage 3 (multimodal
pretraining with segmentation; arrives with issue 5) and stage 4 (region-controlled editing) — the progressive
recipe of the paper (§3.5) — then sets the predictor's "no target" threshold on dev scenes
(evaluate.calibrate_presence), evaluates on held-out scenes and writes a run folder:

    runs/tiny/config.json        the config (FocusConfig JSON)
    runs/tiny/stage*/            each stage's resumable checkpoint (safetensors)
    runs/tiny/final/             the trained model (FocusModel.from_pretrained reads it)
    runs/tiny/metrics.json       held-out metrics (DESIGN §6 keys) + minutes per stage
    runs/tiny/history.json       every stage's logged losses (the curves)
    runs/tiny/report.md          the numbers, loss curves, masks and edits as figures

An interrupted run continues with --resume and gives the same result; a NaN loss stops the
run and keeps the last good checkpoint (train.fit).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from focus_ref import instruct, pretrain, standins, train
from focus_ref.config import FocusConfig

# Stage 3 (pretrain.py): multimodal pretraining with segmentation-aware alignment.
STAGES = {0: standins.stage0, 1: train.stage1, 2: train.stage2, 3: pretrain.stage3, 4: instruct.stage4}
TASKS = ("refseg", "region", "vqa", "tokenizer", "edit", "gen")


def parse_stages(text: str) -> list[int]:
    """ "0-4" -> [0, 1, 2, 3, 4]; "3" -> [3]; "1,3" -> [1, 3]."""
    out: list[int] = []
    try:
        for part in str(text).split(","):
            lo, _, hi = part.partition("-")
            out += list(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise ValueError(f"--stages {text!r} is not a stage list: write e.g. 0-4, 3-4 or 2") from None
    bad = [s for s in out if s not in STAGES]
    if bad or not out:
        raise ValueError(f"--stages {text!r} names unknown stage(s) {bad}: stages are "
                         f"{sorted(STAGES)}")
    return sorted(set(out))


def quick_config(cfg: FocusConfig, steps: int = 3) -> FocusConfig:
    """A smoke-test copy of cfg: every stage runs `steps` steps with small batches."""
    cfg = FocusConfig.from_dict(cfg.to_dict())
    for name in [f.name for f in train_stage_fields(cfg)]:
        sc = getattr(cfg.train, name)
        sc.steps, sc.batch_size, sc.warmup = steps, min(sc.batch_size, 4), 1
        sc.log_every, sc.ckpt_every = 1, steps
    cfg.train.scene_pool, cfg.train.text_scenes = 32, 20  # fewer scenes rendered up front
    cfg.train.stage3_scenes = 32
    return cfg


def train_stage_fields(cfg: FocusConfig):
    import dataclasses

    from focus_ref.config import StageConfig

    return [f for f in dataclasses.fields(cfg.train)
            if isinstance(getattr(cfg.train, f.name), StageConfig)]


def main_job(preset: str = "tiny", stages: str = "0-4", out: str | Path = "runs/tiny",
             resume: bool = False, seed: int = 0, quick: bool = False, init: str | None = None,
             eval_n: int | None = None, progress: bool = True) -> dict:
    from accelerate import PartialState

    from focus_ref.evaluate import calibrate_presence, evaluate_model
    from focus_ref.model import FocusModel

    out = Path(out)
    order = parse_stages(stages)
    if (out / "config.json").is_file() and not resume:
        raise FileExistsError(f"run folder {out} already holds a run: pass --resume to continue "
                              "it, or choose another --out (nothing was changed)")
    cfg = FocusConfig.from_json(out / "config.json") if resume and (out / "config.json").is_file() \
        else FocusConfig.from_preset(preset)
    cfg.train.seed = seed
    if quick:
        cfg = quick_config(cfg)
    state = PartialState()  # accelerate launch: every process reads the folder, one writes
    state.wait_for_everyone()
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        cfg.to_json(out / "config.json")
    state.wait_for_everyone()
    torch.manual_seed(seed)
    model = FocusModel.from_pretrained(init) if init else FocusModel(cfg)
    model.config = cfg
    histories, minutes = {}, {}
    for n in order:
        t0 = time.time()
        histories[n] = STAGES[n](model, cfg, out, resume=resume, progress=progress)
        minutes[f"time.stage{n}_min"] = round((time.time() - t0) / 60, 2)
    if not state.is_main_process:  # accelerate launch: the others' work is done
        return {}
    if {3, 4} & set(order):  # the presence head trained: choose its GRES operating point
        t0 = time.time()
        calibrate_presence(model, n=4 if quick else 300, progress=progress)
        minutes["time.calibrate_min"] = round((time.time() - t0) / 60, 2)
    model.save_pretrained(out / "final")  # (its config holds the chosen threshold)
    t0 = time.time()
    metrics = evaluate_model(model, "val", n=eval_n or (8 if quick else 200), progress=progress,
                             tasks=TASKS)
    metrics.update(minutes)
    metrics["time.eval_min"] = round((time.time() - t0) / 60, 2)
    metrics["time.train_min"] = round(sum(minutes.values()), 2)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (out / "history.json").write_text(json.dumps(_flat_histories(histories)) + "\n")
    write_report(model, metrics, histories, out)
    return metrics


def ship(run: str | Path, dest: str | Path) -> None:
    """Copy a finished run's model into `dest` as the shipped checkpoint: weights in half
    precision (fp16 on disk, fp32 once loaded), config, text tokenizer, and the run's
    metrics.json and history.json (the numbers and curves the notebooks show)."""
    import shutil

    from focus_ref.model import FocusModel

    run, dest = Path(run), Path(dest)
    FocusModel.from_pretrained(run / "final").save_pretrained(dest, half=True)
    for name in ("metrics.json", "history.json"):
        shutil.copyfile(run / name, dest / name)


def _flat_histories(histories: dict) -> dict[str, list]:
    """{stage: history or {part: history}} -> {"stage0 lm": [...], ...} for plotting."""
    flat = {}
    for n, h in histories.items():
        if isinstance(h, dict):
            flat.update({f"stage{n} {k}": v for k, v in h.items() if v})
        elif h:
            flat[f"stage{n}"] = h
    return flat


def machine() -> str:
    """What a run's numbers depend on beyond the seed: torch, its CPU kernels, threads."""
    import platform

    return (f"torch {torch.__version__}, {platform.machine()} "
            f"{torch.backends.cpu.get_cpu_capability()} kernels, "
            f"{torch.get_num_threads()} threads")


def write_report(model, metrics: dict, histories: dict, out: Path) -> None:
    """report.md: the metric table, loss curves, and example masks and edits (held-out)."""
    import matplotlib.pyplot as plt

    from focus_ref import viz
    from focus_ref.shapesworld import ShapesWorld

    fig_dir = out / "figures"
    fig_dir.mkdir(exist_ok=True)
    curves = _flat_histories(histories)
    if curves:
        fig, ax = plt.subplots(figsize=(7, 4))
        viz.plot_curves(curves, ax=ax)
        fig.savefig(fig_dir / "loss.png", dpi=90, bbox_inches="tight")
        plt.close(fig)
    world = ShapesWorld(model.config.data, "val")
    imgs, titles = [], []
    for i in range(4):
        s = world.sample(i)
        res = model.edit(s["image"], s["edit"]["instruction"], return_details=True)
        mask = np.zeros(s["inst"].shape, bool) if res.mask is None else res.mask
        imgs += [viz.overlay(s["image"], mask), res.image]
        titles += [f"mask for: {s['edit']['instruction']}", f"edit ({res.reason})"]
    fig = viz.show_row(imgs, titles, size=2.0)
    fig.savefig(fig_dir / "examples.png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    rows = "\n".join(f"| `{k}` | {v:.4g} |" if isinstance(v, float) else f"| `{k}` | {v} |"
                     for k, v in metrics.items())
    (out / "report.md").write_text(
        f"# focus_ref run: preset `{model.config.preset}`\n\n"
        f"Held-out ShapesWorld (split `val`), seed {model.config.train.seed}.\n\n"
        f"Machine: {machine()}. Training is deterministic for one seed on one such machine; "
        "another CPU's kernels round differently and the runs drift apart (lab notes).\n\n"
        f"| metric | value |\n|---|---|\n{rows}\n\n"
        "## Training curves\n\n![loss](figures/loss.png)\n\n"
        "## Held-out edits (predicted edit region, result)\n\n![examples](figures/examples.png)\n")
