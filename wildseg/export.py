"""An output folder of `wildseg segment` as a data set other tools load: one COCO file (instance segmentation,
masks as RLE) or Ultralytics YOLO segmentation labels (polygons), rebuilt from the per-image outputs on disk
(mask PNG and JSON record), so that a resumed or extended run holds every image once.

COCO: `images` (file_name: the image's path below the folder it was found in, as the outputs mirror it),
`categories` (the labels in order, ids from 1), `annotations`: one per class present in an image, its mask
as COCO RLE made by pycocotools, `area`, `bbox` (x, y, width, height), `iscrowd` 0 and the class's mean
probability over its pixels as `score`. YOLO: `labels/<name>.txt` with one line `class x1 y1 x2 y2 ...` per
connected region of a class (its outer contour by OpenCV, coordinates divided by the image's width and
height; regions smaller than `min_region` of the image skipped; holes are filled, as the format has none),
`images/<name>.<ext>` linked to the image where it is found, and `data.yaml` naming the classes.

With `instances` (a run of `wildseg segment --instances`, whose records list their objects and whose
`<name>_instances.png` maps them, `instances.region_objects`), both hold one annotation per object instead: COCO
its mask, area, box, `iscrowd` 0 and the object's score; YOLO one line per object, the outer contours of its
pieces joined into one polygon by zero-width bridges between their nearest corners (Ultralytics' own joining of
multi-part COCO masks works the same way).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import cv2
import numpy as np

from .datasets.base import read_label_image
from .errors import WildsegError, setting
from .files import TEMPORARY_SUFFIX, write_atomically, write_json
from .labels import BACKGROUND

MIN_REGION = 1e-4
"""Default least share of the image a region must cover to become a YOLO polygon (specks are skipped)."""
COORDINATE_DECIMALS = 6


@dataclass(frozen=True)
class SegmentedImage:
    """One image's outputs in a folder: its name below the folder (`stem`, without suffix), its JSON record and
    its mask's path."""

    stem: Path
    record: dict
    mask_path: Path

    @property
    def file_name(self) -> str:
        """The image's path below the folder it was found in, with its own suffix (`trip/a.jpg`)."""
        return (self.stem.parent / f"{self.stem.name}{Path(self.record['image']).suffix}").as_posix()

    def mask(self) -> np.ndarray:
        return read_label_image(self.mask_path)

    @property
    def object_map_path(self) -> Path:
        """Where `wildseg segment --instances` put the image's object map: <name>_instances.png."""
        return self.mask_path.with_name(f"{self.mask_path.stem}_instances.png")

    def has_objects(self) -> bool:
        """Whether the image was segmented with --instances: its record lists objects and their map exists."""
        return isinstance(self.record.get("instances"), list) and self.object_map_path.is_file()

    def objects(self) -> list[tuple[dict, np.ndarray]]:
        """Each object of the record (class `label`, `score`, ...) with its mask (H x W bool) from the object map."""
        object_map = read_label_image(self.object_map_path)
        return [(found, object_map == found["id"]) for found in self.record["instances"]]


def segmented_images(folder: Path) -> list[SegmentedImage]:
    """Every image `wildseg segment` finished in `folder` and its sub-folders (a JSON record with its labels and
    the mask beside it), by name."""
    if not folder.is_dir():
        raise WildsegError(f"{folder} is not a folder: give the {setting('out')} folder of wildseg segment")
    images = []
    for record_path in sorted(folder.rglob("*.json")):
        if record_path.name.startswith(".") or record_path.name.endswith(TEMPORARY_SUFFIX):
            continue
        record = _record(record_path)
        mask_path = record_path.with_suffix(".png")
        if record is not None and mask_path.is_file():
            images.append(SegmentedImage(record_path.relative_to(folder).with_suffix(""), record, mask_path))
    return images


