"""The benchmark: speed and quality figures live here, never in timed tests (DESIGN §8).

`python -m focus_ref bench --json bench.json` measures, on this machine:

  train.samples_per_s   training throughput of a stage-3 step (the multimodal task mix)
  train.mfu             model FLOP utilisation: the step's FLOPs (counted with
                        torch.utils.flop_counter) per second, over this machine's measured
                        dense-matmul FLOP/s (so 1.0 means "as fast as a big matmul runs here")
  latency.*_s           median seconds of one public call on the shipped checkpoint
  memory.peak_rss_mb    peak resident memory of the process
"""

from __future__ import annotations

import resource
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode


def matmul_flops_per_s(n: int = 1024, repeats: int = 10) -> float:
    """This machine's dense fp32 matmul throughput: the denominator of MFU."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - t0)


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of fn (forward + backward if fn runs both), counted by torch."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def median_seconds(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux, bytes on macOS
    return kb / 1024 / (1024 if sys.platform == "darwin" else 1)


def train_throughput(step: Callable[[], object], batch_size: int, steps: int = 5) -> dict:
    """samples/s and MFU of a training step (a closure running forward, backward, update)."""
    flops = count_flops(step)
    sec = median_seconds(step, repeats=steps)
    peak = matmul_flops_per_s()
    return {"train.samples_per_s": batch_size / sec, "train.step_s": sec,
            "train.flops_per_step": flops, "train.mfu": flops / sec / peak,
            "machine.matmul_gflops": peak / 1e9}


def stage_step(stage) -> Callable[[], None]:
    """One optimizer step of a train.Stage on a fixed batch (its step-0 batch), with the
    deterministic kernels train.fit runs."""
    from focus_ref.train import deterministic

    opt = torch.optim.AdamW([p for p in stage.params if p.requires_grad], lr=stage.cfg.lr)
    batch = stage.batch_fn(0)

    def step():
        with deterministic():
            loss, _ = stage.loss_fn(batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return step


def run_bench(checkpoint=None, train_run=None, repeats: int = 5, progress: bool = True) -> dict:
    """Every DESIGN §6 bench key for a checkpoint (a random tiny model if None).

    train_run: a folder to run the whole main job (`train --preset tiny`) in; its stage minutes
    and held-out metrics join the result (prefixed "run."). Without it, the stage minutes are
    those recorded in the checkpoint's metrics.json by the run that trained it, if any.
    """
    import copy
    import json
    import warnings
    from pathlib import Path

    from focus_ref.config import FocusConfig
    from focus_ref.model import FocusModel
    from focus_ref.shapesworld import ShapesWorld

    model = FocusModel.from_pretrained(checkpoint) if checkpoint else FocusModel(FocusConfig.tiny())
    cfg, out = model.config, {}
    s = ShapesWorld(cfg.data, "val").sample(0)
    obj = s["prompts"][0]
    calls = {"edit": lambda: model.edit(s["image"], s["edit"]["instruction"]),
             "generate": lambda: model.generate(s["caption"])}
    if hasattr(model, "segment"):  # the understanding path (stage 3)
        calls["segment"] = lambda: model.segment(s["image"], click=obj["click"])
        calls["segment_text"] = lambda: model.segment(s["image"], expression=s["refs"][0]["text"])
    if hasattr(model, "understand"):
        calls["understand"] = lambda: model.understand(s["image"], s["qa"][0][0])
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # "no edit made" from an untrained model
        for name, fn in calls.items():
            out[f"latency.{name}_s"] = median_seconds(fn, repeats=repeats)
    # training throughput: a stage-3 step (the multimodal task mix, pretrain.py)
    from focus_ref.pretrain import stage3_multitask

    trainee = copy.deepcopy(model).train()
    stage = stage3_multitask(trainee, cfg)
    out.update(train_throughput(stage_step(stage), stage.cfg.batch_size, steps=repeats))
    out["train.stage"] = "stage3"
    del trainee
    metrics = Path(checkpoint or "", "metrics.json") if checkpoint else None
    if train_run is not None:
        from focus_ref.run import main_job

        run = main_job("tiny", out=train_run, progress=progress)
        out.update({k if k.startswith("time.") else f"run.{k}": v for k, v in run.items()})
    elif metrics is not None and metrics.is_file():  # recorded by the run that made it
        out.update({k: v for k, v in json.loads(metrics.read_text()).items()
                    if k.startswith("time.")})
    out["memory.peak_rss_mb"] = peak_rss_mb()
    return out
