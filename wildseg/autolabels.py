"""Automatic labels: which classes of a vocabulary are in an image, found by segmenting with all of them.

Rule: the image is segmented with every prompt of the vocabulary (the segmenter's method, views and
background rule, no refinement); a class scores the max over its prompts' scores and owns the pixels where
it has the best score and beats the background. A class is found when it owns at least `min_area` of the
image and its mean score over those pixels is at least `min_score`. The found classes are then segmented as
if the user had given them.

Vocabularies are class-name lists (`datasets.classes`): the built-in `voc` (20 PASCAL VOC objects), `coco`
(80 COCO objects) and `ade` (150 ADE20K classes), or a file in that format. A background line is left out.
"""

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

import numpy as np

from .choices import AUTO_MIN_AREA, AUTO_MIN_SCORES, VOCABULARIES
from .datasets.classes import ClassName, builtin_class_names, read_class_names
from .errors import WildsegError
from .images import ImageInput



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


def find_labels(segmenter, image: ImageInput, vocabulary: list[ClassName],
                rule: AutoLabelRule = AutoLabelRule()) -> list[Candidate]:
    """The vocabulary's candidates in `image` by the rule, its score threshold defaulting to the segmenter
    method's (those with `found` set are its labels)."""
    prompts = [prompt for entry in vocabulary for prompt in entry.prompts]
    return candidates_from_scores(segmenter.label_scores(image, prompts), vocabulary,
                                  rule_for(rule, segmenter.method))


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
                       f"{rule.min_score}{best}: lower --auto-min-area or --auto-min-score")


def auto_label_record(vocabulary: str, rule: AutoLabelRule, candidates: list[Candidate]) -> dict:
    """What the JSON output says about automatic labels: vocabulary, rule, and every candidate with its scores."""
    return {"vocabulary": vocabulary, "rule": asdict(rule), "candidates": [asdict(item) for item in candidates]}
