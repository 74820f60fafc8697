"""The interactive demo: the whole model in a notebook, without writing code (DESIGN §2).

FOCUS is one model for *what to see* and *how to edit* (arXiv 2506.16806, Fig. 1): the same
weights answer questions, segment what words or a pointer name, edit that region and draw
from a caption. This file puts those four public methods behind a few ipywidgets:

    from focus_ref.widgets import demo
    demo()                      # the shipped tiny checkpoint on held-out ShapesWorld scenes

    [scene 0..999 | upload]  [task: segment / understand / edit / generate]
    [text: "the red circle" / "how many circles?" / "make the red circle blue" / a caption]
    [region: none / click X,Y / box X0,Y0,X1,Y1 / scribble X,Y;X,Y;...]   [Run]
    input (region drawn in magenta)  ->  result (masks, answer, edited or generated image)

Region text uses the CLI's syntax (`python -m focus_ref segment --click 20,31`), pixels of
the model's 64 x 64 input, x = column. Bad input (a click outside the image, an empty
expression, an unreadable upload) shows the same one-line error as the Python API, in red,
and keeps the last result on screen. `Demo` is plain Python around the widgets, so tests
(and a course) can drive it: set `.task.value`, `.text.value`, ... and call `.run()`.
"""

from __future__ import annotations

import html
import io
from types import SimpleNamespace

import ipywidgets as W
import numpy as np
from PIL import Image

TASKS = ("segment", "understand", "edit", "generate")
REGION_KINDS = ("none", "click", "box", "scribble")
EXAMPLES = {"segment": "the red circle", "understand": "how many circles are there?",
            "edit": "make the red circle blue", "generate": "a red circle and a blue square"}
# for a ShapesWorld scene the text box suggests that scene's own expression, question, ...
SUGGEST = {"segment": lambda s: s["refs"][0]["text"], "understand": lambda s: s["qa"][0][0],
           "edit": lambda s: s["edit"]["instruction"], "generate": lambda s: s["caption"]}
REGION_EXAMPLE = {"click": "20,31", "box": "10,10,30,30", "scribble": "10,10;30,30"}
SCALE = 4  # on-screen magnification of the 64 px images (nearest neighbour: crisp pixels)


def png(image: np.ndarray, scale: int = SCALE) -> bytes:
    """uint8 (H, W, 3) -> PNG bytes, magnified `scale` times without smoothing."""
    im = Image.fromarray(image)
    im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def parse_region(kind: str, text: str) -> dict:
    """("click", "20,31") -> {"click": (20, 31)}; "none" -> {}. Errors as the CLI's."""
    from focus_ref.__main__ import region_from_args

    if kind == "none":
        return {}
    if kind not in REGION_KINDS:
        raise ValueError(f"unknown region kind {kind!r}: choose one of {REGION_KINDS}")
    if not text.strip():
        raise ValueError(f"the {kind} is empty: type it as in the CLI, e.g. "
                         f"{REGION_EXAMPLE[kind]}")
    return region_from_args(SimpleNamespace(**{kind: text.strip()}))


