"""RF-CLIP (Li et al., AAAI 2026, arXiv 2511.16170), as its official code (liblacklucy/RF-CLIP@c2b333e,
`clip/model.py` `VisionTransformer.forward` and `custom_segmentor.py` `RF_CLIP.forward_feature`) computes it:

1. Every block but the last runs with its attention written out; after each block, and after the standard last
   block, "sink" patch tokens are denoised: a token whose channel-normalised value p = (x - min x) / sum(x - min x)
   exceeds sigma / C (sigma 5) on any of the model's over-activated channels is blended 0.6 : 0.4 with the 3 x 3
   mean of its neighbourhood. The denoised outputs are the guides; the last one's class token is the window's
   global vector.
2. Feature enhancing: the patch cosines of the guides' mean, below 0.4 set to 0 (not normalised), aggregate the
   penultimate output and the guides' mean.
3. Decoding: each of the two goes through the last block's values with, as attention, the key-key softmax
   softmax(k k^T / sqrt(d)) averaged over all blocks (the last block's taken on it; class token rows and columns
   dropped after the softmax); the two outputs are averaged into the patch features.
4. Hierarchical prompts: the label embeddings are clustered (complete linkage on cosine distance, cut at
   `cluster_threshold`); in each cluster the label most similar to the global vector moves a share
   `prompt_shift` towards the mean of its 2 most similar patches.
5. The map is (1 - w) cos(patch, adjusted label) + w cos(global vector, label), w = `global_weight`; the global
   vector is the whole image's (`global_context` "image", a separate pass) or the window's own ("window").

Its published protocols are `rfclip.json`.
"""

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import squareform

from ..backbone.clip_internals import ClipTower, dot_product_weights
from ..timing import NoStageTimes
from .base import DenseMethod

SINK_CHANNELS = {
    768: (4, 162, 189, 326, 429, 474, 633, 713),
    1024: (250, 261, 437, 650, 720, 779, 936, 1005),
}
"""The over-activated channels of the official code by tower width: ViT-B/16's (its default) and ViT-L/14's (the
line beside it). Other widths take ViT-B/16's modulo the width (`sink_channels`)."""
SINK_SIGMA = 5.0
"""A token is a sink where its normalised value on a sink channel exceeds SINK_SIGMA / width."""
DENOISE_SHARE = 0.4
"""The share of the neighbourhood mean in a denoised token (the official `alpha`)."""
GUIDE_FLOOR = 0.4
"""Guide cosines below this do not enhance (the official `beta`)."""
TOP_PATCHES = 2
"""Patches whose mean moves a cluster's chosen label (the official `k`)."""


def sink_channels(width: int) -> tuple[int, ...]:
    """The sink channels of a tower of `width` channels: the official list for ViT-B/16 (768) and ViT-L/14 (1024),
    else ViT-B/16's taken modulo the width (how the oracle fixtures of the official code ran on a tiny model)."""
    return SINK_CHANNELS.get(width) or tuple(channel % width for channel in SINK_CHANNELS[768])


