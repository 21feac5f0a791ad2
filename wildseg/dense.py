"""Dense label maps from CLIP's patch tokens, with the last block's attention replaced (training-free family).

CLIP's last block mixes every patch token with the whole image, so its patch tokens do not describe their
own location. The training-free dense segmenters change that block only: patch tokens of the previous
block, x, go through a variant of the attention (below), optionally with the residual x + ... and the
feed-forward branch, then through ln_post and the visual projection into the joint space, where the cosine
with each label's text embedding gives a map on the patch grid (Zhou et al. 2022, MaskCLIP, Sec. 3.2).

Positional embeddings are interpolated bicubically to the window's patch grid (as the official code does), so
windows of any size work.
"""

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

from .choices import DEFAULT_ATTENTION, DENSE_LOGIT_SCALE, DENSE_SHORT_SIDE, DENSE_WINDOW
from .datasets.classes import builtin_class_names
from .errors import WildsegError
from .relevance import (
    attention_output,
    dot_product_weights,
    feed_forward,
    head_projections,
)

NEIGHBOURHOOD_STD = 5.0
"""Width (in patches) of NACLIP's Gaussian neighbourhood prior (Hajimiri et al. 2025, Sec. 3.2)."""


def vanilla_weights(query: torch.Tensor, key: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """CLIP's own attention (Vaswani et al. 2017): softmax(q k^T / sqrt(d))."""
    return dot_product_weights(query, key)


def maskclip_weights(query: torch.Tensor, key: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """MaskCLIP (Zhou et al., ECCV 2022): every token keeps its own value embedding, attention = I."""
    tokens = query.shape[-2]
    return torch.eye(tokens, dtype=query.dtype, device=query.device).expand(*query.shape[:-2], tokens, tokens)


def clearclip_weights(query: torch.Tensor, key: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """ClearCLIP (Lan et al., ECCV 2024, Eq. 6): self-self attention softmax(q q^T / sqrt(d))."""
    return dot_product_weights(query, query)


def sclip_weights(query: torch.Tensor, key: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """SCLIP (Wang et al., ECCV 2024, Eq. 5), correlative self-attention:
    softmax(q q^T / sqrt(d)) + softmax(k k^T / sqrt(d))."""
    return dot_product_weights(query, query) + dot_product_weights(key, key)


def neighbourhood_prior(grid: tuple[int, int], std: float, device: torch.device) -> torch.Tensor:
    """NACLIP's additive attention bias (T x T, T = 1 + patches): exp(-|p_i - p_j|^2 / (2 std^2)) between
    patches i and j at grid positions p (in patches); 0 in the class token's row and column."""
    rows, columns = torch.meshgrid(torch.arange(grid[0], device=device), torch.arange(grid[1], device=device),
                                   indexing="ij")
    positions = torch.stack([rows.flatten(), columns.flatten()], dim=1).float()
    prior = torch.exp(-torch.cdist(positions, positions).square() / (2 * std**2))
    return F.pad(prior, (1, 0, 1, 0))


def naclip_weights(query: torch.Tensor, key: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """NACLIP (Hajimiri et al., WACV 2025, Eq. 7), neighbourhood-aware key-key attention:
    softmax(k k^T / sqrt(d) + G), G the Gaussian neighbourhood prior of `neighbourhood_prior`."""
    prior = neighbourhood_prior(grid, NEIGHBOURHOOD_STD, key.device).to(key.dtype)
    return torch.softmax(key @ key.transpose(-2, -1) / math.sqrt(key.shape[-1]) + prior, dim=-1)


@dataclass(frozen=True)
class AttentionVariant:
    """How the last block is changed: its attention weights (from per-head queries, keys and the patch grid),
    and whether the residual connection and the feed-forward branch are kept."""

    weights: Callable[[torch.Tensor, torch.Tensor, tuple[int, int]], torch.Tensor]
    residual: bool
    feed_forward: bool


ATTENTION_VARIANTS = {
    "vanilla": AttentionVariant(vanilla_weights, residual=True, feed_forward=True),
    "maskclip": AttentionVariant(maskclip_weights, residual=False, feed_forward=False),
    "sclip": AttentionVariant(sclip_weights, residual=True, feed_forward=True),
    "clearclip": AttentionVariant(clearclip_weights, residual=False, feed_forward=False),
    "naclip": AttentionVariant(naclip_weights, residual=False, feed_forward=False),
}
"""`vanilla` is CLIP's unchanged block (the reference the others depart from); the rest follow their papers."""


def check_attention(name: str) -> AttentionVariant:
    """The named attention variant, or a one-line error listing the known ones."""
    if name not in ATTENTION_VARIANTS:
        raise WildsegError(f"unknown attention {name!r}: use one of {', '.join(ATTENTION_VARIANTS)}")
    return ATTENTION_VARIANTS[name]


def interpolated_positions(visual: VisionTransformer, grid: tuple[int, int]) -> torch.Tensor:
    """The positional embedding (1 + rows * columns, width) for a patch grid of another size: the class token's
    entry kept, the patch entries resized bicubically on their native square grid as the official NACLIP, SCLIP
    and ClearCLIP code does (after DINO): scale factor (g + 0.1) / native per axis, which floors to g patches,
    with sample positions following that factor (align_corners=False, recompute_scale_factor=False)."""
    embedding = visual.positional_embedding
    native = math.isqrt(embedding.shape[0] - 1)
    if grid == (native, native):
        return embedding
    patches = embedding[1:].reshape(1, native, native, -1).permute(0, 3, 1, 2)
    scale = ((grid[0] + 0.1) / native, (grid[1] + 0.1) / native)
    resized = F.interpolate(patches.float(), scale_factor=scale, mode="bicubic", align_corners=False,
                            recompute_scale_factor=False)
    return torch.cat([embedding[:1], resized[0].flatten(1).T.to(embedding.dtype)])


def embed_windows(visual: VisionTransformer, windows: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """Tokens entering the first block (batch x 1 + patches x width) for windows of any size, and the grid."""
    patches = visual.conv1(windows)
    grid = tuple(patches.shape[-2:])
    tokens = patches.flatten(2).transpose(1, 2)
    class_token = visual.class_embedding.to(tokens.dtype).expand(tokens.shape[0], 1, -1)
    tokens = torch.cat([class_token, tokens], dim=1) + interpolated_positions(visual, grid).to(tokens.dtype)
    return visual.ln_pre(tokens), grid


def modified_block(block: ResidualAttentionBlock, x: torch.Tensor, grid: tuple[int, int],
                   variant: AttentionVariant) -> torch.Tensor:
    """The last block with its attention weights, residual and feed-forward set by `variant`."""
    query, key, value = head_projections(block, block.ln_1(x))
    attended = block.ls_1(attention_output(block, variant.weights(query, key, grid), value))
    x = x + attended if variant.residual else attended
    return feed_forward(block, x) if variant.feed_forward else x


def patch_tokens(visual: VisionTransformer, windows: torch.Tensor, variant: AttentionVariant) -> torch.Tensor:
    """Tokens after ln_post (batch x 1 + patches x width), the last block changed by `variant`."""
    x, grid = embed_windows(visual, windows)
    for block in visual.transformer.resblocks[:-1]:
        x = block(x)
    x = modified_block(visual.transformer.resblocks[-1], x, grid, variant)
    return visual.ln_post(x)


def dense_features(visual: VisionTransformer, windows: torch.Tensor, variant: AttentionVariant) -> torch.Tensor:
    """Unit-norm patch features in the joint space (windows x patches x dim, row-major grid, fp32): patch tokens
    after ln_post and the visual projection."""
    with torch.no_grad():
        tokens = patch_tokens(visual, windows, variant)[:, 1:]
        if visual.proj is not None:
            tokens = tokens @ visual.proj
        return F.normalize(tokens.float(), dim=-1)


def dense_label_maps(visual: VisionTransformer, windows: torch.Tensor, text: torch.Tensor,
                     variant: AttentionVariant) -> torch.Tensor:
    """Cosine of every patch with every label (windows x labels x rows x columns), fp32, for unit-norm label
    embeddings `text` (labels x dim)."""
    cosine = dense_features(visual, windows, variant) @ text.float().T
    rows, columns = windows.shape[-2] // visual.patch_size[0], windows.shape[-1] // visual.patch_size[1]
    return cosine.transpose(1, 2).reshape(windows.shape[0], text.shape[0], rows, columns)


def default_background_words() -> tuple[str, ...]:
    """Stuff words the dense method scores as background: those of the PASCAL VOC background class."""
    return next(entry.prompts for entry in builtin_class_names("voc21") if entry.is_background)


@dataclass(frozen=True)
class DenseSettings:
    """Settings of the dense method: attention variant; the image is resized so that its short side is
    `short_side` (its long side at most `long_side`) and seen in windows of `window` pixels every `stride`
    (`window` 0: the whole image in one pass); the logit scale of the label softmax; background words.

    `stride=None` means half a window. `background_words` are scored as background (with the threshold);
    by default those of PASCAL VOC's background class; `()` turns them off, as evaluation does, where data
    sets name their own background words.
    """

    attention: str = DEFAULT_ATTENTION
    window: int = DENSE_WINDOW
    stride: Optional[int] = None
    short_side: int = DENSE_SHORT_SIDE
    long_side: int = 2048
    logit_scale: float = DENSE_LOGIT_SCALE
    background_words: tuple[str, ...] = field(default_factory=default_background_words)

    @property
    def window_stride(self) -> int:
        return self.stride if self.stride is not None else self.window // 2


def model_image_size(height: int, width: int, short_side: int, long_side: int) -> tuple[int, int]:
    """(height, width) of an image rescaled as mmcv's `Resize(scale=(long_side, short_side), keep_ratio=True)`
    rescales it for the official dense segmenters: by min(long_side / long, short_side / short), rounded
    half up."""
    scale = min(long_side / max(height, width), short_side / min(height, width))
    return int(height * scale + 0.5), int(width * scale + 0.5)


def resize_for_model(rgb: np.ndarray, settings: DenseSettings) -> np.ndarray:
    """The image the dense method's windows are cut from: `rgb` rescaled by `model_image_size` with OpenCV's
    bilinear interpolation, as mmcv does."""
    height, width = model_image_size(*rgb.shape[:2], settings.short_side, settings.long_side)
    if (height, width) == rgb.shape[:2]:
        return rgb
    return cv2.resize(rgb, (width, height), interpolation=cv2.INTER_LINEAR)
