"""DINO self-supervised ViTs (Caron et al., ICCV 2021) as proxy backbones for patch correlations (CorrCLIP, Zhang et
al., ICCV 2025, arXiv 2411.10086, Sec. 3.2), built by timm: `vit_base_patch8_224.dino` and
`vit_small_patch8_224.dino` have the architecture and key names of torch.hub's `dino_vitb8` and `dino_vits8`.

timm resamples positional embeddings its own way; DINO's code (facebookresearch/dino `vision_transformer.py`,
`interpolate_pos_encoding`) resizes the native grid bicubically with scale factor (g + 0.1) / native, and its
features differ from timm's by 5e-3 at 336 pixels, so `dino_positions` does it DINO's way.
"""

import math
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from ..errors import WildsegError, checkpoint_not_found

DINO_MODELS = {"vit_base_patch8_224.dino": "DINO ViT-B/8 (torch.hub dino_vitb8)",
               "vit_small_patch8_224.dino": "DINO ViT-S/8 (torch.hub dino_vits8)"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
"""The pixel normalisation DINO was trained with (0-1 units)."""


def load_dino(model: str = "vit_base_patch8_224.dino", checkpoint: Optional[Path] = None, device: str = "cpu",
              **architecture) -> torch.nn.Module:
    """A DINO ViT by timm's name, its weights from timm's hub cache or a local file, in eval mode.

    Args:
        model: a timm model name (`DINO_MODELS`, or another timm ViT).
        checkpoint: a local state dict in DINO's (and timm's) key names; None for timm's own weights.
        device: where the model goes.
        architecture: timm constructor arguments that override the named model's (a tiny model for tests).

    Returns:
        The timm `VisionTransformer`, without classifier head.
    """
    import timm

    if checkpoint is not None and not Path(checkpoint).is_file():
        raise checkpoint_not_found(checkpoint)
    overlay = {"file": str(checkpoint)} if checkpoint is not None else {}
    try:
        network = timm.create_model(model, pretrained=True, num_classes=0, pretrained_cfg_overlay=overlay,
                                    **architecture)
    except (OSError, RuntimeError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise WildsegError(f"timm could not load {model}'s weights ({first_line}): connect to the Hugging Face hub "
                           "once, or give a local state dict as the checkpoint") from error
    return network.eval().to(device)


def dino_positions(network: torch.nn.Module, grid: tuple[int, int]) -> torch.Tensor:
    """The positional embedding (1 x 1 + rows * columns x width) for a patch grid: the class token's kept, the
    native square grid resized bicubically with scale factor (g + 0.1) / native per axis (align_corners False,
    the sample positions following that factor), as DINO's `interpolate_pos_encoding`."""
    embedding = network.pos_embed
    native = math.isqrt(embedding.shape[1] - 1)
    if grid == (native, native):
        return embedding
    patches = embedding[:, 1:].reshape(1, native, native, -1).permute(0, 3, 1, 2)
    scale = ((grid[0] + 0.1) / native, (grid[1] + 0.1) / native)
    resized = F.interpolate(patches, scale_factor=scale, mode="bicubic", align_corners=False,
                            recompute_scale_factor=False)
    return torch.cat([embedding[:, :1], resized.flatten(2).transpose(1, 2)], dim=1)


def correlation_features(network: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """CorrCLIP's DINO features: the last block's query + key (all heads, before the split) of each patch token,
    L2-normalised (Sec. 3.2).

    Args:
        network: a DINO ViT (`load_dino`).
        images: ImageNet-normalised images (batch x 3 x height x width), sides multiples of the patch size.

    Returns:
        (batch x patches x width unit features, the patch grid (rows, columns)).
    """
    patches = network.patch_embed.proj(images)
    grid = tuple(patches.shape[-2:])
    tokens = patches.flatten(2).transpose(1, 2)
    tokens = torch.cat([network.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
    x = network.norm_pre(network.pos_drop(tokens + dino_positions(network, grid)))
    for block in network.blocks[:-1]:
        x = block(x)
    last = network.blocks[-1]
    query, key, _ = F.linear(last.norm1(x), last.attn.qkv.weight, last.attn.qkv.bias).chunk(3, dim=-1)
    return F.normalize((query + key)[:, 1:], dim=-1), grid
