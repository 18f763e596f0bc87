"""Framework adapters, one module per framework; each imports ``core`` and its framework, never another adapter.

Import the one you need (``alphaclip_plugins.integrations.timm``); a missing framework raises an
ImportError that names the extra to install.
"""
from __future__ import annotations

import importlib
from types import ModuleType


def require(module: str, extra: str, hint: str = "") -> ModuleType:
    """Import ``module`` or raise an ImportError that says how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        how = hint or f"pip install 'alphaclip-plugins[{extra}]'"
        raise ImportError(f"this integration needs {module!r}, which is not installed: {how}") from e
