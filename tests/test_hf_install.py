"""``pip install 'alphaclip-plugins[hf]'`` keeps an installed, supported transformers (and its tokenizers).

Runs in the transformers 4.x venvs of ``scripts/hf_venvs.sh`` (where the LLaVA family lives): pip resolves the
package's ``hf`` extra against what is installed there, without installing anything.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")
if int(transformers.__version__.split(".")[0]) >= 5:
    pytest.skip("checked in the transformers 4.x venvs (scripts/hf_venvs.sh)", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]


def test_installing_the_hf_extra_moves_neither_transformers_nor_tokenizers():
    import tokenizers
    import torch

    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--report", "-", f"{ROOT}[hf]"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    planned = {item["metadata"]["name"].lower(): item["metadata"]["version"]
               for item in json.loads(result.stdout)["install"]}
    assert "alphaclip-plugins" in planned  # the resolver did see the package
    for name, installed in (("transformers", transformers.__version__), ("tokenizers", tokenizers.__version__),
                            ("torch", torch.__version__)):
        assert name not in planned, f"pip would replace {name} {installed} with {planned[name]}"
