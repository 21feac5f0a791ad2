"""Benchmark evaluation: protocols, class scores from synonyms, the confusion matrix over a data set, reports.

Protocols:
- `open` (open vocabulary): every class of the data set is a candidate for every image; a background class
  is the segmenter's threshold background together with its stuff words.
- `given` (Zabari & Hoshen's label-given setting): each image's candidates are the classes present in its
  ground truth; background comes from the threshold rule alone.

A class scores the max of its synonyms' probabilities; the prediction is the best-scoring candidate class.
When the data set has no background class, the segmenter's background row is left out of that choice.

The dense method is scored as the official dense segmenters score it (`dense_class_prediction`), under the
published protocol of the segmenter its attention names (`dense_protocol`, wildseg/dense_protocols.json),
with the class lists they evaluate with, word for word.
"""

import json
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from .choices import DEFAULT_DENSE_BG_THRESHOLD
from .datasets import SegmentationDataset
from .datasets.base import Sample
from .datasets.base import read_label_image
from .datasets.classes import ClassName, published_class_prompts
from .errors import WildsegError, first_line
from .images import ImageInput
from .labels import MAX_LABELS
from .metrics import (
    confusion_matrix,
    mean_class_accuracy,
    mean_iou,
    per_class_accuracy,
    per_class_iou,
    pixel_accuracy,
)
from .outputs import label_palette, mask_image, write_atomically, write_json
from .resolution import upsample_argmax

PROTOCOLS = {
    "open": "open vocabulary: every class of the data set is a candidate for every image",
    "given": "label-given (Zabari & Hoshen): each image gets the classes present in its ground truth",
}
SETTINGS_FILE = "settings.json"


class SegmenterLike(Protocol):
    """What `evaluate` needs of a segmenter (tests use stand-ins)."""

    method: str
    bg_threshold: float

    def segment_many(self, images: Iterable[Any], labels: Callable[[Any], list[str]], decode_workers: int,
                     read: Callable[[Any], ImageInput]) -> Iterator: ...

    def query_probabilities_many(self, images: Iterable[Any], queries: Callable[[Any], list[str]],
                                 decode_workers: int, read: Callable[[Any], ImageInput]) -> Iterator: ...

    def settings(self) -> dict: ...


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


def dense_protocol(attention: str, dataset_key: str, dataset: SegmentationDataset) -> dict:
    """The published evaluation protocol of the dense segmenter that `attention` names (NACLIP, SCLIP, ClearCLIP;
    NACLIP's for the others) on a data set of the registry, from wildseg/dense_protocols.json: `options` (segmenter
    option values: the segmenter's common settings with the data set's on top; where none sets a background
    threshold, 0.1 if background is a class, else 0), `area_threshold`, `class_list`, `config`, `published_miou`,
    `source`, `follows` and the `deviations` of wildseg's run from the official one known in advance."""
    table = json.loads(resources.files("wildseg").joinpath("dense_protocols.json").read_text(encoding="utf-8"))
    follows = attention if attention in table else "naclip"
    published = table[follows]
    entry = dict(published["datasets"].get(dataset_key, {}))
    deviations = list(published["known_deviations"])
    if follows != attention:
        deviations.append(f"{attention} has no published evaluation protocol: NACLIP's is used")
        entry.pop("published_miou", None)
    if dataset_key not in published["datasets"]:
        deviations.append(f"{follows} published no protocol for this data set: its common settings are used")
    metadata = {key: entry.pop(key, None) for key in ("config", "class_list", "area_threshold", "published_miou")}
    options = {**published["common"], **entry}
    options.setdefault("bg_threshold", protocol_bg_threshold(dataset, DEFAULT_DENSE_BG_THRESHOLD))
    if "pamr_dilations" in options:
        options["pamr_dilations"] = tuple(options["pamr_dilations"])
    return {"follows": follows, "source": published["source"], **metadata, "options": options,
            "deviations": deviations}


def use_published_class_list(dataset: SegmentationDataset, class_list: str) -> None:
    """Give the data set's classes the queries of a published class list (`datasets/classnames/published`), word
    for word, keeping wildseg's class names for the report."""
    published = published_class_prompts(class_list)
    if len(published) != len(dataset.classes):
        raise WildsegError(f"the published class list {class_list} has {len(published)} classes, {dataset.name} "
                           f"{len(dataset.classes)}: pass --class-names with one line per class")
    dataset.rename_classes([ClassName(entry.name, prompts, entry.is_background)
                            for entry, prompts in zip(dataset.classes, published)])


