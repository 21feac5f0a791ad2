"""The report of an evaluation: what was run on what, the metrics, per-class rows, counts and timings."""

from pathlib import Path
from typing import Optional

import torch

from ..datasets import SegmentationDataset
from ..errors import WildsegError, first_line, setting
from ..metrics import mean_class_accuracy, mean_iou, per_class_accuracy, per_class_iou, pixel_accuracy
from .loop import Evaluation
from .scoring import PROTOCOLS


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
        raise WildsegError(f"cannot read {setting('ids')} {path}: {first_line(error)}") from None
    if not wanted:
        raise WildsegError(f"{setting('ids')} {path} lists no image id: give one id per line")
    known = set(dataset.ids)
    unknown = [image_id for image_id in wanted if image_id not in known]
    if unknown:
        raise WildsegError(
            f"{len(unknown)} id(s) in {path} are not in {dataset.name} (first: {unknown[0]!r}): "
            "list ids of this data set and split"
        )
    return list(dict.fromkeys(wanted))
