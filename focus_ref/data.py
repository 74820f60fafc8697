"""Data: ShapesWorld and real datasets as tensors, Hugging Face `datasets`, and collate.

FOCUS (arXiv 2506.16806, §3.5 and §4) trains on captioning, VQA, referring segmentation
(RefCOCO family, gRefCOCO), interactive region prompts and instruction editing. This file
turns a ShapesWorld scene (DESIGN §4) into the examples of each task, batches them, bridges
ShapesWorld to Hugging Face `datasets` (the shipped sample in data_samples/shapesworld/ is one),
and reads real referring data in its public RefCOCO format.

    world = ShapesWorld(cfg.data, split="train")
    exs = format_refseg(world.sample(0))    # [{"image", "text", "mask", "has_target", ...}]
    batch = collate(exs)                    # {"image": (B, 3, H, W), "mask": (B, H, W), ...}
    ds = shapesworld_dataset(cfg.data, "val", n=100)   # a datasets.Dataset (cached on disk)
    refcoco = RefCOCO("instances.json", "refs.json", "images/", image_size=64)

Image convention everywhere in focus_ref: a float tensor (3, H, W) in [-1, 1] (the range
the MoVQ tokenizer and the diffusion decoder work in); images on disk and at the public
API are uint8 H x W x 3 arrays or PIL images. Points are pixels, x = column, y = row.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools import mask as mask_utils

from focus_ref import shapesworld
from focus_ref.config import DataConfig
from focus_ref.shapesworld import Obj, Scene, ShapesWorld


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


# ----- task formatting: one ShapesWorld sample -> plain dicts of tensors and strings ------
def format_caption(s: dict) -> list[dict]:
    return [{"task": "caption", "image": image_to_tensor(s["image"]), "text": s["caption"]}]


def format_vqa(s: dict) -> list[dict]:
    image = image_to_tensor(s["image"])  # (3, H, W)
    return [{"task": "vqa", "image": image, "question": q, "answer": a} for q, a in s["qa"]]


def format_refseg(s: dict) -> list[dict]:
    """Referring segmentation, generalised (gRefCOCO): the mask is the union of all targets,
    empty for a no-target expression."""
    image, inst = image_to_tensor(s["image"]), torch.from_numpy(s["inst"].astype(np.int64))
    out = []
    for r in s["refs"]:
        mask = torch.isin(inst, torch.tensor(r["targets"], dtype=torch.long))  # (H, W)
        out.append({"task": "refseg", "image": image, "text": r["text"], "mask": mask,
                    "has_target": bool(r["targets"]), "n_targets": len(r["targets"]),
                    "ref_type": r.get("type", "")})
    return out


def format_region(s: dict) -> list[dict]:
    """Interactive segmentation: every object with each prompt kind -> its visible mask. The
    prompt's map is the model's own (`segmentation.rasterize_prompt` at its default
    radius, 2 px, the tiny preset's `segmentation.prompt_radius`: a click is a disc, a scribble
    a stroke), so an example shows what the tiny model's region encoder is given."""
    from focus_ref.segmentation import PROMPT_KINDS, rasterize_prompt  # on use: SAM's modules

    image, size, out = image_to_tensor(s["image"]), s["inst"].shape[0], []
    for k, p in enumerate(s["prompts"]):
        points = {"click": [p["click"]], "box": [p["box"][:2], p["box"][2:]],
                  "scribble": p["scribble"], "mask": []}
        for kind in PROMPT_KINDS:
            out.append({"task": "region", "image": image, "kind": kind, "object": k,
                        "points": torch.tensor(points[kind], dtype=torch.float32).view(-1, 2),
                        "prompt_mask": rasterize_prompt(kind, p[kind], size).bool(),
                        "mask": torch.from_numpy(s["inst"] == k)})  # (P, 2), (H, W), (H, W)
    return out


