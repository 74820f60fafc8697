"""ShapesWorld: a synthetic world with exact ground truth for every FOCUS task.

FOCUS (arXiv 2506.16806) is trained on captioning, VQA, referring / reasoning segmentation
(RefCOCO family, gRefCOCO), interactive region prompts and instruction editing. Those sets are
large and downloaded; ShapesWorld stands in for all of them at laptop scale. A seeded scene
graph (2-6 coloured shapes, plain or textured background, occlusion) is rasterised without
anti-aliasing, so every mask is exact; every text, prompt and edit is derived from the graph,
so every answer is known; and the oracle (oracle.py) judges any image against a scene. The
scene graph and the language derived from it (captions, expressions, questions) are in
scenegraph.py; this file renders scenes and derives region prompts, edits and clips.

    world = ShapesWorld(DataConfig(), split="train")
    s = world.sample(7)   # image, inst, scene, caption, qa, refs, prompts, edit
    oracle.judge_edit(s["edit"]["target_image"], s["edit"])  # -> {"success": True, ...}
    c = world.clip(7)     # frames + per-frame instance maps of moving objects

Sample i of a split depends only on (seed, split, i): same seed, identical bytes.
Coordinates are pixels, x = column, y = row; boxes are (x0, y0, x1, y1), both ends inclusive.
"""

from __future__ import annotations

import copy
import functools

import numpy as np

from focus_ref.config import DataConfig
from focus_ref.scenegraph import (COLORS, SHAPES, SIZES, Obj, Scene, article, caption, phrase,
                                  questions, referring, unique_attrs)

BG_COLORS = {"white": (245, 245, 245), "gray": (170, 170, 170), "beige": (225, 210, 175)}
TEXTURES = ("plain", "striped", "checkered")
TEXTURE_SHADE = 30  # textured backgrounds alternate the colour with a shade this much darker
EDIT_KINDS = ("recolor", "remove", "replace", "move", "background")
MIN_VISIBLE = 0.5  # every object keeps at least this share of its area visible


