"""CorrCLIP (Zhang et al., ICCV 2025, arXiv 2411.10086), v1, as its official code (zdk258/CorrCLIP@103bc18,
`CorrCLIPv1/corrclip_segmentor.py` and its open_clip `VisionTransformer.forward`) computes it, per window:

1. Proxy correlations (Sec. 3.2): DINO's last-block query + key of each 8-pixel patch, unit norm
   (`backbone.dino.correlation_features`), of the window un-normalised with CLIP's constants and normalised for
   ImageNet.
2. Region merging (Sec. 3.3): the regions on DINO's grid (ids sampled at each patch's top-left pixel) other than
   the smallest id (unsegmented) get their mean features; regions whose cosine is within MERGE_DISTANCE of the
   largest cosine are linked, and each connected component (DBSCAN with one sample per core, as the official code
   clusters) becomes one region.
3. Correlation scope: two patches of one merged region correlate, and so does any pair with an unsegmented patch
   whose DINO similarity is above the mean similarity; the attention is softmax(TAU x similarity) over that scope.
4. CLIP runs unchanged with one "mask class token" per region of its patch grid, a copy of the class token that
   attends only to the class token and its region's patches. The last block's values, of the penultimate output
   (main) and of the mean output of NUM_SPATIAL middle blocks (spatial), upsampled to DINO's grid, are mixed by the
   scoped attention and out-projected; the mask tokens' outputs of the whole last block are each region's semantic
   feature. The patch feature is ln_post(main) + ALPHA ln_post(spatial) + BETA ln_post(semantic), projected.
5. The map's label, after the argmax, is each region's majority label (map correction, `majority_labels`).

The regions come from `--regions` (`refinement.regions`): CorrCLIP's released SAM 2 masks as a folder, SAM 2 itself,
or superpixels. Its published protocols are `corrclip.json`.
"""

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from scipy.sparse.csgraph import connected_components

from ..backbone.clip_internals import ClipTower
from ..backbone.dino import IMAGENET_MEAN, IMAGENET_STD, correlation_features
from ..errors import WildsegError, setting
from ..refinement.regions import nearest_ids
from ..timing import NoStageTimes
from .base import DenseMethod

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
"""The constants the official code un-normalises each window with before DINO (0-1 units), whatever the model's."""
TAU, ALPHA, BETA = 4.0, 1.0, 0.5
"""The scoped attention's temperature, and the weights of the spatial and semantic branches."""
MERGE_DISTANCE = 0.2
"""DBSCAN's eps on max(cosine) - cosine between region features."""
PAD_MULTIPLE, PAD_REGION = 56, 10000
"""A window whose sides are no multiple of PAD_MULTIPLE pixels is zero-padded, its regions padded with PAD_REGION."""
MERGED_BASE = 10000
"""Merged region k is given the id MERGED_BASE + k (the padding id equals merged region 0, as in the official
code)."""


def spatial_blocks(depth: int) -> range:
    """The blocks whose mean output is the spatial branch: the NUM_SPATIAL blocks ending at the one before the
    penultimate (5 for 12 blocks, 12 for 24, 28 for 32, else depth - 4)."""
    count = {12: 5, 24: 12, 32: 28}.get(depth, depth - 4)
    return range(depth - 2 - count, depth - 2)


