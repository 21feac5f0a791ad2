"""What every data set offers: image ids, class names, an ignore index, and samples with ground truth.

Ground truth is returned in the data set's class-index space (value i = `classes[i]`), with pixels that
do not count set to `ignore_index`; readers translate their on-disk label values through a lookup table.
"""

import copy
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
from PIL import Image

from ..errors import WildsegError, first_line, setting
from ..images import load_image
from .classes import ClassName

IGNORE = 255


@dataclass(frozen=True)
class Sample:
    """One image (H x W x 3 RGB uint8) with its ground truth (H x W class indices)."""

    image_id: str
    image: np.ndarray
    truth: np.ndarray


class SegmentationDataset(ABC):
    """Base of the readers: `ids` in a fixed order, `classes`, `ignore_index`, and `load(image_id)`.

    `split` names the official split read (None for a folder dataset) and `root` the folder read.
    """

    name: str
    split: Optional[str] = None
    root: Optional[Path] = None
    classes: list[ClassName]
    ignore_index: Optional[int]
    ids: list[str]

    @abstractmethod
    def load(self, image_id: str) -> Sample:
        """The image and ground truth of `image_id`; WildsegError when its files cannot be read."""

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> Sample:
        return self.load(self.ids[index])

    def __iter__(self) -> Iterator[Sample]:
        return (self.load(image_id) for image_id in self.ids)

    @property
    def background_class(self) -> Optional[int]:
        """Index of the background class, or None when background is not a scored class of this data set."""
        index = next((index for index, name in enumerate(self.classes) if name.is_background), None)
        return None if index == self.ignore_index else index

    @property
    def scored_classes(self) -> list[int]:
        """The classes metrics are computed over: all but an ignore index that falls inside the class range."""
        return [index for index in range(len(self.classes)) if index != self.ignore_index]

    def with_classes(self, classes: list[ClassName]) -> "SegmentationDataset":
        """The same data set with another class-name list (own synonyms or prompts) of as many classes, in order;
        this one is left as it is."""
        if len(classes) != len(self.classes):
            raise WildsegError(
                f"the class names list {len(classes)} classes but {self.name} has {len(self.classes)}: "
                "give one line per class, in the data set's order"
            )
        renamed = copy.copy(self)
        renamed.classes = list(classes)
        return renamed


class PairedFiles(SegmentationDataset):
    """Images paired with label PNGs by id; label values are mapped through `lookup` when one is given."""

    def __init__(
        self,
        name: str,
        classes: list[ClassName],
        images: dict[str, Path],
        masks: dict[str, Path],
        ignore_index: Optional[int] = IGNORE,
        lookup: Optional[np.ndarray] = None,
    ):
        self.name, self.classes, self.ignore_index, self.lookup = name, classes, ignore_index, lookup
        self.ids = [image_id for image_id in images if image_id in masks]
        if not self.ids:
            raise WildsegError(f"{name}: no image has a label file; check {setting('root')} and {setting('split')}")
        self._images, self._masks = images, masks

    def load(self, image_id: str) -> Sample:
        image = load_image(self._images[image_id])
        truth = read_label_image(self._masks[image_id])
        if truth.shape != image.shape[:2]:
            raise WildsegError(
                f"label file {self._masks[image_id].name} is {truth.shape[1]}x{truth.shape[0]} "
                f"but its image is {image.shape[1]}x{image.shape[0]}"
            )
        if self.lookup is not None:
            if truth.max() >= len(self.lookup):
                raise WildsegError(f"label file {self._masks[image_id].name} holds value {truth.max()}, "
                                   f"which {self.name} does not define")
            truth = self.lookup[truth]
        return Sample(image_id, image, truth)


def read_label_image(path: Path) -> np.ndarray:
    """Class values of a single-channel or palette PNG (the palette index is the value)."""
    try:
        with Image.open(path) as label_image:
            if label_image.mode not in ("P", "L", "I", "I;16"):
                raise WildsegError(
                    f"label file {path} is {label_image.mode}: labels must be single-channel or palette PNGs "
                    "whose pixel values are class indices"
                )
            return np.array(label_image)
    except OSError as error:
        raise WildsegError(f"cannot read label file {path}: {first_line(error)}") from None


def shifted_lookup(first_class_value: int, classes: int) -> np.ndarray:
    """Table mapping on-disk values first_class_value.. to classes 0..classes-1 and every other value to IGNORE.

    E.g. ADE20K stores `other` as 0 and its 150 classes as 1..150: shifted_lookup(1, 150).
    """
    table = np.full(256, IGNORE, dtype=np.uint8)
    table[first_class_value : first_class_value + classes] = np.arange(classes, dtype=np.uint8)
    return table


def ids_from_list(list_file: Path, what: str) -> list[str]:
    """Image ids, one per line, of an official split file."""
    if not list_file.is_file():
        raise WildsegError(f"{what}: split file {list_file} not found; check {setting('root')} and {setting('split')}")
    return [line.strip() for line in list_file.read_text().splitlines() if line.strip()]


def files_by_stem(folder: Path, suffixes: tuple[str, ...], what: str) -> dict[str, Path]:
    """Files in `folder` with one of `suffixes` (any letter case), keyed by their name without suffix."""
    if not folder.is_dir():
        raise WildsegError(f"{what}: folder {folder} not found; check {setting('root')} and {setting('split')}")
    return {path.stem: path for path in sorted(folder.iterdir()) if path.suffix.lower() in suffixes}