class PredictionStore:
    """Predicted masks saved as `<id>.png` (palette PNG, value = class index), reusable by a later run.

    `settings.json` records what produced them; a run with other settings is refused the folder rather than
    mixing predictions.
    """

    def __init__(self, folder: Path, settings: dict, classes: int):
        self.folder, self.classes, self.palette = Path(folder), classes, label_palette(max(classes, 1))
        record = self.folder / SETTINGS_FILE
        if self.folder.exists() and not self.folder.is_dir():
            raise WildsegError(f"--save-predictions {folder} is a file: give a folder")
        settings = json.loads(json.dumps(settings))
        if record.is_file():
            previous = _read_settings(record)
            changed = sorted(key for key in settings.keys() | previous.keys() if settings.get(key) != previous.get(key))
            if changed:
                raise WildsegError(
                    f"{folder} holds predictions made with other settings ({', '.join(changed)} differ): "
                    "use a new --save-predictions folder, or the same settings to resume"
                )
        elif self.folder.is_dir() and any(self.folder.glob("*.png")):
            raise WildsegError(f"{folder} holds PNG files that wildseg eval did not write: give an empty folder")
        else:
            write_json(record, settings, "the --save-predictions settings")

    def path(self, image_id: str) -> Path:
        return self.folder / f"{image_id}.png"

    def load(self, image_id: str, shape: tuple[int, int]) -> Optional[np.ndarray]:
        """A saved prediction of the given shape, or None when there is none (or it does not fit: unreadable,
        another shape, or a value that is no class)."""
        if not self.path(image_id).is_file():
            return None
        try:
            prediction = read_label_image(self.path(image_id))
        except WildsegError:
            return None
        return prediction if prediction.shape == shape and prediction.max() < self.classes else None

    def save(self, image_id: str, prediction: np.ndarray) -> None:
        write_atomically(self.path(image_id), lambda path: mask_image(prediction, self.palette).save(path, "PNG"))


def _read_settings(record: Path) -> dict:
    try:
        settings = json.loads(record.read_text())
    except (OSError, ValueError) as error:
        raise WildsegError(f"cannot read {record} ({first_line(error)}): delete it with the predictions beside it, "
                           "or use a new --save-predictions folder") from None
    if not isinstance(settings, dict):
        raise WildsegError(f"{record} is not a wildseg eval settings file: use a new --save-predictions folder")
    return settings


def check_dataset(dataset: SegmentationDataset, protocol: str) -> None:
    """Refuse up front what no image could pass: too many classes for a mask, too many prompts for a segmenter."""
    if len(dataset.classes) > MAX_LABELS:
        raise WildsegError(f"{dataset.name} has {len(dataset.classes)} classes; predictions hold at most {MAX_LABELS}")
    prompts = sum(len(dataset.classes[index].prompts) for index in dataset.scored_classes)
    if protocol == "open" and prompts > MAX_LABELS:
        raise WildsegError(
            f"{dataset.name} has {prompts} class names and synonyms, a segmentation takes at most {MAX_LABELS}: "
            "shorten the list (--class-names) or use --given-labels"
        )