# ----- rendering: hard rasterisation, so masks are exact ---------------------------------
@functools.lru_cache(maxsize=8)
def pixel_centres(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Read-only (size, size) row and column coordinates of the pixel centres, built once."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    yy.flags.writeable = xx.flags.writeable = False
    return yy, xx


def shape_mask(shape: str, x: float, y: float, r: float, size: int) -> np.ndarray:
    """Boolean (size, size) silhouette of one shape centred at (x, y) with radius r."""
    yy, xx = pixel_centres(size)  # (size, size) each
    dx, dy = xx - x, yy - y
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return (np.abs(dx) <= 0.85 * r) & (np.abs(dy) <= 0.85 * r)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= 1.15 * r
    if shape == "triangle":  # apex up: inside the two slanted edges and above the base
        return (dy <= 0.8 * r) & (2 * np.abs(dx) <= (dy + r) * 1.1)
    raise ValueError(f"unknown shape {shape!r}: choose one of {SHAPES}")


def radius(obj: Obj, size: int) -> float:
    return SIZES[obj.size] * size


def render_background(scene: Scene) -> np.ndarray:
    return _background(scene.background, scene.bg_color, scene.size).copy()


@functools.lru_cache(maxsize=64)
def _background(background: str, bg_color: str, s: int) -> np.ndarray:
    base = np.array(BG_COLORS[bg_color], np.int16)
    img = np.broadcast_to(base, (s, s, 3)).copy()
    yy, xx = np.mgrid[0:s, 0:s]
    period = max(2, s // 16)
    if background == "striped":
        img[(xx // period) % 2 == 1] -= TEXTURE_SHADE
    elif background == "checkered":
        img[((xx // period) + (yy // period)) % 2 == 1] -= TEXTURE_SHADE
    return img.clip(0, 255).astype(np.uint8)


def silhouettes(scene: Scene) -> list[np.ndarray]:
    """Each object's whole (unoccluded) boolean (H, W) silhouette, in drawing order."""
    return [shape_mask(o.shape, o.x, o.y, radius(o, scene.size), scene.size)
            for o in scene.objects]


def render(scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    """Scene -> (image uint8 (H, W, 3), inst int16 (H, W): -1 background, k object k)."""
    img = render_background(scene)
    inst = np.full((scene.size, scene.size), -1, np.int16)
    for k, (o, m) in enumerate(zip(scene.objects, silhouettes(scene))):  # painter's order
        img[m] = COLORS[o.color]
        inst[m] = k
    return img, inst


def visible_fractions(masks: list[np.ndarray]) -> list[float]:
    """The share of each silhouette (drawing order) that the later ones leave visible."""
    inst = np.full(masks[0].shape, -1, np.int16)
    for k, m in enumerate(masks):
        inst[m] = k
    return [float((inst == k).sum()) / max(1, m.sum()) for k, m in enumerate(masks)]


# ----- scenes ----------------------------------------------------------------------------
def sample_scene(rng: np.random.Generator, size: int = 64, n_objects: int | None = None,
                 min_objects: int = 2, max_objects: int = 6, tries: int = 200) -> Scene:
    """A random scene whose objects all stay at least MIN_VISIBLE visible."""
    n = int(rng.integers(min_objects, max_objects + 1)) if n_objects is None else n_objects
    if n < 0 or n * (2 * SIZES["small"] * size) ** 2 > 0.8 * size * size:
        raise ValueError(f"cannot fit {n} objects in a {size}x{size} image: ask for fewer "
                         "objects or a larger image_size")
    scene = Scene([], str(rng.choice(TEXTURES)), str(rng.choice(list(BG_COLORS))), size)
    masks: list[np.ndarray] = []  # the placed objects' silhouettes
    for _ in range(n):
        for _ in range(tries):
            o = Obj(str(rng.choice(SHAPES)), str(rng.choice(list(COLORS))),
                    str(rng.choice(list(SIZES))), 0.0, 0.0)
            r = radius(o, size)
            o.x, o.y = (float(v) for v in rng.uniform(r + 1, size - r - 1, 2))
            m = shape_mask(o.shape, o.x, o.y, r, size)
            if min(visible_fractions(masks + [m])) >= MIN_VISIBLE:
                scene.objects.append(o)
                masks.append(m)
                break
        else:
            raise ValueError(f"could not place {n} objects in a {size}x{size} image after "
                             f"{tries} tries: ask for fewer objects or a larger image_size")
    return scene


# ----- region prompts --------------------------------------------------------------------
def region_prompts(mask: np.ndarray, rng: np.random.Generator) -> dict:
    """Click, box, scribble and mask prompts for one object's visible mask."""
    ys, xs = np.nonzero(mask)
    inner = mask.copy()  # prefer points one pixel away from the border
    inner[1:] &= mask[:-1]
    inner[:-1] &= mask[1:]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    iy, ix = np.nonzero(inner) if inner.any() else (ys, xs)
    i = int(rng.integers(len(ix)))
    pts = rng.choice(len(ix), size=min(len(ix), int(rng.integers(3, 6))), replace=False)
    axis = ix if np.ptp(ix) >= np.ptp(iy) else iy  # scribble runs along the longer side
    pts = sorted(pts, key=lambda j: axis[j])
    return {"click": (int(ix[i]), int(iy[i])),
            "box": (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())),
            "scribble": [(int(ix[j]), int(iy[j])) for j in pts],
            "mask": mask.copy()}


# ----- edits -----------------------------------------------------------------------------
def make_edit(scene: Scene, inst: np.ndarray, rng: np.random.Generator,
              kind: str | None = None, image: np.ndarray | None = None) -> dict | None:
    """An instruction, the exact target image and the region allowed to change."""
    kind = str(rng.choice(EDIT_KINDS)) if kind is None else kind
    n, new = len(scene.objects), copy.deepcopy(scene)
    describable = [k for k in range(n) if unique_attrs(scene, k) is not None]
    if kind != "background" and not describable:
        return None
    k = int(rng.choice(describable)) if describable else -1
    desc = f"the {phrase(unique_attrs(scene, k))}" if k >= 0 else ""
    o = new.objects[k] if k >= 0 else None
    if kind == "recolor":
        o.color = str(rng.choice([c for c in COLORS if c != o.color]))
        text = f"make {desc} {o.color}"
    elif kind == "remove":
        new.objects.pop(k)
        text = f"remove {desc}"
    elif kind == "replace":
        o.shape = str(rng.choice([s for s in SHAPES if s != o.shape]))
        text = f"turn {desc} into {article(o.shape)}"
    elif kind == "move":  # a quarter of the image, in a direction with room for it
        r, s, step = radius(o, scene.size), scene.size, 0.25 * scene.size
        lo, hi = r + 1, s - r - 1
        room = {"left": o.x - lo, "right": hi - o.x, "up": o.y - lo, "down": hi - o.y}
        dirs = [d for d, v in room.items() if v >= step]
        if not dirs:
            return make_edit(scene, inst, rng, "recolor", image)
        d = str(rng.choice(dirs))
        o.x += {"left": -step, "right": step}.get(d, 0.0)
        o.y += {"up": -step, "down": step}.get(d, 0.0)
        text = f"move {desc} {d}"
    elif kind == "background":
        new.bg_color = str(rng.choice([c for c in BG_COLORS if c != scene.bg_color]))
        new.background = str(rng.choice(TEXTURES))
        text = f"make the background {new.background} {new.bg_color}"
    else:
        raise ValueError(f"unknown edit kind {kind!r}: choose one of {EDIT_KINDS}")
    target, t_inst = render(new)
    source = render(scene)[0] if image is None else image
    region = np.any(target != source, axis=-1)  # exactly the pixels the edit changes
    if kind == "background":
        region = (inst == -1) & (t_inst == -1)
    elif kind in ("move", "replace"):
        region |= inst == k
        region |= t_inst == k
    else:
        region |= inst == k
    return {"kind": kind, "instruction": text, "target_object": k, "target_image": target,
            "target_inst": t_inst, "target_scene": new, "region": region,
            "source_mask": inst == k if k >= 0 else inst == -1}


# ----- the world -------------------------------------------------------------------------
class ShapesWorld:
    """Indexable, deterministic ShapesWorld split: sample i depends on (seed, split, i) only.
    "train" trains, "val" is held out and reported, "dev" chooses settings (never either)."""

    def __init__(self, cfg: DataConfig | None = None, split: str = "train"):
        self.cfg = cfg or DataConfig()
        if split not in ("train", "val", "dev"):
            raise ValueError(f"unknown split {split!r}: use 'train', 'val' or 'dev'")
        if not isinstance(self.cfg.seed, (int, np.integer)) or isinstance(self.cfg.seed, bool):
            raise TypeError(f"seed must be an int, got {self.cfg.seed!r}")
        self.split = split

    def rng(self, i: int) -> np.random.Generator:
        if not isinstance(i, (int, np.integer)) or i < 0:
            raise ValueError(f"sample index must be a non-negative int, got {i!r}")
        offset = {"train": 0, "val": self.cfg.val_offset, "dev": self.cfg.dev_offset}[self.split]
        return np.random.default_rng([int(self.cfg.seed), offset + int(i)])

    def scene(self, i: int, n_objects: int | None = None) -> Scene:
        c = self.cfg
        return sample_scene(self.rng(i), c.image_size, n_objects, c.min_objects, c.max_objects)

    def sample(self, i: int) -> dict:
        rng = self.rng(i)
        c = self.cfg
        scene = sample_scene(rng, c.image_size, None, c.min_objects, c.max_objects)
        image, inst = render(scene)
        prompts = [region_prompts(inst == k, rng) for k in range(len(scene.objects))]
        edit = make_edit(scene, inst, rng, image=image) or make_edit(scene, inst, rng,
                                                                     "background", image)
        return {"index": i, "image": image, "inst": inst, "scene": scene,
                "caption": caption(scene), "qa": questions(scene, rng),
                "refs": referring(scene, rng), "prompts": prompts, "edit": edit}

    def clip(self, i: int, n_frames: int = 8) -> dict:
        """Objects moving with constant velocity, bouncing off the borders; exact masks."""
        rng = self.rng(i)
        scene = sample_scene(rng, self.cfg.image_size, None, self.cfg.min_objects, 4)
        for o in scene.objects:
            o.vx, o.vy = (float(v) for v in rng.uniform(-2.5, 2.5, 2))
        frames, insts, s = [], [], scene.size
        cur = copy.deepcopy(scene)
        for _ in range(n_frames):
            img, inst = render(cur)
            frames.append(img)
            insts.append(inst)
            for o in cur.objects:
                r = radius(o, s)
                o.x, o.y = o.x + o.vx, o.y + o.vy
                if not r + 1 <= o.x <= s - r - 1:
                    o.vx, o.x = -o.vx, float(np.clip(o.x, r + 1, s - r - 1))
                if not r + 1 <= o.y <= s - r - 1:
                    o.vy, o.y = -o.vy, float(np.clip(o.y, r + 1, s - r - 1))
        return {"frames": np.stack(frames), "insts": np.stack(insts), "scene": scene,
                "caption": caption(scene)}

    def corpus(self, n: int) -> list[str]:
        """Every text of the first n scenes (captions, Q&A, expressions, instructions)."""
        out = []
        for i in range(n):
            s = self.sample(i)
            out.append(s["caption"])
            out += [t for qa in s["qa"] for t in qa]
            out += [r["text"] for r in s["refs"]]
            out.append(s["edit"]["instruction"])
        return out
