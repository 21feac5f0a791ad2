"""The generic folder layout: `images/<id>.<ext>`, `masks/<id>.png` (pixel value = class index, single
channel or palette), `classes.txt` (line i = class i, synonyms after commas, see `classes`)."""

from pathlib import Path
from typing import Optional

from ..errors import WildsegError
from ..images import IMAGE_SUFFIXES
from .base import PairedFiles, files_by_stem
from .classes import read_class_names


def folder_dataset(root: Path, ignore_index: Optional[int] = None) -> PairedFiles:
    """Images and masks paired by file name; mask values are class indices, `ignore_index` is not scored."""
    root = Path(root)
    for required in ("images", "masks", "classes.txt"):
        if not (root / required).exists():
            raise WildsegError(f"{root} has no {required}: a folder dataset needs images/, masks/, classes.txt")
    images = files_by_stem(root / "images", IMAGE_SUFFIXES, "folder dataset")
    masks = files_by_stem(root / "masks", (".png",), "folder dataset")
    return PairedFiles(root.name, read_class_names(root / "classes.txt"), images, masks, ignore_index)
