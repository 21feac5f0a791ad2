"""Evaluation policy: under which protocol each method is run on a data set, and how a run departs from it.

The relevance method runs with wildseg's defaults (background threshold 0.4 where background is a class, else 0).
A dense method runs under the published protocol of the official code its name follows (`methods.published_protocols`:
NACLIP's, SCLIP's, ClearCLIP's; NACLIP's for methods without one), with that code's class lists word for word;
every given option, class list or protocol that departs from the published run is a deviation of the report.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Optional

from .. import methods
from ..choices import (
    DEFAULT_ATTENTION,
    DEFAULT_BG_THRESHOLD,
    DEFAULT_DENSE_BG_THRESHOLD,
    DEFAULT_REGIONS,
    DEFAULT_TEMPLATES,
)
from ..datasets import SegmentationDataset
from ..datasets.classes import ClassName, published_class_prompts
from ..errors import WildsegError, setting
from ..resolution import model_image_size
from .scoring import protocol_bg_threshold

FALLBACK = methods.PROTOCOL_FALLBACK
"""The published protocol a dense method without one of its own is run under."""


def dense_protocol(method: str, dataset_key: str, dataset: SegmentationDataset) -> dict:
    """The published evaluation protocol a dense method follows on a data set of the registry.

    Args:
        method: a dense method's name; one without published protocols follows NACLIP's.
        dataset_key: the data set's key in `datasets.DATASETS`.
        dataset: the data set (whether background is a class sets the default threshold).

    Returns:
        `follows` (whose protocol), `source`, `config`, `class_list`, `area_threshold`, `published_miou`,
        `normalization` (the official code's pixel `mean` and `std`, 0-255 units), `window_padding` (None, or
        "zero" where the official code zero-pads windows whose sides are no multiple of the patch size), `options`
        (SegmenterConfig values: the common settings with the data set's on top; where none sets a background
        threshold, 0.1 if background is a class, else 0) and the `deviations` of wildseg's run from the
        official one known in advance.
    """
    follows = method if methods.published_protocols(method) is not None else FALLBACK
    published = methods.published_protocols(follows)
    entry = dict(published["datasets"].get(dataset_key, {}))
    deviations = list(published["known_deviations"])
    if follows != method:
        deviations.append(f"{method} has no published evaluation protocol: NACLIP's is used")
        entry.pop("published_miou", None)
    if dataset_key not in published["datasets"]:
        deviations.append(f"{follows} published no protocol for this data set: its common settings are used")
    metadata = {key: entry.pop(key, None) for key in ("config", "class_list", "area_threshold", "published_miou")}
    options = {**published["common"], **entry}
    options.setdefault("bg_threshold", protocol_bg_threshold(dataset, DEFAULT_DENSE_BG_THRESHOLD))
    if "pamr_dilations" in options:
        options["pamr_dilations"] = tuple(options["pamr_dilations"])
    return {"follows": follows, "source": published["source"], **metadata,
            "normalization": {"mean": published["pixel_mean"], "std": published["pixel_std"]},
            "window_padding": published.get("window_padding"), "options": options, "deviations": deviations}


def with_published_class_list(dataset: SegmentationDataset, class_list: str) -> SegmentationDataset:
    """The data set with the queries of a published class list (`datasets/classnames/published`), word for word,
    wildseg's class names kept for the report."""
    published = published_class_prompts(class_list)
    if len(published) != len(dataset.classes):
        raise WildsegError(f"the published class list {class_list} has {len(published)} classes, {dataset.name} "
                           f"{len(dataset.classes)}: pass {setting('class_names')} with one line per class")
    return dataset.with_classes([ClassName(entry.name, prompts, entry.is_background)
                                 for entry, prompts in zip(dataset.classes, published)])


@dataclass(frozen=True)
class RunProtocol:
    """How one method is evaluated: the SegmenterConfig values where none is given (`defaults`), the data set with
    the classes it is queried with, SCLIP's area threshold, and for a dense method the published protocol followed
    with the run's deviations (`published`, as the report holds it)."""

    defaults: dict
    dataset: SegmentationDataset
    area_threshold: Optional[float] = None
    published: Optional[dict] = None


