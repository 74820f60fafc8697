"""Regenerate the RefCOCO-format fixture in this folder from ShapesWorld.

    python data_samples/refcoco_fixture/make_fixture.py

Writes images/*.png, instances.json (COCO instances: whole shapes as polygons, occluded
ones as compressed RLE, one as uncompressed RLE with iscrowd = 1, the three encodings real
COCO files mix) and refs.json (the refer JSON form: single targets as an int ann_id like
RefCOCO, several targets as a list and "no_target" like gRefCOCO).
"""

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from focus_ref.config import DataConfig
from focus_ref.shapesworld import SHAPES, ShapesWorld, radius, silhouettes, visible_fractions

HERE = Path(__file__).resolve().parent
SCENES = [(64, 0), (64, 1), (96, 2)]  # (image size, val index)


def outline(o, size):
    """The shape's polygon [x0, y0, x1, y1, ...] in COCO pixel coordinates."""
    r = radius(o, size)
    if o.shape == "circle":
        pts = [(o.x + r * math.cos(t), o.y + r * math.sin(t))
               for t in np.linspace(0, 2 * math.pi, 24, endpoint=False)]
    elif o.shape == "square":
        a = 0.85 * r
        pts = [(o.x - a, o.y - a), (o.x + a, o.y - a), (o.x + a, o.y + a), (o.x - a, o.y + a)]
    elif o.shape == "diamond":
        a = 1.15 * r
        pts = [(o.x, o.y - a), (o.x + a, o.y), (o.x, o.y + a), (o.x - a, o.y)]
    else:  # triangle, apex up
        pts = [(o.x, o.y - r), (o.x + 0.99 * r, o.y + 0.8 * r), (o.x - 0.99 * r, o.y + 0.8 * r)]
    return [round(float(v), 2) for p in pts for v in p]  # COCO pixel centres sit at +0.5 too


def uncompressed_rle(mask):
    flat = mask.flatten(order="F").astype(np.int8)  # COCO runs go down the columns
    edges = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    counts = np.diff(np.concatenate([[0], edges])).tolist()
    return {"size": list(mask.shape), "counts": counts}


def main():
    images, anns, refs = [], [], []
    (HERE / "images").mkdir(exist_ok=True)
    for image_id, (size, index) in enumerate(SCENES, start=1):
        s = ShapesWorld(DataConfig(image_size=size), "val").sample(index)
        name = f"shapes_{image_id:06d}.png"
        Image.fromarray(s["image"]).save(HERE / "images" / name)
        images.append({"id": image_id, "file_name": name, "height": size, "width": size})
        vis = visible_fractions(silhouettes(s["scene"]))
        ids = []
        for k, o in enumerate(s["scene"].objects):
            m = s["inst"] == k
            ann = {"id": 100 * image_id + k, "image_id": image_id, "iscrowd": 0,
                   "category_id": SHAPES.index(o.shape) + 1, "area": int(m.sum()),
                   "bbox": [int(v) for v in mask_utils.toBbox(
                       mask_utils.encode(np.asfortranarray(m.astype(np.uint8))))]}
            if vis[k] == 1.0 and k != 0:
                ann["segmentation"] = [outline(o, size)]
            elif k == 0:
                ann["segmentation"], ann["iscrowd"] = uncompressed_rle(m), 1
            else:
                rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
                ann["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode()}
            anns.append(ann)
            ids.append(ann["id"])
        for r in s["refs"]:
            ref_id = len(refs) + 1
            t = [ids[k] for k in r["targets"]]
            sents = [r["text"]] + ([r["text"][4:]] if r["type"] == "attribute" else [])
            refs.append({
                "ref_id": ref_id, "image_id": image_id, "file_name": name,
                "split": "val" if image_id < 3 else "testA",
                "ann_id": t[0] if len(t) == 1 else (t or [-1]), "no_target": not t,
                "category_id": [SHAPES.index(s["scene"].objects[k].shape) + 1
                                for k in r["targets"]],
                "sent_ids": [10 * ref_id + j for j in range(len(sents))],
                "sentences": [{"sent": x, "raw": x, "tokens": x.split(), "sent_id": 10 * ref_id + j}
                              for j, x in enumerate(sents)]})
    cats = [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(SHAPES)]
    (HERE / "instances.json").write_text(json.dumps(
        {"images": images, "annotations": anns, "categories": cats}, indent=1) + "\n")
    (HERE / "refs.json").write_text(json.dumps(refs, indent=1) + "\n")


if __name__ == "__main__":
    main()
