"""Segmentation data sets on disk.

`FolderDataset` reads the generic layout: `images/<id>.<ext>`, `masks/<id>.png` (pixel value = class
index, single channel or palette), `classes.txt` (line i = name of class i).
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
from PIL import Image

from .errors import WildsegError
from .images import load_image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class Sample:
    """One image (H x W x 3 RGB uint8) with its ground truth (H x W class indices)."""

    image_id: str
    image: np.ndarray
    truth: np.ndarray


class FolderDataset:
    """Images, class-index masks and class names in the generic folder layout (see the module docstring)."""

    def __init__(self, root: Path, ignore_index: Optional[int] = None):
        self.root = Path(root)
        for required in ("images", "masks", "classes.txt"):
            if not (self.root / required).exists():
                raise WildsegError(f"{self.root} has no {required}: a folder dataset needs images/, masks/, classes.txt")
        self.classes = [line.strip() for line in (self.root / "classes.txt").read_text().splitlines() if line.strip()]
        self.ignore_index = ignore_index
        images = {path.stem: path for path in (self.root / "images").iterdir() if path.suffix.lower() in IMAGE_SUFFIXES}
        self.ids = sorted(stem for stem in images if (self.root / "masks" / f"{stem}.png").is_file())
        if not self.ids:
            raise WildsegError(f"{self.root} has no image with a mask of the same name in masks/")
        self._images = images

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> Sample:
        image_id = self.ids[index]
        image = load_image(self._images[image_id])
        truth = np.array(Image.open(self.root / "masks" / f"{image_id}.png"))
        if truth.shape != image.shape[:2]:
            raise WildsegError(f"mask {image_id}.png is {truth.shape[::-1]} but its image is {image.shape[1::-1]}")
        return Sample(image_id, image, truth)

    def __iter__(self) -> Iterator[Sample]:
        return (self[index] for index in range(len(self)))
