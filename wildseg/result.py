"""What segmenting an image gives: the full-size mask, the per-class probabilities and their summary."""

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from .errors import WildsegError
from .resolution import downscale


@dataclass
class SegmentationResult:
    """A segmentation of one image.

    `mask` (H x W, the image as displayed) holds class indices: 0 is background, i the i-th label given.
    `scores` (classes x h x w) are per-pixel class probabilities (after refinement) in the same order at the
    working resolution (the image's size unless its long side exceeds `max_side`); `labels[i]` names class i.
    `regions` holds the region ids it was made with (working resolution, `refinement.regions`), if any.
    """

    mask: np.ndarray
    scores: np.ndarray
    labels: list[str]
    image: np.ndarray = field(repr=False)
    timings: dict[str, float] = field(default_factory=dict)
    regions: Optional[np.ndarray] = field(default=None, repr=False)

    @property
    def working_mask(self) -> np.ndarray:
        """The mask at the working resolution of `scores` (the mask itself unless the image is large)."""
        if self.mask.shape == self.scores.shape[1:]:
            return self.mask
        return self.scores.argmax(axis=0).astype(np.uint8)

    def preview(self) -> tuple[np.ndarray, np.ndarray]:
        """The image and its mask at the working resolution (the full ones unless the image is large)."""
        return downscale(self.image, self.scores.shape[1:]), self.working_mask

    def summary(self) -> list[dict]:
        """Per class: name, fraction of the image's pixels and mean probability over those pixels (the latter
        at working resolution)."""
        counts = np.bincount(self.mask.ravel(), minlength=len(self.labels))
        working_mask = self.working_mask
        rows = []
        for index, name in enumerate(self.labels):
            selected = working_mask == index
            mean_score = float(self.scores[index][selected].mean()) if selected.any() else 0.0
            rows.append({"label": name, "pixel_fraction": counts[index] / self.mask.size, "mean_score": mean_score})
        return rows

    def objects(self):
        """The image's objects, each the part of a region given one class (`instances.region_objects`); a
        WildsegError when it was segmented without regions.

        Returns:
            `instances.ImageObjects`: the object map (full size) and the objects with class, score and box.
        """
        from .instances import region_objects

        if self.regions is None:
            raise WildsegError("objects come from regions: segment with --refine regions (and --regions) or with "
                               "--method corrclip")
        return region_objects(self.mask, self.regions, self.scores)
