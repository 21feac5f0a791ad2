"""Segmentation metrics from a confusion matrix accumulated with torch.bincount.

IoU_c = TP_c / (TP_c + FP_c + FN_c); mIoU averages IoU over classes present in the ground truth or the
prediction (a class absent from both has no IoU); pixel accuracy = trace / total; class accuracy
Acc_c = TP_c / (TP_c + FN_c), averaged over the classes present in the ground truth (mean class accuracy).
"""

import numpy as np
import torch


def confusion_matrix(
    prediction: np.ndarray | torch.Tensor,
    truth: np.ndarray | torch.Tensor,
    classes: int,
    ignore_index: int | None = None,
) -> torch.Tensor:
    """classes x classes counts, rows = ground truth, columns = prediction.

    Ground-truth pixels equal to `ignore_index` or outside [0, classes) are skipped; a prediction outside
    [0, classes) at a counted pixel is an error.
    """
    predicted = torch.as_tensor(prediction).long().flatten()
    actual = torch.as_tensor(truth).long().flatten()
    keep = (actual >= 0) & (actual < classes)
    if ignore_index is not None:
        keep &= actual != ignore_index
    predicted = predicted[keep]
    if predicted.numel() and (predicted.min() < 0 or predicted.max() >= classes):
        raise ValueError(
            f"predictions must lie in [0, {classes - 1}], got values in [{predicted.min()}, {predicted.max()}]"
        )
    pairs = actual[keep] * classes + predicted
    return torch.bincount(pairs, minlength=classes * classes).reshape(classes, classes)


def per_class_iou(confusion: torch.Tensor) -> torch.Tensor:
    """IoU per class, NaN for a class that appears in neither ground truth nor prediction."""
    confusion = confusion.double()
    true_positive = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - true_positive
    return torch.where(union > 0, true_positive / union.clamp(min=1), torch.full_like(union, float("nan")))


def mean_iou(confusion: torch.Tensor) -> float:
    """Mean of the defined per-class IoUs."""
    return float(per_class_iou(confusion).nanmean())


def pixel_accuracy(confusion: torch.Tensor) -> float:
    """Fraction of counted pixels whose predicted class is right."""
    confusion = confusion.double()
    return float(confusion.diag().sum() / confusion.sum().clamp(min=1))


def per_class_accuracy(confusion: torch.Tensor) -> torch.Tensor:
    """Recall per class, TP / ground-truth pixels; NaN for a class absent from the ground truth."""
    confusion = confusion.double()
    truth_pixels = confusion.sum(1)
    return torch.where(
        truth_pixels > 0, confusion.diag() / truth_pixels.clamp(min=1), torch.full_like(truth_pixels, float("nan"))
    )


def mean_class_accuracy(confusion: torch.Tensor) -> float:
    """Mean of the per-class accuracies of the classes present in the ground truth."""
    return float(per_class_accuracy(confusion).nanmean())
