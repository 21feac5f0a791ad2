"""Objects: with a region source, an object is the part of one region that the mask gives one class.

Regions (`refinement.regions`: SAM 2's automatic masks, a folder of masks such as CorrCLIP's released SAM 2 maps,
or superpixels) divide an image into segments; after the region vote (`--refine regions`) or CorrCLIP's majority
correction each region holds one class, and a later CRF may split it. So an image's objects are the pairs (region,
class) whose pixels the full-size mask holds, background and unsegmented pixels excluded: disjoint, and together
exactly the labelled pixels inside regions. Each has a score, the mean probability of its class over its pixels
(scores sampled by nearest neighbour at working resolution), and a box.

With SAM 2 or released masks an object is what the mask generator found (an animal, a car); with superpixels it is
a superpixel, a fragment of a thing.
"""

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .errors import WildsegError
from .refinement.regions import UNSEGMENTED, resized_regions

MAX_OBJECTS = np.iinfo(np.uint16).max
"""The most objects an image's object map (a 16-bit PNG, 0 meaning none) can hold."""


@dataclass(frozen=True)
class ImageObject:
    """One object: its value in the object map (`identifier`, from 1), class index in the labels (from 1), region
    id, score (mean class probability over its pixels), area in pixels and box (x, y, width, height in pixels)."""

    identifier: int
    class_index: int
    region: int
    score: float
    area: int
    box: tuple[int, int, int, int]

    def as_record(self, labels: list[str]) -> dict:
        """The object as the JSON record lists it, its class named from `labels` (background first)."""
        return {"id": self.identifier, "label": labels[self.class_index], "class_index": self.class_index,
                "region": self.region, "score": self.score, "area": self.area, "box": list(self.box)}


@dataclass(frozen=True)
class ImageObjects:
    """An image's objects: `map` (H x W uint16, object `identifier`s, 0 where none) and the objects in order."""

    map: np.ndarray
    objects: list[ImageObject]


def region_objects(mask: np.ndarray, regions: np.ndarray, scores: np.ndarray) -> ImageObjects:
    """The objects of a segmentation (see the module's description), ordered by class, then region id.

    Args:
        mask: the full-size class map (H x W; 0 background, i the i-th label).
        regions: region ids at any resolution (resized to H x W by nearest neighbour as `resized_regions` does),
            `refinement.regions.UNSEGMENTED` where none.
        scores: class probabilities (classes x h x w, working resolution).

    Returns:
        The object map and objects. An image with more than `MAX_OBJECTS` objects raises a WildsegError.
    """
    height, width = mask.shape
    region_map = resized_regions(regions, (height, width))
    covered = (region_map != UNSEGMENTED) & (mask > 0)
    classes = scores.shape[0]
    keys = region_map[covered].astype(np.int64) * classes + mask[covered]
    unique_keys, index = np.unique(keys, return_inverse=True)
    order = np.lexsort((unique_keys // classes, unique_keys % classes))
    if len(order) > MAX_OBJECTS:
        raise WildsegError(f"the image holds {len(order)} objects, more than the {MAX_OBJECTS} an object map holds: "
                           "use coarser regions")
    identifiers = np.empty(len(order), dtype=np.uint16)
    identifiers[order] = np.arange(1, len(order) + 1)
    object_map = np.zeros((height, width), dtype=np.uint16)
    object_map[covered] = identifiers[index]
    rows = np.minimum(np.arange(height) * scores.shape[1] // height, scores.shape[1] - 1)
    columns = np.minimum(np.arange(width) * scores.shape[2] // width, scores.shape[2] - 1)
    pixel_rows, pixel_columns = np.nonzero(covered)
    pixel_scores = scores[mask[covered], rows[pixel_rows], columns[pixel_columns]].astype(np.float64)
    areas = np.bincount(index, minlength=len(unique_keys))
    means = np.bincount(index, weights=pixel_scores, minlength=len(unique_keys)) / np.maximum(areas, 1)
    boxes = ndimage.find_objects(object_map, max_label=len(order))
    objects = []
    for identifier, key in enumerate(order, start=1):
        row_slice, column_slice = boxes[identifier - 1]
        box = (column_slice.start, row_slice.start, column_slice.stop - column_slice.start,
               row_slice.stop - row_slice.start)
        objects.append(ImageObject(identifier, int(unique_keys[key] % classes), int(unique_keys[key] // classes),
                                   float(means[key]), int(areas[key]), tuple(int(value) for value in box)))
    return ImageObjects(object_map, objects)
