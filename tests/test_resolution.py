"""Working resolution: the strip-wise upsampled argmax against the whole map's, on arrays and tensors."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from wildseg import resolution
from wildseg.resolution import upsample_argmax, working_size


@pytest.mark.parametrize("as_tensor", [False, True])
def test_strips_give_the_argmax_of_the_whole_upsampled_map(as_tensor, monkeypatch):
    monkeypatch.setattr(resolution, "STRIP_ROWS", 7)
    probabilities = torch.rand(5, 13, 17, generator=torch.Generator().manual_seed(0))
    expected = F.interpolate(probabilities[None], size=(100, 61), mode="bilinear", align_corners=False)[0].argmax(0)
    given = probabilities if as_tensor else probabilities.numpy()
    mask = upsample_argmax(given, 100, 61)
    assert mask.dtype == np.uint8 and mask.shape == (100, 61)
    assert np.array_equal(mask, expected.numpy())
    assert np.array_equal(upsample_argmax(given, 13, 17), probabilities.argmax(0).numpy())


def test_working_size_scales_the_long_side_down_only():
    assert working_size(3000, 1500, 1024) == (1024, 512)
    assert working_size(375, 500, 1024) == (375, 500)