def format_edit(s: dict) -> list[dict]:
    e = s["edit"]
    return [{"task": "edit", "image": image_to_tensor(s["image"]), "instruction": e["instruction"],
             "target_image": image_to_tensor(e["target_image"]), "kind": e["kind"],
             "region": torch.from_numpy(e["region"])}]  # (3, H, W), (3, H, W), (H, W)


def format_clip(c: dict, obj: int = 0) -> dict:
    """Video: the object's mask on frame 0 is the prompt; its masks on every frame the target."""
    masks = torch.from_numpy(c["insts"] == obj)  # (T, H, W)
    return {"task": "video", "frames": torch.stack([image_to_tensor(f) for f in c["frames"]]),
            "prompt_mask": masks[0], "masks": masks}  # (T, 3, H, W), (H, W), (T, H, W)


FORMATTERS = {"caption": format_caption, "vqa": format_vqa, "refseg": format_refseg,
              "region": format_region, "edit": format_edit}


def collate(examples: list[dict]) -> dict:
    """Batch examples of one task: tensors of one shape are stacked (B, ...); tensors whose
    first dimension varies (points) are zero-padded with `<key>_len`; numbers become
    tensors; strings and anything else stay lists (as do images of different sizes)."""
    if not examples:
        raise ValueError("collate got an empty batch: pass at least one example")
    keys = list(examples[0])
    for e in examples:
        if list(e) != keys:
            raise ValueError(f"examples with different keys ({sorted(keys)} vs {sorted(e)}): "
                             "batch one task at a time")
    out = {}
    for k in keys:
        vals = [e[k] for e in examples]
        if isinstance(vals[0], torch.Tensor):
            if all(v.shape == vals[0].shape for v in vals):
                out[k] = torch.stack(vals)  # (B, ...)
            elif all(v.dim() >= 1 and v.shape[1:] == vals[0].shape[1:] for v in vals):
                lens = [len(v) for v in vals]
                out[k] = vals[0].new_zeros((len(vals), max(lens), *vals[0].shape[1:]))
                for i, v in enumerate(vals):
                    out[k][i, :len(v)] = v  # (B, P_max, ...) zero-padded
                out[k + "_len"] = torch.tensor(lens)  # (B,)
            else:
                out[k] = vals
        elif isinstance(vals[0], (bool, int, float)):
            out[k] = torch.tensor(vals)  # (B,)
        else:
            out[k] = vals
    return out


def make_batch(world: ShapesWorld, task: str, indices, rng: np.random.Generator | None = None):
    """One example of `task` per scene index (picked with `rng`, else the first), collated.
    Deterministic in (indices, rng state): what a resumable `Stage.batch_fn` needs."""
    if task not in FORMATTERS:
        raise ValueError(f"unknown task {task!r}: choose one of {sorted(FORMATTERS)}")
    picked = []
    for i in indices:
        exs = FORMATTERS[task](world.sample(int(i)))
        picked.append(exs[int(rng.integers(len(exs)))] if rng is not None else exs[0])
    return collate(picked)


# ----- Hugging Face `datasets`: a ShapesWorld split as a Dataset ---------------------------
_POINT = datasets.List(datasets.Value("int32"), length=2)
FEATURES = datasets.Features({
    "index": datasets.Value("int32"),
    "image": datasets.Image(),
    "inst": datasets.Image(),  # uint8: 0 background, k + 1 object k (visible pixels)
    "scene": datasets.Value("string"),  # the scene graph as JSON (the oracle's input)
    "caption": datasets.Value("string"),
    "qa": datasets.List({"question": datasets.Value("string"),
                         "answer": datasets.Value("string")}),
    "refs": datasets.List({"text": datasets.Value("string"), "type": datasets.Value("string"),
                           "targets": datasets.List(datasets.Value("int32"))}),
    "prompts": datasets.List({"click": _POINT, "box": datasets.List(datasets.Value("int32"),
                                                                    length=4),
                              "scribble": datasets.List(_POINT)}),  # mask prompt = inst == k
    "edit": {"kind": datasets.Value("string"), "instruction": datasets.Value("string"),
             "target_object": datasets.Value("int32"), "target_image": datasets.Image(),
             "target_inst": datasets.Image(), "region": datasets.Image(),  # region: 0 / 255
             "target_scene": datasets.Value("string")},
})