def run_protocol(options: dict, dataset_key: str, dataset: SegmentationDataset, class_names: Optional[Path],
                 protocol: str) -> RunProtocol:
    """The protocol of one run.

    Args:
        options: the run's SegmenterConfig values as given (None: not given).
        dataset_key: the data set's registry key.
        dataset: the data set as opened (with `class_names` applied, if given).
        class_names: the own class-name list given, if any (then the published list is not used).
        protocol: `open` or `given` (`scoring.PROTOCOLS`).

    Returns:
        The RunProtocol; the data set given is left as it is.
    """
    if (options.get("method") or "relevance") == "relevance":
        return RunProtocol({"bg_threshold": protocol_bg_threshold(dataset, DEFAULT_BG_THRESHOLD)}, dataset)
    published = dense_protocol(options.get("attention") or DEFAULT_ATTENTION, dataset_key, dataset)
    if "crf" in (options.get("refine") or published["options"]["refine"]):
        raise WildsegError(f"the dense method's eval scores as the official dense segmenters do, with PAMR or no "
                           f"refinement: set {setting('refine')} pamr or none")
    deviations = published["deviations"]
    if class_names is not None and published["class_list"] is not None:
        deviations.append(f"class_names {class_names} instead of the published list {published['class_list']}")
    elif published["class_list"] is not None:
        dataset = with_published_class_list(dataset, published["class_list"])
    if protocol != "open":
        deviations.append("the label-given protocol instead of the published open-vocabulary one")
    region_masks = methods.published_protocols(published["follows"]).get("region_masks")
    regions = options.get("regions")
    if region_masks is not None and (regions is None or not Path(regions).is_dir()):
        deviations.append(f"regions {regions or DEFAULT_REGIONS} instead of {region_masks}")
    expected = {"stride": (published["options"].get("window", 0) // 2) or None, "templates": DEFAULT_TEMPLATES,
                **published["options"]}
    for name, value in options.items():
        if name in expected and value is not None and value != expected[name]:
            deviations.append(f"{name} {value} instead of {expected[name]}")
    return RunProtocol({**published["options"], "background_words": ()}, dataset, published["area_threshold"],
                       published)


def normalization_deviations(published: dict, segmenter_settings: dict) -> list[str]:
    """The deviation of a run's pixel normalisation from the official code's, if any.

    Args:
        published: the protocol followed (`dense_protocol`).
        segmenter_settings: the run's `Segmenter.settings()` (its `dense.normalization`, 0-255 units).

    Returns:
        One line naming both sets of constants where they differ, else nothing.
    """
    used, official = segmenter_settings["dense"]["normalization"], published["normalization"]
    if [*used["mean"], *used["std"]] == [*official["mean"], *official["std"]]:
        return []
    whose = "the model's own" if used["source"] == "model" else used["source"]
    return [f"pixels normalised with {whose} constants, mean {_constants(used['mean'])} and std "
            f"{_constants(used['std'])}, instead of the official code's, mean {_constants(official['mean'])} and std "
            f"{_constants(official['std'])}"]


def padding_deviations(published: dict, segmenter_settings: dict, image_sizes: Mapping[tuple[int, int], int]
                       ) -> list[str]:
    """The deviation of a run whose official code zero-pads windows (`window_padding` "zero", ClearCLIP's) where one
    of its images had a window the image edge cut to a side that is no multiple of the patch size: wildseg drops
    that remainder, as NACLIP and SCLIP do.

    Args:
        published: the protocol followed (`dense_protocol`).
        segmenter_settings: the run's `Segmenter.settings()` (window, sides, patch size).
        image_sizes: how many images of each (height, width) the run scored.

    Returns:
        One line with the number of such images, or nothing when there were none.
    """
    dense = segmenter_settings["dense"]
    window, patch = dense["window"], dense["patch_size"]
    if published["window_padding"] != "zero" or not window:
        return []
    padded = sum(count for size, count in image_sizes.items()
                 if any(side < window and side % patch
                        for side in model_image_size(*size, dense["short_side"], dense["long_side"])))
    if not padded:
        return []
    return [f"{published['follows']} zero-pads a window whose side the image edge cuts to no multiple of the "
            f"{patch}-pixel patches ({padded} image{'s' if padded > 1 else ''} of this run); wildseg drops the "
            "remainder, as NACLIP and SCLIP do"]


def _constants(values: Iterable[float]) -> str:
    return "(" + ", ".join(f"{value:.7g}" for value in values) + ")"
