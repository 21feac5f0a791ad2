"""CLIP's own last block (Radford et al. 2021), read densely: the reference the training-free methods depart from.

Attention softmax(q k^T / sqrt(d)) (Vaswani et al. 2017), with the residual connection and the feed-forward branch.
"""

import torch

from ..backbone.clip_internals import dot_product_weights
from .base import LastBlockMethod


def vanilla_weights(query: torch.Tensor, key: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """CLIP's own attention softmax(q k^T / sqrt(d)) over per-head queries and keys."""
    return dot_product_weights(query, key)


def build(config) -> LastBlockMethod:
    """The method for a `SegmenterConfig` (it has no settings of its own)."""
    return LastBlockMethod("vanilla", vanilla_weights, residual=True, feed_forward=True)
