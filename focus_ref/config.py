"""Configuration: one dataclass per component, composed in `FocusConfig`.

FOCUS (arXiv 2506.16806, §3) is built from a dual-branch visual encoder, a MoVQ visual
tokenizer, a Qwen2.5 LLM, a segmentation predictor and a diffusion decoder. Each part has a
dataclass here; `FocusConfig` holds one of each plus the data and training settings.

Three named presets (minGPT-style):
  tiny   every stage trains on 2 CPU cores in minutes (ShapesWorld 64x64, <= ~12M params)
  small  the same code on one GPU, wider and at 128 px
  paper  the published sizes (Qwen2.5-3B, ConvNeXt-L, a Qwen2.5-VL ViT, MoVQGAN-67M, SDXL
         UNet); built on the meta device here, loaded with `from_pretrained` where the
         weights exist.

The config is saved as JSON beside every checkpoint; `FocusConfig.from_dict` refuses unknown
keys with an error naming them, so a typo never silently falls back to a default. A comment
beside a knob says why it is set so; the measurements behind it are in docs/lab_notes.md
("Why the tiny preset's knobs are set as they are").
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class DataConfig:
    image_size: int = 64  # ShapesWorld render size = the high-resolution input
    min_objects: int = 2
    max_objects: int = 6
    seed: int = 0  # generator seed; the val split uses a disjoint index range
    val_offset: int = 1_000_000  # sample i of split "val" is scene val_offset + i
    dev_offset: int = 2_000_000  # split "dev": for choosing settings, never trained on or reported


@dataclass
class EncoderConfig:
    """Dual-branch encoder (paper §3.1): a ViT on the low-res image, ConvNeXt on the high-res."""

    vit_kind: str = "siglip"  # "siglip" (tiny/small) | "qwen2_5_vl" (paper)
    low_res: int = 32  # vanilla branch input size
    vit_patch: int = 8  # tiny: 4 x 4 = 16 visual tokens per image
    vit_hidden: int = 128
    vit_layers: int = 4
    vit_heads: int = 4
    vit_mlp: int = 512
    vit_pretrained: str = ""  # path / hub id loaded with from_pretrained ("" = build from config)
    high_res: int = 64  # hierarchical branch input size
    convnext_depths: tuple = (1, 1, 2, 1)
    convnext_dims: tuple = (32, 64, 96, 128)
    convnext_pretrained: str = ""
    fusion_heads: int = 4  # Mini-Gemini-style windowed cross-attention; its zero-initialised gate
    #   barely opens at this scale, and forced open it gave no gain (lab notes)
    adapter_hidden: int = 256  # MLP adapter to the LLM width
    vit_out: int = 0  # width of the vanilla tokens (global_feats); 0 = vit_hidden. Qwen2.5-VL's
    #                   patch merger outputs 2048 in the 3B model
    clip_dim: int = 128  # stage-0 contrastive embedding size
    dense_heads: tuple = (7, 5, 3)  # stage 0c stand-in: classes of the per-pixel colour / shape /
    #                   size heads on the ConvNeXt (ShapesWorld's, + background); () = none (paper:
    #                   the released ConvNeXt-L already knows shapes)
    vit_dense: bool = False  # stage 0c also teaches each ViT token what is in its window: the
    #   tokens carry more, the main job gains nothing, stage 0 +1.3 min: off (lab notes)

    @property
    def vit_dim(self) -> int:
        """C_vit: the width of `DualEncoder(...).global_feats` (read this, not vit_hidden)."""
        return self.vit_out or self.vit_hidden


@dataclass
class LLMConfig:
    """The causal LM at the centre (paper: Qwen2.5-3B); tiny: a Qwen2 built from config."""

    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 768
    max_position: int = 1024
    text_vocab_size: int = 512  # text ids [0, V): tiny BPE (~440 tokens) padded to this size
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False  # paper (Qwen2.5-3B): True
    pretrained: str = ""  # e.g. "Qwen/Qwen2.5-3B" at paper scale


@dataclass
class TokenizerConfig:
    """MoVQ visual tokenizer (paper §3.2): pixel-level VQ codes + semantic-level codes."""

    block_out_channels: tuple = (32, 32, 32)  # downsampling factor 2**(len-1); >= 32 (SpatialNorm)
    layers_per_block: int = 0  # tiny: strided convs only in the encoder, 1 resnet per decoder level
    latent_channels: int = 16
    num_vq_embeddings: int = 256  # pixel codebook size
    vq_embed_dim: int = 16
    norm_num_groups: int = 8
    sem_codebook_size: int = 256  # semantic codebook over vanilla-encoder features
    sem_dim: int = 32
    commitment_beta: float = 0.25
    perceptual_weight: float = 0.0  # larger presets: LPIPS-style term
    adversarial_weight: float = 0.0  # larger presets: patch-GAN term
    attn_at_lowest: bool = False  # self-attention blocks at the coarsest level (MoVQGAN-67M)
    pretrained: str = ""


@dataclass
class SegmentationConfig:
    """SAM-style mask decoder driven by the <seg> hidden state (paper §3.3, LISA)."""

    dim: int = 64
    num_layers: int = 4  # two-way transformer blocks (SAM: 2); 4 read relations and attributes
    #   better (main job: refseg cIoU 0.613 -> 0.656; lab notes)
    num_heads: int = 4
    mlp_dim: int = 256
    num_region_tokens: int = 4  # tokens one region prompt becomes in the LLM input
    decoder_stride: int = 8  # feature stride the two-way transformer reads; upsampled to stride 1
    region_grid: int = 8  # a region prompt's shape is seen on a grid x grid raster
    prompt_radius: float = 2.0  # pixels: click disc radius, scribble half-width
    w_presence: float = 1.0  # weight of the "object present" BCE (GRES no-target)
    presence_threshold: float = 0.0  # presence logit above which a <seg> has a target; the
    #   main job sets it on dev scenes after training (evaluate.calibrate_presence)
    max_words: int = 32  # learned word positions (a longer expression shares the last one)
    word_tokens: int = 16  # the first this many prompt words (the template "segment:" is 7
    #   of them; the longest expressions 16) also become prompt tokens of the two-way
    #   transformer (0: off; their pooled mean is always one); lab notes
    refine: tuple = ("click", "click", "scribble", "expression")  # prompts whose masks go back
    #   in as mask prompts, one pass per listing (SAM's iterative refinement): click mIoU
    #   0.62 -> 0.74 -> 0.81 over two passes; box and mask prompts get worse (lab notes)
    clip_box: bool = True  # a box prompt bounds its object: mask pixels outside it are dropped
    #   (150 dev scenes, shipped checkpoint: box mIoU 0.86 -> 0.92; the masks spill onto the
    #   neighbouring objects)
    fine_width: int = 32  # channels of the full-resolution mask refinement (0: none):
    #   region mIoU 0.877 -> 0.904 in the main job, about 5 min more training (lab notes)
    connected: tuple = ("click", "scribble")  # prompts whose masks keep only the parts joined
    #   to their points (interactive segmentation's usual clean-up; clicks 0.74 -> 0.76)
    grounded_answers: bool = True  # UniPixel's mask-grounded answers (pretrain.grounded): a
    #   question about named objects is answered "<seg><region> ... answer", one <seg> per
    #   object it names, each followed by the region tokens of its predicted mask or,
    #   when the predictor finds nothing, RegionPromptEncoder.empty (counts stay in
    #   words). Main job: VQA 0.32 -> 0.68, refseg cIoU 0.74 -> 0.68 (lab notes)

@dataclass
class DiffusionConfig:
    """Diffusion decoder in the tokenizer's latent space; the mask is its spatial prompt (§3.4)."""

    block_out_channels: tuple = (32, 64)
    layers_per_block: int = 1
    attention_head_dim: int = 32  # channels per attention head
    cross_attention_dim: int = 128
    num_train_timesteps: int = 1000
    num_inference_steps: int = 10
    guidance_scale: float = 2.0
    cond_dropout: float = 0.1  # classifier-free guidance: condition dropped in training
    mask_condition: str = "explicit"  # "explicit" (mask channel) | "tokens" (the ablation)
    pretrained: str = ""  # e.g. SDXL's UNet at paper scale
    down_block_types: tuple = ()  # () = cross-attention at every level (SDXL: none at the first)
    transformer_layers_per_block: tuple = ()  # () = one per block (SDXL: 1, 2, 10)
    use_linear_projection: bool = False  # SDXL: True
    norm_num_groups: int = 32
    max_sem_tokens: int = 256  # semantic codes the context can hold
    beta_schedule: str = "squaredcos_cap_v2"  # DDPM noise schedule (SDXL: "scaled_linear")
    prediction_type: str = "sample"  # "sample" (x0: learns fastest here) | "v_prediction" | "epsilon"
    sampler: str = "dpm"  # "dpm" (DPM-Solver++) | "ddim"
    mask_loss_weight: float = 1.0  # extra weight of the loss inside the edit region
    blend_latents: bool = True  # sampling: outside the mask, keep the (noised) source latent
    render_share: float = 0.5  # stage 1: share of "render from tokens" examples (rest: edits)


