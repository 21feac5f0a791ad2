"""ClearCLIP (Lan et al., "ClearCLIP: Decomposing CLIP Representations for Dense Vision-Language Inference", ECCV
2024).

Self-self attention in the last block, Eq. 6: softmax(q q^T / sqrt(d)), without the residual connection and the
feed-forward branch. Its published protocols are `clearclip.json`.
"""

import torch

from ..backbone.clip_internals import dot_product_weights
from .base import LastBlockMethod


def clearclip_weights(query: torch.Tensor, key: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """softmax(q q^T / sqrt(d)) over per-head queries."""
    return dot_product_weights(query, query)


def build(config) -> LastBlockMethod:
    """The method for a `SegmenterConfig` (it has no settings of its own)."""
    return LastBlockMethod("clearclip", clearclip_weights, residual=False, feed_forward=False)