def _scene_json(scene: Scene) -> str:
    return json.dumps(dataclasses.asdict(scene), sort_keys=True)


def _scene_from_json(text: str) -> Scene:
    d = json.loads(text)
    return Scene(**{**d, "objects": [Obj(**o) for o in d["objects"]]})


def to_record(s: dict) -> dict:
    """A ShapesWorld sample -> one row of FEATURES (images as uint8 arrays)."""
    e = s["edit"]
    return {
        "index": int(s["index"]), "image": s["image"], "inst": (s["inst"] + 1).astype(np.uint8),
        "scene": _scene_json(s["scene"]), "caption": s["caption"],
        "qa": [{"question": q, "answer": a} for q, a in s["qa"]],
        "refs": [{"text": r["text"], "type": r.get("type", ""), "targets": list(r["targets"])}
                 for r in s["refs"]],
        "prompts": [{"click": list(p["click"]), "box": list(p["box"]),
                     "scribble": [list(q) for q in p["scribble"]]} for p in s["prompts"]],
        "edit": {"kind": e["kind"], "instruction": e["instruction"],
                 "target_object": int(e["target_object"]), "target_image": e["target_image"],
                 "target_inst": (e["target_inst"] + 1).astype(np.uint8),
                 "region": e["region"].astype(np.uint8) * 255,
                 "target_scene": _scene_json(e["target_scene"])},
    }


def from_record(row: dict) -> dict:
    """A row read back from a Dataset -> the ShapesWorld sample dict (what the formatters take)."""
    arr = np.asarray
    inst = arr(row["inst"]).astype(np.int16) - 1  # (H, W): -1 background, k object k
    e = row["edit"]
    k = e["target_object"]
    return {
        "index": row["index"], "image": arr(row["image"].convert("RGB")), "inst": inst,
        "scene": _scene_from_json(row["scene"]), "caption": row["caption"],
        "qa": [(q["question"], q["answer"]) for q in row["qa"]],
        "refs": [dict(r) for r in row["refs"]],
        "prompts": [{"click": tuple(p["click"]), "box": tuple(p["box"]),
                     "scribble": [tuple(q) for q in p["scribble"]], "mask": inst == k2}
                    for k2, p in enumerate(row["prompts"])],
        "edit": {"kind": e["kind"], "instruction": e["instruction"], "target_object": k,
                 "target_image": arr(e["target_image"].convert("RGB")),
                 "target_inst": arr(e["target_inst"]).astype(np.int16) - 1,
                 "region": arr(e["region"]) > 127, "target_scene": _scene_from_json(
                     e["target_scene"]), "source_mask": inst == k if k >= 0 else inst == -1},
    }


def _records(cfg: DataConfig, split: str, start: int, n: int):
    world = ShapesWorld(cfg, split)
    for i in range(start, start + n):
        yield to_record(world.sample(i))


def shapesworld_dataset(cfg: DataConfig | None = None, split: str = "val", n: int = 100,
                        start: int = 0, streaming: bool = False, cache_dir: str | None = None):
    """Scenes start .. start + n - 1 of a split as a `datasets.Dataset` (materialised with
    `Dataset.from_generator`, cached on disk) or, with `streaming=True`, an `IterableDataset`
    generated on the fly. Rows follow FEATURES; `from_record(row)` gives the sample back."""
    cfg = cfg or DataConfig()
    ShapesWorld(cfg, split)  # bad split / seed: the generator's own clear error, here
    kwargs = {"cfg": cfg, "split": split, "start": int(start), "n": int(n)}
    if streaming:
        return datasets.IterableDataset.from_generator(_records, FEATURES, gen_kwargs=kwargs)
    # the cache key includes the generator's source, so an edited ShapesWorld never reuses
    # a stale cache
    src = "".join(Path(m).read_text() for m in (__file__, shapesworld.__file__))
    key = json.dumps([dataclasses.asdict(cfg), split, start, n, src], sort_keys=True)
    return datasets.Dataset.from_generator(
        _records, FEATURES, cache_dir=cache_dir, gen_kwargs=kwargs, split=split,
        fingerprint=hashlib.sha256(key.encode()).hexdigest()[:16])


