"""MaskCLIP (Zhou, Loy & Dai, "Extract Free Dense Labels from CLIP", ECCV 2022, Sec. 3.2).

The last block's attention is the identity: each patch token keeps its own value embedding, which goes through
the out-projection alone, without the residual connection or the feed-forward branch.
"""

import torch

from .base import LastBlockMethod


def maskclip_weights(query: torch.Tensor, key: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Attention = I: every token attends to itself only."""
    tokens = query.shape[-2]
    return torch.eye(tokens, dtype=query.dtype, device=query.device).expand(*query.shape[:-2], tokens, tokens)


def build(config) -> LastBlockMethod:
    """The method for a `SegmenterConfig` (it has no settings of its own)."""
    return LastBlockMethod("maskclip", maskclip_weights, residual=False, feed_forward=False)
