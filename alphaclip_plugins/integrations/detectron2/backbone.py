"""``AlphaCLIPViTBackbone``: the core vision tower as a Detectron2 backbone, and its yacs config."""
from __future__ import annotations

import math
from typing import Any, Dict, List, Sequence

import torch
from detectron2.config import CfgNode as CN
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone, SimpleFeaturePyramid
from detectron2.modeling.backbone.fpn import LastLevelMaxPool

from ...core.vision import feature_tower
from ...detection.features import default_stride, dense_features
from ...detection.inputs import RGBA_MEAN_255, RGBA_STD_255

#: MODEL.PIXEL_MEAN / PIXEL_STD for INPUT.FORMAT "RGB" plus alpha, on the 0-255 scale.
PIXEL_MEAN, PIXEL_STD = list(RGBA_MEAN_255), list(RGBA_STD_255)


class AlphaCLIPViTBackbone(Backbone):
    """Alpha-CLIP ViT producing one feature map ``{out_feature: [B, width, H/s, W/s]}``.

    Input is ``[B, 4, H, W]`` (RGB + normalised alpha) or ``[B, 3, H, W]`` (whole image); any size that
    is a multiple of the stride ``s`` works (the positional embedding is resampled). ``s`` is the patch
    size for patch 8/16/32 and 16 for patch-14 towers (:mod:`alphaclip_plugins.detection.features`), so
    detectron2's ``SimpleFeaturePyramid`` gets power-of-two strides for any patch size.

    Args:
        arch: core architecture name (``"ViT-B/16"``, ``"ViT-L/14"``, ``"tiny"``...).
        out_feature: name of the output map.
        block: index of the block whose output is returned (-1: the last).
        frozen: freeze the whole tower and keep it in eval mode.
        frozen_stages: -1 none; 0 the stem; k the stem and the first k blocks.
        with_cp: gradient checkpointing of the blocks.
        window_size: > 0: attention in windows of that many patches a side, except in ``global_blocks``
            (ViTDet: 14 and ``(2, 5, 8, 11)``); 0 = global attention in every block.
        global_blocks: blocks that keep global attention when ``window_size`` > 0.
        out_stride: stride of the output; 0 = automatic (see above).
        **overrides: vision config fields, e.g. ``image_size=336``.
    """

    def __init__(self, arch: str = "ViT-B/16", out_feature: str = "last_feat", block: int = -1, frozen: bool = False,
                 frozen_stages: int = -1, with_cp: bool = False, window_size: int = 0,
                 global_blocks: Sequence[int] = (), out_stride: int = 0, **overrides: Any):
        super().__init__()
        self.visual = feature_tower(arch, frozen, frozen_stages, with_cp, window_size=window_size,
                                    global_blocks=global_blocks, **overrides)
        cfg = self.visual.cfg
        self.block = block % cfg.layers
        self.out_stride = default_stride(cfg.patch_size, out_stride)
        self._out_features = [out_feature]
        self._out_feature_channels = {out_feature: cfg.width}
        self._out_feature_strides = {out_feature: self.out_stride}

    @property
    def size_divisibility(self) -> int:
        return self.out_stride

    @property
    def padding_constraints(self) -> Dict[str, int]:
        return {"size_divisibility": self.out_stride}

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        (feat,) = dense_features(self.visual, x, [self.block], out_stride=self.out_stride)
        return {self._out_features[0]: feat}


def pyramid_levels(stride: int = 16, scale_factors: Sequence[float] = (4.0, 2.0, 1.0, 0.5),
                   top_levels: int = 1) -> List[str]:
    """Names of ``SimpleFeaturePyramid``'s levels over a map of ``stride`` (the backbone's ``out_stride``):
    ``["p2", ..., "p6"]`` for 16; the ``top_levels`` max-pooled levels come last. For RPN/RoI ``in_features``.

    Raises:
        ValueError: a level whose stride is not a power of two.
    """
    strides = [stride / float(s) for s in scale_factors]
    if any(s != int(s) or int(s) < 1 or int(s) & (int(s) - 1) for s in strides):
        raise ValueError(f"a stride-{stride} map with scale factors {tuple(scale_factors)} gives strides {strides}; "
                         f"they must be powers of two (set the backbone's out_stride explicitly, e.g. 16)")
    first = [int(math.log2(s)) for s in strides]
    return [f"p{k}" for k in first] + [f"p{first[-1] + i + 1}" for i in range(top_levels)]


def pooler_scales(stride: int = 16, scale_factors: Sequence[float] = (4.0, 2.0, 1.0, 0.5)) -> List[float]:
    """RoI pooler ``scales`` of the pyramid levels over a map of ``stride``: ``1 / level stride`` each."""
    return [1.0 / 2 ** int(name[1:]) for name in pyramid_levels(stride, scale_factors, top_levels=0)]


def coarsest_max_pool(levels: Sequence[str]) -> LastLevelMaxPool:
    """detectron2's ``LastLevelMaxPool`` reading the coarsest of ``levels`` (it assumes ``"p5"``)."""
    top = LastLevelMaxPool()
    top.in_feature = levels[-1]
    return top


