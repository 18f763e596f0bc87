"""Open-vocabulary detection pieces shared by the MMDetection and Detectron2 adapters, framework-free.

``inputs``: the alpha plane of a detection sample (whole image, union of its boxes or masks, or a
prompt) and the 0-255 RGBA statistics detection pipelines normalise with. ``open_vocab``: the zero-shot
box classifier, the re-scorer's CLIP and the vocabulary swap. ``rescore``: Alpha-CLIP re-scoring of
detections (top-k, regions batched across images, fusion, sort, threshold, cut). The adapters in
``alphaclip_plugins.integrations.{mmdet,detectron2}`` only translate their frameworks' structures.
"""
