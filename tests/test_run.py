"""The main job end to end on a few steps per stage, and the CLI around it."""

import json

import pytest

from focus_ref.__main__ import main
from focus_ref.run import main_job, parse_stages


def test_parse_stages():
    assert parse_stages("0-2,4") == [0, 1, 2, 4]
    assert parse_stages("4") == [4]
    with pytest.raises(ValueError, match="not a stage list"):
        parse_stages("a-b")
    with pytest.raises(ValueError, match="unknown stage"):
        parse_stages("7")


def test_quick_main_job_writes_a_complete_run_folder(tmp_path):
    out = tmp_path / "run"
    metrics = main_job(out=out, quick=True, eval_n=4, progress=False)
    for f in ("config.json", "final/model.safetensors", "final/config.json", "metrics.json",
              "report.md", "figures/loss.png", "figures/examples.png"):
        assert (out / f).is_file(), f
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics))
    for key in ("tokenizer.psnr", "tokenizer.code_usage", "edit.success", "edit.bg_psnr",
                "gen.attr_acc", "time.stage0_min", "time.stage4_min"):
        assert key in saved, key
    assert "| `edit.success` |" in (out / "report.md").read_text()
    # an existing run is never overwritten without --resume: one line, exit status 2
    assert main(["train", "--out", str(out), "--quick"]) == 2


def test_cli_reports_a_missing_checkpoint_in_one_line(tmp_path, capsys):
    rc = main(["generate", "--prompt", "a red circle", "--out", str(tmp_path / "x.png"),
               "--checkpoint", str(tmp_path / "nope")])
    assert rc == 2
    assert "no checkpoint at" in capsys.readouterr().err