# ----- the shipped sample: data_samples/shapesworld/ --------------------------------------
SAMPLE_DIR = Path(__file__).resolve().parent.parent / "data_samples" / "shapesworld"
SAMPLE_SPLITS = {"val": 128}  # held-out scenes 0..127 of the default DataConfig


def write_shapesworld_sample(out_dir: str | Path = SAMPLE_DIR) -> list[Path]:
    """(Re)generate the shipped sample: one parquet file per split, deterministic in the
    default DataConfig. Read it with `datasets.load_dataset(str(SAMPLE_DIR), split="val")`."""
    out_dir, paths = Path(out_dir), []
    (out_dir / "data").mkdir(parents=True, exist_ok=True)
    for split, n in SAMPLE_SPLITS.items():
        ds = datasets.Dataset.from_list(list(_records(DataConfig(), split, 0, n)), FEATURES)
        paths.append(out_dir / "data" / f"{split}-00000-of-00001.parquet")
        ds.to_parquet(str(paths[-1]))
    return paths


def load_shapesworld_sample(split: str = "val") -> datasets.Dataset:
    """The shipped ShapesWorld sample as a `datasets.Dataset` (no download)."""
    if not (SAMPLE_DIR / "data").is_dir():
        raise FileNotFoundError(f"no shipped sample in {SAMPLE_DIR}: run from a clone of the "
                                "repository or call data.write_shapesworld_sample()")
    return datasets.load_dataset(str(SAMPLE_DIR), split=split)


# ----- real data: RefCOCO / RefCOCO+ / RefCOCOg / gRefCOCO in their public format ----------
def _read_json(path, what: str, fix: str):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {path} not found: {fix}")
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{what} file {path} is not JSON ({type(e).__name__}): {fix}") from None


