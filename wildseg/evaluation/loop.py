"""Evaluating a segmenter over a data set: samples read ahead, segmented in batches, counted in a confusion
matrix against their ground truth."""

import time
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional, Protocol

import numpy as np
import torch

from ..config import REGION_METHODS
from ..datasets import SegmentationDataset
from ..datasets.base import Sample
from ..errors import WildsegError, first_line
from ..images import ImageInput
from ..methods.corrclip import majority_labels
from ..metrics import confusion_matrix
from ..refinement.regions import resized_regions
from .predictions import PredictionStore
from .scoring import PROTOCOLS, Query, build_query, candidate_classes, class_prediction, dense_class_prediction


class SegmenterLike(Protocol):
    """What `evaluate` needs of a segmenter (tests use stand-ins): its `config` (`method`, `background_threshold`)
    and batch calls."""

    config: Any

    def segment_many(self, images: Iterable[Any], labels: Callable[[Any], list[str]], decode_workers: int,
                     read: Callable[[Any], ImageInput]) -> Iterator: ...

    def query_probabilities_many(self, images: Iterable[Any], queries: Callable[[Any], list[str]],
                                 decode_workers: int, read: Callable[[Any], ImageInput]) -> Iterator: ...

    def settings(self) -> dict: ...


@dataclass
class Evaluation:
    """What a run over a data set accumulated."""

    confusion: torch.Tensor
    evaluated: int = 0
    reused: int = 0
    failed: list[dict] = field(default_factory=list)
    timings_s: dict[str, float] = field(default_factory=dict)
    image_sizes: Counter = field(default_factory=Counter)
    """How many images of each (height, width) were scored."""

    def add(self, other: "Evaluation") -> None:
        """Count another part of the run (a Ray worker's chunk): confusion, counts, failures, stage seconds."""
        self.confusion += other.confusion
        self.evaluated += other.evaluated
        self.reused += other.reused
        self.failed.extend(other.failed)
        self.image_sizes.update(other.image_sizes)
        for stage, seconds in other.timings_s.items():
            _add_time(self.timings_s, stage, seconds)


def evaluate(
    segmenter: SegmenterLike,
    dataset: SegmentationDataset,
    ids: list[str],
    protocol: str = "open",
    store: Optional[PredictionStore] = None,
    on_image: Callable[[str, str], None] = lambda image_id, outcome: None,
    area_threshold: Optional[float] = None,
    workers: int = 2,
) -> Evaluation:
    """Segment every image of `ids` under `protocol` and accumulate the confusion matrix against ground truth.

    The samples are read by `workers` threads ahead of the segmenter, which segments them as a batch
    (`Segmenter.segment_many`, or for the dense method `query_probabilities_many`). An image that cannot be read
    or segmented is recorded in `failed` and the run goes on. `on_image(id, outcome)` is called after each
    image with outcome `done`, `reused` or `failed`. `area_threshold` is the dense method's (SCLIP's, see
    `dense_class_prediction`).
    """
    if protocol not in PROTOCOLS:
        raise WildsegError(f"unknown protocol {protocol!r}: use one of {', '.join(PROTOCOLS)}")
    classes = len(dataset.classes)
    evaluation = Evaluation(torch.zeros(classes, classes, dtype=torch.int64))
    started = time.perf_counter()
    dense = segmenter.config.method == "dense"
    samples: dict[str, Sample] = {}
    queries: dict[str, Query] = {}

    def count(image_id: str, prediction: np.ndarray, truth: np.ndarray, outcome: str) -> None:
        evaluation.confusion += confusion_matrix(prediction, truth, classes, dataset.ignore_index)
        evaluation.evaluated += 1
        evaluation.reused += outcome == "reused"
        evaluation.image_sizes[tuple(truth.shape[:2])] += 1
        on_image(image_id, outcome)

    def fail(image_id: str, reason: str) -> None:
        evaluation.failed.append({"id": image_id, "reason": reason})
        on_image(image_id, "failed")

    def to_segment() -> Iterator[str]:
        """The ids the segmenter must answer; the others (reused, nothing to ask, unreadable) are counted here."""
        for image_id, sample, reason in _read_ahead(dataset, ids, workers, evaluation.timings_s):
            if sample is None:
                fail(image_id, reason)
                continue
            prediction = store.load(image_id, sample.truth.shape) if store else None
            if prediction is not None:
                count(image_id, prediction, sample.truth, "reused")
                continue
            query = build_query(dataset, candidate_classes(dataset, sample.truth, protocol), protocol,
                                threshold_row=not dense)
            if not query.labels:
                # Nothing to ask: the background where there is one; else no pixel is scored, and any class will do.
                count(image_id, np.full(sample.truth.shape, query.classes[0] if query.classes else 0, np.uint8),
                      sample.truth, "done")
                continue
            samples[image_id], queries[image_id] = sample, query
            yield image_id

    batch = segmenter.query_probabilities_many if dense else segmenter.segment_many
    clock = time.perf_counter()
    for item in batch(to_segment(), lambda image_id: queries[image_id].labels, decode_workers=workers,
                      read=lambda image_id: samples[image_id].image):
        sample, query = samples.pop(item.source), queries.pop(item.source)
        if item.error is not None:
            fail(item.source, item.error)
            continue
        try:
            prediction = _prediction(segmenter, dataset, item, query, sample.truth.shape, area_threshold,
                                     evaluation.timings_s)
            if store:
                store.save(item.source, prediction)
        except (WildsegError, OSError) as error:
            fail(item.source, first_line(error))
            continue
        count(item.source, prediction, sample.truth, "done")
    evaluation.timings_s["predict_s"] = time.perf_counter() - clock
    evaluation.timings_s["total_s"] = time.perf_counter() - started
    return evaluation


