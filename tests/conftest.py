"""Fixtures shared by the editing tests (test_editing.py, inference) and the stage-4 tests
(test_instruct.py, training): the tiny config, a random-weight model, 8 held-out scenes.
Files that define their own `cfg` / `model` fixtures override these."""

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
