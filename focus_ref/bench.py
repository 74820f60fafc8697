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
