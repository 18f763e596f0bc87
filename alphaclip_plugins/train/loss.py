"""The contrastive loss of Alpha-CLIP training: symmetric InfoNCE over the global batch."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .distributed import gather_features


class ContrastiveLoss(nn.Module):
    """Symmetric InfoNCE between region and caption embeddings, with label smoothing (open_clip's ``ClipLoss``).

    Features of all ranks are gathered first (:func:`~.distributed.gather_features`), so every sample sees
    the whole global batch as negatives and gradients flow to the local features only.

    Two samples with the same caption have identical text features, so their rows and columns of the
    logits are tied; summed over such a group the loss equals the one with the group as shared
    positives, and no special handling is needed.

    Args:
        label_smoothing: mixed into the targets of both directions (the paper code uses 0.1).
    """

    def __init__(self, label_smoothing: float = 0.1):
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(
        self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor
    ) -> torch.Tensor:
        """Loss of one micro-batch.

        Args:
            image_features: ``[B, D]`` L2-normalised region embeddings of this rank.
            text_features: ``[B, D]`` L2-normalised caption embeddings, row ``i`` describing region ``i``.
            logit_scale: scalar multiplier of the cosine similarities (``exp`` of the model's parameter).

        Returns:
            Scalar loss over the global batch (the same value on every rank).
        """
        image = gather_features(image_features.float())
        text = gather_features(text_features.float())
        logits = logit_scale.float() * image @ text.T  # [N, N]: regions x captions
        labels = torch.arange(logits.shape[0], device=logits.device)
        return 0.5 * (
            F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
            + F.cross_entropy(logits.T, labels, label_smoothing=self.label_smoothing)
        )
