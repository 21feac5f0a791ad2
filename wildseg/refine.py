"""Refinement of per-pixel class probabilities by a fully connected CRF (Kraehenbuehl & Koltun, NIPS 2011).

Energy E(x) = sum_i -log P_i(x_i) + sum_{i<j} mu(x_i, x_j) k(f_i, f_j) with Potts compatibility and
k = w_g exp(-|p_i - p_j|^2 / 2 theta_g^2) + w_b exp(-|p_i - p_j|^2 / 2 theta_b^2 - |I_i - I_j|^2 / 2 theta_rgb^2),
minimised by mean-field inference with pydensecrf. Defaults are pydensecrf's documented example values,
which DeepLab and Zabari & Hoshen-style pipelines use: theta_g = 3, w_g = 3; theta_b = 80, theta_rgb = 13,
w_b = 10; 5 iterations.
"""

from dataclasses import dataclass

import numpy as np
from pydensecrf import densecrf
from pydensecrf.utils import unary_from_softmax

REFINEMENTS = ("crf", "pamr", "pamr+crf", "none")


@dataclass(frozen=True)
class CrfSettings:
    """Dense-CRF parameters: Gaussian (smoothness) and bilateral (appearance) kernels, mean-field iterations."""

    iterations: int = 5
    gaussian_sxy: float = 3.0
    gaussian_weight: float = 3.0
    bilateral_sxy: float = 80.0
    bilateral_srgb: float = 13.0
    bilateral_weight: float = 10.0


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
