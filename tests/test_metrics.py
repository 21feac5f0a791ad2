"""Confusion matrix and IoU against hand-computed values, with ignored pixels and absent classes."""

import math

import numpy as np
import torch

from wildseg.metrics import (
    confusion_matrix,
    mean_class_accuracy,
    mean_iou,
    per_class_accuracy,
    per_class_iou,
    pixel_accuracy,
)


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
    accuracy = per_class_accuracy(confusion)
    assert math.isclose(accuracy[0], 1 / 2) and math.isclose(accuracy[1], 2 / 3) and math.isclose(accuracy[2], 1 / 2)
    assert math.isnan(accuracy[3])
    assert math.isclose(mean_class_accuracy(confusion), (1 / 2 + 2 / 3 + 1 / 2) / 3)


def test_a_class_only_predicted_counts_zero_iou_but_no_accuracy():
    truth = np.array([0, 0, 0, 1])
    prediction = np.array([0, 2, 2, 1])
    confusion = confusion_matrix(prediction, truth, classes=3)
    assert per_class_iou(confusion).tolist() == [1 / 3, 1.0, 0.0]
    assert math.isclose(mean_iou(confusion), (1 / 3 + 1 + 0) / 3)
    assert math.isclose(mean_class_accuracy(confusion), (1 / 3 + 1) / 2)


def test_confusion_accumulates_over_images_of_different_sizes():
    first = confusion_matrix(np.zeros((2, 3)), np.array([[0, 0, 1], [1, 1, 1]]), classes=2)
    second = confusion_matrix(np.ones((4, 1)), np.array([[1], [1], [0], [255]]), classes=2, ignore_index=255)
    total = first + second
    assert torch.equal(total, torch.tensor([[2 + 0, 0 + 1], [4 + 0, 0 + 2]]))


def test_predictions_outside_the_classes_are_refused():
    import pytest

    with pytest.raises(ValueError, match=r"predictions must lie in \[0, 2\]"):
        confusion_matrix(np.array([0, 255]), np.array([0, 1]), classes=3)
    assert confusion_matrix(np.array([0, 255]), np.array([0, 255]), classes=3, ignore_index=255).sum() == 1
