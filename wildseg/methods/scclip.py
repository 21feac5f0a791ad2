"""SC-CLIP (Bai, Liu, Han, Zhang & Tang, "Self-Calibrated CLIP for Training-Free Open-Vocabulary Segmentation",
arXiv 2411.15869), as its official code (SuleBai/SC-CLIP@0417ba9, `clip/model.py` `VisionTransformer.forward`)
computes it, on a ViT of at least 11 blocks (the paper's ViT-B/16 has 12):

1. Anomaly resolution (Sec. 3.2): the patch tokens of the penultimate block's output whose local outlier factor
   (Breunig et al. 2000; 30 neighbours, squared Euclidean distances) exceeds its 95th percentile are replaced by
   the mean of their non-outlier 8-neighbours.
2. Self-adjusting (Sec. 3.3): the cosines of block 9's patch tokens (outliers fixed the same way), below 0.4 set to
   0, aggregate the tokens before the last block, row-normalised; the last block runs without residual or
   feed-forward, its attention the mean of softmax(3 (S - mean S)) (entries below the mean masked) and the key-key
   softmax, plus 0.3 x the class token; block 4's thresholded cosines aggregate its output.
3. Multi-level fusion (Sec. 3.4): the outputs of blocks 4 to 10, summed, go through the same last block and
   aggregation, and are added.

Its published protocols are `scclip.json`.
"""

import math

import torch
import torch.nn.functional as F

from ..backbone.clip_internals import ClipTower
from ..errors import WildsegError
from .base import DenseMethod

NEIGHBOURS = 30
"""Neighbours of the local outlier factor (`lof_pytorch`'s n_neighbors)."""
CONTAMINATION = 0.05
"""Share of the patch tokens taken as outliers: those above the (1 - CONTAMINATION) quantile of the factor."""
SIMILARITY_FLOOR = 0.4
"""Cosines below this do not aggregate (the official code's `beta`)."""
CLASS_TOKEN_SHARE = 0.3
"""The class token's share added to the last block's output (`res_cls`)."""
PRE_ADJUST_BLOCK, POST_ADJUST_BLOCK = 8, 3
"""0-based blocks whose outputs give the similarities before and after the last block (blocks 9 and 4)."""
MULTI_LEVEL_BLOCKS = range(3, 10)
"""0-based blocks whose outputs are fused (blocks 4 to 10)."""
LEAST_DEPTH = 11
"""The block indices above need at least this many blocks."""


def local_outlier_factor(tokens: torch.Tensor, neighbours: int = NEIGHBOURS) -> torch.Tensor:
    """The local outlier factor of each token (Breunig et al. 2000) as SC-CLIP computes it: squared Euclidean
    distances; reach(a, b) = max(d(a, b), the k-distance of a itself); LRD(a) = k / mean_b reach(a, b);
    LOF(a) = mean_b LRD(b) / LRD(a), over a's k nearest neighbours b.

    Args:
        tokens: tokens x width.
        neighbours: k.

    Returns:
        tokens.
    """
    distances = torch.norm(tokens[:, None] - tokens[None, :], dim=2, p=2) ** 2
    nearest, indices = torch.topk(distances, k=neighbours + 1, largest=False)
    nearest, indices = nearest[:, 1:], indices[:, 1:]
    reach = torch.max(nearest, nearest[:, -1:].expand_as(nearest))
    density = neighbours / torch.nan_to_num(reach.mean(dim=1), nan=1e-6)
    return (density[indices] / density.unsqueeze(1)).mean(dim=1)


def outlier_mask(tokens: torch.Tensor) -> torch.Tensor:
    """The anomalous tokens: local outlier factor above its (1 - CONTAMINATION) quantile (linear interpolation)."""
    factor = local_outlier_factor(tokens)
    return factor > torch.quantile(factor.float(), 1 - CONTAMINATION)


