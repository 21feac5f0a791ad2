"""Automatic labels: which classes of a vocabulary are in an image, found by segmenting with all of them.

Rule: the image is segmented with every prompt of the vocabulary (the segmenter's method, views and
background rule, no refinement); a class scores the max over its prompts' scores and owns the pixels where
it has the best score and beats the background. A class is found when it owns at least `min_area` of the
image and its mean score over those pixels is at least `min_score`. The found classes are then segmented as
if the user had given them.

Many images go in two passes per chunk (`segment_with_found_labels`): the vocabulary's scores of every image of
the chunk in shared model batches, then the segmentation of each with its found labels, in shared batches too,
from the pixels decoded in the first pass. The command line, its Ray workers and the demo all run it.

Vocabularies are class-name lists (`datasets.classes`): the built-in `voc` (20 PASCAL VOC objects), `coco`
(80 COCO objects) and `ade` (150 ADE20K classes), or a file in that format. A background line is left out.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Optional

import numpy as np

from .choices import AUTO_MIN_AREA, AUTO_MIN_SCORES, VOCABULARIES
from .datasets.classes import ClassName, builtin_class_names, read_class_names
from .errors import WildsegError
from .images import ImageInput

if TYPE_CHECKING:
    from .streaming import BatchItem

CHUNK = 32
"""Images per two-pass chunk: their decoded pixels are kept between the passes."""


@dataclass(frozen=True)
class AutoLabelRule:
    """Thresholds for keeping a vocabulary class: share of the image's pixels it owns, and its mean score there
    (None: the method's default in AUTO_MIN_SCORES)."""

    min_area: float = AUTO_MIN_AREA
    min_score: Optional[float] = None


@dataclass(frozen=True)
class Candidate:
    """A vocabulary class that owns pixels of the image: its share of them, its mean score there, and whether
    it passed the rule."""

    label: str
    pixel_fraction: float
    mean_score: float
    found: bool


def load_vocabulary(vocabulary: str) -> list[ClassName]:
    """A built-in vocabulary by name, or a class-name file by path; the background line is dropped."""
    if vocabulary in VOCABULARIES:
        classes = builtin_class_names(VOCABULARIES[vocabulary])
    elif Path(vocabulary).is_file():
        classes = read_class_names(Path(vocabulary))
    else:
        raise WildsegError(f"unknown vocabulary {vocabulary!r}: use {', '.join(VOCABULARIES)} or the path of a "
                           "class-name file (one class per line, synonyms after commas)")
    objects = [entry for entry in classes if not entry.is_background]
    if not objects:
        raise WildsegError(f"vocabulary {vocabulary} names only background: list the classes to look for")
    return objects


def candidates_from_scores(scores: np.ndarray, vocabulary: list[ClassName], rule: AutoLabelRule) -> list[Candidate]:
    """Candidates, most pixels first, from scores (1 + prompts) x h x w whose rows follow the vocabulary's
    prompts in order after the background row."""
    starts = np.cumsum([0] + [len(entry.prompts) for entry in vocabulary])
    grouped = np.stack([scores[0]] + [scores[1 + start : 1 + end].max(axis=0)
                                      for start, end in zip(starts[:-1], starts[1:])])
    owner = grouped.argmax(axis=0)
    candidates = []
    for index in np.unique(owner[owner > 0]):
        owned = owner == index
        fraction, score = float(owned.mean()), float(grouped[index][owned].mean())
        found = fraction >= rule.min_area and score >= rule.min_score
        candidates.append(Candidate(vocabulary[index - 1].name, fraction, score, found))
    return sorted(candidates, key=lambda candidate: -candidate.pixel_fraction)


def vocabulary_prompts(vocabulary: list[ClassName]) -> list[str]:
    """Every prompt of the vocabulary, class by class: the labels its first pass segments with."""
    return [prompt for entry in vocabulary for prompt in entry.prompts]


def find_labels(segmenter, image: ImageInput, vocabulary: list[ClassName],
                rule: AutoLabelRule = AutoLabelRule()) -> list[Candidate]:
    """The vocabulary's candidates in one image by the rule, its score threshold defaulting to the segmenter
    method's (those with `found` set are its labels)."""
    return candidates_from_scores(segmenter.label_scores(image, vocabulary_prompts(vocabulary)), vocabulary,
                                  rule_for(rule, segmenter.config.method))


def segment_with_found_labels(segmenter, images: Iterable[Any], vocabulary_name: str, vocabulary: list[ClassName],
                              rule: AutoLabelRule = AutoLabelRule(), decode_workers: int = 2,
                              refine_workers: Optional[int] = None, read: Optional[Callable[[Any], ImageInput]] = None
                              ) -> Iterator[BatchItem]:
    """Segment each image with the classes of the vocabulary found in it, in two passes per chunk of CHUNK images.

    Args:
        segmenter: the Segmenter (its method, views and background rule find the labels too).
        images: the images, or any keys with `read`.
        vocabulary_name: the vocabulary's name for the records.
        vocabulary: its classes (`load_vocabulary`).
        rule: the thresholds (the score's defaulting to the method's).
        decode_workers, refine_workers, read: as `Segmenter.segment_many`'s.

    Returns:
        A BatchItem per image as it finishes, whose `auto_labels` is the record of every candidate
        (`auto_label_record`); an image where no class passes fails with the reason, its record kept.
    """
    from .streaming import BatchItem  # torch: once segmenting

    rule = rule_for(rule, segmenter.config.method)
    prompts = vocabulary_prompts(vocabulary)
    remaining = iter(images)
    while chunk := list(islice(remaining, CHUNK)):
        found, records, decoded = {}, {}, {}
        for item in segmenter.label_scores_many(chunk, prompts, decode_workers, read):
            if item.error is not None:
                yield item
                continue
            candidates = candidates_from_scores(item.result, vocabulary, rule)
            record = auto_label_record(vocabulary_name, rule, candidates)
            try:
                found[item.source] = found_labels(candidates, rule)
            except WildsegError as error:
                yield BatchItem(item.source, error=str(error), auto_labels=record)
                continue
            records[item.source], decoded[item.source] = record, item.decoded
        for item in segmenter.segment_many(list(found), found.__getitem__, decode_workers, refine_workers,
                                           read=decoded.pop):
            item.auto_labels = records.pop(item.source)
            yield item


def rule_for(rule: AutoLabelRule, method: str) -> AutoLabelRule:
    """The rule with the method's default score threshold filled in."""
    return rule if rule.min_score is not None else replace(rule, min_score=AUTO_MIN_SCORES[method])


def found_labels(candidates: list[Candidate], rule: AutoLabelRule) -> list[str]:
    """The names of the found candidates, or a one-line error naming the best one when none passed the rule."""
    names = [candidate.label for candidate in candidates if candidate.found]
    if names:
        return names
    best = (f" (best: {candidates[0].label!r} on {candidates[0].pixel_fraction:.1%} of the pixels, "
            f"score {candidates[0].mean_score:.2f})" if candidates else " (all pixels are background)")
    raise WildsegError(f"no class of the vocabulary covers {rule.min_area:.1%} of the image with a mean score of "
                       f"{rule.min_score}{best}: lower the rule's min_area or min_score (--auto-min-area, "
                       "--auto-min-score)")


def auto_label_record(vocabulary: str, rule: AutoLabelRule, candidates: list[Candidate]) -> dict:
    """What the JSON output says about automatic labels: vocabulary, rule, and every candidate with its scores."""
    return {"vocabulary": vocabulary, "rule": asdict(rule), "candidates": [asdict(item) for item in candidates]}
