"""Fixtures shared by the editing tests (test_editing.py, inference) and the stage-4 tests
(test_instruct.py, training): the tiny config, a random-weight model, 8 held-out scenes; and
a spy on the `<seg>` loss's targets (stages 3 and 4). Files that define their own `cfg` /
`model` fixtures override these."""

import pytest
import torch

from focus_ref.config import FocusConfig
from focus_ref.model import FocusModel
from focus_ref.shapesworld import ShapesWorld


@pytest.fixture(scope="module")
def cfg():
    return FocusConfig.tiny()


@pytest.fixture(scope="module")
def model(cfg):
    torch.manual_seed(0)
    return FocusModel(cfg).eval()


@pytest.fixture(scope="module")
def val(cfg):
    w = ShapesWorld(cfg.data, "val")
    return [w.sample(i) for i in range(8)]


@pytest.fixture
def seg_targets(monkeypatch):
    """Records the target masks (gt) and presence labels the `<seg>` loss is given, as
    {"gt": (S, 1, H, W), "present": (S, 1)}; the loss itself runs unchanged."""
    from focus_ref import segmentation

    got, real = {}, segmentation.segmentation_loss

    def spy(logits, presence, gt, present, cfg):
        got.update(gt=gt, present=present)
        return real(logits, presence, gt, present, cfg)

    monkeypatch.setattr(segmentation, "segmentation_loss", spy)
    return got