@dataclass
class EditConfig:
    """Editing and generation (§3.4, stage 4): the LLM writes <seg> + semantic codes (editing.py)."""

    share_generate: float = 0.3  # stage 4 task mix: text -> image examples
    caption_dropout: float = 0.1  # generation examples with an empty caption (CFG on logits)
    share_absent: float = 0.1  # of the rest: edits naming an absent object -> an empty <seg>
    share_not_edit: float = 0.05  # a question / caption given as an edit -> refused
    share_region: float = 0.2  # edits by a click / box / scribble / mask: "make this blue"
    w_diffusion: float = 1.0  # weight of the decoder's denoising loss in stage 4
    gen_guidance: float = 3.0  # classifier-free guidance on the code logits (generation);
    #   shipped checkpoint, 96 dev captions: 1.5 / 3 / 5 / 8 -> 0.27 / 0.26 / 0.30 / 0.26,
    #   greedy codes 0.28, temperature 0.7 0.27, top-k 20 0.27: all within sampling noise
    gen_temperature: float = 1.0  # sampling temperature of generated codes (0 = greedy)
    gen_top_k: int = 0  # keep the k most likely codes when sampling (0 = all)
    max_instruction_tokens: int = 48  # longer instructions are refused with an error


@dataclass
class StageConfig:
    steps: int = 500
    lr: float = 1e-3
    batch_size: int = 32
    warmup: int = 20
    weight_decay: float = 0.0
    log_every: int = 25
    ckpt_every: int = 250