def _record(path: Path) -> Optional[dict]:
    """The JSON at `path` if it is an image's record of `wildseg segment`, else None (summaries, reports)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    keys = ("image", "labels", "classes", "image_size")
    if isinstance(record, dict) and all(key in record for key in keys) and record["labels"][:1] == [BACKGROUND]:
        return record
    return None


def check_objects(images: list[SegmentedImage]) -> None:
    """A WildsegError when some of the images were segmented without --instances (so have no objects)."""
    missing = [image for image in images if not image.has_objects()]
    if missing:
        raise WildsegError(f"{len(missing)} of the {len(images)} images have no objects ({missing[0].stem} first): "
                           "run wildseg segment on them again with --instances, which redoes them")


def categories(images: Iterable[SegmentedImage]) -> list[str]:
    """The labels of the images but background, in the order they first appear (a run's --labels order)."""
    return list(dict.fromkeys(label for image in images for label in image.record["labels"][1:]))


def class_masks(image: SegmentedImage, mask: np.ndarray) -> list[tuple[str, float, np.ndarray]]:
    """Per class present in the image: its label, mean probability and mask."""
    present = set(np.unique(mask).tolist())
    return [(label, float(image.record["classes"][index]["mean_score"]), mask == index)
            for index, label in enumerate(image.record["labels"][1:], start=1) if index in present]


def object_masks(image: SegmentedImage) -> list[tuple[str, float, np.ndarray]]:
    """Per object of the image (`wildseg segment --instances`): its label, score and mask."""
    return [(found["label"], float(found["score"]), pixels) for found, pixels in image.objects()]


def coco_dataset(images: list[SegmentedImage], instances: bool = False) -> dict:
    """The COCO instance-segmentation data set of the images (see the module's description): one annotation per
    class present in an image, or with `instances` per object."""
    from pycocotools import mask as coco_mask

    if instances:
        check_objects(images)
    names = categories(images)
    category_ids = {name: index + 1 for index, name in enumerate(names)}
    entries, annotations = [], []
    for image_id, image in enumerate(images, start=1):
        mask = image.mask()
        entries.append({"id": image_id, "file_name": image.file_name, "height": int(mask.shape[0]),
                        "width": int(mask.shape[1]), "wildseg_image": image.record["image"]})
        for label, score, pixels in object_masks(image) if instances else class_masks(image, mask):
            rle = coco_mask.encode(np.asfortranarray(pixels.astype(np.uint8)))
            annotations.append({
                "id": len(annotations) + 1,
                "image_id": image_id,
                "category_id": category_ids[label],
                "segmentation": {"size": [int(size) for size in rle["size"]], "counts": rle["counts"].decode()},
                "area": int(coco_mask.area(rle)),
                "bbox": [float(value) for value in coco_mask.toBbox(rle)],
                "iscrowd": 0,
                "score": score,
            })
    return {
        "info": {"description": "wildseg zero-shot segmentation", "version": "1.0"},
        "images": entries,
        "categories": [{"id": category_ids[name], "name": name, "supercategory": ""} for name in names],
        "annotations": annotations,
    }


def write_coco(folder: Path, path: Path, instances: bool = False) -> dict:
    """Write the COCO file of the images done in `folder` to `path` atomically (per object with `instances`);
    returns the data set."""
    dataset = coco_dataset(segmented_images(folder), instances)
    write_json(path, dataset, "the COCO annotations")
    return dataset


def region_polygons(region: np.ndarray, min_pixels: int) -> list[np.ndarray]:
    """The outer contour (n x 2 pixel coordinates x, y; OpenCV's, corners only) of every 8-connected region
    of `region` with at least `min_pixels` pixels and 3 corners."""
    count, components, stats, _ = cv2.connectedComponentsWithStats(region.astype(np.uint8), connectivity=8)
    polygons = []
    for component in range(1, count):
        if stats[component, cv2.CC_STAT_AREA] < min_pixels:
            continue
        left, top = stats[component, cv2.CC_STAT_LEFT], stats[component, cv2.CC_STAT_TOP]
        width, height = stats[component, cv2.CC_STAT_WIDTH], stats[component, cv2.CC_STAT_HEIGHT]
        crop = (components[top : top + height, left : left + width] == component).astype(np.uint8)
        contours, _ = cv2.findContours(crop, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        contour = max(contours, key=len).reshape(-1, 2) + (left, top)
        if len(contour) >= 3:
            polygons.append(contour)
    return polygons


def joined_polygon(polygons: list[np.ndarray]) -> np.ndarray:
    """One polygon (n x 2) through all of `polygons` (largest first): each further one is entered from the corner
    of the polygon so far nearest to it, walked round and left the same way, a zero-width bridge there and back."""
    polygons = sorted(polygons, key=lambda polygon: -abs(cv2.contourArea(polygon.astype(np.float32))))
    joined = polygons[0]
    for polygon in polygons[1:]:
        distances = np.square(joined[:, None, :] - polygon[None, :, :]).sum(axis=2)
        start, entry = np.unravel_index(distances.argmin(), distances.shape)
        walk = np.concatenate([polygon[entry:], polygon[: entry + 1]])
        joined = np.concatenate([joined[: start + 1], walk, joined[start:]])
    return joined


def yolo_line(class_id: int, polygon: np.ndarray, width: int, height: int) -> str:
    """A YOLO segmentation label line: `class x1 y1 x2 y2 ...`, coordinates divided by the image's size."""
    points = polygon / (width, height)
    return f"{class_id} " + " ".join(f"{value:.{COORDINATE_DECIMALS}f}" for value in points.ravel())


def min_pixels(min_region: float, shape: tuple[int, int]) -> int:
    """The least pixels a region of an image of `shape` covering `min_region` of it has (at least 1)."""
    return max(1, int(np.ceil(min_region * shape[0] * shape[1])))


def yolo_lines(mask: np.ndarray, labels: list[str], class_ids: dict[str, int], min_region: float) -> list[str]:
    """The YOLO label lines of a mask whose value i is `labels[i]`: `class x1 y1 ...` per region, normalised."""
    height, width = mask.shape
    smallest = min_pixels(min_region, mask.shape)
    return [yolo_line(class_ids[label], polygon, width, height)
            for index, label in enumerate(labels[1:], start=1) for polygon in region_polygons(mask == index, smallest)]


def object_lines(image: SegmentedImage, class_ids: dict[str, int], min_region: float) -> list[str]:
    """The YOLO label lines of an image's objects: one per object, its pieces of at least `min_region` of the
    image joined (`joined_polygon`); an object with no such piece has none."""
    lines = []
    for found, pixels in image.objects():
        polygons = region_polygons(pixels, min_pixels(min_region, pixels.shape))
        if polygons:
            lines.append(yolo_line(class_ids[found["label"]], joined_polygon(polygons), pixels.shape[1],
                                   pixels.shape[0]))
    return lines


def write_yolo(folder: Path, target: Path, min_region: float = MIN_REGION, instances: bool = False
               ) -> tuple[int, int]:
    """Write the YOLO data set of the images done in `folder` into `target` (see the module's description; one
    line per object with `instances`); returns how many images, and how many of them could not be linked because
    their file is not found."""
    images = segmented_images(folder)
    if instances:
        check_objects(images)
    names = categories(images)
    class_ids = {name: index for index, name in enumerate(names)}
    unlinked = 0
    for image in images:
        lines = (object_lines(image, class_ids, min_region) if instances
                 else yolo_lines(image.mask(), image.record["labels"], class_ids, min_region))
        label_path = target / "labels" / image.stem.parent / f"{image.stem.name}.txt"
        write_atomically(label_path, lambda path: path.write_text("".join(f"{line}\n" for line in lines)))
        unlinked += not _link_image(Path(image.record["image"]), target / "images" / image.file_name)
    data = ["# Ultralytics YOLO segmentation data set written by wildseg",
            f"path: {json.dumps(str(target.absolute()))}", "train: images", "val: images", "names:",
            *(f"  {index}: {json.dumps(name)}" for index, name in enumerate(names))]
    write_atomically(target / "data.yaml", lambda path: path.write_text("\n".join(data) + "\n"))
    return len(images), unlinked


def _link_image(source: Path, link: Path) -> bool:
    """Link `link` to the image file (replacing an older link); False when the image is not found from here."""
    if not source.is_file():
        return False
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        if link.resolve() == source.resolve():
            return True
        link.unlink()
    os.symlink(source.absolute(), link)
    return True
