"""timm's own tests/test_models.py runs next to this file (scripts/timm_suite.sh copies it here, unmodified).

The one thing it needs: the alphaclip_* models registered, as a user's ``import`` does.
"""
import alphaclip_plugins.integrations.timm  # noqa: F401
