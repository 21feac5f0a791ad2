"""From merged label maps to per-pixel label scores and probabilities, with background as class 0.

Relevance method (documented in the README): each label's map is min-max normalised over the image to
[0, 1]; the background gets the constant score `bg_threshold`, so a pixel is background when no label's
normalised relevance reaches the threshold.

Dense method (as the training-free dense segmenters score patches): the labels' cosine maps, with those of
any background words, go through softmax(logit_scale * cosine) over all of them; a label scores its
probability, the background the larger of `bg_threshold` and its words' best probability. So a pixel is
background when no label is at least `bg_threshold` likely or a background word is likelier.

Probabilities are a softmax of the scores at temperature `temperature` (sharper for smaller values); the
argmax is unchanged, and they are the refinement's input.
"""

import torch

from .choices import DEFAULT_BG_THRESHOLD, DEFAULT_TEMPERATURE


def normalize_per_label(maps: torch.Tensor) -> torch.Tensor:
    """Min-max normalise each label's map (labels x H x W) to [0, 1]; a flat map becomes all zeros."""
    flat = maps.flatten(1)
    low = flat.min(dim=1).values[:, None, None]
    span = (flat.max(dim=1).values[:, None, None] - low).clamp(min=torch.finfo(maps.dtype).tiny)
    return (maps - low) / span


def label_scores(maps: torch.Tensor, bg_threshold: float = DEFAULT_BG_THRESHOLD) -> torch.Tensor:
    """Scores (1 + labels) x H x W: row 0 is the background's constant threshold, row i the i-th label's map."""
    normalized = normalize_per_label(maps)
    background = torch.full_like(normalized[:1], bg_threshold)
    return torch.cat([background, normalized])


def dense_scores(cosines: torch.Tensor, labels: int, logit_scale: float, bg_threshold: float) -> torch.Tensor:
    """Scores (1 + labels) x H x W from cosine maps ((labels + background words) x H x W) by the dense rule."""
    probabilities = torch.softmax(logit_scale * cosines, dim=0)
    background = torch.full_like(probabilities[:1], bg_threshold)
    if len(cosines) > labels:
        background = torch.maximum(background, probabilities[labels:].amax(dim=0, keepdim=True))
    return torch.cat([background, probabilities[:labels]])


def scores_to_probabilities(scores: torch.Tensor, temperature: float = DEFAULT_TEMPERATURE) -> torch.Tensor:
    """Per-pixel class probabilities softmax(scores / temperature) over the class axis."""
    return torch.softmax(scores / temperature, dim=0)