class Demo:
    """The widgets and what Run does; `widget` is the box to display."""

    def __init__(self, model=None, split: str = "val"):
        from focus_ref.shapesworld import ShapesWorld

        if model is None:
            from focus_ref import FocusModel
            from focus_ref.__main__ import SHIPPED

            model = FocusModel.from_pretrained(SHIPPED)
        self.model, self.world = model.eval(), ShapesWorld(model.config.data, split)
        self.size = model.config.data.image_size
        self.uploaded: np.ndarray | None = None
        self.scene = W.IntSlider(0, 0, 999, description="scene", continuous_update=False)
        self.upload = W.FileUpload(accept="image/*", multiple=False, description="upload")
        self.task = W.Dropdown(options=TASKS, value="segment", description="task")
        self.text = W.Text(EXAMPLES["segment"], description="text",
                           layout=W.Layout(width="420px"))
        self.region_kind = W.Dropdown(options=REGION_KINDS, value="none", description="region")
        self.region = W.Text("", placeholder="X,Y  |  X0,Y0,X1,Y1  |  X,Y;X,Y;...")
        self.run_button = W.Button(description="Run", button_style="primary")
        self.status = W.HTML()
        self.input_view, self.output_view = W.Image(format="png"), W.Image(format="png")
        self.scene.observe(self._new_scene, "value")
        self.upload.observe(self._new_upload, "value")
        self.task.observe(self._new_task, "value")
        self.run_button.on_click(self.run)
        self._suggest()
        self.widget = W.VBox([
            W.HBox([self.scene, self.upload]),
            W.HBox([self.task, self.text]),
            W.HBox([self.region_kind, self.region, self.run_button]),
            self.status,
            W.HBox([self.input_view, self.output_view])])
        self._show_input()

    # ----- inputs ------------------------------------------------------------------------
    def image(self) -> np.ndarray:
        """The current input: the uploaded image (resized to the model), else the scene."""
        if self.uploaded is not None:
            return self.uploaded
        return self.world.sample(self.scene.value)["image"]  # (H, W, 3) uint8

    def _new_scene(self, _=None) -> None:
        self.uploaded = None
        self._suggest()
        self._show_input()

    def _suggest(self) -> None:
        """Fill the text box: the scene's own expression / question / edit / caption."""
        task = self.task.value
        self.text.value = EXAMPLES[task] if self.uploaded is not None else \
            SUGGEST[task](self.world.sample(self.scene.value))

    def _new_upload(self, change) -> None:
        files = change["new"]
        if not files:
            return
        f = files[0] if isinstance(files, (list, tuple)) else next(iter(files.values()))
        try:
            with Image.open(io.BytesIO(bytes(f["content"]))) as im:
                im = im.convert("RGB").resize((self.size, self.size), Image.BILINEAR)
        except (OSError, ValueError, Image.DecompressionBombError) as e:  # not an image
            self._error(f"cannot read {f.get('name', 'the upload')} as an image "
                        f"({type(e).__name__}): upload a PNG or JPEG")
            return
        self.uploaded = np.asarray(im)
        self._suggest()
        self._show_input()

    def _new_task(self, _=None) -> None:
        self._suggest()

    def _show_input(self, region: dict | None = None) -> None:
        from focus_ref.segmentation import rasterize_prompt
        from focus_ref.viz import overlay

        img = self.image()
        if region:  # the prompt as the model sees it (a click is a small disc)
            kind, value = next(iter(region.items()))
            img = overlay(img, [rasterize_prompt(kind, value, self.size).numpy() > 0])
        self.input_view.value = png(img)

    def _error(self, message: str) -> None:
        self.status.value = f"<span style='color:#c00'>{html.escape(message)}</span>"

    # ----- run -----------------------------------------------------------------------------
    def run(self, _=None) -> dict | None:
        """Call the model for the chosen task; show and return the result (None on an error:
        the message is in `status`, the previous result stays)."""
        from focus_ref.viz import overlay

        m, task, text = self.model, self.task.value, self.text.value
        try:
            region = parse_region(self.region_kind.value, self.region.value)
            img = self.image()
            if region and task == "generate":
                raise ValueError("generate takes no region: set region to 'none', or choose "
                                 "segment / understand / edit to point at an object")
            self._show_input(region)
            if task == "segment":
                masks = m.segment(img, **(region or {"expression": text}))
                out, msg = overlay(img, masks), f"{len(masks)} mask(s)" if masks else "no target"
                result = {"masks": masks}
            elif task == "understand":
                answer = m.understand(img, text, region or None)  # "what is this?" + a click
                out, msg, result = img, f"answer: {answer}", {"answer": answer}
            elif task == "edit":
                res = m.edit(img, text, region or None, return_details=True)
                out, msg = res.image, res.reason
                result = {"image": res.image, "mask": res.mask, "reason": res.reason}
            else:
                out = np.asarray(m.generate(text))
                msg, result = "generated", {"image": out}
        except (ValueError, TypeError) as e:
            self._error(str(e))
            return None
        self.output_view.value = png(out)
        self.status.value = html.escape(msg)
        return result


def demo(model=None, split: str = "val") -> Demo:
    """Build the demo (the shipped checkpoint by default) and display it in the notebook."""
    from IPython.display import display

    d = Demo(model, split)
    display(d.widget)
    return d
