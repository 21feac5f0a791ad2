"""How a data set's classes become a segmenter's queries, and its answers predictions.

Protocols:
- `open` (open vocabulary): every class of the data set is a candidate for every image; a background class is
  the segmenter's threshold background together with its stuff words.
- `given` (Zabari & Hoshen's label-given setting): each image's candidates are the classes present in its ground
  truth; background comes from the threshold rule alone.

A class scores the max of its synonyms' probabilities; the prediction is the best-scoring candidate class. When
the data set has no background class, the segmenter's background row is left out of that choice. The dense
method is scored as the official dense segmenters score it (`dense_class_prediction`).
"""

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..datasets import SegmentationDataset
from ..errors import WildsegError, setting
from ..labels import MAX_LABELS
from ..resolution import upsample_argmax

PROTOCOLS = {
    "open": "open vocabulary: every class of the data set is a candidate for every image",
    "given": "label-given (Zabari & Hoshen): each image gets the classes present in its ground truth",
}
@dataclass(frozen=True)
class Query:
    """The labels a segmenter is asked for, and for each candidate class the rows of its scores that it owns.

    Row 0 of a segmentation's scores is its threshold background, row 1 + i is `labels[i]`.
    """

    labels: list[str]
    classes: list[int]
    rows: list[list[int]]


def candidate_classes(dataset: SegmentationDataset, truth: np.ndarray, protocol: str) -> list[int]:
    """The non-background classes a segmenter is asked for on an image with ground truth `truth`."""
    scored = [index for index in dataset.scored_classes if index != dataset.background_class]
    if protocol == "open":
        return scored
    present = set(np.unique(truth).tolist())
    return [index for index in scored if index in present]


def build_query(dataset: SegmentationDataset, candidates: list[int], protocol: str, threshold_row: bool = True
                ) -> Query:
    """Flatten the candidates' synonyms into one label list and remember which rows belong to which class.

    With `threshold_row` the rows are those of a segmentation's scores (row 0 the threshold background, which the
    background class owns); without, they index the label list itself (the dense method's query probabilities).
    """
    first = 1 if threshold_row else 0
    labels, classes, rows = [], [], []
    for index in candidates:
        prompts = dataset.classes[index].prompts
        classes.append(index)
        rows.append(list(range(first + len(labels), first + len(labels) + len(prompts))))
        labels.extend(prompts)
    background = dataset.background_class
    if background is not None:
        stuff = dataset.classes[background].prompts if protocol == "open" else ()
        classes.append(background)
        rows.append([0] * threshold_row + list(range(first + len(labels), first + len(labels) + len(stuff))))
        labels.extend(stuff)
    return Query(labels, classes, rows)


def class_prediction(scores: np.ndarray, query: Query, size: tuple[int, int]) -> np.ndarray:
    """Per pixel of an image of `size`, the candidate class whose best synonym has the highest probability.

    `scores` may be at a lower working resolution; the class scores are then bilinearly upsampled.
    """
    grouped = np.stack([scores[rows].max(axis=0) for rows in query.rows])
    return np.asarray(query.classes, dtype=np.uint8)[upsample_argmax(grouped, *size)]


def protocol_bg_threshold(dataset: SegmentationDataset, default: float) -> float:
    """Background threshold for a data set: `default` where background is a class, 0 (no background) otherwise."""
    return default if dataset.background_class is not None else 0.0


def dense_class_prediction(probabilities: np.ndarray, query: Query, size: tuple[int, int], bg_threshold: float,
                           area_threshold: Optional[float], background: Optional[int]) -> np.ndarray:
    """The official dense segmenters' prediction (NACLIP, SCLIP, ClearCLIP `postprocess_result`) from per-query
    probabilities (`query` without threshold row): a class scores the max over its queries, bilinearly resized to
    `size` if need be; with `area_threshold` (SCLIP), a foreground class that wins on no more than that share of
    the pixels won by any foreground class scores 0 everywhere; the best class wins, and the background class
    where the best score is below `bg_threshold`."""
    maps = torch.from_numpy(np.ascontiguousarray(probabilities))
    grouped = torch.stack([maps[rows].amax(dim=0) if rows else torch.zeros_like(maps[0]) for rows in query.rows])
    if tuple(grouped.shape[1:]) != tuple(size):
        grouped = F.interpolate(grouped[None], size=size, mode="bilinear", align_corners=False)[0]
    if area_threshold is not None:
        foreground = torch.tensor([index != background for index in query.classes])
        areas = torch.bincount(grouped.argmax(dim=0).flatten(), minlength=len(query.classes))
        dropped = foreground & (areas <= area_threshold * areas[foreground].sum())
        grouped[dropped] = 0
    best, winner = grouped.max(dim=0)
    prediction = torch.tensor(query.classes, dtype=torch.uint8)[winner]
    if background is not None:
        prediction[best < bg_threshold] = background
    return prediction.numpy()


def check_dataset(dataset: SegmentationDataset, protocol: str) -> None:
    """Refuse up front what no image could pass: too many classes for a mask, too many prompts for a segmenter."""
    if len(dataset.classes) > MAX_LABELS:
        raise WildsegError(f"{dataset.name} has {len(dataset.classes)} classes; predictions hold at most {MAX_LABELS}")
    prompts = sum(len(dataset.classes[index].prompts) for index in dataset.scored_classes)
    if protocol == "open" and prompts > MAX_LABELS:
        raise WildsegError(
            f"{dataset.name} has {prompts} class names and synonyms, a segmentation takes at most {MAX_LABELS}: "
            f"shorten the list ({setting('class_names')}) or use {setting('given_labels')}"
        )


