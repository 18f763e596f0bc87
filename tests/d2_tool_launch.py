"""Run one of detectron2's own tools (``tools/train_net.py``, ``tools/lazyconfig_train_net.py``) in tests.

What a user's copy of ``train_net.py`` adds, done here around the unchanged script: this package's config
keys in ``get_cfg()`` (``add_alphaclip_config``, as detectron2 projects do) and the tiny synthetic COCO set
registered as ``$ALPHACLIP_TEST_COCO`` (``name,instances.json,image_dir``).
Usage: ``python tests/d2_tool_launch.py SCRIPT ARGS...``.
"""
import os
import runpy
import sys

import detectron2.config
from detectron2.data.datasets import register_coco_instances

from alphaclip_plugins.integrations.detectron2 import add_alphaclip_config

_get_cfg = detectron2.config.get_cfg
detectron2.config.get_cfg = lambda: add_alphaclip_config(_get_cfg())

if __name__ == "__main__":
    name, json_file, image_root = os.environ["ALPHACLIP_TEST_COCO"].split(",")
    register_coco_instances(name, {}, json_file, image_root)
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
