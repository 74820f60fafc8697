"""Command line: `python -m focus_ref {train,eval,segment,understand,edit,generate,bench}`.

Every command has --help. The shipped tiny checkpoint (data_samples/checkpoint) is the
default --checkpoint, so a new user's first command shows a real result. Bad input (a missing
image, a click outside it, an empty expression ...) ends with one line naming the problem and
the fix, and exit status 2; nothing already written is touched.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

SHIPPED = Path(__file__).resolve().parent.parent / "data_samples" / "checkpoint"
TASKS = ("refseg", "region", "vqa", "tokenizer", "edit", "gen")


class InputError(ValueError):
    """Bad input from the command line: printed as one line, exit status 2."""


def _ints(text: str, n: int | None, what: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(round(float(v))) for v in text.split(","))
    except ValueError:
        raise InputError(f"{what} must be integers separated by commas, got {text!r}") from None
    if n is not None and len(vals) != n:
        raise InputError(f"{what} needs {n} numbers (got {len(vals)} in {text!r})")
    return vals


def load_image(path: str):
    """Any readable image -> RGB uint8 array (other modes converted; size checked by the model)."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise InputError(f"image {path} not found: pass the path of a PNG or JPEG file")
    try:
        with Image.open(p) as im:
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError) as e:
        raise InputError(f"image {path} could not be read ({e}); pass a PNG or JPEG file") from None


def region_from_args(args) -> dict:
    """--click / --box / --scribble / --mask -> {kind: value} for FocusModel methods."""
    if getattr(args, "click", None):
        return {"click": _ints(args.click, 2, "--click X,Y")}
    if getattr(args, "box", None):
        return {"box": _ints(args.box, 4, "--box X0,Y0,X1,Y1")}
    if getattr(args, "scribble", None):
        pts = [_ints(p, 2, "each --scribble point X,Y") for p in args.scribble.split(";") if p]
        return {"scribble": pts}
    if getattr(args, "mask", None):
        return {"mask": load_image(args.mask).max(-1) > 127}
    return {}


def _paragraphs(*parts: str) -> str:
    """--help text: each part wrapped at 88 columns (parts that start with spaces kept as is)."""
    import textwrap

    return "\n\n".join(p if p.startswith("  ") else textwrap.fill(p, 88) for p in parts)


def add_region_options(p: argparse.ArgumentParser, required: bool) -> None:
    g = p.add_mutually_exclusive_group(required=required)
    g.add_argument("--click", metavar="X,Y", help="a pixel inside the object (x = column)")
    g.add_argument("--box", metavar="X0,Y0,X1,Y1", help="a box around the object (inclusive)")
    g.add_argument("--scribble", metavar="X,Y;X,Y;...", help="a polyline over the object")
    g.add_argument("--mask", metavar="PNG", help="a mask image (white = the object)")


def load_model(args):
    from focus_ref.model import FocusModel

    if not (Path(args.checkpoint) / "model.safetensors").is_file():
        raise InputError(f"no checkpoint at {args.checkpoint}: train one with `python -m "
                         "focus_ref train --preset tiny` and pass --checkpoint RUN/final")
    return FocusModel.from_pretrained(args.checkpoint)


# ----- commands ---------------------------------------------------------------------------
def cmd_train(args) -> None:
    from focus_ref.run import main_job

    main_job(preset=args.preset, stages=args.stages, out=args.out, resume=args.resume,
             seed=args.seed, quick=args.quick, init=args.init)