def add_alphaclip_config(cfg: CN) -> CN:
    """Add the ``MODEL.ALPHACLIP`` and ``INPUT.ALPHA_SOURCE`` keys (with defaults) to a yacs config."""
    cfg.MODEL.ALPHACLIP = CN()
    a = cfg.MODEL.ALPHACLIP
    a.ARCH = "ViT-B/16"  # core architecture name
    a.IMAGE_SIZE = 0  # 0 = the architecture's; positions are resampled to any input size anyway
    a.OUT_FEATURE = "last_feat"
    a.FROZEN = False  # freeze the whole tower (F-VLM style)
    a.FROZEN_STAGES = -1  # -1 none, 0 stem, k stem + first k blocks
    a.WITH_CP = False  # gradient checkpointing
    a.WINDOW_SIZE = 0  # > 0: windowed attention (ViTDet: 14) outside GLOBAL_BLOCKS
    a.GLOBAL_BLOCKS = []  # blocks with global attention when WINDOW_SIZE > 0 (ViTDet B: [2, 5, 8, 11])
    a.OUT_STRIDE = 0  # 0: the patch size if a power of two, else 16 (patch-14 towers)
    a.SFP_OUT_CHANNELS = 256  # simple feature pyramid
    a.SFP_SCALE_FACTORS = [4.0, 2.0, 1.0, 0.5]
    a.SFP_NORM = "LN"
    a.SQUARE_PAD = 0  # > 0: pad inputs to this square size (ViTDet large-scale jitter)
    # Open vocabulary
    a.TEXT_EMBEDDINGS = ""  # file from save_text_embeddings; computed from CLASS_NAMES with CLIP if missing
    a.CLASS_NAMES = []
    # The CLIP of the text embeddings and the re-scorer: "backbone" (ARCH with CLIP_CHECKPOINT, plus the text
    # tower of CLIP_TEXT_CHECKPOINT when that is a vision tower only), "default" (the embedded demo model),
    # a save_pretrained directory or a checkpoint.
    a.CLIP = "backbone"
    a.CLIP_CHECKPOINT = ""  # "backbone": the tower's weights, any layout (e.g. clip_b16_grit1m_fultune_8xe.pth)
    a.CLIP_TEXT_CHECKPOINT = ""  # "backbone": the matching CLIP (e.g. ViT-B-16.pt) for the text tower
    a.TEMPLATES = "ovseg"
    a.RESCORE = False  # re-score detections with Alpha-CLIP (box as alpha)
    a.NOVEL_CLASSES = []
    a.ALPHA_BASE = 0.35  # weight of Alpha-CLIP in the geometric mean, base classes
    a.BETA_NOVEL = 0.65  # the same, novel classes
    a.RESCORE_MODE = "alpha"  # "alpha": whole image, box as alpha; "crop": the box cropped (plain CLIP way)
    a.RESCORE_TOPK = 100  # detections per image re-scored; ROI_HEADS.SCORE_THRESH_TEST / TEST.DETECTIONS_PER_IMAGE
    #                       then apply to the fused scores
    cfg.INPUT.ALPHA_SOURCE = "whole"  # "whole", "gt_boxes", "gt_masks" or "prompt" (dataset_dict["alpha_prompt"])
    cfg.INPUT.ALPHA_FALLBACK = "error"  # "prompt" on a dict without one: "error", or "whole" (the whole image)
    cfg.SOLVER.OPTIMIZER = "SGD"  # AlphaCLIPTrainer: "SGD" (detectron2's) or "ADAMW" (no decay on the tower's embeddings)
    return cfg


def _vit_from_cfg(cfg: CN) -> AlphaCLIPViTBackbone:
    a = cfg.MODEL.ALPHACLIP
    extra = {"image_size": a.IMAGE_SIZE} if a.IMAGE_SIZE else {}
    return AlphaCLIPViTBackbone(a.ARCH, a.OUT_FEATURE, frozen=a.FROZEN, frozen_stages=a.FROZEN_STAGES,
                                with_cp=a.WITH_CP, window_size=a.WINDOW_SIZE, global_blocks=tuple(a.GLOBAL_BLOCKS),
                                out_stride=a.OUT_STRIDE, **extra)


@BACKBONE_REGISTRY.register()
def build_alphaclip_vit_backbone(cfg: CN, input_shape: ShapeSpec) -> Backbone:
    """The single-scale tower (``MODEL.BACKBONE.NAME: build_alphaclip_vit_backbone``)."""
    return _vit_from_cfg(cfg)


@BACKBONE_REGISTRY.register()
def build_alphaclip_vit_sfp_backbone(cfg: CN, input_shape: ShapeSpec) -> Backbone:
    """The tower inside detectron2's ``SimpleFeaturePyramid``: outputs ``p2``..``p6`` for FPN-style heads
    (stride-16 maps, patch 16 or 14), ``p1``..``p5`` for a patch-8 tower.

    Raises:
        ValueError: ``MODEL.RPN.IN_FEATURES`` / ``MODEL.ROI_HEADS.IN_FEATURES`` name levels the pyramid lacks.
    """
    a = cfg.MODEL.ALPHACLIP
    net = _vit_from_cfg(cfg)
    levels = pyramid_levels(net.out_stride, a.SFP_SCALE_FACTORS)
    wanted = list(cfg.MODEL.RPN.IN_FEATURES) + list(cfg.MODEL.ROI_HEADS.IN_FEATURES)
    if set(wanted) - set(levels):
        raise ValueError(f"MODEL.RPN.IN_FEATURES / MODEL.ROI_HEADS.IN_FEATURES name {sorted(set(wanted) - set(levels))}, "
                         f"but the pyramid of {a.ARCH} (stride {net.out_stride}) has {levels}; use {levels} and "
                         f"{levels[:-1]}")
    # The max-pooled extra level follows the coarsest pyramid level ("p5" for stride 16).
    top = coarsest_max_pool(levels[:-1])
    return SimpleFeaturePyramid(
        net=net, in_feature=a.OUT_FEATURE, out_channels=a.SFP_OUT_CHANNELS, scale_factors=tuple(a.SFP_SCALE_FACTORS),
        top_block=top, norm=a.SFP_NORM, square_pad=a.SQUARE_PAD,
    )
