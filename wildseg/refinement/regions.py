"""Regions: single-image segments that the pseudo-labels are made to respect (Zabari & Hoshen, arXiv 2112.03185,
Sec. 3.3, "single-image segmentation techniques"; the region vote of CorrCLIP, Zhang et al., ICCV 2025, arXiv
2411.10086, Sec. 3.4).

A region source gives, per image, an integer map of regions at the image's resolution:

- `slic`, `felzenszwalb`: scikit-image's superpixels of the working image (SLIC, Achanta et al., TPAMI 2012;
  Felzenszwalb & Huttenlocher, IJCV 2004), which need no weights;
- `sam2`: SAM 2's automatic masks of the image, painted into one map as CorrCLIP paints them
  (`automatic_masks`);
- a folder of maps named by the image's stem: `<stem>.npz` with key `instance_mask` (CorrCLIP's released format,
  the smallest value meaning "unsegmented") or `<stem>.png` of region ids (0 unsegmented, as SAM-style mask
  painting leaves it).

`region_vote` gives every pixel of a region the region's mean class probabilities, so that the region takes the
label of its mean probability; unsegmented pixels keep their own.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from skimage.segmentation import felzenszwalb, slic

from ..choices import REGION_MODELS, SUPERPIXELS
from ..errors import WildsegError
from .settings import MaskGeneration

SLIC_SEGMENTS, SLIC_COMPACTNESS = 250, 10.0
FELZENSZWALB_SCALE, FELZENSZWALB_SIGMA, FELZENSZWALB_MIN_SIZE = 100.0, 0.8, 50
UNSEGMENTED = -1
"""The region id of pixels no region covers, in the maps `image_regions` returns."""


@dataclass(frozen=True)
class RegionSource:
    """Where an image's regions come from: a `choices.SUPERPIXELS` or `choices.REGION_MODELS` name, or a folder of
    region maps (checked to exist by `SegmenterConfig`)."""

    name: str

    @property
    def folder(self) -> Optional[Path]:
        """The folder of region maps, or None for superpixels and models."""
        return None if self.name in SUPERPIXELS or self.name in REGION_MODELS else Path(self.name)

    def identity(self) -> str:
        """The source as records name it: the superpixel method or model, or the folder's absolute path."""
        return self.name if self.folder is None else str(self.folder.resolve())


def superpixels(image: np.ndarray, method: str) -> np.ndarray:
    """Superpixels of an RGB uint8 image (h x w x 3) as region ids from 0 (h x w, int64).

    Args:
        image: the image.
        method: "slic" (`skimage.segmentation.slic`, SLIC_SEGMENTS, SLIC_COMPACTNESS, start label 0) or
            "felzenszwalb" (`skimage.segmentation.felzenszwalb` with the FELZENSZWALB_* settings).
    """
    if method == "slic":
        labels = slic(image, n_segments=SLIC_SEGMENTS, compactness=SLIC_COMPACTNESS, start_label=0)
    else:
        labels = felzenszwalb(image, scale=FELZENSZWALB_SCALE, sigma=FELZENSZWALB_SIGMA,
                              min_size=FELZENSZWALB_MIN_SIZE)
    return labels.astype(np.int64)


def region_file(folder: Path, stem: str) -> np.ndarray:
    """An image's region map from a folder: ids from 0, UNSEGMENTED where no region is (h x w, int64).

    Args:
        folder: holds `<stem>.npz` (key `instance_mask`, its smallest value unsegmented) or `<stem>.png` (0
            unsegmented).
        stem: the image's file name without its suffix.

    Raises:
        WildsegError: when neither file exists or the npz has no `instance_mask`.
    """
    npz, png = folder / f"{stem}.npz", folder / f"{stem}.png"
    if npz.is_file():
        with np.load(npz) as stored:
            if "instance_mask" not in stored.files:
                raise WildsegError(f"{npz} has no instance_mask array (it has {', '.join(stored.files)})")
            ids = np.asarray(stored["instance_mask"]).astype(np.int64)
        unsegmented = ids.min()
    elif png.is_file():
        ids, unsegmented = np.asarray(Image.open(png)).astype(np.int64), 0
    else:
        raise WildsegError(f"no region map {npz.name} or {png.name} in {folder}")
    if ids.ndim != 2:
        raise WildsegError(f"the region map of {stem} is not a single-channel map (shape {ids.shape})")
    return np.where(ids == unsegmented, UNSEGMENTED, ids)


def image_regions(source: RegionSource, stem: Optional[str], rgb: np.ndarray, working: np.ndarray,
                  sam2=None, generation: MaskGeneration = MaskGeneration()) -> np.ndarray:
    """An image's regions at working resolution (h x w, int64, UNSEGMENTED where none).

    Args:
        source: where they come from.
        stem: the image file's stem (None for an image given as pixels: then no folder's map can be found).
        rgb: the image as displayed (a region file must have its size; SAM 2 sees it).
        working: the image at working resolution (superpixels are made of it).
        sam2: the loaded SAM 2 of source `sam2` (`backbone.sam2.load_sam2`).
        generation: how SAM 2's masks are made.
    """
    if source.name in SUPERPIXELS:
        return superpixels(working, source.name)
    if source.folder is None:
        from .automatic_masks import automatic_masks, painted_regions

        painted = painted_regions(automatic_masks(sam2, rgb, generation), rgb.shape[:2])
        ids = np.where(painted == 0, UNSEGMENTED, painted)
    else:
        if stem is None:
            raise WildsegError("region maps from a folder are found by the image's file name: give image files")
        ids = region_file(source.folder, stem)
        if ids.shape != rgb.shape[:2]:
            raise WildsegError(f"the region map of {stem} is {ids.shape[1]} x {ids.shape[0]}, the image "
                               f"{rgb.shape[1]} x {rgb.shape[0]}: give maps at the image's resolution")
    return resized_regions(ids, working.shape[:2])


def resized_regions(regions: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A region map resized by nearest neighbour as torch's `nearest` samples (source index floor(i * in / out),
    computed in float32, as CorrCLIP resizes its masks).

    Args:
        regions: h x w ids.
        shape: the (height, width) wanted.

    Returns:
        The resized ids (int64); the map itself when it has that shape.
    """
    if regions.shape == tuple(shape):
        return regions
    return nearest_ids(torch.from_numpy(regions), tuple(shape)).numpy()


def nearest_ids(ids: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """An id map tensor (h x w) resized by torch's nearest neighbour (source index floor(i * in / out)), in
    float32 as CorrCLIP resizes its masks; its dtype kept."""
    return F.interpolate(ids[None, None].float(), size=size, mode="nearest")[0, 0].to(ids.dtype)


def region_vote(probabilities: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
    """Each region's pixels given the region's mean class probabilities; unsegmented pixels keep theirs.

    Args:
        probabilities: classes x h x w.
        regions: h x w region ids (int64 on the same device), UNSEGMENTED where no region is.

    Returns:
        classes x h x w, on the device of `probabilities`.
    """
    flat = regions.flatten()
    covered = flat != UNSEGMENTED
    if not bool(covered.any()):
        return probabilities
    _, index = torch.unique(flat[covered], return_inverse=True)
    values = probabilities.flatten(1)
    sums = torch.zeros(values.shape[0], int(index.max()) + 1, dtype=torch.float32, device=values.device)
    sums.index_add_(1, index, values[:, covered].float())
    means = sums / torch.bincount(index).to(sums.dtype)
    voted = values.clone()
    voted[:, covered] = means[:, index].to(values.dtype)
    return voted.reshape(probabilities.shape)