def merged_regions(features: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
    """Regions on the DINO grid with similar regions merged (step 2).

    Args:
        features: unit DINO features of the grid's patches (patches x width).
        regions: region ids on the grid (rows x columns, int64); the smallest is unsegmented.

    Returns:
        The merged ids (rows x columns): the smallest id kept, every other region MERGED_BASE + its component;
        unchanged where the grid has at most two ids.
    """
    values, index = torch.unique(regions.flatten(), return_inverse=True)
    if len(values) <= 2:
        return regions
    sums = torch.zeros(len(values), features.shape[1], dtype=features.dtype).index_add_(0, index, features)
    region_features = F.normalize(sums[1:] / torch.bincount(index)[1:, None].to(features.dtype), dim=-1)
    similarity = region_features @ region_features.T
    linked = (similarity.max() - similarity <= MERGE_DISTANCE).numpy()
    _, components = connected_components(linked, directed=False)
    relabelled = torch.cat([values[:1], MERGED_BASE + torch.from_numpy(components).to(values.dtype)])
    return relabelled[index].reshape(regions.shape)


def scope_attention(features: torch.Tensor, merged: torch.Tensor) -> torch.Tensor:
    """The scoped attention (step 3): softmax(TAU x S) over the allowed pairs, S the DINO similarity.

    Args:
        features: unit DINO features (patches x width).
        merged: merged region ids on the grid (`merged_regions`).

    Returns:
        patches x patches attention.
    """
    similarity = features @ features.T
    ids = merged.flatten()
    unsegmented = ids == ids.min()
    same_region = (ids[:, None] == ids[None, :]) & ~unsegmented[:, None]
    allowed = same_region | ((unsegmented[:, None] | unsegmented[None, :]) & (similarity > similarity.mean()))
    return torch.softmax(TAU * similarity.masked_fill(~allowed, float("-inf")), dim=-1)


def masked_block(layer: torch.nn.Module, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """An open_clip residual block on batch-first tokens with an additive attention mask (tokens x tokens)."""
    normed = layer.ln_1(x)
    attended, _ = layer.attn(normed, normed, normed, need_weights=False, attn_mask=mask)
    x = x + layer.ls_1(attended)
    return x + layer.ls_2(layer.mlp(layer.ln_2(x)))


def window_features(tower: ClipTower, window: torch.Tensor, attention: torch.Tensor, merged: torch.Tensor,
                    dino_grid: tuple[int, int]) -> torch.Tensor:
    """CorrCLIP's patch features of one window on DINO's grid (step 4), before normalisation.

    Args:
        tower: CLIP's image tower.
        window: the normalised window (3 x height x width).
        attention: the scoped attention (`scope_attention`, DINO patches x DINO patches).
        merged: merged region ids on DINO's grid.
        dino_grid: DINO's (rows, columns).

    Returns:
        DINO patches x dim.
    """
    x, grid = tower.embed_windows(window[None])
    clip_regions = nearest_ids(merged, grid).flatten()
    region_ids = torch.unique(clip_regions)
    count, tokens = len(region_ids), x.shape[1]
    allowed = torch.zeros(count + tokens, count + tokens, dtype=torch.bool, device=x.device)
    allowed[count:, count:] = True
    allowed[:count, count] = True
    allowed[:count, count + 1:] = (clip_regions[None, :] == region_ids[:, None]).to(x.device)
    mask = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device).masked_fill(~allowed, float("-inf"))
    sequence = torch.cat([x[:, :1].expand(1, count, -1), x], dim=1)
    spatial_range, spatial = spatial_blocks(tower.depth), []
    for block in range(tower.depth - 1):
        sequence = masked_block(tower.blocks[block], sequence, mask)
        if block in spatial_range:
            spatial.append(sequence[:, count:])
    last = tower.blocks[-1]
    value_weight = last.attn.in_proj_weight[2 * x.shape[-1]:]
    value_bias = last.attn.in_proj_bias[2 * x.shape[-1]:]
    streams = []
    for tokens_in in (sequence[:, count:], torch.stack(spatial).mean(0)):
        values = F.linear(last.ln_1(tokens_in), value_weight, value_bias)[0, 1:]
        values = values.T.reshape(-1, *grid)[None]
        values = F.interpolate(values, size=dino_grid, mode="bilinear", align_corners=False)[0].flatten(1).T
        streams.append(tower.visual.ln_post(last.attn.out_proj(attention.to(values.dtype) @ values)))
    semantic = masked_block(last, sequence, mask)[0, :count]
    dino_regions = nearest_ids(nearest_ids(merged, grid), dino_grid).flatten()
    positions = torch.searchsorted(region_ids, dino_regions.to(region_ids.device))
    streams.append(tower.visual.ln_post(semantic[positions]))
    feature = streams[0] + ALPHA * streams[1] + BETA * streams[2]
    return feature @ tower.visual.proj


def dino_input(window: torch.Tensor) -> torch.Tensor:
    """DINO's input from a CLIP-normalised window (3 x h x w): un-normalised with CLIP's constants, normalised with
    ImageNet's (step 1), in float32."""
    def channels(values):
        return torch.tensor(values, device=window.device)[:, None, None]

    pixels = window.float() * channels(CLIP_STD) + channels(CLIP_MEAN)
    return (pixels - channels(IMAGENET_MEAN)) / channels(IMAGENET_STD)


def majority_labels(mask: np.ndarray, regions: np.ndarray) -> np.ndarray:
    """Map correction (step 5): every region but the smallest id takes the most frequent label of `mask` inside it
    (the smallest label on ties, as torch's `mode` on the CPU).

    Args:
        mask: a label map (h x w).
        regions: region ids of the same size; the smallest is unsegmented.

    Returns:
        The corrected label map.
    """
    values, index = np.unique(regions, return_inverse=True)
    index = index.reshape(regions.shape)
    labels = int(mask.max()) + 1
    counts = np.zeros((len(values), labels), dtype=np.int64)
    np.add.at(counts, (index.ravel(), mask.ravel().astype(np.int64)), 1)
    majority = counts.argmax(1).astype(mask.dtype)
    corrected = majority[index]
    return np.where(index == 0, mask, corrected)


@dataclass(frozen=True)
class CorrClip(DenseMethod):
    """CorrCLIP over views whose fourth channel holds region ids (`pipeline.Pipeline.view_tensor`), with `dino`
    (`backbone.dino.load_dino`) for the proxy correlations."""

    dino: Any
    name: str = "corrclip"
    uses_regions = True

    def check(self, tower: ClipTower, model_name: str) -> None:
        """Refuse a tower too shallow for the spatial branch (`spatial_blocks`: at least 5 blocks)."""
        super().check(tower, model_name)
        if tower.depth < 5:
            raise WildsegError(f"CorrCLIP's spatial branch averages middle blocks, and {model_name} has {tower.depth}: "
                               "use a model with at least 5 blocks, such as ViT-B-16")

    def features(self, tower: ClipTower, windows: torch.Tensor) -> torch.Tensor:
        """Unit patch features on DINO's grid (windows x patches x dim) of windows with their region channel."""
        return torch.stack([F.normalize(self.window(tower, window)[0].float(), dim=-1) for window in windows])

    def window(self, tower: ClipTower, window: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """One window's features (`window_features`), its sides zero-padded to PAD_MULTIPLE and the padding cut
        off again, and their grid (rows, columns)."""
        pixels, regions = window[:3], window[3].round().long()
        height, width = pixels.shape[-2:]
        pad_rows, pad_columns = -height % PAD_MULTIPLE, -width % PAD_MULTIPLE
        padding = (pad_columns // 2, pad_columns - pad_columns // 2, pad_rows // 2, pad_rows - pad_rows // 2)
        if any(padding):
            pixels = F.pad(pixels, padding)
            regions = F.pad(regions, padding, value=PAD_REGION)
        dino_features, dino_grid = correlation_features(self.dino, dino_input(pixels)[None].to(
            next(self.dino.parameters())))
        dino_features = dino_features[0].float()
        patch = pixels.shape[-1] // dino_grid[1]
        merged = merged_regions(dino_features.cpu(), nearest_ids(regions.cpu(), dino_grid))
        attention = scope_attention(dino_features, merged.to(dino_features.device))
        feature = window_features(tower, pixels, attention, merged, dino_grid)
        if not any(padding):
            return feature, dino_grid
        rows, columns = height // patch, width // patch
        top, left = padding[2] // patch, padding[0] // patch
        return feature.reshape(*dino_grid, -1)[top:top + rows, left:left + columns].flatten(0, 1), (rows, columns)

    def map_views(self, tower: ClipTower, views: torch.Tensor, text: torch.Tensor, stages=NoStageTimes()
                  ) -> torch.Tensor:
        """Cosine of every DINO-grid patch with every label: maps on DINO's grid (views x labels x rows x
        columns)."""
        with torch.no_grad(), stages.stage("forward"):
            windows = [self.window(tower, view) for view in views]
        return torch.stack([(F.normalize(feature.float(), dim=-1) @ text.float().T).T.reshape(len(text), *grid)
                            for feature, grid in windows])


def build(config, dino: Optional[Any] = None) -> CorrClip:
    """CorrCLIP on the loaded DINO (`backbone.dino.load_dino`); a one-line error without it."""
    if dino is None:
        raise WildsegError(f"{setting('attention')} corrclip needs DINO: load it with wildseg.backbone.dino.load_dino "
                           "and give it to the Segmenter as dino=")
    return CorrClip(dino)
