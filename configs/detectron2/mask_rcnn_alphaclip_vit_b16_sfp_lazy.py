"""Mask R-CNN with an Alpha-CLIP ViT-B/16 backbone attending globally in every block, in a simple feature
pyramid (LazyConfig, projects/ViTDet style).

Everything but the attention is the ViTDet recipe of ``mask_rcnn_alphaclip_vit_b16_vitdet_lsj_100ep.py``,
imported from it: large-scale jitter at 1024 px through ``AlphaDatasetMapper``, AdamW with layer-wise lr
decay 0.7 and no weight decay on norms, biases, class and positional embeddings, the 100-epoch schedule and
its ``lr_multiplier``; the pyramid levels follow the backbone's ``out_stride``.

    python tools/lazyconfig_train_net.py --config-file configs/detectron2/mask_rcnn_alphaclip_vit_b16_sfp_lazy.py
"""
from .mask_rcnn_alphaclip_vit_b16_vitdet_lsj_100ep import (  # noqa: F401
    dataloader, lr_multiplier, model, optimizer, train,
)

model.backbone.net.update(window_size=0, global_blocks=())  # global attention (the pre-ViTDet SFP backbone)
