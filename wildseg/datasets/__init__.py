"""Benchmark data sets for `wildseg eval`: a registry of readers for the official on-disk layouts.

Each entry names what `--root` must point at; `open_dataset` checks the options that only some data sets
take (`--download` for VOC, `--ignore-index` for folders) and applies an optional class-name list.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from ..errors import WildsegError, setting
from .ade20k import ade20k_dataset
from .base import Sample, SegmentationDataset
from .cityscapes import cityscapes_dataset
from .classes import ClassName, read_class_names
from .coco import CocoObjects, coco_stuff_dataset
from .context import context_dataset
from .folder import folder_dataset
from .voc import voc_dataset

DEFAULT_SPLIT = "val"


@dataclass(frozen=True)
class DatasetEntry:
    """A benchmark: its title, what --root is (a phrase: "the VOCdevkit/VOC2012 folder"), and the reader called
    with (root, split)."""

    title: str
    root: str
    reader: Callable[[Path, str], SegmentationDataset]


DATASETS: dict[str, DatasetEntry] = {
    "voc": DatasetEntry("PASCAL VOC 2012, 21 classes (background scored)", "the VOCdevkit/VOC2012 folder",
                        lambda root, split: voc_dataset(root, split, background=True)),
    "voc20": DatasetEntry("PASCAL VOC 2012, 20 object classes (background ignored)", "the VOCdevkit/VOC2012 folder",
                          lambda root, split: voc_dataset(root, split, background=False)),
    "context": DatasetEntry("PASCAL Context, 60 classes (background scored)", "the VOCdevkit/VOC2010 folder",
                            lambda root, split: context_dataset(root, split, background=True)),
    "context59": DatasetEntry("PASCAL Context, 59 classes (background ignored)", "the VOCdevkit/VOC2010 folder",
                              lambda root, split: context_dataset(root, split, background=False)),
    "coco-object": DatasetEntry("COCO-Object 2017, 80 things + background",
                                "the COCO 2017 folder (annotations/, val2017/)",
                                CocoObjects),
    "coco-stuff": DatasetEntry("COCO-Stuff 164k, 171 classes", "the COCO-Stuff folder (images/, annotations/)",
                               coco_stuff_dataset),
    "ade20k": DatasetEntry("ADE20K SceneParsing, 150 classes", "the ADEChallengeData2016 folder",
                           ade20k_dataset),
    "cityscapes": DatasetEntry("Cityscapes fine, 19 classes", "the cityscapes folder (leftImg8bit/, gtFine/)",
                               cityscapes_dataset),
    "folder": DatasetEntry("images/, masks/, classes.txt", "a folder holding images/, masks/ and classes.txt",
                           lambda root, split: folder_dataset(root)),
}


def open_dataset(
    dataset: str,
    root: Optional[Path],
    split: Optional[str] = None,
    ignore_index: Optional[int] = None,
    download: Optional[Path] = None,
    class_names: Optional[Path] = None,
) -> SegmentationDataset:
    """A benchmark of the registry.

    Args:
        dataset: its key in `DATASETS`.
        root: the folder it lies in, in its released layout (`DATASETS[dataset].root` says which).
        split: the split to read (default val; folder data sets have none).
        ignore_index: folder data sets: the mask value that is not scored.
        download: VOC only: fetch the official VOC2012 trainval archive into this folder and read it.
        class_names: an own class-name list (one line per class in the data set's order, synonyms after commas).

    Returns:
        The data set, reading its files by absolute paths.
    """
    if dataset not in DATASETS:
        raise WildsegError(f"unknown {setting('dataset')} {dataset!r}: use one of {', '.join(DATASETS)}")
    if split is not None and dataset == "folder":
        raise WildsegError(f"a folder dataset has no splits: leave out {setting('split')}, or point "
                           f"{setting('root')} at the split's folder")
    split = split or DEFAULT_SPLIT
    if download is not None and dataset not in ("voc", "voc20"):
        raise WildsegError(f"{setting('download')} fetches PASCAL VOC only; download {dataset} by hand and give its "
                           f"{setting('root')}")
    if download is not None and root is not None:
        raise WildsegError(f"give {setting('root')} (data already on disk) or {setting('download')} DIR (fetch it "
                           "there), not both")
    if ignore_index is not None and dataset != "folder":
        raise WildsegError(f"{setting('ignore_index')} is for folder datasets; {dataset} ignores label 255 by "
                           "definition")
    if download is not None:
        opened = voc_dataset(root, split, background=dataset == "voc", download=download)
    elif root is None:
        raise WildsegError(f"{setting('dataset')} {dataset} needs {setting('root')}: {DATASETS[dataset].root}")
    elif not Path(root).is_dir():
        raise WildsegError(f"{setting('root')} {root} is not a folder: point it at {DATASETS[dataset].root}")
    else:
        opened = DATASETS[dataset].reader(Path(root).resolve(), split)
    if ignore_index is not None:
        opened.ignore_index = ignore_index
    opened.split = None if dataset == "folder" else split
    opened.root = Path(download if download is not None else root).resolve()
    if class_names is not None:
        opened = opened.with_classes(read_class_names(class_names))
    return opened


__all__ = ["DATASETS", "ClassName", "Sample", "SegmentationDataset", "folder_dataset", "open_dataset"]
