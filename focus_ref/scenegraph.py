"""The ShapesWorld scene graph and everything said about it: captions, referring expressions,
questions.

FOCUS (arXiv 2506.16806, §4.1) learns to understand and to ground language from captioning,
VQA and referring-segmentation sets (RefCOCO family, gRefCOCO with several or no targets).
In ShapesWorld every such text is derived from the scene graph defined here, so every answer
and every expression's target set is known exactly. Rendering, region prompts, edits and the
indexable splits are in shapesworld.py, which builds on this file.

    scene = Scene([Obj("circle", "red", "small", 20.0, 30.0),
                   Obj("square", "blue", "large", 44.0, 30.0)])
    caption(scene)              # "a small red circle and a large blue square on a plain ..."
    unique_attrs(scene, 0)      # {"shape": "circle"}: the shortest description of object 0
    questions(scene, rng)       # [("how many objects are there?", "2"), ...]
    referring(scene, rng)       # [{"text": "the circle", "targets": [0], "type": "attribute"}, ...]
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

SHAPES = ("circle", "square", "triangle", "diamond")
COLORS = {"red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220),
          "yellow": (235, 200, 30), "purple": (140, 60, 180), "orange": (240, 130, 20)}
SIZES = {"small": 0.09, "large": 0.15}  # radius as a share of the image side
RELATIONS = ("left of", "right of", "above", "below")


@dataclass
class Obj:
    shape: str
    color: str
    size: str
    x: float  # centre, pixels
    y: float
    vx: float = 0.0  # velocity for clips, pixels per frame
    vy: float = 0.0

    def words(self) -> str:
        return f"{self.size} {self.color} {self.shape}"


@dataclass
class Scene:
    objects: list[Obj]  # drawing order: later objects occlude earlier ones
    background: str = "plain"  # one of shapesworld.TEXTURES
    bg_color: str = "white"
    size: int = 64
    meta: dict = field(default_factory=dict)


# ----- language: captions, expressions, questions ----------------------------------------
def plural(shape: str) -> str:
    return shape + "s"


def group_noun(attr: str, value: str) -> str:
    """What a group sharing one attribute is called: "red objects", "circles"."""
    return f"{value} objects" if attr == "color" else plural(value)


def absent_pair(objs: list[Obj], rng: np.random.Generator) -> tuple[str, str]:
    """A random (colour, shape) that no object has: what no-target expressions and "no"
    questions name."""
    absent = [(c, s) for c in COLORS for s in SHAPES
              if not any(o.color == c and o.shape == s for o in objs)]
    return absent[int(rng.integers(len(absent)))]


def article(words: str) -> str:
    return ("an " if words[0] in "aeiou" else "a ") + words


def matches(o: Obj, attrs: dict) -> bool:
    return all(getattr(o, k) == v for k, v in attrs.items())


def phrase(attrs: dict) -> str:
    words = [attrs[k] for k in ("size", "color") if k in attrs]
    return " ".join(words + [attrs.get("shape", "object")])


SHAPE_FIRST = (("shape",), ("color",), ("color", "shape"), ("size", "shape"), ("size", "color"),
               ("size", "color", "shape"))  # how ShapesWorld's expressions name an object
COLOUR_FIRST = (("color",), ("color", "shape"), ("size", "color"), ("size", "color", "shape"))


def unique_attrs(scene: Scene, k: int, pool: list[int] | None = None,
                 orders: tuple = SHAPE_FIRST) -> dict | None:
    """The first attribute set of `orders` that picks out object k among `pool` (default:
    all); with SHAPE_FIRST the shortest."""
    o, pool = scene.objects[k], range(len(scene.objects)) if pool is None else pool
    for keys in orders:
        attrs = {a: getattr(o, a) for a in keys}
        if [j for j in pool if matches(scene.objects[j], attrs)] == [k]:
            return attrs
    return None  # an identical twin: no description singles k out


def colour_ref(scene: Scene, inst: np.ndarray, rng: np.random.Generator) -> dict | None:
    """A referring expression that names a visible object by its colour (+ size / shape where
    the colour alone is shared): "the red object", "the small blue circle"; None if every
    visible object's colour needs more than that to single it out."""
    for k in rng.permutation([k for k in range(len(scene.objects)) if (inst == k).any()]):
        if attrs := unique_attrs(scene, int(k), orders=COLOUR_FIRST):
            return {"text": f"the {phrase(attrs)}", "targets": [int(k)], "type": "attribute"}
    return None


def relation_holds(a: Obj, b: Obj, rel: str, margin: float = 3.0) -> bool:
    return {"left of": a.x < b.x - margin, "right of": a.x > b.x + margin,
            "above": a.y < b.y - margin, "below": a.y > b.y + margin}[rel]


def caption(scene: Scene) -> str:
    objs = sorted(scene.objects, key=lambda o: o.x)  # read left to right
    names = [article(o.words()) for o in objs]
    body = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return f"{body} on {article(scene.background)} {scene.bg_color} background"


