"""Open vocabulary in Detectron2: a zero-shot box predictor and a vocabulary swap at inference."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Union

from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.modeling import ROI_HEADS_REGISTRY, StandardROIHeads
from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers
from torch import nn

from ...detection.open_vocab import ZeroShotClassifier, backbone_clip_spec, swap_vocabulary


def clip_spec(cfg) -> Any:
    """``MODEL.ALPHACLIP.CLIP`` as a ``resolve_model`` spec, ``"backbone"`` resolved from ``ARCH`` and the
    ``CLIP_CHECKPOINT`` / ``CLIP_TEXT_CHECKPOINT`` keys."""
    a = cfg.MODEL.ALPHACLIP
    if a.CLIP != "backbone":
        return a.CLIP
    return backbone_clip_spec(a.ARCH, a.CLIP_CHECKPOINT or None, a.CLIP_TEXT_CHECKPOINT or None)


class ZeroShotFastRCNNOutputLayers(FastRCNNOutputLayers):
    """``FastRCNNOutputLayers`` whose ``cls_score`` is the core :class:`ZeroShotClassifier`.

    Use class-agnostic box regression so the vocabulary can change at inference.

    Args:
        zero_shot: keyword arguments of ``ZeroShotClassifier`` other than the feature sizes
            (``text_embeddings``, ``class_names``, ``clip``, ``templates``, ``logit_scale``).
        **kwargs: as ``FastRCNNOutputLayers``.
    """

    @configurable
    def __init__(self, input_shape, *, zero_shot: Dict[str, Any], **kwargs: Any):
        super().__init__(input_shape, **kwargs)
        self.cls_score = ZeroShotClassifier(self.cls_score.in_features, self.cls_score.out_features, **zero_shot)

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        a = cfg.MODEL.ALPHACLIP
        ret["zero_shot"] = dict(text_embeddings=a.TEXT_EMBEDDINGS, class_names=list(a.CLASS_NAMES) or None,
                                clip=clip_spec(cfg), templates=a.TEMPLATES)
        return ret


@ROI_HEADS_REGISTRY.register()
class OpenVocabROIHeads(StandardROIHeads):
    """``StandardROIHeads`` with the zero-shot box predictor (``MODEL.ROI_HEADS.NAME: OpenVocabROIHeads``)."""

    @classmethod
    def _init_box_head(cls, cfg, input_shape):
        ret = super()._init_box_head(cfg, input_shape)
        ret["box_predictor"] = ZeroShotFastRCNNOutputLayers(cfg, ret["box_head"].output_shape)
        return ret


def set_vocabulary(
    model: nn.Module, text_embeddings: Union[str, Path], novel_classes: Sequence[str] = (),
    dataset: Optional[str] = None,
) -> str:
    """Swap a built detector's vocabulary in place: everything that names or counts its classes.

    The zero-shot classifier, ``num_classes`` and the re-scorer take the new classes, and so does the
    ``MetadataCatalog`` entry ``dataset`` (``thing_classes``; colours and the dataset-id map of the old
    classes are dropped). The entry is updated in place, so a ``DefaultPredictor`` or ``Visualizer``
    holding it sees the new names. ``dataset=None`` registers ``alphaclip_vocab_<file stem>``.

    Args:
        text_embeddings: a file written by ``alphaclip vocab`` / ``save_text_embeddings``.
        novel_classes: names among them the detector never trained on.
        dataset: the ``MetadataCatalog`` name to update (e.g. ``cfg.DATASETS.TEST[0]``).

    Returns:
        The name of the ``MetadataCatalog`` entry that holds the new classes.
    """
    labels = swap_vocabulary(model, text_embeddings, novel_classes, heads=lambda m: isinstance(
        getattr(m, "cls_score", None), ZeroShotClassifier) or isinstance(m, StandardROIHeads))
    name = dataset or f"alphaclip_vocab_{Path(text_embeddings).stem}"
    fields = vars(MetadataCatalog.get(name))  # Metadata refuses to change a set field; its dict does not
    for stale in ("thing_colors", "thing_dataset_id_to_contiguous_id"):
        fields.pop(stale, None)
    fields["thing_classes"] = list(labels)
    return name
