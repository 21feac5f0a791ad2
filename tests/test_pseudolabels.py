"""Per-label normalisation, background rule and probabilities, against hand-computed values."""

import torch
from conftest import raises_worded

from wildseg.config import SegmenterConfig
from wildseg.pseudolabels import label_scores, normalize_per_label, scores_to_probabilities


def test_maps_are_min_max_normalised_per_label():
    maps = torch.tensor([[[2.0, 4.0], [6.0, 10.0]], [[-1.0, -1.0], [-1.0, -1.0]]])
    normalized = normalize_per_label(maps)
    assert torch.allclose(normalized[0], torch.tensor([[0.0, 0.25], [0.5, 1.0]]))
    assert torch.equal(normalized[1], torch.zeros(2, 2))


def test_background_wins_where_no_label_reaches_the_threshold():
    maps = torch.tensor([[[0.0, 1.0, 2.0, 10.0]], [[10.0, 0.0, 0.0, 0.0]]])
    scores = label_scores(maps, bg_threshold=0.15)
    assert torch.allclose(scores[0], torch.full((1, 4), 0.15))
    assert torch.allclose(scores[1], torch.tensor([[0.0, 0.1, 0.2, 1.0]]))
    assert scores.argmax(0).tolist() == [[2, 0, 1, 1]]


def test_probabilities_are_a_softmax_at_the_temperature():
    scores = torch.tensor([[[0.4]], [[0.6]], [[0.1]]])
    probabilities = scores_to_probabilities(scores, temperature=0.1)
    expected = torch.tensor([4.0, 6.0, 1.0]).exp() / torch.tensor([4.0, 6.0, 1.0]).exp().sum()
    assert torch.allclose(probabilities[:, 0, 0], expected)


def test_settings_outside_their_range_are_refused():
    with raises_worded(r"--bg-threshold must lie in \[0, 1\], got 1.5"):
        SegmenterConfig(bg_threshold=1.5)
    with raises_worded("temperature must be positive"):
        SegmenterConfig(temperature=0.0)
