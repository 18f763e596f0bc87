"""MMDetection 3.x: Alpha-CLIP backbone, feature pyramid, 4-channel data pipeline and open vocabulary.

Use from a config with::

    custom_imports = dict(imports=["alphaclip_plugins.integrations.mmdet"], allow_failed_imports=False)
"""
from .. import require

require("mmdet", "mmdet", "pip install 'alphaclip-plugins[mmdet]' (mmcv 2.1 with ops: scripts/build_mmcv.sh)")

from .safe_globals import register_mmengine_safe_globals  # noqa: E402

register_mmengine_safe_globals()  # mmengine checkpoints load under torch >= 2.6's weights_only default

from .backbone import AlphaCLIPViT  # noqa: E402
from .data import AddAlphaChannel, AlphaCocoDataset, AlphaDetDataPreprocessor, AlphaPad  # noqa: E402
from .neck import SimpleFeaturePyramid  # noqa: E402
from .optimizer import AlphaCLIPLayerDecayOptimizerConstructor  # noqa: E402
from .open_vocab import AlphaCLIPRegionScorer, OpenVocabTwoStageDetector, ZeroShotClassifier, set_vocabulary  # noqa: E402,E501

__all__ = [
    "AlphaCLIPViT", "AddAlphaChannel", "AlphaCocoDataset", "AlphaDetDataPreprocessor", "AlphaPad",
    "SimpleFeaturePyramid",
    "AlphaCLIPRegionScorer", "OpenVocabTwoStageDetector", "ZeroShotClassifier", "set_vocabulary",
    "AlphaCLIPLayerDecayOptimizerConstructor", "register_mmengine_safe_globals",
]
