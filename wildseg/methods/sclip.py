"""SCLIP (Wang, Mei & Yuille, "SCLIP: Rethinking Self-Attention for Dense Vision-Language Inference", ECCV 2024).

Correlative self-attention in the last block, Eq. 5: softmax(q q^T / sqrt(d)) + softmax(k k^T / sqrt(d)), with the
residual connection and the feed-forward branch kept, as the official code (wangf3014/SCLIP) runs it. Its published
protocols are `sclip.json`.
"""

import torch

from ..backbone.clip_internals import dot_product_weights
from .base import LastBlockMethod


def sclip_weights(query: torch.Tensor, key: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """softmax(q q^T / sqrt(d)) + softmax(k k^T / sqrt(d)) over per-head queries and keys."""
    return dot_product_weights(query, query) + dot_product_weights(key, key)


def build(config) -> LastBlockMethod:
    """The method for a `SegmenterConfig` (it has no settings of its own)."""
    return LastBlockMethod("sclip", sclip_weights, residual=True, feed_forward=True)