def _read_ahead(dataset: SegmentationDataset, ids: list[str], workers: int, timings: dict[str, float]
                ) -> Iterator[tuple[str, Optional[Sample], Optional[str]]]:
    """(id, sample, None) for each id in order, or (id, None, reason) where it cannot be read, `workers` threads
    reading up to twice as many samples ahead; their seconds add up in `read_s`."""
    def read(image_id: str) -> tuple[Optional[Sample], Optional[str], float]:
        clock = time.perf_counter()
        try:
            return dataset.load(image_id), None, time.perf_counter() - clock
        except (WildsegError, OSError) as error:
            return None, first_line(error), time.perf_counter() - clock

    with ThreadPoolExecutor(max(1, workers), thread_name_prefix="wildseg-read") as executor:
        ahead: deque = deque()
        for image_id in ids:
            ahead.append((image_id, executor.submit(read, image_id)))
            if len(ahead) > 2 * max(1, workers):
                yield _finished_read(*ahead.popleft(), timings)
        while ahead:
            yield _finished_read(*ahead.popleft(), timings)


def _finished_read(image_id: str, future: Future, timings: dict[str, float]
                   ) -> tuple[str, Optional[Sample], Optional[str]]:
    sample, reason, seconds = future.result()
    _add_time(timings, "read_s", seconds)
    return image_id, sample, reason


def _prediction(segmenter: SegmenterLike, dataset: SegmentationDataset, item, query: Query,
                shape: tuple[int, int], area_threshold: Optional[float], timings: dict[str, float]) -> np.ndarray:
    """An image's predicted classes from what the segmenter gave (the item's `result`): the dense method's query
    probabilities, each region taking its majority class where the method reads regions (CorrCLIP's map correction,
    from the item's `decoded` regions), or a SegmentationResult whose stage seconds add up in `timings`."""
    result = item.result
    if segmenter.config.method == "dense":
        prediction = dense_class_prediction(result, query, shape, segmenter.config.background_threshold,
                                            area_threshold, dataset.background_class)
        if getattr(segmenter.config, "method_name", None) in REGION_METHODS and item.decoded is not None:
            prediction = majority_labels(prediction, resized_regions(item.decoded.regions, shape))
        return prediction
    for stage, seconds in result.timings.items():
        _add_time(timings, stage, seconds)
    return class_prediction(result.scores, query, shape)


def _add_time(timings: dict[str, float], stage: str, seconds: float) -> None:
    timings[stage] = timings.get(stage, 0.0) + seconds


