"""Mask R-CNN, ViTDet recipe (projects/ViTDet), with an Alpha-CLIP ViT-B/16 backbone (LazyConfig).

Windowed attention (14 x 14, global blocks 2, 5, 8, 11), a simple feature pyramid over a stride-16 map
(for patch-14 towers too), large-scale jitter at 1024 px, AdamW with layer-wise lr decay 0.7 and no weight
decay on norms, biases, class and positional embeddings; 100 epochs of COCO at batch 64. The pyramid
levels of the RPN and RoI heads and the pooler scales follow the backbone's ``out_stride``.

    from detectron2.config import LazyConfig, instantiate
    cfg = LazyConfig.load("configs/detectron2/mask_rcnn_alphaclip_vit_b16_vitdet_lsj_100ep.py")
    model = instantiate(cfg.model)    # then train as detectron2's tools/lazyconfig_train_net.py does
"""
from functools import partial

import detectron2.data.transforms as T
from detectron2.config import LazyCall as L
from detectron2.data import build_detection_test_loader, build_detection_train_loader, get_detection_dataset_dicts
from detectron2.evaluation import COCOEvaluator
from detectron2.model_zoo import get_config
from detectron2.modeling import SimpleFeaturePyramid
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import MultiStepParamScheduler
from omegaconf import OmegaConf

from alphaclip_plugins.integrations.detectron2 import (
    AlphaCLIPViTBackbone, AlphaDatasetMapper, AlphaGeneralizedRCNN, get_alphaclip_vit_lr_decay_rate,
    no_weight_decay_overrides,
)
from alphaclip_plugins.integrations.detectron2.backbone import (
    PIXEL_MEAN, PIXEL_STD, coarsest_max_pool, pooler_scales, pyramid_levels,
)

image_size = 1024
num_layers = 12  # blocks of the tower: layer-wise lr decay counts them

# --- model ---------------------------------------------------------------------------------------------
model = get_config("common/models/mask_rcnn_vitdet.py").model
model._target_ = AlphaGeneralizedRCNN
model.pixel_mean, model.pixel_std, model.input_format = PIXEL_MEAN, PIXEL_STD, "RGB"
STRIDE, SCALES = "${model.backbone.net.out_stride}", "${model.backbone.scale_factors}"
model.backbone = L(SimpleFeaturePyramid)(
    net=L(AlphaCLIPViTBackbone)(
        arch="ViT-B/16", out_feature="last_feat", with_cp=True,
        window_size=14, global_blocks=(2, 5, 8, 11), out_stride=16,
    ),
    in_feature="${.net.out_feature}",
    out_channels=256,
    scale_factors=(4.0, 2.0, 1.0, 0.5),
    top_block=L(coarsest_max_pool)(levels=L(pyramid_levels)(stride=STRIDE, scale_factors=SCALES, top_levels=0)),
    norm="LN",
    square_pad=image_size,
)
model.proposal_generator.in_features = L(pyramid_levels)(stride=STRIDE, scale_factors=SCALES)
model.roi_heads.box_in_features = L(pyramid_levels)(stride=STRIDE, scale_factors=SCALES, top_levels=0)
model.roi_heads.mask_in_features = "${.box_in_features}"
model.roi_heads.box_pooler.scales = L(pooler_scales)(stride=STRIDE, scale_factors=SCALES)
model.roi_heads.mask_pooler.scales = "${..box_pooler.scales}"

# --- data: large-scale jitter; AlphaDatasetMapper moves the alpha plane with the image -------------------
dataloader = OmegaConf.create()
dataloader.train = L(build_detection_train_loader)(
    dataset=L(get_detection_dataset_dicts)(names="coco_2017_train"),
    mapper=L(AlphaDatasetMapper)(
        is_train=True,
        augmentations=[
            L(T.RandomFlip)(horizontal=True),
            L(T.ResizeScale)(min_scale=0.1, max_scale=2.0, target_height=image_size, target_width=image_size),
            L(T.FixedSizeCrop)(crop_size=(image_size, image_size), pad=False),
        ],
        image_format="RGB",
        use_instance_mask=True,
        recompute_boxes=True,  # boxes from the cropped masks
        alpha_source="whole",
    ),
    total_batch_size=64,
    num_workers=4,
)
dataloader.test = L(build_detection_test_loader)(
    dataset=L(get_detection_dataset_dicts)(names="coco_2017_val", filter_empty=False),
    mapper=L(AlphaDatasetMapper)(
        is_train=False,
        augmentations=[L(T.ResizeShortestEdge)(short_edge_length=image_size, max_size=image_size)],
        image_format="RGB",
        alpha_source="whole",
    ),
    num_workers=4,
)
dataloader.evaluator = L(COCOEvaluator)(dataset_name="${..test.dataset.names}")

# --- optimizer: AdamW, layer-wise lr decay, no weight decay on norms, biases and embeddings --------------
optimizer = get_config("common/optim.py").AdamW  # weight_decay_norm=0 already
optimizer.params.lr_factor_func = partial(get_alphaclip_vit_lr_decay_rate, lr_decay_rate=0.7, num_layers=num_layers)
optimizer.params.weight_decay_bias = 0.0
optimizer.params.overrides = no_weight_decay_overrides()

# --- schedule: 100 epochs = 184375 iterations at batch 64 -----------------------------------------------
train = get_config("common/train.py").train
train.amp.enabled = True
train.ddp.fp16_compression = True
# No device ids: DDP then wraps the model where it is, a CUDA model as with [local rank] (detectron2 passes
# that by default), and a CPU one (train.device="cpu", gloo), for which DDP refuses device ids.
train.ddp.device_ids = None
# Any layout the core reader takes (official Alpha-CLIP .pth, OpenAI .pt, open_clip, HF, timm), through
# AlphaCLIPCheckpointer.
train.init_checkpoint = "checkpoints/clip_b16_grit1m_fultune_8xe.pth"
train.max_iter = 184375
lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(
        values=[1.0, 0.1, 0.01], milestones=[163889, 177546], num_updates=train.max_iter,
    ),
    warmup_length=250 / train.max_iter,
    warmup_factor=0.001,
)
