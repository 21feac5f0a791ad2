"""Cityscapes (Cordts et al. 2016) fine annotations through torchvision's `Cityscapes` reader.

The 19 evaluated classes are the `trainId`s of the official label definition; every other label id is
ignored.
"""

from pathlib import Path

import numpy as np

from ..errors import WildsegError, first_line
from .base import IGNORE, PairedFiles
from .classes import builtin_class_names

IMAGE_SUFFIX = "_leftImg8bit"


def cityscapes_dataset(root: Path, split: str = "val") -> PairedFiles:
    """Cityscapes `split` under `root` (holding leftImg8bit/ and gtFine/)."""
    from torchvision.datasets import Cityscapes  # torchvision takes seconds to import: only when reading

    try:
        cityscapes = Cityscapes(str(root), split=split, mode="fine", target_type="semantic")
    except (OSError, RuntimeError, ValueError) as error:
        raise WildsegError(f"cannot read Cityscapes {split} under {root}: {first_line(error)}") from None
    ids = [Path(path).stem.removesuffix(IMAGE_SUFFIX) for path in cityscapes.images]
    images = dict(zip(ids, map(Path, cityscapes.images)))
    masks = {image_id: Path(targets[0]) for image_id, targets in zip(ids, cityscapes.targets)}
    return PairedFiles("cityscapes", builtin_class_names("cityscapes"), images, masks, IGNORE, train_id_lookup())


def train_id_lookup() -> np.ndarray:
    """Label id -> trainId (0..18) from torchvision's copy of the official label table; the rest -> IGNORE."""
    from torchvision.datasets import Cityscapes

    table = np.full(256, IGNORE, dtype=np.uint8)
    for label in Cityscapes.classes:
        if 0 <= label.id < 256 and 0 <= label.train_id < IGNORE:
            table[label.id] = label.train_id
    return table
