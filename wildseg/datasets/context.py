"""PASCAL Context (Mottaghi et al. 2014) in its usual released layout (the one mmsegmentation's converter writes).

`VOCdevkit/VOC2010/`: `JPEGImages/<id>.jpg`, `SegmentationClassContext/<id>.png` (0 = background,
1..59 = the 59 frequent classes), `ImageSets/SegmentationContext/<split>.txt`. Context60 scores background
as class 0; Context59 ignores background pixels.
"""

from pathlib import Path

from .base import IGNORE, PairedFiles, ids_from_list, shifted_lookup
from .classes import builtin_class_names


def context_dataset(root: Path, split: str = "val", background: bool = True) -> PairedFiles:
    """PASCAL Context `split` under `root` (the VOC2010 folder)."""
    root = Path(root)
    ids = ids_from_list(root / "ImageSets" / "SegmentationContext" / f"{split}.txt", "PASCAL Context")
    images = {image_id: root / "JPEGImages" / f"{image_id}.jpg" for image_id in ids}
    masks = {image_id: root / "SegmentationClassContext" / f"{image_id}.png" for image_id in ids}
    if background:
        return PairedFiles("context60", builtin_class_names("context60"), images, masks, IGNORE, shifted_lookup(0, 60))
    return PairedFiles("context59", builtin_class_names("context59"), images, masks, IGNORE, shifted_lookup(1, 59))