def referring(scene: Scene, rng: np.random.Generator) -> list[dict]:
    """Attribute, relation, superlative, several-target and no-target expressions."""
    objs, n, refs = scene.objects, len(scene.objects), []
    k = int(rng.integers(n))
    if (a := unique_attrs(scene, k)) is not None:
        refs.append({"text": f"the {phrase(a)}", "targets": [k], "type": "attribute"})
    for _ in range(10):  # relation: the <a> <rel> the <b>
        t, b = (int(v) for v in rng.choice(n, 2, replace=False))
        rel = str(rng.choice(RELATIONS))
        ab = unique_attrs(scene, b)
        pool = [j for j in range(n) if j != b and relation_holds(objs[j], objs[b], rel)]
        at = unique_attrs(scene, t, pool) if t in pool else None
        if ab is not None and at is not None:
            refs.append({"text": f"the {phrase(at)} {rel} the {phrase(ab)}", "targets": [t],
                         "type": "relation"})
            break
    sup = {"leftmost": lambda o: o.x, "rightmost": lambda o: -o.x, "topmost": lambda o: o.y,
           "bottommost": lambda o: -o.y}
    word = str(rng.choice(list(sup)))
    attr = str(rng.choice(["color", "shape"]))
    group_val = getattr(objs[k], attr)
    group = [j for j in range(n) if getattr(objs[j], attr) == group_val]
    keys = sorted(group, key=lambda j: sup[word](objs[j]))
    if len(group) >= 2 and abs(sup[word](objs[keys[0]]) - sup[word](objs[keys[1]])) > 3:
        refs.append({"text": f"the {word} {phrase({attr: group_val})}", "targets": [keys[0]],
                     "type": "superlative"})
    attr = str(rng.choice(["color", "shape"]))  # several targets (gRefCOCO-style)
    val = getattr(objs[int(rng.integers(n))], attr)
    targets = [j for j in range(n) if getattr(objs[j], attr) == val]
    refs.append({"text": f"all {group_noun(attr, val)}", "targets": targets, "type": "multi"})
    c, s = absent_pair(objs, rng)
    # no target, worded as targets are (GRES): the shape alone if no object has it, else the
    # colour alone if none has it, else both; always "colour shape" let a model spot the
    # absent ones by their wording (the old ShapesWorld: N-acc 1.00 from the words alone)
    text = f"the {s}" if not any(o.shape == s for o in objs) else \
        f"the {c} object" if not any(o.color == c for o in objs) else f"the {c} {s}"
    refs.append({"text": text, "targets": [], "type": "none"})
    return refs


def questions(scene: Scene, rng: np.random.Generator) -> list[tuple[str, str]]:
    """Count, colour, shape, existence and relative-position questions with answers."""
    objs, n, qa = scene.objects, len(scene.objects), []
    attr = str(rng.choice(["color", "shape", "all"]))
    if attr == "all":
        qa.append(("how many objects are there?", str(n)))
    else:
        v = getattr(objs[int(rng.integers(n))], attr)
        qa.append((f"how many {group_noun(attr, v)} are there?",
                   str(sum(getattr(o, attr) == v for o in objs))))
    order = rng.permutation(n)
    for k in order:  # colour of a uniquely described object
        a = unique_attrs(scene, int(k))
        if a is not None and "color" not in a:
            qa.append((f"what color is the {phrase(a)}?", objs[k].color))
            break
    for k in order:  # shape of a uniquely described object
        a = unique_attrs(scene, int(k))
        if a is not None and "shape" not in a:
            qa.append((f"what shape is the {phrase(a)}?", objs[k].shape))
            break
    if rng.random() < 0.5:  # existence, balanced yes / no
        o = objs[int(rng.integers(n))]
        qa.append((f"is there {article(o.color)} {o.shape}?", "yes"))
    else:
        c, s = absent_pair(objs, rng)
        qa.append((f"is there {article(c)} {s}?", "no"))
    for _ in range(10):  # relative position
        a, b = (int(v) for v in rng.choice(n, 2, replace=False))
        aa, ab = unique_attrs(scene, a), unique_attrs(scene, b)
        dx, dy = objs[a].x - objs[b].x, objs[a].y - objs[b].y
        if aa is None or ab is None or max(abs(dx), abs(dy)) < 2 * min(abs(dx), abs(dy)) + 3:
            continue  # ambiguous: neither axis clearly dominates
        ans = ("left" if dx < 0 else "right") if abs(dx) > abs(dy) else \
              ("above" if dy < 0 else "below")
        qa.append((f"where is the {phrase(aa)} relative to the {phrase(ab)}?", ans))
        break
    return qa


def question_objects(scene: Scene, question: str) -> list[int]:
    """The objects a `questions()` question names, in the order it names them: "where" the
    object asked about, then the reference; a count or existence question every object that
    matches (none for an absent one). A question's words are its phrases' attributes."""
    words = question.rstrip("?").split()

    def named(ws):
        attrs = {}
        for w in ws:
            if w in COLORS or w in SIZES:
                attrs["color" if w in COLORS else "size"] = w
            elif w in SHAPES or w[:-1] in SHAPES:  # "circle" or "circles"
                attrs["shape"] = w if w in SHAPES else w[:-1]
        return [k for k, o in enumerate(scene.objects) if matches(o, attrs)]

    if words[0] == "where":  # where is the <a> relative to the <b>
        i = words.index("relative")
        return named(words[3:i]) + named(words[i + 3:])
    return named(words)
