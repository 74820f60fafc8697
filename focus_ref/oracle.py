"""The ShapesWorld oracle: judges any image against a scene or an edit.

DESIGN §4-5: because ShapesWorld is rendered from a scene graph with a known palette, an
image can be checked without a learned judge. Each pixel is labelled with its nearest palette
colour; an edit succeeds when the labels inside the edit's region match the exact target and
the pixels outside it are untouched (PSNR); a generated scene is scored by finding each
described object (colour + shape by template matching) among the image's colour regions.
This is the stand-in for CLIP-T / CLIP-I / FID, which need weights that tests cannot download.
"""

from __future__ import annotations

import numpy as np

from focus_ref.shapesworld import BG_COLORS, COLORS, SHAPES, TEXTURE_SHADE, Scene, shape_mask

PALETTE_NAMES = list(COLORS) + [f"bg:{c}" for c in BG_COLORS] + [f"bg:{c}-" for c in BG_COLORS]
PALETTE = np.array(list(COLORS.values()) + list(BG_COLORS.values())
                   + [tuple(max(0, v - TEXTURE_SHADE) for v in c) for c in BG_COLORS.values()],
                   np.float32)


def palette_labels(image: np.ndarray) -> np.ndarray:
    """Nearest palette colour per pixel -> int (H, W); textures map to their base colour."""
    d = ((image[..., None, :].astype(np.float32) - PALETTE) ** 2).sum(-1)  # (H, W, P)
    lab = d.argmin(-1)
    nb, nc = len(BG_COLORS), len(COLORS)
    return np.where(lab >= nc + nb, lab - nb, lab)  # shade of a background = that background


def judge(image: np.ndarray, expected: np.ndarray, region: np.ndarray,
          inside_tol: float = 0.9, bg_psnr_min: float = 28.0) -> dict:
    """Does `image` show `expected` inside `region` (colour and shape, by palette labels)
    and leave everything outside it untouched (PSNR against `expected`)?"""
    if image.shape != expected.shape:
        raise ValueError(f"image {image.shape} and expected {expected.shape} differ in size")
    same = palette_labels(image) == palette_labels(expected)
    inside = float(same[region].mean()) if region.any() else 1.0
    out = ~region
    err = ((image[out].astype(np.float32) - expected[out]) ** 2).mean() if out.any() else 0.0
    bg_psnr = float("inf") if err == 0 else float(10 * np.log10(255.0 ** 2 / err))
    return {"inside_acc": inside, "bg_psnr": bg_psnr,
            "success": inside >= inside_tol and bg_psnr >= bg_psnr_min}


def judge_edit(image: np.ndarray, edit: dict) -> dict:
    """The oracle for an edit pair: the requested change holds in the region, the rest stays."""
    return judge(image, edit["target_image"], edit["region"])


def detect_objects(image: np.ndarray) -> list[dict]:
    """Connected regions of one object colour -> [{color, shape, pixels}] (shape by template)."""
    lab, found = palette_labels(image), []
    seen = np.zeros(lab.shape, bool)
    s = image.shape[0]
    for y0, x0 in zip(*np.nonzero(lab < len(COLORS))):
        if seen[y0, x0]:
            continue
        stack, comp, c = [(y0, x0)], [], lab[y0, x0]
        seen[y0, x0] = True
        while stack:  # 4-connected flood fill
            y, x = stack.pop()
            comp.append((y, x))
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < s and 0 <= nx < s and not seen[ny, nx] and lab[ny, nx] == c:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        if len(comp) < 6:
            continue
        m = np.zeros(lab.shape, bool)
        m[tuple(np.array(comp).T)] = True
        ys, xs = np.nonzero(m)
        cx, cy = (xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2
        r = max(xs.max() - xs.min() + 1, ys.max() - ys.min() + 1) / 2
        ious = {}
        for sh in SHAPES:  # best-matching template over a few radii (shapes differ in extent)
            best = 0.0
            for f in (0.9, 1.0, 1.1, 1.2):
                t = shape_mask(sh, cx, cy + (0.1 * r if sh == "triangle" else 0), r * f, s)
                best = max(best, (t & m).sum() / (t | m).sum())
            ious[sh] = best
        found.append({"color": list(COLORS)[c], "shape": max(ious, key=ious.get),
                      "pixels": len(comp)})
    return found


def attribute_accuracy(image: np.ndarray, scene: Scene) -> float:
    """Share of the scene's objects found in `image` with the right colour and shape."""
    found = detect_objects(image)
    hits = 0
    for o in scene.objects:
        for i, f in enumerate(found):
            if f["color"] == o.color and f["shape"] == o.shape:
                hits += 1
                found.pop(i)
                break
    return hits / max(1, len(scene.objects))
