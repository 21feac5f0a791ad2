"""NACLIP (Hajimiri, Ben Ayed & Dolz, "Pay Attention to Your Neighbours: Training-Free Open-Vocabulary Semantic
Segmentation", WACV 2025).

Neighbourhood-aware key-key attention in the last block, Eq. 7: softmax(k k^T / sqrt(d) + G), with G the Gaussian
prior exp(-|p_i - p_j|^2 / (2 std^2)) between patches at grid positions p (std 5 patches, Sec. 3.2), without the
residual connection and the feed-forward branch. Its published protocols are `naclip.json`.
"""

import math

import torch
import torch.nn.functional as F

from .base import LastBlockMethod

NEIGHBOURHOOD_STD = 5.0
"""Width (in patches) of NACLIP's Gaussian neighbourhood prior (Sec. 3.2)."""


def neighbourhood_prior(grid: tuple[int, int], std: float, device: torch.device) -> torch.Tensor:
    """NACLIP's additive attention bias.

    Args:
        grid: the patch grid (rows, columns).
        std: the Gaussian's width in patches.
        device: where to make it.

    Returns:
        T x T with T = 1 + patches: exp(-|p_i - p_j|^2 / (2 std^2)) between patches i and j; 0 in the class token's
        row and column.
    """
    rows, columns = torch.meshgrid(torch.arange(grid[0], device=device), torch.arange(grid[1], device=device),
                                   indexing="ij")
    positions = torch.stack([rows.flatten(), columns.flatten()], dim=1).float()
    prior = torch.exp(-torch.cdist(positions, positions).square() / (2 * std**2))
    return F.pad(prior, (1, 0, 1, 0))


def naclip_weights(query: torch.Tensor, key: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """softmax(k k^T / sqrt(d) + G) over per-head keys, G the prior of `neighbourhood_prior`."""
    prior = neighbourhood_prior(grid, NEIGHBOURHOOD_STD, key.device).to(key.dtype)
    return torch.softmax(key @ key.transpose(-2, -1) / math.sqrt(key.shape[-1]) + prior, dim=-1)


def build(config) -> LastBlockMethod:
    """The method for a `SegmenterConfig` (it has no settings of its own)."""
    return LastBlockMethod("naclip", naclip_weights, residual=False, feed_forward=False)
