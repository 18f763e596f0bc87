"""timm's model tests that timm picks by its own lists, called on the alphaclip_* models.

timm runs ``test_model_default_cfgs_non_std`` on its ViTs because their names match its ``NON_STD_FILTERS``
(``vit_*``; the standard ``test_model_default_cfgs`` expects an ``[B, C, H, W]`` ``forward_features`` and
skips them), and ``test_model_forward_intermediates(_features)`` because their module is in its
``FEAT_INTER_FILTERS``. The alphaclip_* names and module match neither list, so these wrappers call the same,
unmodified test functions of timm's ``test_models.py`` on them.
"""
import pytest
import timm

import test_models as timm_tests  # timm's tests/test_models.py, copied next to this file by scripts/timm_suite.sh

MODELS = timm.list_models("alphaclip_*")
TAGGED = timm.list_models("alphaclip_*", include_tags=True)
CFG_DEVICE = "meta" if timm_tests._HAS_DEVICE_CONTEXT else timm_tests.torch_device  # timm's cfg_device fixture


@pytest.mark.parametrize("model_name", TAGGED)
def test_model_default_cfgs_non_std(model_name):
    timm_tests.test_model_default_cfgs_non_std(model_name, 1, CFG_DEVICE)


@pytest.mark.parametrize("model_name", MODELS)
def test_model_forward_intermediates(model_name):
    timm_tests.test_model_forward_intermediates(model_name, 1)


@pytest.mark.parametrize("model_name", MODELS)
def test_model_forward_intermediates_features(model_name):
    timm_tests.test_model_forward_intermediates_features(model_name, 1)
