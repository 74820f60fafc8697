"""The benchmark runs and reports every DESIGN §6 key (its numbers are measured, not asserted)."""

import json

from focus_ref.__main__ import main
from focus_ref.bench import count_flops, run_bench


def test_count_flops_of_a_matmul():
    import torch

    a, b = torch.randn(8, 16), torch.randn(16, 4)
    assert count_flops(lambda: a @ b) == 2 * 8 * 16 * 4


def test_bench_reports_every_key_on_a_random_model(tmp_path):
    out = tmp_path / "bench.json"
    assert main(["bench", "--random", "--repeats", "1", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    for key in ("train.samples_per_s", "train.mfu", "latency.edit_s", "latency.generate_s",
                "memory.peak_rss_mb"):
        assert res[key] > 0, key
    assert 0 < res["train.mfu"] < 5  # FLOP/s of a step over a big matmul's: a sane ratio


def test_bench_takes_stage_minutes_from_the_checkpoints_run(tmp_path):
    from focus_ref import FocusConfig, FocusModel

    FocusModel(FocusConfig.tiny()).save_pretrained(tmp_path)
    (tmp_path / "metrics.json").write_text(json.dumps({"time.stage4_min": 1.5, "edit.success": 0.1}))
    res = run_bench(tmp_path, repeats=1)
    assert res["time.stage4_min"] == 1.5 and "edit.success" not in res
