"""FocusModel: the parts of FOCUS (arXiv 2506.16806, Fig. 2) assembled into one model.

    image ──► DualEncoder ──► visual tokens ─┐
                  └─► multi-scale features ──┼──────────────► SegmentationPredictor ─► mask
    region prompt ─► RegionPromptEncoder ────┤                      ▲ (<seg> hidden state)
    text ───────────────────────────────────►FocusLLM ─► text, <seg>, visual tokens
                                                                    │
    VisualTokenizer (codes / latents) ◄──── DiffusionDecoder ◄──────┘ (+ mask as spatial prompt)

`FocusModel(FocusConfig.tiny())` builds every part from config with random weights; under
`accelerate.init_empty_weights()` any preset builds on the meta device.
`save_pretrained(dir)` writes config.json + model.safetensors (+ the text tokenizer);
`from_pretrained(dir)` reads them back and refuses a checkpoint that does not match its config.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from focus_ref.config import FocusConfig
from focus_ref.diffusion import DiffusionDecoder
from focus_ref.editing import EDITED, SemanticHead
from focus_ref.encoder import DualEncoder
from focus_ref.llm import FocusLLM
from focus_ref.segmentation import RegionPromptEncoder, SegmentationPredictor
from focus_ref.tokenizer import VisualTokenizer


class FocusModel(nn.Module):
    def __init__(self, config: FocusConfig, text_tokenizer=None):
        super().__init__()
        self.config = config
        self.encoder = DualEncoder(config)  # vanilla ViT + hierarchical ConvNeXt + fusion
        self.llm = FocusLLM(config, text_tokenizer=text_tokenizer)  # Qwen2-family causal LM
        self.visual_tokenizer = VisualTokenizer(config)  # MoVQ: semantic + pixel codes
        self.region_encoder = RegionPromptEncoder(config)  # click/box/scribble/mask -> tokens
        self.segmentation = SegmentationPredictor(config)  # <seg> state -> mask
        self.diffusion = DiffusionDecoder(config)  # mask-conditioned latent diffusion
        self.semantic_head = SemanticHead(config)  # LLM <-> semantic codes (Janus)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def num_parameters(self) -> dict[str, int]:
        parts = {n: sum(p.numel() for p in m.parameters()) for n, m in self.named_children()}
        return {**parts, "total": sum(parts.values())}

    # ----- checkpoints -------------------------------------------------------------------
    def save_pretrained(self, path: str | Path, half: bool = False) -> None:
        """config.json + model.safetensors (+ text_tokenizer/). `half` stores fp16 on disk."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.config.to_json(path / "config.json")
        from focus_ref.train import saveable_state

        state = saveable_state(self)  # tied weights stored once (safetensors refuses aliases)
        if half:
            state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
        save_file(state, str(path / "model.safetensors.tmp"))
        (path / "model.safetensors.tmp").replace(path / "model.safetensors")
        self.llm.save_text_tokenizer(path / "text_tokenizer")

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu") -> FocusModel:
        path = Path(path)
        if not (path / "model.safetensors").is_file():
            raise FileNotFoundError(
                f"no checkpoint at {path} (expected config.json and model.safetensors): pass a "
                "folder written by save_pretrained or by `python -m focus_ref train`")
        config = FocusConfig.from_json(path / "config.json")
        model = cls(config, text_tokenizer=FocusLLM.load_text_tokenizer(path / "text_tokenizer"))
        from focus_ref.train import tied_aliases

        state = load_file(str(path / "model.safetensors"))
        tied = tied_aliases(model)  # stored once: fill the aliases from their first name
        state.update({k: state[v] for k, v in tied.items() if v in state})
        own = model.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
        if missing or unexpected or wrong:
            raise ValueError(
                f"checkpoint {path} does not match its config.json: {len(missing)} missing, "
                f"{len(unexpected)} unexpected, {len(wrong)} wrongly shaped tensors (first: "
                f"{(missing + unexpected + wrong)[:3]}). Re-save it with this version of "
                "focus_ref, or fix config.json to the sizes it was trained with.")
        model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})
        return model.to(device).eval()

    # ----- understanding and segmentation (pretrain.py, paper §3.3, §3.5 stage 3) ----------
    def _input(self, image) -> torch.Tensor:
        """A path, PIL image or uint8 array -> (1, 3, H, W) on the model's device."""
        from PIL import Image, UnidentifiedImageError

        from focus_ref.editing import to_input

        if isinstance(image, (str, Path)):
            try:
                with Image.open(image) as im:
                    image = im.convert("RGB")
            except (FileNotFoundError, UnidentifiedImageError, OSError) as e:
                raise ValueError(f"cannot read the image {image} ({type(e).__name__}): pass "
                                 "a PNG / JPEG path, a PIL image or a uint8 H x W x 3 array"
                                 ) from None
        try:
            return to_input(image, self.config.data.image_size).to(self.device)
        except TypeError as e:
            raise ValueError(str(e)) from None

    def segment(self, image, expression: str | None = None, click=None, box=None,
                scribble=None, mask=None) -> list:
        """The objects an expression or ONE region prompt refers to, as boolean H x W masks.

        click (x, y), box (x0, y0, x1, y1) inclusive, scribble [(x, y), ...] (>= 2 points)
        in pixels of the model's resolution (x = column); mask: bool H x W. Returns one mask
        per target (the LLM writes one `<seg>` each); an empty list means "no target".
        """
        from focus_ref.grounding import segment_masks

        given = {k: v for k, v in dict(expression=expression, click=click, box=box,
                                       scribble=scribble, mask=mask).items() if v is not None}
        if len(given) != 1:
            raise ValueError(f"pass exactly one of expression / click / box / scribble / mask, "
                             f"got {sorted(given) or 'none'}")
        if expression is not None and (not isinstance(expression, str) or not expression.strip()):
            raise ValueError("empty expression: name what to segment, e.g. 'the red circle'")
        x = self._input(image)
        region = None if expression is not None else next(iter(given.items()))
        masks = segment_masks(self.eval(), x, expression and expression.strip(), region)
        return [m for m in masks.cpu().numpy()]  # [(H, W) bool] * K

    def understand(self, image, question: str, region: dict | None = None) -> str:
        """The model's answer to a question about the image (greedy); with a region prompt
        ({"click": (x, y)} | {"box": ...} | {"scribble": [...]} | {"mask": bool H x W}) the
        question is about that region, e.g. "what is this?" (UniPixel's region questions)."""
        from focus_ref.editing import check_region
        from focus_ref.grounding import answer

        if not isinstance(question, str) or not question.strip():
            raise ValueError("empty question: ask something, e.g. 'how many circles are there?'")
        region = check_region(region)
        return answer(self.eval(), self._input(image), question.strip(),
                      next(iter(region.items())) if region else None)

    # ----- editing and generation (editing.py, paper §3.4) ----------------------------------
    def edit(self, image, instruction: str, region: dict | None = None, seed: int = 0,
             return_details: bool = False):
        """Edit the region an instruction (and optionally a region prompt) names.

        image: uint8 H x W x 3 array or PIL image; region: {"click": (x, y)} | {"box": ...} |
        {"scribble": [...]} | {"mask": bool H x W}. Returns a PIL image (the input unchanged,
        with a warning and `image.info["focus_reason"]`, when the model refuses: "no such
        object", "not an edit instruction"); `return_details=True` returns an EditResult
        (image, predicted mask, reason, generated codes).
        """
        import warnings

        from PIL import Image

        from focus_ref.editing import check_instruction, check_region, run_edits, to_input
        from focus_ref.grounding import cleaned_up_by_segment

        x = to_input(image, self.config.data.image_size).to(self.device)  # (1, 3, H, W)
        check_instruction(self.llm, instruction, self.config.edit.max_instruction_tokens)
        region = check_region(region)
        if region and cleaned_up_by_segment(next(iter(region)), self.config.segmentation):
            found = self.segment(image, **region)  # the prompt's mask as segment() cleans it up
            region = {"mask": np.any(found, 0)} if found else region
        g = torch.Generator(self.device).manual_seed(seed)
        res = run_edits(self.eval(), x, [instruction.strip()], [region], generator=g)[0]
        if return_details:
            return res
        out = Image.fromarray(res.image)
        out.info["focus_reason"] = res.reason
        if res.reason != EDITED:
            warnings.warn(f"no edit made: the model answered {res.reason!r} to "
                          f"{instruction!r}; the image is returned unchanged", stacklevel=2)
        return out

    def generate(self, prompt: str, seed: int = 0):
        """An image (PIL) from a caption: semantic codes with CFG on the logits -> decoder."""
        from PIL import Image

        from focus_ref.data import tensor_to_image
        from focus_ref.editing import check_instruction, run_generate

        check_instruction(self.llm, prompt, self.config.edit.max_instruction_tokens, "prompt")
        g = torch.Generator(self.device).manual_seed(seed)
        return Image.fromarray(tensor_to_image(run_generate(self.eval(), [prompt.strip()],
                                                            generator=g)[0]))
