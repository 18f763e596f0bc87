# Faster R-CNN with an Alpha-CLIP ViT-B/16 backbone and a simple feature pyramid (ViTDet style).
# The swap from a ResNet config is the custom import plus the preprocessor, backbone and neck below.
_base_ = 'mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py'
custom_imports = dict(imports=['alphaclip_plugins.integrations.mmdet'], allow_failed_imports=False)

model = dict(
    # RGB normalised with CLIP's mean/std, alpha with 0.5/0.26; 3-channel batches mean "whole image".
    data_preprocessor=dict(_delete_=True, type='AlphaDetDataPreprocessor', bgr_to_rgb=True, pad_size_divisor=32),
    backbone=dict(
        _delete_=True, type='AlphaCLIPViT', arch='ViT-B/16', out_indices=(-1, ), with_cp=False,
        # Any layout the core loader reads: official Alpha-CLIP .pth, OpenAI .pt, open_clip, HF, timm.
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/clip_b16_grit1m_fultune_8xe.pth')),
    neck=dict(_delete_=True, type='SimpleFeaturePyramid', in_channels=768, out_channels=256, num_outs=5),
)

# The alpha channel is added after photometric transforms and before the geometric ones. Pad in the
# pipeline with AlphaPad (alpha padded as background), not mmdet's Pad; the preprocessor pads the batch.
train_pipeline = [
    dict(type='LoadImageFromFile', backend_args=None),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='AddAlphaChannel', source='whole'),
    dict(type='Resize', scale=(1024, 1024), keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile', backend_args=None),
    dict(type='AddAlphaChannel', source='whole'),
    dict(type='Resize', scale=(1024, 1024), keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
train_dataloader = dict(dataset=dict(pipeline=train_pipeline))
val_dataloader = dict(dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader

optim_wrapper = dict(
    _delete_=True, type='OptimWrapper', optimizer=dict(type='AdamW', lr=1e-4, weight_decay=0.1),
    paramwise_cfg=dict(custom_keys={'backbone': dict(lr_mult=0.1)}))