class RefCOCO:
    """(image, expression, mask) samples of RefCOCO, RefCOCO+, RefCOCOg or gRefCOCO.

    instances: COCO instances JSON ("images", "annotations"; segmentation as polygons or as
        RLE, compressed or not), decoded with pycocotools.
    refs: the referring expressions as JSON: a list of refs (or {"refs": [...]}) with
        image_id, ann_id and sentences [{"sent": ...}], plus "split". `ann_id` may be a list
        (several targets) and "no_target": true marks an expression with none (gRefCOCO's
        grefs(unc).json is already in this form). The classic refs(unc).p is a *pickle*,
        which focus_ref never unpickles (it can run code): convert it once, where you trust
        the file, with
          python -c "import pickle,json; json.dump(pickle.load(open('refs(unc).p','rb')),
                     open('refs(unc).json','w'))"
    image_dir: the folder holding the images' file_name (COCO train2014 for RefCOCO).
    split: keep only refs of this split ("train", "val", "testA", ...); None keeps all.
    image_size: resize images (bilinear) and masks (nearest) to a square, e.g. the model's
        cfg.data.image_size; None keeps each image's own size.

    Items have the keys of `format_refseg`, plus ref_id, image_id and file_name.
    """

    def __init__(self, instances, refs, image_dir, split: str | None = None,
                 image_size: int | None = None):
        fix = "pass the COCO instances JSON (e.g. refcoco/instances.json)"
        coco = _read_json(instances, "COCO instances", fix)
        refs_fix = ("pass the referring expressions as JSON; a refs(...).p file is a pickle, "
                    "convert it once as help(RefCOCO) shows")
        refs = _read_json(refs, "refs", refs_fix)
        refs = refs["refs"] if isinstance(refs, dict) and "refs" in refs else refs
        if not isinstance(coco, dict) or not {"images", "annotations"} <= set(coco):
            raise ValueError(f"{instances} is not a COCO instances file (it needs 'images' "
                             f"and 'annotations'): {fix}")
        if not isinstance(refs, list):
            raise ValueError(f"{refs_fix}: expected a list of refs")
        self.images = {im["id"]: im for im in coco["images"]}
        self.anns = {a["id"]: a for a in coco["annotations"]}
        self.image_dir, self.image_size, self.items = Path(image_dir), image_size, []
        for n, ref in enumerate(refs):
            if not isinstance(ref, dict) or not {"image_id", "ann_id", "sentences"} <= set(ref):
                raise ValueError(f"ref #{n} lacks image_id / ann_id / sentences: {refs_fix}")
            if split is not None and ref.get("split") != split:
                continue
            ids = ref["ann_id"] if isinstance(ref["ann_id"], list) else [ref["ann_id"]]
            ids = [] if ref.get("no_target") else [a for a in ids if a is not None and a >= 0]
            missing = [a for a in ids if a not in self.anns]
            if ref["image_id"] not in self.images or missing:
                raise ValueError(f"ref #{n} (ref_id {ref.get('ref_id')}) points at image "
                                 f"{ref['image_id']} / annotations {missing or ids} that "
                                 f"{instances} does not have: pair refs with their own "
                                 "instances file")
            for sent in ref["sentences"]:
                self.items.append((ref, ids, sent.get("sent", sent.get("raw", ""))))
        files = {self.images[r["image_id"]]["file_name"] for r, _, _ in self.items}
        absent = sorted(f for f in files if not (self.image_dir / f).is_file())
        if absent:
            raise FileNotFoundError(f"{len(absent)} image(s) missing from {self.image_dir}, "
                                    f"e.g. {absent[0]}: point image_dir at the images "
                                    "(COCO train2014 for the RefCOCO family)")

    def __len__(self) -> int:
        return len(self.items)

    def mask(self, ann_ids: list[int], h: int, w: int) -> np.ndarray:
        """Union of the annotations' masks, bool (H, W); polygons and RLE via pycocotools."""
        out = np.zeros((h, w), bool)
        for a in ann_ids:
            seg = self.anns[a]["segmentation"]
            if isinstance(seg, list):  # polygons [[x0, y0, x1, y1, ...], ...]
                rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
            elif isinstance(seg.get("counts"), list):  # uncompressed RLE
                rle = mask_utils.frPyObjects(seg, h, w)
            else:  # compressed RLE
                rle = {"size": seg["size"], "counts": seg["counts"].encode()
                       if isinstance(seg["counts"], str) else seg["counts"]}
            out |= mask_utils.decode(rle).astype(bool)  # (H, W)
        return out

    def __getitem__(self, i: int) -> dict:
        ref, ids, text = self.items[i]
        info = self.images[ref["image_id"]]
        path = self.image_dir / info["file_name"]
        try:
            image = Image.open(path).convert("RGB")
        except OSError as e:
            raise ValueError(f"cannot read image {path} ({e}): replace the corrupt file") from None
        w, h = image.size
        if (info.get("height", h), info.get("width", w)) != (h, w):
            raise ValueError(f"image {path} is {w} x {h} but the instances file says "
                             f"{info['width']} x {info['height']}: use the original images")
        image, mask = image_to_tensor(image), torch.from_numpy(self.mask(ids, h, w))
        if self.image_size is not None:
            s = (self.image_size, self.image_size)
            image = F.interpolate(image[None], s, mode="bilinear", antialias=True,
                                  align_corners=False)[0].clamp(-1, 1)  # (3, S, S)
            mask = F.interpolate(mask[None, None].float(), s, mode="nearest")[0, 0] > 0.5
        return {"task": "refseg", "image": image, "text": text, "mask": mask,  # (H, W)
                "has_target": bool(ids), "n_targets": len(ids), "ref_type": "",
                "ref_id": ref.get("ref_id", -1), "image_id": ref["image_id"],
                "file_name": info["file_name"]}
