"""What each refinement stage is worth on real images, while CLIP's weights are not available.

Coarse maps are derived from ground truth the way a ViT-B/16 sees an image (`coarse_maps.py`: class
one-hot averaged over a 14 x 14 patch grid, Gaussian blur of 1 cell, Gaussian noise 0.1 with seed = image
index, bilinear upsampling), then refined by each option (PAMR with the paper's dilations and with NACLIP's
(8, 16); the region vote over scikit-image's SLIC and Felzenszwalb superpixels, alone and around PAMR and the
CRF, in `--refine`'s order); mIoU, pixel accuracy and seconds per image (superpixels included) are printed per
option.

    python benchmarks/refinement_study.py --camvid data/camvid --nyuv2 data/nyuv2 --limit 50

Each folder is in the `folder` layout of `wildseg eval` (images/, masks/, classes.txt).
"""

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from coarse_maps import coarse_probabilities, pamr_on_arrays
from rich.console import Console
from rich.progress import track
from rich.table import Table

from wildseg.datasets import folder_dataset
from wildseg.metrics import confusion_matrix, mean_iou, pixel_accuracy
from wildseg.refinement.crf import dense_crf
from wildseg.refinement.regions import region_vote, superpixels
from wildseg.refinement.settings import CrfSettings, PamrSettings

IGNORED_VALUES = {"camvid": 11, "nyuv2": 0}
"""The mask value each data set leaves unscored (CamVid's void, NYUv2's unlabeled)."""
NACLIP_PAMR = PamrSettings(iterations=10, dilations=(8, 16))
REFINEMENTS = {
    "none": lambda image, probabilities: probabilities,
    "crf": lambda image, probabilities: dense_crf(image, probabilities, CrfSettings()),
    "pamr": lambda image, probabilities: pamr_on_arrays(image, probabilities),
    "pamr (8, 16)": lambda image, probabilities: pamr_on_arrays(image, probabilities, NACLIP_PAMR),
    "pamr+crf": lambda image, probabilities: dense_crf(image, pamr_on_arrays(image, probabilities), CrfSettings()),
    "regions (slic)": lambda image, probabilities: voted(image, probabilities, "slic"),
    "regions (felzenszwalb)": lambda image, probabilities: voted(image, probabilities, "felzenszwalb"),
    "pamr+regions (slic)": lambda image, probabilities: voted(image, pamr_on_arrays(image, probabilities), "slic"),
    "regions (slic)+crf": lambda image, probabilities: dense_crf(image, voted(image, probabilities, "slic"),
                                                                CrfSettings()),
}


def voted(image: np.ndarray, probabilities: np.ndarray, method: str) -> np.ndarray:
    """The region vote of `probabilities` over the image's superpixels (`wildseg.refinement.regions`)."""
    regions = torch.from_numpy(superpixels(image, method))
    return region_vote(torch.from_numpy(probabilities), regions).numpy()


def study(root: Path, ignore_index: int, limit: int) -> dict[str, tuple[float, float, float]]:
    """mIoU, pixel accuracy and seconds per image of each refinement on the first `limit` images of the folder data
    set at `root` whose mask value `ignore_index` is not scored."""
    dataset = folder_dataset(root, ignore_index=ignore_index)
    classes = len(dataset.classes)
    confusions = {option: torch.zeros(classes, classes, dtype=torch.long) for option in REFINEMENTS}
    seconds = dict.fromkeys(REFINEMENTS, 0.0)
    count = min(limit, len(dataset))
    for index in track(range(count), description=root.name):
        sample = dataset[index]
        coarse = coarse_probabilities(sample.truth, classes, seed=index, ignore_index=dataset.ignore_index)
        for option, refine in REFINEMENTS.items():
            started = time.perf_counter()
            refined = refine(sample.image, coarse)
            seconds[option] += time.perf_counter() - started
            confusions[option] += confusion_matrix(refined.argmax(0), sample.truth, classes, dataset.ignore_index)
    return {
        option: (mean_iou(confusion), pixel_accuracy(confusion), seconds[option] / count)
        for option, confusion in confusions.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in IGNORED_VALUES:
        parser.add_argument(f"--{name}", type=Path, required=True, help=f"the {name} folder data set")
    parser.add_argument("--limit", type=int, default=50, help="images per data set")
    arguments = parser.parse_args()
    table = Table(title=f"refinement of coarse ground-truth maps, first {arguments.limit} images")
    for column in ("dataset", "refinement", "mIoU", "pixel acc.", "s / image"):
        table.add_column(column)
    for name, ignore_index in IGNORED_VALUES.items():
        for option, (miou, accuracy, seconds) in study(getattr(arguments, name), ignore_index, arguments.limit).items():
            table.add_row(name, option, f"{miou:.3f}", f"{accuracy:.3f}", f"{seconds:.3f}")
    Console().print(table)


if __name__ == "__main__":
    main()