def neighbour_mean_fix(patches: torch.Tensor, outliers: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Outlier patch tokens replaced by the mean of their non-outlier 8-neighbours on the grid (zero-padded border);
    one without such a neighbour stays.

    Args:
        patches: patches x width, row-major on `grid`.
        outliers: patches, True where a token is replaced.
        grid: (rows, columns).

    Returns:
        patches x width.
    """
    rows, columns = grid
    width = patches.shape[1]
    feature_map = patches.T.reshape(1, width, rows, columns)
    keep = (~outliers).to(patches.dtype).reshape(1, 1, rows, columns)
    ring = torch.ones(1, 1, 3, 3, dtype=patches.dtype, device=patches.device)
    ring[0, 0, 1, 1] = 0
    neighbour_sum = F.conv2d(F.pad(feature_map * keep, (1, 1, 1, 1)), ring.expand(width, 1, 3, 3), groups=width)
    valid = F.conv2d(F.pad(keep, (1, 1, 1, 1)), ring)
    mean = neighbour_sum / valid.clamp(min=1)
    update = (1 - keep) * (valid > 0).to(patches.dtype)
    fixed = feature_map * (1 - update) + mean * update
    return fixed.reshape(width, rows * columns).T


def thresholded_cosines(patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The cosine matrix of `patches` (patches x width), and the same with entries below SIMILARITY_FLOOR set to 0."""
    unit = patches / patches.norm(dim=-1, keepdim=True)
    cosines = unit @ unit.T
    return cosines, cosines.masked_fill(cosines < SIMILARITY_FLOOR, 0.0)


def aggregate(tokens: torch.Tensor, similarity: torch.Tensor) -> torch.Tensor:
    """Each token replaced by the similarity-weighted mean of all: (S / (rowsum S + 1e-6)) @ tokens."""
    return (similarity / (similarity.sum(dim=-1, keepdim=True) + 1e-6)) @ tokens


def calibrated_attention(tower: ClipTower, tokens: torch.Tensor, similarity: torch.Tensor) -> torch.Tensor:
    """The last block's attention branch, without residual or feed-forward, on patch tokens (patches x width):
    weights ((softmax(M) + softmax(k k^T / sqrt(d))) / 2 per head, M = 3 (S - mean S) with its negative entries
    -inf, the same for every head; values and projections the block's own."""
    last = tower.depth - 1
    _, key, value = tower.head_projections(last, tokens[None])
    shifted = (similarity - similarity.mean()) * 3.0
    shifted = shifted.masked_fill(shifted < 0.0, float("-inf"))
    key_key = torch.softmax(key @ key.transpose(-2, -1) / math.sqrt(key.shape[-1]), dim=-1)
    weights = (torch.softmax(shifted, dim=-1)[None, None] + key_key) / 2
    return tower.attention_output(last, weights, value)[0]


class SCClipMethod(DenseMethod):
    """SC-CLIP's patch features (module docstring), one window at a time (the outlier factor is per window)."""

    name = "scclip"

    def check(self, tower: ClipTower, model_name: str) -> None:
        """A ViT (`Method.check`) of at least LEAST_DEPTH blocks."""
        super().check(tower, model_name)
        if tower.depth < LEAST_DEPTH:
            raise WildsegError(f"scclip reads blocks 4 to 10 of the image tower, and {model_name}'s has "
                               f"{tower.depth}: use a model with at least {LEAST_DEPTH} blocks, such as ViT-B-16")

    def features(self, tower: ClipTower, windows: torch.Tensor) -> torch.Tensor:
        """Unit-norm patch features (windows x patches x dim, fp32)."""
        x, grid = tower.embed_windows(windows)
        return torch.stack([self.window_features(tower, tokens, grid) for tokens in x])

    def window_features(self, tower: ClipTower, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Unit-norm patch features of one window's tokens entering the first block (1 + patches x width)."""
        outputs = []
        x = tokens[None]
        for block in range(tower.depth - 1):
            x = tower.run_block(block, x)
            outputs.append(x[0])
        penultimate = outputs[-1]
        outliers = outlier_mask(penultimate[1:])
        x = neighbour_mean_fix(penultimate[1:], outliers, grid)
        class_token = penultimate[:1]
        similarity, before = thresholded_cosines(neighbour_mean_fix(outputs[PRE_ADJUST_BLOCK][1:], outliers, grid))
        x = aggregate(x, before)
        x = calibrated_attention(tower, x, similarity) + CLASS_TOKEN_SHARE * class_token
        _, after = thresholded_cosines(outputs[POST_ADJUST_BLOCK][1:])
        x = aggregate(x, after)
        levels = sum(outputs[block] for block in MULTI_LEVEL_BLOCKS)
        fused = calibrated_attention(tower, levels[1:], similarity) + CLASS_TOKEN_SHARE * levels[:1]
        x = x + aggregate(fused, after)
        return F.normalize(tower.into_joint_space(x).float(), dim=-1)


def build(config) -> SCClipMethod:
    """The method for a `SegmenterConfig` (it has no settings of its own)."""
    return SCClipMethod()
