"""The embedded demo model: a tiny Alpha-CLIP trained on synthetic shapes, shipped with the package.

It knows the colours x shapes of :mod:`.synthetic` ("red circle", "blue square", ...) and needs no
download: ``alphaclip classify`` uses it when no weights are given. It was trained from random weights
with ``alphaclip train configs/train/tiny_shapes.yaml`` (both towers, since the text tower must learn
the shape words); its input size is 64 px with 8 px patches. Its weights live in
``alphaclip_plugins/assets/tiny-shapes`` (``core.factory.DEFAULT_MODEL_DIR``).
"""
from __future__ import annotations

from typing import List, Union

import torch

from ..core.factory import model_labels, resolve_model
from ..core.model import AlphaCLIP


def load_default_model(device: Union[str, torch.device, None] = None) -> AlphaCLIP:
    """The embedded tiny Alpha-CLIP (fp32, eval mode).

    Raises:
        FileNotFoundError: the package was installed without its assets.
    """
    return resolve_model("default").to(device)


def default_labels() -> List[str]:
    """The classes the embedded model knows (saved with it): ``"colour shape"`` for every colour and shape."""
    return model_labels()
