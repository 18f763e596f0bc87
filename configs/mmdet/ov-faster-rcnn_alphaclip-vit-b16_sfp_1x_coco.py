# Open-vocabulary Faster R-CNN (F-VLM recipe): a frozen Alpha-CLIP backbone, a bbox head whose classifier
# is Alpha-CLIP text embeddings of the class names, and Alpha-CLIP re-scoring of every detection with its
# box as alpha, fused with the detector's score (geometric mean; novel classes lean on Alpha-CLIP).
# Swap the vocabulary at inference with alphaclip_plugins.integrations.mmdet.set_vocabulary(model, file).
_base_ = './faster-rcnn_alphaclip-vit-b16_sfp_1x_coco.py'

classes = ('person', 'bicycle', 'car', 'motorcycle', 'airplane', 'bus', 'train', 'truck', 'boat', 'dog', 'cat')
novel_classes = ('bus', 'cat')  # held out of training annotations; scored mainly by Alpha-CLIP
# The CLIP whose text tower embeds the class names (once: the file is written at the first build and the
# embeddings are saved in every checkpoint; `alphaclip vocab classes.txt -o FILE` writes one too).
clip = dict(name='ViT-B/16', pretrained='checkpoints/ViT-B-16.pt',
            alpha_checkpoint='checkpoints/clip_b16_grit1m_fultune_8xe.pth')

model = dict(
    type='OpenVocabTwoStageDetector',
    backbone=dict(frozen=True),
    roi_head=dict(
        bbox_head=dict(
            num_classes=len(classes),
            reg_class_agnostic=True,
            cls_predictor_cfg=dict(
                type='ZeroShotClassifier', text_embeddings='work_dirs/text_embeddings_ov.safetensors',
                class_names=classes, clip=clip, templates='ovseg'))),
    # The re-scorer is the backbone's own Alpha-CLIP (its arch and init checkpoint, a vision tower, plus the
    # text tower of `text_checkpoint`), frozen and outside DDP and checkpoints. The head's best `topk`
    # detections are re-scored; test_cfg.rcnn's score_thr and max_per_img then apply to the fused scores.
    region_scorer=dict(type='AlphaCLIPRegionScorer', labels=classes, clip='backbone',
                       text_checkpoint='checkpoints/ViT-B-16.pt', novel_classes=novel_classes,
                       alpha_base=0.35, beta_novel=0.65, topk=100),
)

# The datasets (hence CocoMetric's category ids and the checkpoint's dataset_meta) name the head's classes,
# in its label order; CocoDataset's default is COCO's 80 classes, whose 10th is not 'dog'. Train on the base
# classes only: AlphaCocoDataset drops the annotations of `novel_classes` (labels keep their index among
# `classes`); the test set keeps every class. It also delivers images[i]['alpha_prompt'] of the COCO JSON to
# AddAlphaChannel(source='prompt').
metainfo = dict(classes=classes)
train_dataloader = dict(dataset=dict(type='AlphaCocoDataset', metainfo=metainfo, novel_classes=novel_classes))
val_dataloader = dict(dataset=dict(type='AlphaCocoDataset', metainfo=metainfo))
test_dataloader = val_dataloader
