"""ADE20K SceneParsing (Zhou et al. 2017), 150 classes, in the released `ADEChallengeData2016/` layout.

`images/{training,validation}/<id>.jpg` and `annotations/{training,validation}/<id>.png` whose value 0 is
`other` (ignored) and 1..150 the classes.
"""

from pathlib import Path

from .base import IGNORE, PairedFiles, files_by_stem, shifted_lookup
from .classes import builtin_class_names

SPLIT_FOLDERS = {"val": "validation", "train": "training"}


def ade20k_dataset(root: Path, split: str = "val") -> PairedFiles:
    """ADE20K-150 `split` (val or train) under `root` (the ADEChallengeData2016 folder)."""
    root, folder = Path(root), SPLIT_FOLDERS.get(split, split)
    images = files_by_stem(root / "images" / folder, (".jpg",), "ADE20K")
    masks = files_by_stem(root / "annotations" / folder, (".png",), "ADE20K")
    return PairedFiles("ade20k", builtin_class_names("ade20k"), images, masks, IGNORE, shifted_lookup(1, 150))