def cmd_eval(args) -> None:
    from focus_ref.evaluate import evaluate_model

    metrics = evaluate_model(load_model(args), split=args.split, n=args.n, tasks=TASKS)
    print(json.dumps(metrics, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(metrics, indent=2) + "\n")


def cmd_segment(args) -> None:
    import numpy as np
    from PIL import Image

    image = load_image(args.image)
    region = region_from_args(args)
    if args.expression is not None:
        region = {"expression": args.expression}
    masks = load_model(args).segment(image, **region)
    union = np.any(masks, 0) if masks else np.zeros(image.shape[:2], bool)  # (H, W)
    Image.fromarray(union.astype(np.uint8) * 255).save(args.out)
    print(f"wrote {args.out}: {len(masks)} target(s)" if masks else
          f"wrote {args.out}: no target (empty mask)")


def cmd_understand(args) -> None:
    print(load_model(args).understand(load_image(args.image), args.question,
                                      region_from_args(args) or None))


def cmd_edit(args) -> None:
    from focus_ref.editing import EDITED

    region = region_from_args(args)
    out = load_model(args).edit(load_image(args.image), args.instruction,
                                region=region or None)
    out.save(args.out)
    reason = out.info.get("focus_reason", EDITED)
    print(f"wrote {args.out}" if reason == EDITED else
          f"wrote {args.out} unchanged: the model answered {reason!r}")


def cmd_generate(args) -> None:
    load_model(args).generate(args.prompt, seed=args.seed).save(args.out)
    print(f"wrote {args.out}")


def cmd_bench(args) -> None:
    from focus_ref.bench import run_bench

    ckpt = None if args.random else args.checkpoint
    result = run_bench(ckpt, train_run=args.train, repeats=args.repeats)
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m focus_ref", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser(
        "train", help="train every stage end to end, evaluate, write a run folder",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=_paragraphs(
            "The main job: stage 0 (stand-ins for the pretrained backbones), 1 (visual tokenizer "
            "+ diffusion decoder), 2 (adapter warm-up), 3 (multimodal pretraining with "
            "segmentation) and 4 (region-controlled editing), then the \"no target\" threshold "
            "chosen on dev scenes and the held-out evaluation.",
            "  --preset tiny   22 to 45 minutes on 2 CPU cores, by the day (README: each stage)\n"
            "  --quick         3 steps per stage: a smoke test of the whole pipeline",
            "Writes OUT/config.json, OUT/stage*/ (resumable safetensors checkpoints), OUT/final/ "
            "(the model: give it to any command as --checkpoint OUT/final), OUT/metrics.json, "
            "OUT/history.json and OUT/report.md (metrics, loss curves, masks, edits). After "
            "Ctrl-C or a crash, rerun with --resume: it continues from the last checkpoint to "
            "the same result as an uninterrupted run. A NaN loss stops the run and keeps the "
            "last good checkpoint."))
    t.add_argument("--preset", default="tiny", choices=["tiny", "small", "paper"])
    t.add_argument("--stages", default="0-4", help="e.g. 0-3 or 3-4 (default: all, 0-4)")
    t.add_argument("--out", default="runs/tiny", help="run folder (default runs/tiny)")
    t.add_argument("--resume", action="store_true", help="continue from the run folder's "
                   "checkpoints (same result as an uninterrupted run)")
    t.add_argument("--seed", type=int, default=0, help="training is deterministic: one seed on "
                   "one machine and thread count gives the same weights, bit for bit")
    t.add_argument("--init", metavar="CHECKPOINT", help="start from a trained checkpoint, e.g. "
                   "to run only --stages 3-4 on top of earlier stages")
    t.add_argument("--quick", action="store_true", help="3 steps per stage (a smoke test)")
    t.set_defaults(fn=cmd_train)

    def with_ckpt(sp):
        sp.add_argument("--checkpoint", default=str(SHIPPED),
                        help="checkpoint folder (default: the shipped tiny checkpoint)")
        return sp

    e = with_ckpt(sub.add_parser(
        "eval", help="held-out metrics (DESIGN §6 keys)",
        description="Every held-out metric of a checkpoint (refseg / GRES, region prompts, VQA, "
        "tokenizer, edits, generation) on scenes never trained on, printed as JSON; 2 to 4 "
        "minutes on 2 CPU cores for the default 200 scenes, as fast or slow as the day."))
    e.add_argument("--split", default="val", choices=["val", "train", "dev"])
    e.add_argument("--n", type=int, default=200, help="held-out scenes per task")
    e.add_argument("--json", help="also write the metrics to this file")
    e.set_defaults(fn=cmd_eval)

    sg = with_ckpt(sub.add_parser(
        "segment", help="mask of what an expression or a region prompt refers to",
        description="Segment the object(s) an expression names (one mask per target; several "
        "targets are united in the PNG; none gives an empty mask), or the object under a "
        "click / box / scribble / mask. Coordinates are pixels of the model's resolution "
        "(64 x 64 for the tiny preset), x = column. Example: python -m focus_ref segment "
        "--image scene.png --expression 'the red circle' --out mask.png"))
    sg.add_argument("--image", required=True, help="PNG / JPEG (resized to the model's size)")
    g = sg.add_mutually_exclusive_group(required=True)
    g.add_argument("--expression", metavar="TEXT", help='words, e.g. "all circles"')
    g.add_argument("--click", metavar="X,Y", help="a pixel inside the object (x = column)")
    g.add_argument("--box", metavar="X0,Y0,X1,Y1", help="a box around the object (inclusive)")
    g.add_argument("--scribble", metavar="X,Y;X,Y;...", help="a polyline over the object "
                   "(at least 2 points)")
    g.add_argument("--mask", metavar="PNG", help="a mask image (white = the object)")
    sg.add_argument("--out", required=True, help="where to write the mask PNG (white = object)")
    sg.set_defaults(fn=cmd_segment)

    un = with_ckpt(sub.add_parser(
        "understand", help="answer a question about an image",
        description="Answer a question about an image, e.g. python -m focus_ref understand "
        "--image scene.png --question 'how many circles are there?'; or about one region of "
        "it: --question 'what is this?' --click 20,31"))
    un.add_argument("--image", required=True, help="PNG / JPEG (resized to the model's size)")
    un.add_argument("--question", required=True, help='e.g. "what color is the square?"')
    add_region_options(un, required=False)
    un.set_defaults(fn=cmd_understand)

    ed = with_ckpt(sub.add_parser(
        "edit", help="edit the region an instruction names",
        description="Edit one region: the model segments what the instruction names (or the "
        "region you give), writes the target's visual tokens and the diffusion decoder repaints "
        "only that mask; the rest of the image is kept. Kinds: recolour, remove, replace a "
        "shape, move, change the background. An instruction naming nothing in the image is "
        "refused (\"no such object\") and the image is written unchanged. Example: python -m "
        "focus_ref edit --image scene.png --instruction 'remove the red circle' --out edited.png"))
    ed.add_argument("--image", required=True, help="PNG / JPEG (resized to the model's size)")
    ed.add_argument("--instruction", required=True, help='e.g. "make the red circle blue"')
    add_region_options(ed, required=False)
    ed.add_argument("--out", required=True, help="where to write the edited image (PNG)")
    ed.set_defaults(fn=cmd_edit)

    gn = with_ckpt(sub.add_parser(
        "generate", help="an image from a caption",
        description="Text -> the LLM writes semantic visual tokens (classifier-free guidance on "
        "the logits) -> the diffusion decoder renders them. Example: python -m focus_ref "
        "generate --prompt 'a small red circle and a large blue square' --out gen.png"))
    gn.add_argument("--prompt", required=True,
                    help='a ShapesWorld caption, e.g. "a small red circle and a large blue square"')
    gn.add_argument("--seed", type=int, default=0,
                    help="the sampler's noise (same seed, same image)")
    gn.add_argument("--out", required=True, help="where to write the image (PNG)")
    gn.set_defaults(fn=cmd_generate)

    b = with_ckpt(sub.add_parser(
        "bench", help="speed and memory on this machine (latency of each public call, training "
        "samples/s and MFU, peak RSS, stage minutes); --train DIR also times the whole main job"))
    b.add_argument("--json", help="also write the results to this file")
    b.add_argument("--train", metavar="DIR", help="run `train --preset tiny` into DIR and add "
                   "its stage minutes and held-out metrics (run.*): the full-length numbers")
    b.add_argument("--repeats", type=int, default=5, help="timed calls per figure (median)")
    b.add_argument("--random", action="store_true", help="a random tiny model instead of a "
                   "checkpoint (speed only)")
    b.set_defaults(fn=cmd_bench)

    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except (InputError, ValueError, FileNotFoundError, FileExistsError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
