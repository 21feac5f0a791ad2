"""Coarse class maps derived from ground truth, the way a CLIP ViT sees an image, to study refinement
(`refinement_study.py`, and the tests that assert its measurements).

Where CLIP's weights are not at hand, these stand in for its maps: the class one-hot of the ground truth is
averaged over the patch grid (default 14 x 14, as ViT-B/16 at 224 px), blurred with a Gaussian of `blur_sigma`
cells, perturbed with Gaussian noise of standard deviation `noise_std` (fixed seed), and upsampled bilinearly to
the image size. The result is renormalised to class probabilities.
"""

import numpy as np
import torch
import torch.nn.functional as F
from skimage.filters import gaussian

from wildseg.refinement.pamr import pamr
from wildseg.refinement.settings import PamrSettings


def coarse_probabilities(
    truth: np.ndarray,
    classes: int,
    grid: int = 14,
    blur_sigma: float = 1.0,
    noise_std: float = 0.1,
    seed: int = 0,
    ignore_index: int | None = None,
) -> np.ndarray:
    """classes x H x W probabilities from an H x W ground-truth mask.

    Ignored pixels count as no class, and an ignore index inside [0, classes) gets probability 0 everywhere,
    so it is never predicted.
    """
    height, width = truth.shape
    one_hot = np.zeros((classes, height, width), dtype=np.float32)
    valid = (truth >= 0) & (truth < classes)
    if ignore_index is not None:
        valid &= truth != ignore_index
    rows, cols = np.nonzero(valid)
    one_hot[truth[rows, cols], rows, cols] = 1.0
    cells = F.adaptive_avg_pool2d(torch.from_numpy(one_hot)[None], grid)[0].numpy()
    blurred = gaussian(cells, sigma=blur_sigma, channel_axis=0, preserve_range=True)
    noisy = blurred + np.random.default_rng(seed).normal(0.0, noise_std, blurred.shape)
    upsampled = F.interpolate(
        torch.from_numpy(noisy.astype(np.float32))[None], size=(height, width), mode="bilinear", align_corners=False
    )[0].clamp(min=1e-4)
    if ignore_index is not None and 0 <= ignore_index < classes:
        upsampled[ignore_index] = 0.0
    return (upsampled / upsampled.sum(dim=0, keepdim=True)).numpy()


def pamr_on_arrays(image_rgb: np.ndarray, probabilities: np.ndarray, settings: PamrSettings = PamrSettings(),
                   device: str = "cpu") -> np.ndarray:
    """`wildseg.refinement.pamr.pamr` of numpy arrays: an H x W x 3 image (uint8 or float) and classes x H x W
    probabilities; returns the refined probabilities as an array."""
    image = torch.as_tensor(np.ascontiguousarray(image_rgb), device=device).permute(2, 0, 1).float()
    return pamr(image, torch.as_tensor(probabilities, device=device), settings).cpu().numpy()