def sink_tokens(patches: torch.Tensor, channels: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Which patch tokens are sinks, and their score: p = (x - min_c x) / max(sum_c (x - min_c x), 1e-8), the score
    the largest p over the sink channels, a sink where it exceeds SINK_SIGMA / width.

    Args:
        patches: ... x width.
        channels: the sink channels.

    Returns:
        (... bool, ... scores).
    """
    shifted = patches - patches.min(dim=-1, keepdim=True).values
    normalised = shifted / shifted.sum(dim=-1, keepdim=True).clamp(min=1e-8)
    score = normalised[..., list(channels)].max(dim=-1).values
    return score > SINK_SIGMA / patches.shape[-1], score


def denoised(x: torch.Tensor, grid: tuple[int, int], channels: tuple[int, ...]) -> torch.Tensor:
    """Tokens (batch x 1 + patches x width) with their sink patches blended with the 3 x 3 mean of the grid around
    them (zero padding, sinks included): 0.6 x + 0.4 mean; the class token and the other patches unchanged."""
    patches = x[:, 1:]
    sinks, _ = sink_tokens(patches, channels)
    batch, count, width = patches.shape
    feature_map = patches.transpose(1, 2).reshape(batch, width, *grid)
    mean = F.avg_pool2d(feature_map, 3, stride=1, padding=1, count_include_pad=True)
    mean = mean.reshape(batch, width, count).transpose(1, 2)
    replaced = torch.where(sinks[..., None], mean, patches)
    return torch.cat([x[:, :1], (1 - DENOISE_SHARE) * patches + DENOISE_SHARE * replaced], dim=1)


def key_key_attention(key: torch.Tensor) -> torch.Tensor:
    """softmax(k k^T / sqrt(d_head)) of per-head keys (batch x heads x tokens x head width)."""
    return torch.softmax(key @ key.transpose(-2, -1) / math.sqrt(key.shape[-1]), dim=-1)


def enhancing_cosines(guide: torch.Tensor) -> torch.Tensor:
    """The cosines of the guide's patch tokens (batch x patches x width), below GUIDE_FLOOR set to 0, not
    normalised: the feature-enhancing matrix (batch x patches x patches)."""
    unit = F.normalize(guide, dim=-1, eps=1e-8)
    cosines = unit @ unit.transpose(1, 2)
    return cosines.masked_fill(cosines < GUIDE_FLOOR, 0.0)


def enhanced(x: torch.Tensor, cosines: torch.Tensor) -> torch.Tensor:
    """Tokens (batch x 1 + patches x width) with their patches replaced by `cosines` @ patches."""
    return torch.cat([x[:, :1], cosines @ x[:, 1:]], dim=1)


@dataclass
class Encoding:
    """What RF-CLIP's image tower gives of a batch of windows: the tokens leaving the penultimate block (denoised),
    the guides' mean, the key-key attention of every block but the last (summed, class token dropped), the
    patch grid, and the global vectors (batch x dim, before normalisation)."""

    penultimate: torch.Tensor
    guide_mean: torch.Tensor
    key_key_sum: torch.Tensor
    grid: tuple[int, int]
    global_vectors: torch.Tensor


def encode(tower: ClipTower, windows: torch.Tensor) -> Encoding:
    """Step 1 of the module docstring on normalised windows (batch x 3 x height x width)."""
    channels = sink_channels(tower.visual.transformer.width)
    x, grid = tower.embed_windows(windows)
    guides, key_key_sum = [], None
    for block in range(tower.depth - 1):
        query, key, value = tower.head_projections(block, x)
        key_key = key_key_attention(key)[..., 1:, 1:]
        key_key_sum = key_key if key_key_sum is None else key_key_sum + key_key
        attended = tower.attention_output(block, dot_product_weights(query, key), value)
        x = denoised(tower.feed_forward(block, x + attended), grid, channels)
        guides.append(x)
    last = denoised(tower.run_block(tower.depth - 1, x), grid, channels)
    guides.append(last)
    return Encoding(x, torch.stack(guides).mean(dim=0), key_key_sum, grid,
                    tower.into_joint_space(last[:, 0]))


def decoded(tower: ClipTower, tokens: torch.Tensor, key_key_sum: torch.Tensor) -> torch.Tensor:
    """The last block's values of `tokens` (batch x 1 + patches x width) mixed by the key-key attention averaged
    over all blocks, the last one's taken on `tokens`; out-projected, patches only."""
    last = tower.depth - 1
    _, key, value = tower.head_projections(last, tokens)
    weights = (key_key_sum + key_key_attention(key)[..., 1:, 1:]) / tower.depth
    return tower.attention_output(last, weights, value[..., 1:, :])


def patch_features(tower: ClipTower, encoding: Encoding) -> torch.Tensor:
    """Steps 2 and 3: unit-norm patch features in the joint space (batch x patches x dim, fp32)."""
    cosines = enhancing_cosines(encoding.guide_mean[:, 1:])
    outputs = [decoded(tower, enhanced(tokens, cosines), encoding.key_key_sum)
               for tokens in (encoding.penultimate, encoding.guide_mean)]
    return F.normalize(tower.into_joint_space((outputs[0] + outputs[1]) / 2).float(), dim=-1)


def prompt_clusters(text: torch.Tensor, threshold: float) -> np.ndarray:
    """Cluster ids (0-based) of the label embeddings (labels x dim): complete linkage on their cosine distances
    (1 - cosine, in [0, 2]), cut at `threshold` (scipy's `fcluster`, criterion "distance")."""
    if len(text) < 2:
        return np.zeros(len(text), dtype=int)
    unit = F.normalize(text.detach().double().cpu(), dim=-1).numpy()
    distances = np.clip(1.0 - unit @ unit.T, 0.0, 2.0)
    distances = (distances + distances.T) / 2
    np.fill_diagonal(distances, 0.0)
    return fcluster(linkage(squareform(distances), method="complete"), t=threshold, criterion="distance") - 1


def chosen_labels(global_similarity: torch.Tensor, clusters: np.ndarray) -> torch.Tensor:
    """Each cluster's label most similar to the global vector (windows x clusters, label indices).

    Args:
        global_similarity: cosines of the global vectors with the labels (windows x labels).
        clusters: each label's cluster id (`prompt_clusters`).
    """
    device = global_similarity.device
    members = torch.from_numpy(clusters).to(device)[None] == torch.arange(int(clusters.max()) + 1,
                                                                          device=device)[:, None]
    return global_similarity[:, None, :].masked_fill(~members[None], float("-inf")).argmax(dim=-1)


def best_patches(features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The TOP_PATCHES patches most similar to each of some labels, per window.

    Args:
        features: unit patch features (windows x patches x dim).
        labels: unit label embeddings per window (windows x labels x dim).

    Returns:
        (patch indices, their cosines), each windows x labels x TOP_PATCHES.
    """
    cosines = features @ labels.transpose(1, 2)
    top = cosines.topk(min(TOP_PATCHES, features.shape[1]), dim=1)
    return top.indices.transpose(1, 2), top.values.transpose(1, 2)


def adjusted_prompts(features: torch.Tensor, global_similarity: torch.Tensor, text: torch.Tensor,
                     clusters: np.ndarray, shift: float) -> torch.Tensor:
    """Step 4: per window, the label embeddings with each cluster's `chosen_labels` label t moved to
    normalise((1 - shift) t + shift m), m the normalised mean of its `best_patches`.

    Args:
        features: unit patch features (windows x patches x dim).
        global_similarity: cosines of the global vectors with the labels (windows x labels).
        text: unit label embeddings (labels x dim).
        clusters: each label's cluster id (`prompt_clusters`).
        shift: the patches' share.

    Returns:
        windows x labels x dim.
    """
    chosen = chosen_labels(global_similarity, clusters)
    chosen_text = F.normalize(text[chosen], dim=-1)
    top, _ = best_patches(features, chosen_text)
    windows = torch.arange(features.shape[0], device=features.device)[:, None, None]
    patch_mean = F.normalize(features[windows, top].mean(dim=2), dim=-1)
    moved = F.normalize((1 - shift) * chosen_text + shift * patch_mean, dim=-1)
    adjusted = text[None].expand(features.shape[0], -1, -1).clone()
    return adjusted.scatter(1, chosen[..., None].expand(-1, -1, text.shape[-1]), moved)


@dataclass(frozen=True)
class RFClipMethod(DenseMethod):
    """RF-CLIP's maps (module docstring) with its per-data-set weights."""

    global_weight: float
    prompt_shift: float
    cluster_threshold: float
    global_context: str

    name = "rfclip"

    @property
    def uses_image_context(self) -> bool:
        """With `global_context` "image" (`Method.uses_image_context`)."""
        return self.global_context == "image"

    def features(self, tower: ClipTower, windows: torch.Tensor) -> torch.Tensor:
        """Unit-norm patch features (windows x patches x dim, fp32)."""
        return patch_features(tower, encode(tower, windows))

    def image_context(self, tower: ClipTower, image: torch.Tensor) -> torch.Tensor:
        """The whole image's unit global vector (dim), from a pass of its own (`encode`) of the normalised image
        (3 x height x width)."""
        with torch.no_grad():
            return F.normalize(encode(tower, image[None]).global_vectors[0].float(), dim=-1)

    def map_views(self, tower: ClipTower, views: torch.Tensor, text: torch.Tensor, stages=NoStageTimes(),
                  contexts: Optional[list] = None) -> torch.Tensor:
        """(1 - w) cos(patch, adjusted label) + w cos(global vector, label) for every patch and label (steps 4 and
        5); `contexts` the whole images' global vectors (`image_context`) where the windows do not give their own."""
        with torch.no_grad(), stages.stage("forward"):
            encoding = encode(tower, views)
            features = patch_features(tower, encoding)
            if contexts is not None:
                global_vectors = torch.stack(contexts).float()
            else:
                global_vectors = F.normalize(encoding.global_vectors.float(), dim=-1)
            unit_text = text.float()
            global_similarity = global_vectors @ unit_text.T
            prompts = adjusted_prompts(features, global_similarity, unit_text,
                                       prompt_clusters(unit_text, self.cluster_threshold), self.prompt_shift)
            local = features @ prompts.transpose(1, 2)
            logits = (1 - self.global_weight) * local + self.global_weight * global_similarity[:, None, :]
        rows, columns = encoding.grid
        return logits.transpose(1, 2).reshape(views.shape[0], text.shape[0], rows, columns)


def build(config) -> RFClipMethod:
    """The method for a `SegmenterConfig`: its `global_weight`, `prompt_shift`, `cluster_threshold` and
    `global_context` in effect; with the whole image in one view (`window` 0) the view's own global vector is the
    image's."""
    context = config.resolved("global_context") if config.resolved("window") else "window"
    return RFClipMethod(config.resolved("global_weight"), config.resolved("prompt_shift"),
                        config.resolved("cluster_threshold"), context)
