"""Mask R-CNN, ViTDet style, with an Alpha-CLIP ViT-B/16 backbone (LazyConfig).

    from detectron2.config import LazyConfig, instantiate
    cfg = LazyConfig.load("configs/detectron2/mask_rcnn_alphaclip_vit_b16_sfp_lazy.py")
    model = instantiate(cfg.model)
"""
from detectron2.config import LazyCall as L
from detectron2.model_zoo import get_config
from detectron2.modeling import SimpleFeaturePyramid
from detectron2.modeling.backbone.fpn import LastLevelMaxPool

from alphaclip_plugins.integrations.detectron2 import AlphaCLIPViTBackbone, AlphaGeneralizedRCNN
from alphaclip_plugins.integrations.detectron2.backbone import PIXEL_MEAN, PIXEL_STD

model = get_config("common/models/mask_rcnn_vitdet.py").model
model._target_ = AlphaGeneralizedRCNN
model.pixel_mean, model.pixel_std, model.input_format = PIXEL_MEAN, PIXEL_STD, "RGB"
model.backbone = L(SimpleFeaturePyramid)(
    net=L(AlphaCLIPViTBackbone)(arch="ViT-B/16", out_feature="last_feat", with_cp=True),
    in_feature="last_feat",
    out_channels=256,
    scale_factors=(4.0, 2.0, 1.0, 0.5),
    top_block=L(LastLevelMaxPool)(),
    norm="LN",
    square_pad=1024,
)
