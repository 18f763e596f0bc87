"""The Alpha-CLIP model in plain PyTorch: towers, checkpoints, region preprocessing, zero-shot.

Imports torch and light helpers only, never a framework integration.
"""
