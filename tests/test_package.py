"""Packaging promises: a light top-level import, helpful errors for missing frameworks, py.typed."""
from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import alphaclip_plugins


def test_import_pulls_in_no_framework():
    code = ("import sys, alphaclip_plugins; heavy = [m for m in ('torch', 'timm', 'transformers', 'open_clip', "
            "'mmdet', 'mmengine', 'detectron2') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_lazy_exports_resolve():
    for name in alphaclip_plugins.__all__:
        assert getattr(alphaclip_plugins, name) is not None, name
    with pytest.raises(AttributeError):
        alphaclip_plugins.does_not_exist  # noqa: B018


@pytest.mark.parametrize("module, framework, extra", [
    ("timm", "timm", "timm"), ("open_clip", "open_clip", "open_clip"), ("hf", "transformers", "hf"),
    ("mmdet", "mmdet", "mmdet"),
])
def test_missing_framework_names_the_extra(monkeypatch, module, framework, extra):
    monkeypatch.setitem(sys.modules, framework, None)
    monkeypatch.delitem(sys.modules, f"alphaclip_plugins.integrations.{module}", raising=False)
    with pytest.raises(ImportError, match=rf"alphaclip-plugins\[{extra}\]"):
        importlib.import_module(f"alphaclip_plugins.integrations.{module}")


def test_ships_type_information():
    assert (Path(alphaclip_plugins.__file__).parent / "py.typed").exists()
