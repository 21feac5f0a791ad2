"""Working resolution: large images are segmented at a bounded size and their masks brought back to full size.

The model sees views resized to its input (224 px for ViT-B-16) in any case, so merging relevance,
pseudo-labels and the CRF at a long side of at most `DEFAULT_MAX_SIDE` pixels keeps memory bounded without
changing what the model sees; the full-size mask is the per-pixel argmax of the bilinearly upsampled
probabilities, computed in strips of rows.
"""

from typing import Union

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from .choices import DEFAULT_MAX_SIDE

STRIP_ROWS = 512


def working_size(height: int, width: int, max_side: int = DEFAULT_MAX_SIDE) -> tuple[int, int]:
    """(height, width) scaled down so that the longer side is at most `max_side`; never scaled up."""
    scale = min(1.0, max_side / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def downscale(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The image at `size` (height, width) by area averaging (OpenCV INTER_AREA); unchanged if already there."""
    if image.shape[:2] == size:
        return image
    return cv2.resize(image, (size[1], size[0]), interpolation=cv2.INTER_AREA)


def upsample_argmax(probabilities: Union[np.ndarray, torch.Tensor], height: int, width: int) -> np.ndarray:
    """argmax over classes of `probabilities` (classes x h x w; an array, or a tensor on any device, where the
    work is then done) bilinearly resized to height x width, as a uint8 array.

    Equal to argmax(F.interpolate(..., align_corners=False)) of the whole map, but computed `STRIP_ROWS`
    output rows at a time: rows are interpolated here, columns by F.interpolate at unchanged row count.
    """
    if isinstance(probabilities, np.ndarray):
        probabilities = torch.from_numpy(np.ascontiguousarray(probabilities))
    maps = probabilities.float()
    classes, source_height, source_width = maps.shape
    if (source_height, source_width) == (height, width):
        return maps.argmax(dim=0).to(torch.uint8).cpu().numpy()
    mask = np.empty((height, width), dtype=np.uint8)
    for first in range(0, height, STRIP_ROWS):
        rows = torch.arange(first, min(first + STRIP_ROWS, height), dtype=torch.float64, device=maps.device)
        source = ((rows + 0.5) * source_height / height - 0.5).clamp(min=0)
        below = source.floor().long().clamp(max=source_height - 1)
        above = (below + 1).clamp(max=source_height - 1)
        weight = (source - below).float()[None, :, None]
        strip = maps[:, below] * (1 - weight) + maps[:, above] * weight
        strip = F.interpolate(strip[None], size=(len(rows), width), mode="bilinear", align_corners=False)[0]
        mask[first : first + len(rows)] = strip.argmax(dim=0).to(torch.uint8).cpu().numpy()
    return mask


def model_image_size(height: int, width: int, short_side: int, long_side: int) -> tuple[int, int]:
    """(height, width) of an image rescaled as mmcv's `Resize(scale=(long_side, short_side), keep_ratio=True)`
    rescales it for the official dense segmenters: by min(long_side / long, short_side / short), rounded half up."""
    scale = min(long_side / max(height, width), short_side / min(height, width))
    return int(height * scale + 0.5), int(width * scale + 0.5)


def resize_for_model(rgb: np.ndarray, short_side: int, long_side: int) -> np.ndarray:
    """The image the dense method's windows are cut from: `rgb` rescaled by `model_image_size` with OpenCV's bilinear
    interpolation, as mmcv does."""
    height, width = model_image_size(*rgb.shape[:2], short_side, long_side)
    if (height, width) == rgb.shape[:2]:
        return rgb
    return cv2.resize(rgb, (width, height), interpolation=cv2.INTER_LINEAR)

