"""COCO 2017 (Lin et al. 2014): COCO-Object from the instance annotations, COCO-Stuff 171 from its label maps.

COCO-Object: `annotations/instances_<split>2017.json` read with pycocotools, images in `<split>2017/` or
`images/<split>2017/`. Each pixel takes the category of the smallest instance covering it (instances are
painted largest first, crowd regions included), uncovered pixels are background (class 0); 80 things + 1.

COCO-Stuff (Caesar et al. 2018): the released `images/<split>2017/<id>.jpg` and
`annotations/<split>2017/<id>.png` (stuffthingmaps), whose value is the COCO category id minus one
(255 = unlabeled). The 171 used ids (80 things, 91 stuff) become classes 0..170 in id order.
"""

import contextlib
import io
from pathlib import Path

import numpy as np
from pycocotools.coco import COCO

from ..errors import WildsegError, first_line, setting
from ..images import load_image
from .base import IGNORE, PairedFiles, Sample, SegmentationDataset, files_by_stem
from .classes import builtin_class_names

UNUSED_THING_IDS = (12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91)
STUFF_IDS = range(92, 183)


class CocoObjects(SegmentationDataset):
    """COCO-Object: semantic masks painted from COCO instance annotations (see the module docstring)."""

    def __init__(self, root: Path, split: str = "val"):
        root = Path(root)
        annotations = root / "annotations" / f"instances_{split}2017.json"
        if not annotations.is_file():
            raise WildsegError(f"COCO-Object: {annotations} not found; check {setting('root')} and {setting('split')}")
        self.image_dir = next(
            (folder for folder in (root / f"{split}2017", root / "images" / f"{split}2017") if folder.is_dir()), None
        )
        if self.image_dir is None:
            raise WildsegError(f"COCO-Object: no {split}2017/ image folder under {root} or {root / 'images'}")
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                self.coco = COCO(str(annotations))
        except (OSError, ValueError, KeyError) as error:
            raise WildsegError(f"cannot read COCO annotations {annotations}: {first_line(error)}") from None
        self.name, self.ignore_index = "coco-object", IGNORE
        self.classes = builtin_class_names("coco_object")
        category_ids = sorted(self.coco.getCatIds())
        if len(category_ids) != len(self.classes) - 1:
            raise WildsegError(f"{annotations} has {len(category_ids)} categories, COCO has {len(self.classes) - 1}")
        self.class_of_category = {category: index + 1 for index, category in enumerate(category_ids)}
        self.ids = [f"{image_id:012d}" for image_id in sorted(self.coco.getImgIds())]

    def load(self, image_id: str) -> Sample:
        info = self.coco.loadImgs(int(image_id))[0]
        image = load_image(self.image_dir / info["file_name"])
        truth = np.zeros((info["height"], info["width"]), dtype=np.uint8)
        annotations = self.coco.loadAnns(self.coco.getAnnIds(imgIds=info["id"]))
        for annotation in sorted(annotations, key=lambda annotation: -annotation["area"]):
            truth[self.coco.annToMask(annotation) > 0] = self.class_of_category[annotation["category_id"]]
        if truth.shape != image.shape[:2]:
            raise WildsegError(
                f"image {info['file_name']} is not the {info['width']}x{info['height']} its annotation says"
            )
        return Sample(image_id, image, truth)


def coco_stuff_dataset(root: Path, split: str = "val") -> PairedFiles:
    """COCO-Stuff 171 `split` under `root` (holding images/ and annotations/)."""
    root = Path(root)
    images = files_by_stem(root / "images" / f"{split}2017", (".jpg",), "COCO-Stuff")
    masks = files_by_stem(root / "annotations" / f"{split}2017", (".png",), "COCO-Stuff")
    return PairedFiles("coco-stuff", builtin_class_names("coco_stuff"), images, masks, IGNORE, stuff_lookup())


def stuff_lookup() -> np.ndarray:
    """Stuffthingmap value (category id - 1) -> class 0..170; unused ids and 255 -> IGNORE."""
    used = [category for category in range(1, 92) if category not in UNUSED_THING_IDS] + list(STUFF_IDS)
    table = np.full(256, IGNORE, dtype=np.uint8)
    table[np.array(used) - 1] = np.arange(len(used), dtype=np.uint8)
    return table