@dataclass
class Evaluation:
    """What a run over a data set accumulated."""

    confusion: torch.Tensor
    evaluated: int = 0
    reused: int = 0
    failed: list[dict] = field(default_factory=list)
    timings_s: dict[str, float] = field(default_factory=dict)

    def add(self, other: "Evaluation") -> None:
        """Count another part of the run (a Ray worker's chunk): confusion, counts, failures, stage seconds."""
        self.confusion += other.confusion
        self.evaluated += other.evaluated
        self.reused += other.reused
        self.failed.extend(other.failed)
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
    dense = segmenter.method == "dense"
    samples: dict[str, Sample] = {}
    queries: dict[str, Query] = {}

    def count(image_id: str, prediction: np.ndarray, truth: np.ndarray, outcome: str) -> None:
        evaluation.confusion += confusion_matrix(prediction, truth, classes, dataset.ignore_index)
        evaluation.evaluated += 1
        evaluation.reused += outcome == "reused"
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
            prediction = _prediction(segmenter, dataset, item.result, query, sample.truth.shape, area_threshold,
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


def _prediction(segmenter: SegmenterLike, dataset: SegmentationDataset, result, query: Query,
                shape: tuple[int, int], area_threshold: Optional[float], timings: dict[str, float]) -> np.ndarray:
    """An image's predicted classes from what the segmenter gave: the dense method's query probabilities, or a
    SegmentationResult whose stage seconds add up in `timings`."""
    if segmenter.method == "dense":
        return dense_class_prediction(result, query, shape, segmenter.bg_threshold, area_threshold,
                                      dataset.background_class)
    for stage, seconds in result.timings.items():
        _add_time(timings, stage, seconds)
    return class_prediction(result.scores, query, shape)


def _add_time(timings: dict[str, float], stage: str, seconds: float) -> None:
    timings[stage] = timings.get(stage, 0.0) + seconds


def run_settings(dataset: SegmentationDataset, protocol: str, segmenter_settings: dict) -> dict:
    """Everything that determines the saved predictions: data set (folder, split, ignore index, class prompts),
    protocol, segmenter settings and the weights file's size and modification time."""
    weights = Path(segmenter_settings["weights"])
    return {
        "dataset": dataset.name,
        "root": None if dataset.root is None else str(dataset.root),
        "split": dataset.split,
        "ignore_index": dataset.ignore_index,
        "protocol": protocol,
        "classes": [[name.name, *name.prompts] for name in dataset.classes],
        "segmenter": segmenter_settings,
        "weights_file": {"bytes": weights.stat().st_size, "modified_ns": weights.stat().st_mtime_ns}
        if weights.is_file() else None,
    }


def build_report(
    dataset: SegmentationDataset, settings: dict, selection: dict, evaluation: Evaluation
) -> dict:
    """The JSON report: run settings, image selection, metrics, per-class rows, counts, timings, confusion."""
    timings = dict(evaluation.timings_s)
    segmented = evaluation.evaluated - evaluation.reused
    timings["per_segmented_image_s"] = timings["predict_s"] / segmented if segmented else None
    return {
        **settings,
        "protocol_description": PROTOCOLS[settings["protocol"]],
        "background_class": dataset.background_class,
        "ignore_index": dataset.ignore_index,
        "selection": {"images_in_split": len(dataset), **selection},
        "metrics": summary_metrics(scored_confusion(dataset, evaluation.confusion)),
        "per_class": per_class_rows(dataset, evaluation.confusion),
        "images": {
            "evaluated": evaluation.evaluated,
            "reused": evaluation.reused,
            "failed": len(evaluation.failed),
            "failures": evaluation.failed,
        },
        "timings_s": timings,
        "confusion": evaluation.confusion.tolist(),
    }


def per_class_rows(dataset: SegmentationDataset, confusion: torch.Tensor) -> list[dict]:
    """Per scored class: name, IoU, accuracy (NaN -> None when undefined) and pixel counts."""
    iou, accuracy = per_class_iou(confusion), per_class_accuracy(confusion)
    rows = []
    for index in dataset.scored_classes:
        rows.append({
            "class": index,
            "name": dataset.classes[index].name,
            "iou": _defined(iou[index]),
            "accuracy": _defined(accuracy[index]),
            "truth_pixels": int(confusion[index].sum()),
            "predicted_pixels": int(confusion[:, index].sum()),
            "true_positive_pixels": int(confusion[index, index]),
        })
    return rows


def scored_confusion(dataset: SegmentationDataset, confusion: torch.Tensor) -> torch.Tensor:
    """The confusion matrix without the rows and columns of an ignore index inside the class range."""
    scored = torch.tensor(dataset.scored_classes)
    return confusion[scored][:, scored]


def summary_metrics(confusion: torch.Tensor) -> dict[str, Optional[float]]:
    """mIoU, pixel accuracy and mean class accuracy (fractions, not percent; None without counted pixels)."""
    if confusion.sum() == 0:
        return {"miou": None, "pixel_accuracy": None, "mean_class_accuracy": None}
    return {
        "miou": mean_iou(confusion),
        "pixel_accuracy": pixel_accuracy(confusion),
        "mean_class_accuracy": mean_class_accuracy(confusion),
    }


def _defined(value: torch.Tensor) -> Optional[float]:
    return None if torch.isnan(value) else float(value)


def load_ids(path: Path, dataset: SegmentationDataset) -> list[str]:
    """Image ids listed one per line in `path`, in the file's order; every id must belong to the data set."""
    try:
        wanted = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as error:
        raise WildsegError(f"cannot read --ids {path}: {first_line(error)}") from None
    if not wanted:
        raise WildsegError(f"--ids {path} lists no image id: give one id per line")
    known = set(dataset.ids)
    unknown = [image_id for image_id in wanted if image_id not in known]
    if unknown:
        raise WildsegError(
            f"{len(unknown)} id(s) in {path} are not in {dataset.name} (first: {unknown[0]!r}): "
            "list ids of this data set and split"
        )
    return list(dict.fromkeys(wanted))