@dataclass
class TrainConfig:
    """Progressive training (paper §3.5): stage 0 stands in for pretrained backbones."""

    seed: int = 0
    stage0: StageConfig = field(default_factory=lambda: StageConfig(  # (a) LLM text pretraining
        steps=120, lr=2e-3, batch_size=16, log_every=10, ckpt_every=40))
    stage0_clip: StageConfig = field(default_factory=lambda: StageConfig(  # (b) CLIP encoders
        steps=150, lr=1e-3, batch_size=32, log_every=10, ckpt_every=50))
    stage0_dense: StageConfig = field(default_factory=lambda: StageConfig(  # (c) dense ConvNeXt
        steps=3000, lr=5e-3, batch_size=32, warmup=20, log_every=50, ckpt_every=500))
    #   1500 -> 3000: small objects' shapes read better (0.71 -> 0.85); the main job's refseg
    #   gain (0.647 -> 0.741) is within the spread of seeds (lab notes)
    stage0_seg: StageConfig = field(default_factory=lambda: StageConfig(  # (d) mask decoder
        steps=600, lr=2e-3, batch_size=32, warmup=20, log_every=10, ckpt_every=200))
    #   at 600 steps the decoder's word-reading transition comes early, late or not at all
    #   with the batch order; 1200 read words better for all three orders tried (after stage 3
    #   refseg cIoU +0.03 to +0.06; lab notes, session 32), but not on another machine, where a
    #   fresh 1200-step main job scored below the shipped one (session 33): left at 600
    stage0_seg_colour: float = 0.25  # (d): share of its word rows that name a present object
    #   by its colour (scenegraph.colour_ref); without it one machine's decoder read
    #   no colour word at all (refseg 0.49 -> 0.67 with it; lab notes, session 30)
    stage0_read: StageConfig = field(default_factory=lambda: StageConfig(  # (e) reading
        steps=800, lr=1e-4, batch_size=16, warmup=20, log_every=20, ckpt_every=400))
    #   held-out reading from the caption 0.00 -> 0.49 (150 dev scenes) in 2 min; see llm_lr_mult
    scene_pool: int = 500  # stages 0b / 2: ShapesWorld train scenes rendered once, reused
    dense_scenes: int = 2000  # stage 0c: train scenes with per-pixel labels, rendered once
    text_scenes: int = 200  # stage 0a: scenes whose texts (~15 each) form the LM corpus
    lm_seq_len: int = 64  # stage 0a: tokens per packed row
    stage1: StageConfig = field(default_factory=lambda: StageConfig(  # (a) visual tokenizer
        steps=1500, lr=2e-3, batch_size=8, warmup=10, log_every=20, ckpt_every=250))
    stage1_decoder: StageConfig = field(default_factory=lambda: StageConfig(  # (b) diffusion
        steps=600, lr=2e-3, batch_size=16, warmup=10, log_every=10, ckpt_every=100))
    stage2: StageConfig = field(default_factory=lambda: StageConfig(  # adapter warm-up
        steps=150, lr=2e-3, batch_size=16, log_every=10, ckpt_every=50))
    stage3: StageConfig = field(default_factory=lambda: StageConfig(  # multimodal pretraining
        steps=1200, lr=1e-3, batch_size=16, warmup=20, log_every=10, ckpt_every=200))  # + seg
    #   lr 3e-4: a stage-3 gain that is gone after stage 4 (lab notes); 800 -> 1200 steps:
    #   "what is this?" +0.24 / +0.29 / +0.35 from three snapshots (dev); a main job with it:
    #   refseg 0.66 -> 0.72, VQA 0.63 -> 0.70 on one machine (val; lab notes, session 33)
    llm_lr_mult: float = 0.1  # stages 3 and 4 train the LLM at this x their rate (the rest at
    #   1x): at 1e-3 even a text-only LLM learns no look-up (standins.stage0_read), and
    #   stage 4 at 1x undoes stage 3's reading; 0.3: refseg 0.72 -> 0.68, VQA 0.70 -> 0.67,
    #   edits 0.28 -> 0.31, generation 0.21 -> 0.27 (one main job; lab notes, session 34)
    stage3_scenes: int = 2000  # stages 0d, 0e and 3: ShapesWorld train scenes rendered once, reused
    stage4: StageConfig = field(default_factory=lambda: StageConfig(  # region-controlled editing
        steps=560, lr=1e-3, batch_size=24, warmup=20, log_every=10, ckpt_every=100))
    #   short of updates, not of samples: at the same 13440 examples 560 x 24 beat 420 x 32
    #   and 840 x 16 (lab notes)
    stage4_rehearsal: int = 4  # stage 4: stage-3 examples per step (against forgetting)
    stage4_ablation: StageConfig = field(default_factory=lambda: StageConfig(  # mask_ablation
        steps=150, lr=1e-3, batch_size=16, warmup=10, log_every=10, ckpt_every=50))
    w_text: float = 1.0  # text cross-entropy
    w_mask_bce: float = 2.0  # mask binary cross-entropy
    w_mask_dice: float = 0.5  # mask Dice (LISA's weights); 4 lifts refseg a little and
    #   costs generation more (0.263 -> 0.187): off (lab notes)
    w_visual: float = 1.0  # visual-token cross-entropy
    grad_clip: float = 1.0  # train.fit: max gradient norm of each step; 0 = no clipping
    mixed_precision: str = "no"  # train.fit's accelerate autocast on GPUs ("bf16"); CPU: fp32


