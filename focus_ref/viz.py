"""Plots shared by the notebooks, the run report and the README figure.

Every lesson shows the same few kinds of picture: images in a row, a mask laid over an image,
a region prompt drawn on an image, and training curves. They live here so that notebooks stay
thin drivers (STYLE 6) and the run report draws exactly what the notebooks draw.
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np

MASK_COLORS = [(255, 0, 255), (0, 255, 255), (255, 255, 0), (0, 255, 0), (255, 128, 0)]


def overlay(image: np.ndarray, masks, alpha: float = 0.55) -> np.ndarray:
    """uint8 (H, W, 3) with each boolean (H, W) mask tinted in its own colour and outlined."""
    out = image.astype(np.float32).copy()
    masks = [masks] if isinstance(masks, np.ndarray) and masks.ndim == 2 else list(masks)
    for i, m in enumerate(masks):
        m = np.asarray(m, bool)
        c = np.array(MASK_COLORS[i % len(MASK_COLORS)], np.float32)
        out[m] = (1 - alpha) * out[m] + alpha * c
        edge = m & ~(np.roll(m, 1, 0) & np.roll(m, -1, 0) & np.roll(m, 1, 1) & np.roll(m, -1, 1))
        out[edge] = c
    return out.clip(0, 255).astype(np.uint8)


def show_row(images: Sequence, titles: Sequence[str] | None = None, size: float = 2.2,
             suptitle: str | None = None):
    """Images side by side; returns the figure."""
    n = len(images)
    fig, axes = plt.subplots(1, n, figsize=(size * n, size * 1.15), squeeze=False)
    for i, (ax, img) in enumerate(zip(axes[0], images)):
        img = np.asarray(img)
        ax.imshow(img, cmap="gray" if img.ndim == 2 else None, interpolation="nearest")
        ax.set_axis_off()
        if titles is not None:
            ax.set_title(titles[i], fontsize=8, wrap=True)
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    return fig


def draw_prompt(ax, kind: str, prompt, color: str = "magenta") -> None:
    """Draw a click / box / scribble prompt (pixel coordinates) on an axis."""
    if kind == "click":
        ax.plot(*prompt, marker="*", color=color, markersize=14, markeredgecolor="white")
    elif kind == "box":
        x0, y0, x1, y1 = prompt
        ax.add_patch(plt.Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0 + 1, y1 - y0 + 1, fill=False,
                                   edgecolor=color, linewidth=2))
    elif kind == "scribble":
        xs, ys = zip(*prompt)
        ax.plot(xs, ys, color=color, linewidth=2.5, marker="o", markersize=3)


def plot_curves(histories: dict[str, list[dict]], key: str = "loss", ax=None, log: bool = True):
    """Training curves: {label: history from train.fit} -> one line each."""
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 3))
    for label, hist in histories.items():
        steps = [h["step"] for h in hist if key in h]
        ax.plot(steps, [h[key] for h in hist if key in h], label=label)
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    if log:
        ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return ax


def plot_sample(sample: dict, size: float = 2.2):
    """One ShapesWorld sample: image, instance masks, a referring expression, a click, an edit."""
    img, inst, e = sample["image"], sample["inst"], sample["edit"]
    ref = sample["refs"][0]
    fig, axes = plt.subplots(1, 5, figsize=(size * 5, size * 1.3))
    panels = [(img, "image"),
              (overlay(img, [inst == k for k in range(inst.max() + 1)]), "instance masks"),
              (overlay(img, [inst == k for k in ref["targets"]]), f"\"{ref['text']}\""),
              (overlay(img, sample["prompts"][0]["mask"]), "click -> object 0"),
              (e["target_image"], f"edit: \"{e['instruction']}\"")]
    for ax, (im, title) in zip(axes, panels):
        ax.imshow(im, interpolation="nearest")
        ax.set_title(title, fontsize=8, wrap=True)
        ax.set_axis_off()
    draw_prompt(axes[3], "click", sample["prompts"][0]["click"])
    fig.tight_layout()
    return fig
