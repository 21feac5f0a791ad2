"""The generic folder dataset on the real CamVid and NYUv2 files."""

import numpy as np
import pytest

from conftest import shared_dataset
from wildseg.datasets import FolderDataset
from wildseg.errors import WildsegError


def test_camvid_reads_as_a_folder_dataset():
    dataset = FolderDataset(shared_dataset("camvid"), ignore_index=11)
    assert len(dataset) == 233 and len(dataset.classes) == 11
    assert dataset.classes[0] == "sky" and dataset.classes[6] == "sign symbol"
    sample = dataset[0]
    assert sample.image.shape == (360, 480, 3) and sample.image.dtype == np.uint8
    assert sample.truth.shape == (360, 480) and sample.truth.max() <= 11


def test_nyuv2_reads_as_a_folder_dataset():
    dataset = FolderDataset(shared_dataset("nyuv2"), ignore_index=0)
    assert len(dataset) == 654 and len(dataset.classes) == 41 and dataset.classes[0] == "unlabeled"
    sample = dataset[0]
    assert sample.image.shape == (480, 640, 3) and sample.truth.shape == (480, 640)
    assert 0 in np.unique(sample.truth) and sample.truth.max() <= 40


def test_a_folder_without_the_layout_is_a_clear_error(tmp_path):
    with pytest.raises(WildsegError, match="has no images"):
        FolderDataset(tmp_path)


def test_coarse_maps_never_predict_an_ignore_class_inside_the_class_range():
    from wildseg.coarse import coarse_probabilities

    truth = np.zeros((56, 56), dtype=np.uint8)
    truth[:, 28:] = 2
    probabilities = coarse_probabilities(truth, classes=3, ignore_index=0, noise_std=0.3)
    assert np.all(probabilities[0] == 0) and np.allclose(probabilities.sum(0), 1.0, atol=1e-5)
    assert set(np.unique(probabilities.argmax(0))) <= {1, 2}