@dataclass
class FocusConfig:
    preset: str = "tiny"
    data: DataConfig = field(default_factory=DataConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    segmentation: SegmentationConfig = field(default_factory=SegmentationConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    edit: EditConfig = field(default_factory=EditConfig)

    # ----- presets -----------------------------------------------------------------------
    @classmethod
    def tiny(cls) -> FocusConfig:
        return cls()  # the dataclass defaults are the tiny preset

    @classmethod
    def small(cls) -> FocusConfig:
        return cls.from_dict({
            "preset": "small",
            "data": {"image_size": 128},
            "encoder": {"low_res": 64, "vit_patch": 8, "vit_hidden": 384, "vit_layers": 8,
                        "vit_heads": 6, "vit_mlp": 1536, "high_res": 128,
                        "convnext_depths": [2, 2, 6, 2], "convnext_dims": [64, 128, 256, 512],
                        "fusion_heads": 8, "adapter_hidden": 1024},
            "llm": {"hidden_size": 768, "num_layers": 12, "num_heads": 12, "num_kv_heads": 4,
                    "intermediate_size": 2048, "max_position": 2048, "text_vocab_size": 4096},
            "tokenizer": {"block_out_channels": [64, 128, 128], "layers_per_block": 2,
                          "num_vq_embeddings": 1024, "norm_num_groups": 32},
            "segmentation": {"dim": 256, "num_layers": 2, "num_heads": 8, "mlp_dim": 1024},
            "diffusion": {"block_out_channels": [128, 256, 256], "layers_per_block": 2,
                          "cross_attention_dim": 768, "num_inference_steps": 25,
                          "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D",
                                               "CrossAttnDownBlock2D"]},
            "train": {"mixed_precision": "bf16"},
        })

    @classmethod
    def paper(cls) -> FocusConfig:
        """Published sizes: Qwen2.5-3B, ConvNeXt-L @768, Qwen2.5-VL ViT @448, MoVQGAN-67M, SDXL."""
        return cls.from_dict({
            "preset": "paper",
            "data": {"image_size": 768},
            "encoder": {"vit_kind": "qwen2_5_vl", "low_res": 448, "vit_patch": 14,
                        "vit_hidden": 1280, "vit_layers": 32, "vit_heads": 16, "vit_mlp": 3420,
                        "high_res": 768, "convnext_depths": [3, 3, 27, 3],
                        "convnext_dims": [192, 384, 768, 1536], "fusion_heads": 16,
                        "adapter_hidden": 2048, "vit_out": 2048,
                        "vit_pretrained": "Qwen/Qwen2.5-VL-3B-Instruct",
                        "convnext_pretrained": "facebook/convnext-large-224-22k-1k",
                        "dense_heads": []},
            "llm": {"hidden_size": 2048, "num_layers": 36, "num_heads": 16, "num_kv_heads": 2,
                    "intermediate_size": 11008, "max_position": 32768,
                    "text_vocab_size": 151665, "rope_theta": 1_000_000.0,
                    "tie_word_embeddings": True, "pretrained": "Qwen/Qwen2.5-3B"},
            "tokenizer": {"block_out_channels": [128, 256, 256, 512], "layers_per_block": 2,
                          "latent_channels": 4, "num_vq_embeddings": 16384, "vq_embed_dim": 4,
                          "norm_num_groups": 32, "sem_codebook_size": 16384, "sem_dim": 256,
                          "perceptual_weight": 1.0, "adversarial_weight": 0.1,
                          "attn_at_lowest": True,
                          "pretrained": "kandinsky-community/kandinsky-2-2-decoder/movq"},
            "segmentation": {"dim": 256, "num_layers": 2, "num_heads": 8, "mlp_dim": 2048,
                             "num_region_tokens": 8, "decoder_stride": 16,
                             "region_grid": 16, "prompt_radius": 12.0},
            "diffusion": {"block_out_channels": [320, 640, 1280], "layers_per_block": 2,
                          "attention_head_dim": 64, "cross_attention_dim": 2048,
                          "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D",
                                               "CrossAttnDownBlock2D"],
                          "transformer_layers_per_block": [1, 2, 10],
                          "use_linear_projection": True, "beta_schedule": "scaled_linear",
                          "prediction_type": "epsilon",  # as SDXL was trained
                          "max_sem_tokens": 1024,
                          "num_inference_steps": 30, "guidance_scale": 5.0,
                          "pretrained": "stabilityai/stable-diffusion-xl-base-1.0/unet"},
            "train": {"mixed_precision": "bf16"},
        })

    @classmethod
    def from_preset(cls, name: str) -> FocusConfig:
        presets = {"tiny": cls.tiny, "small": cls.small, "paper": cls.paper}
        if name not in presets:
            raise ValueError(f"unknown preset {name!r}: choose one of {sorted(presets)}")
        return presets[name]()

    # ----- (de)serialisation ---------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FocusConfig:
        return _build(cls, d, path="FocusConfig")

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_json(cls, path: str | Path) -> FocusConfig:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} not found: pass the checkpoint "
                                    "directory that holds config.json")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"config file {path} is not valid JSON ({e}); re-save it with "
                             "FocusConfig.to_json") from None
        return cls.from_dict(d)


def _build(kind: type, d: Any, path: str) -> Any:
    """Build dataclass `kind` from a (possibly partial) dict; unknown keys are an error."""
    if not isinstance(d, dict):
        raise TypeError(f"{path} must be a mapping of settings, got {type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(kind)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ValueError(f"unknown config key(s) {unknown} in {path}; valid keys are "
                         f"{sorted(fields)}")
    obj = kind()
    for name, value in d.items():
        default = getattr(obj, name)
        if dataclasses.is_dataclass(default):
            value = _build(type(default), value, f"{path}.{name}")
        elif isinstance(default, tuple):
            value = tuple(value)
        elif isinstance(default, bool) and not isinstance(value, bool):
            raise TypeError(f"{path}.{name} must be true/false, got {value!r}")
        elif isinstance(default, int) and not isinstance(default, bool):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{path}.{name} must be an int, got {value!r}")
        elif isinstance(default, float) and isinstance(value, (int, float)):
            value = float(value)
        setattr(obj, name, value)
    return obj
