# Mask R-CNN, ViTDet recipe, with an Alpha-CLIP ViT-B/16 backbone: windowed attention with four global
# blocks, a simple feature pyramid, large-scale jitter at 1024 px, AdamW with layer-wise lr decay 0.7 and
# no weight decay on norms, biases, class and positional embeddings. 100 epochs of COCO at batch 64.
#     python mmdet/.mim/tools/train.py configs/mmdet/mask-rcnn_alphaclip-vit-b16_vitdet-lsj-100e_coco.py
_base_ = [
    'mmdet::_base_/models/mask-rcnn_r50_fpn.py',
    'mmdet::common/lsj-100e_coco-instance.py',
]
custom_imports = dict(imports=['alphaclip_plugins.integrations.mmdet'], allow_failed_imports=False)

image_size = (1024, 1024)
num_layers = 12  # blocks of the tower: layer-wise lr decay counts them
model = dict(
    # RGB with CLIP's mean/std, alpha with 0.5/0.26; every image padded to 1024 x 1024, as in ViTDet
    # (the preprocessor pads alpha as background, BatchFixedSizePad's padding included).
    data_preprocessor=dict(
        _delete_=True, type='AlphaDetDataPreprocessor', bgr_to_rgb=True, pad_size_divisor=32, pad_mask=True,
        batch_augments=[dict(type='BatchFixedSizePad', size=image_size, pad_mask=True)]),
    backbone=dict(
        _delete_=True, type='AlphaCLIPViT', arch='ViT-B/16', out_indices=(-1, ), with_cp=True,
        # ViTDet: 14 x 14 windows (the 64 x 64 grid is padded to 70 x 70, padding masked) and global
        # attention in blocks 2, 5, 8, 11. out_stride 16 holds for patch-14 towers too (ViT-L/14).
        window_size=14, global_blocks=(2, 5, 8, 11), out_stride=16,
        # Any layout the core loader reads: official Alpha-CLIP .pth, OpenAI .pt, open_clip, HF, timm.
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/clip_b16_grit1m_fultune_8xe.pth')),
    neck=dict(_delete_=True, type='SimpleFeaturePyramid', in_channels=768, out_channels=256, num_outs=5,
              in_stride=16),  # strides 4..64 checked against the backbone's out_stride
    rpn_head=dict(num_convs=2),  # ViTDet's two-conv RPN head
)

# Large-scale jitter; the alpha channel is added before the geometric transforms so that they move it too.
train_pipeline = [
    dict(type='LoadImageFromFile', backend_args=None),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='AddAlphaChannel', source='whole'),
    dict(type='RandomResize', scale=image_size, ratio_range=(0.1, 2.0), keep_ratio=True),
    dict(type='RandomCrop', crop_type='absolute_range', crop_size=image_size, recompute_bbox=True,
         allow_negative_crop=True),
    dict(type='FilterAnnotations', min_gt_bbox_wh=(1e-2, 1e-2)),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile', backend_args=None),
    dict(type='AddAlphaChannel', source='whole'),
    dict(type='Resize', scale=image_size, keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
train_dataloader = dict(batch_size=4, num_workers=8, dataset=dict(dataset=dict(pipeline=train_pipeline)))
val_dataloader = dict(dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader

# AdamW + layer-wise lr decay (ViTDet: 0.7 for B); the constructor reads num_layers and the tower's
# no_weight_decay() names; norms and biases get no weight decay either.
optim_wrapper = dict(
    _delete_=True, type='AmpOptimWrapper', constructor='AlphaCLIPLayerDecayOptimizerConstructor',
    paramwise_cfg=dict(decay_rate=0.7, decay_type='layer_wise', num_layers=num_layers),
    optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.1))

# 100 epochs at batch 64 = 184375 iterations; warmup 250 iterations, steps at 88.9% and 96.3%.
max_iters = 184375
interval = 5000
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=250),
    dict(type='MultiStepLR', begin=0, end=max_iters, by_epoch=False, milestones=[163889, 177546], gamma=0.1),
]
train_cfg = dict(_delete_=True, type='IterBasedTrainLoop', max_iters=max_iters, val_interval=interval)
default_hooks = dict(logger=dict(type='LoggerHook', interval=50, log_metric_by_epoch=False),
                     checkpoint=dict(by_epoch=False, interval=interval, max_keep_ckpts=5))
log_processor = dict(by_epoch=False)
auto_scale_lr = dict(base_batch_size=64)
