"""Open-vocabulary detection pieces shared by the MMDetection and Detectron2 adapters, framework-free.

``inputs``: the alpha plane of a detection sample (whole image, union of its boxes or masks, or a
prompt) and the 0-255 RGBA statistics detection pipelines normalise with. ``open_vocab``: the zero-shot
box classifier, Alpha-CLIP re-scoring of detections and the vocabulary swap. The adapters in
``alphaclip_plugins.integrations.{mmdet,detectron2}`` only translate their frameworks' structures.
"""
