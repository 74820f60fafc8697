"""The main job end to end on a few steps per stage, and the CLI around it."""

import json

import pytest
import torch

from focus_ref.__main__ import main
from focus_ref.evaluate import calibrate_presence
from focus_ref.model import FocusModel
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
              "history.json", "report.md", "figures/loss.png", "figures/examples.png"):
        assert (out / f).is_file(), f
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics))
    for key in ("refseg.ciou", "refseg.giou", "gres.n_acc", "gres.t_acc", "region.miou",
                "vqa.acc", "tokenizer.psnr", "tokenizer.code_usage", "edit.success",
                "edit.bg_psnr", "gen.attr_acc", "time.stage0_min", "time.stage3_min",
                "time.stage4_min", "time.calibrate_min"):  # every DESIGN §6 key, the minutes
        assert key in saved, key
    # the "no target" threshold chosen on dev scenes is saved with the model
    final = FocusModel.from_pretrained(out / "final")
    chosen = final.config.segmentation.presence_threshold
    assert calibrate_presence(final, n=4, progress=False)["threshold"] == chosen
    report = (out / "report.md").read_text()
    assert "| `edit.success` |" in report and f"torch {torch.__version__}" in report
    # an existing run is never overwritten without --resume: one line, exit status 2
    assert main(["train", "--out", str(out), "--quick"]) == 2


def test_cli_reports_a_missing_checkpoint_in_one_line(tmp_path, capsys):
    rc = main(["generate", "--prompt", "a red circle", "--out", str(tmp_path / "x.png"),
               "--checkpoint", str(tmp_path / "nope")])
    assert rc == 2
    assert "no checkpoint at" in capsys.readouterr().err


def test_ship_writes_a_half_precision_checkpoint_that_loads(tmp_path):
    import torch

    from focus_ref.model import FocusModel
    from focus_ref.run import ship

    run = tmp_path / "run"
    main_job(out=run, stages="4", quick=True, eval_n=2, progress=False)
    ship(run, tmp_path / "shipped")
    full = (run / "final" / "model.safetensors").stat().st_size
    assert (tmp_path / "shipped" / "model.safetensors").stat().st_size < 0.6 * full
    a, b = FocusModel.from_pretrained(run / "final"), FocusModel.from_pretrained(tmp_path / "shipped")
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
        assert w.dtype == v.dtype and torch.allclose(v, w, atol=1e-2, rtol=1e-2), k
    assert (tmp_path / "shipped" / "history.json").is_file()


def test_a_run_stopped_between_stages_resumes_to_the_same_weights(tmp_path):
    """DESIGN §7: `train --resume` continues a run from its checkpoints to the result of an
    uninterrupted run. Here the run stops after stage 1; the resumed process loads stages 0-1
    from their folders and trains 2-4 (the full-length check, a run killed inside stage 3,
    is in the README: byte-identical weights)."""
    import torch
    from safetensors.torch import load_file

    main_job(out=tmp_path / "whole", quick=True, eval_n=1, progress=False)
    main_job(out=tmp_path / "split", stages="0-1", quick=True, eval_n=1, progress=False)
    main_job(out=tmp_path / "split", resume=True, quick=True, eval_n=1, progress=False)
    want = load_file(str(tmp_path / "whole" / "final" / "model.safetensors"))
    got = load_file(str(tmp_path / "split" / "final" / "model.safetensors"))
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want), \
        [k for k in want if not torch.equal(want[k], got[k])][:5]
