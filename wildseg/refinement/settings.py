"""The parameters of the refinements, in a module that imports nothing heavy (the configuration is checked before
the model libraries load)."""

from dataclasses import dataclass

from ..choices import CRF_ITERATIONS, PAMR_ITERATIONS


@dataclass(frozen=True)
class CrfSettings:
    """Dense-CRF parameters: Gaussian (smoothness) and bilateral (appearance) kernels, mean-field iterations."""

    iterations: int = CRF_ITERATIONS
    gaussian_sxy: float = 3.0
    gaussian_weight: float = 3.0
    bilateral_sxy: float = 80.0
    bilateral_srgb: float = 13.0
    bilateral_weight: float = 10.0


@dataclass(frozen=True)
class PamrSettings:
    """PAMR parameters."""

    iterations: int = PAMR_ITERATIONS
    """Number of updates m_i <- sum_j alpha_ij m_j."""
    dilations: tuple[int, ...] = (1, 2, 4, 8, 12, 24)
    """Dilations of the 3 x 3 neighbourhood; each adds its 8 off-centre pixels to the neighbours."""
    sharpness: float = 0.1
    """lambda: scales the local standard deviation that normalises colour differences (smaller = sharper)."""


@dataclass(frozen=True)
class MaskGeneration:
    """How automatic masks are made: CorrCLIP's online settings (`SAM2AutomaticMaskGenerator(points_per_side=8,
    pred_iou_thresh=0.4, stability_score_thresh=0.4, multimask_output=False)`, the rest Meta's defaults)."""

    points_per_side: int = 8
    pred_iou_threshold: float = 0.4
    stability_threshold: float = 0.4
    stability_offset: float = 1.0
    mask_threshold: float = 0.0
    box_nms_threshold: float = 0.7
    points_per_batch: int = 64
