"""Confusion matrix and IoU against hand-computed values, with ignored pixels and absent classes."""

import math

import numpy as np
import torch

from wildseg.metrics import confusion_matrix, mean_iou, per_class_iou, pixel_accuracy


def test_confusion_matrix_iou_and_accuracy_by_hand():
    truth = np.array([[0, 0, 1, 1], [1, 255, 2, 2]])
    prediction = np.array([[0, 1, 1, 1], [0, 2, 2, 0]])
    confusion = confusion_matrix(prediction, truth, classes=4, ignore_index=255)
    expected = torch.tensor([[1, 1, 0, 0], [1, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]])
    assert torch.equal(confusion, expected)
    iou = per_class_iou(confusion)
    assert math.isclose(iou[0], 1 / 4) and math.isclose(iou[1], 2 / 4) and math.isclose(iou[2], 1 / 2)
    assert math.isnan(iou[3])
    assert math.isclose(mean_iou(confusion), (1 / 4 + 2 / 4 + 1 / 2) / 3)
    assert math.isclose(pixel_accuracy(confusion), 4 / 7)


def test_predictions_outside_the_classes_are_refused():
    import pytest

    with pytest.raises(ValueError, match=r"predictions must lie in \[0, 2\]"):
        confusion_matrix(np.array([0, 255]), np.array([0, 1]), classes=3)
    assert confusion_matrix(np.array([0, 255]), np.array([0, 255]), classes=3, ignore_index=255).sum() == 1
