"""Data: ShapesWorld and real datasets as tensors, Hugging Face `datasets`, and collate.

Image convention everywhere in focus_ref: a float tensor (3, H, W) in [-1, 1] (the range
the MoVQ tokenizer and the diffusion decoder work in); images on disk and at the public
API are uint8 H x W x 3 arrays or PIL images.
"""

from __future__ import annotations

import numpy as np
import torch


def image_to_tensor(image) -> torch.Tensor:
    """uint8 (H, W, 3) array or PIL image -> float (3, H, W) in [-1, 1]."""
    arr = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected a uint8 H x W x 3 image, got {arr.dtype} {arr.shape}")
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 127.5 - 1.0  # (3, H, W)


def tensor_to_image(x: torch.Tensor) -> np.ndarray:
    """float (3, H, W) in [-1, 1] -> uint8 (H, W, 3)."""
    x = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(1, 2, 0).numpy()
