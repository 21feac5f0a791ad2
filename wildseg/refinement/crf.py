"""Refinement of per-pixel class probabilities by a fully connected CRF (Kraehenbuehl & Koltun, NIPS 2011).

Energy E(x) = sum_i -log P_i(x_i) + sum_{i<j} mu(x_i, x_j) k(f_i, f_j) with Potts compatibility and
k = w_g exp(-|p_i - p_j|^2 / 2 theta_g^2) + w_b exp(-|p_i - p_j|^2 / 2 theta_b^2 - |I_i - I_j|^2 / 2 theta_rgb^2),
minimised by mean-field inference. Defaults are pydensecrf's documented example values, which DeepLab and
Zabari & Hoshen-style pipelines use: theta_g = 3, w_g = 3; theta_b = 80, theta_rgb = 13, w_b = 10; 5 iterations.

Two implementations of the same inference: `dense_crf` with pydensecrf on the CPU, one image at a time, and
`mean_field_crf` in torch on the tensors' device (CUDA or CPU), a batch of images at once. The torch version
filters both kernels on the permutohedral lattice of `refinement.lattice`, as pydensecrf does, and reproduces its
marginals to float round-off; an exact separable Gaussian for the smoothness kernel would not (measured on
CamVid: 99.97 % of pixels with the same argmax, mean |difference| 6e-5, against 100 % and 7e-9).
"""

from collections.abc import Sequence

import numpy as np
import torch
from pydensecrf import densecrf
from pydensecrf.utils import unary_from_softmax

from .lattice import PermutohedralLattice
from .settings import CrfSettings

PROBABILITY_FLOOR = 1e-5
"""Probabilities are clipped to [1e-5, 1] before -log, as pydensecrf's unary_from_softmax does."""


def dense_crf(image: np.ndarray, probabilities: np.ndarray, settings: CrfSettings = CrfSettings()) -> np.ndarray:
    """Refine class probabilities (classes x H x W) on an RGB uint8 image (H x W x 3); returns the CRF marginals."""
    classes, height, width = probabilities.shape
    crf = densecrf.DenseCRF2D(width, height, classes)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probabilities.astype(np.float32))))
    crf.addPairwiseGaussian(sxy=settings.gaussian_sxy, compat=settings.gaussian_weight)
    crf.addPairwiseBilateral(
        sxy=settings.bilateral_sxy,
        srgb=settings.bilateral_srgb,
        rgbim=np.array(image, dtype=np.uint8, order="C"),
        compat=settings.bilateral_weight,
    )
    marginals = crf.inference(settings.iterations)
    return np.asarray(marginals, dtype=np.float32).reshape(classes, height, width)


@torch.no_grad()
def mean_field_crf(
    images: Sequence[torch.Tensor], probabilities: Sequence[torch.Tensor], settings: CrfSettings = CrfSettings()
) -> list[torch.Tensor]:
    """Refine class probabilities by the dense CRF in torch, a batch of images at once on their device.

    images: RGB images, each H x W x 3 with values in [0, 255] (uint8 or float); probabilities: each C x H x W
    for the image of the same index (same C for all, sizes may differ), on the same device. Returns the
    marginals Q (C x H x W float32 each), as `dense_crf` would for each image alone.

    Inference as pydensecrf's DenseCRF::inference with addPairwise*'s defaults (Kraehenbuehl & Koltun 2011, eq. 4
    with Potts mu): with P' = P clipped to [1e-5, 1], Q_0 = P' renormalised, then `settings.iterations` times
    Q <- softmax_classes(log P' + sum_m w_m D_m^-1/2 K_m D_m^-1/2 Q), where K_m is kernel m's Gaussian filter on the
    permutohedral lattice and D_m = diag(K_m 1): NORMALIZE_SYMMETRIC. K_m includes j = i, as pydensecrf's filter
    does (the paper's update sums over j != i). DIAG_KERNEL only sets the kernel's learnable feature scales (all
    1), which inference does not use.

    All images share one lattice per kernel (keyed by image), so the number of tensor operations does not grow
    with the batch: about 600 to build the two lattices (a few dozen of them wait for the device: unique,
    boolean masks) and about 40 per iteration, 13 of them sparse products. Peak memory, measured on the CPU,
    is about 230 MB per 500 x 375 image with 22 classes and 900 MB with 151: about 8 float32 buffers of
    pixels x classes besides the lattices, so callers bound a batch by pixels x classes.
    """
    if len(images) != len(probabilities) or not images:
        raise ValueError(f"{len(images)} images for {len(probabilities)} probability maps")
    classes = probabilities[0].shape[0]
    for image, probability in zip(images, probabilities):
        if probability.ndim != 3 or len(probability) != classes or tuple(image.shape) != (*probability.shape[1:], 3):
            raise ValueError(f"image {tuple(image.shape)} does not match probabilities {tuple(probability.shape)}")
    device = probabilities[0].device
    log_prior = torch.cat([probability.float().flatten(1).t() for probability in probabilities])
    log_prior = log_prior.clamp_(PROBABILITY_FLOOR, 1.0).log_()
    colours = torch.cat([image.reshape(-1, 3) for image in images]).to(device=device, dtype=torch.float32)
    sizes = [probability[0].numel() for probability in probabilities]
    positions = pixel_positions([probability.shape[1:] for probability in probabilities], device)
    image_index = torch.cat([torch.full((size,), index, device=device) for index, size in enumerate(sizes)])
    bilateral_features = torch.cat([positions / settings.bilateral_sxy, colours / settings.bilateral_srgb], dim=1)
    kernels = [
        (settings.gaussian_weight, PermutohedralLattice(positions / settings.gaussian_sxy, image_index)),
        (settings.bilateral_weight, PermutohedralLattice(bilateral_features, image_index)),
    ]
    ones = log_prior.new_ones(len(log_prior), 1)
    normalisers = [lattice.filter(ones).add_(1e-20).rsqrt_() for _, lattice in kernels]
    marginals = log_prior.softmax(dim=1)
    for _ in range(settings.iterations):
        logits = log_prior.clone()
        for (weight, lattice), normaliser in zip(kernels, normalisers):
            logits.addcmul_(lattice.filter(marginals * normaliser), normaliser, value=weight)
        marginals = logits.softmax(dim=1)
    return [piece.t().reshape(probability.shape) for piece, probability in zip(marginals.split(sizes), probabilities)]


def pixel_positions(sizes: Sequence[tuple[int, int]], device: torch.device) -> torch.Tensor:
    """(x, y) of every pixel (N x 2 float32, row-major per image, images one after another), pydensecrf's order."""
    grids = []
    for height, width in sizes:
        rows, cols = torch.meshgrid(
            torch.arange(height, device=device, dtype=torch.float32),
            torch.arange(width, device=device, dtype=torch.float32),
            indexing="ij",
        )
        grids.append(torch.stack([cols.flatten(), rows.flatten()], dim=1))
    return torch.cat(grids)
