"""What each refinement stage is worth on real images, while CLIP's weights are not available.

Coarse maps are derived from ground truth the way a ViT-B/16 sees an image (`wildseg/coarse.py`: class
one-hot averaged over a 14 x 14 patch grid, Gaussian blur of 1 cell, Gaussian noise 0.1 with seed = image
index, bilinear upsampling), then refined by each option (PAMR with the paper's dilations and with NACLIP's
(8, 16)); mIoU and pixel accuracy are printed per option.

    python benchmarks/refinement_study.py --limit 50
"""

import argparse
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import track
from rich.table import Table

from wildseg.coarse import coarse_probabilities
from wildseg.datasets import folder_dataset
from wildseg.metrics import confusion_matrix, mean_iou, pixel_accuracy
from wildseg.pamr import PamrSettings, pamr_numpy
from wildseg.refine import CrfSettings, dense_crf

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
DATASETS = {"camvid": 11, "nyuv2": 0}
NACLIP_PAMR = PamrSettings(iterations=10, dilations=(8, 16))
REFINEMENTS = {
    "none": lambda image, probabilities: probabilities,
    "crf": lambda image, probabilities: dense_crf(image, probabilities, CrfSettings()),
    "pamr": lambda image, probabilities: pamr_numpy(image, probabilities),
    "pamr (8, 16)": lambda image, probabilities: pamr_numpy(image, probabilities, NACLIP_PAMR),
    "pamr+crf": lambda image, probabilities: dense_crf(image, pamr_numpy(image, probabilities), CrfSettings()),
}


def study(name: str, ignore_index: int, limit: int) -> dict[str, tuple[float, float, float]]:
    """mIoU, pixel accuracy and seconds per image of each refinement on the first `limit` images."""
    dataset = folder_dataset(SHARED / name, ignore_index=ignore_index)
    classes = len(dataset.classes)
    confusions = {option: torch.zeros(classes, classes, dtype=torch.long) for option in REFINEMENTS}
    seconds = dict.fromkeys(REFINEMENTS, 0.0)
    count = min(limit, len(dataset))
    for index in track(range(count), description=name):
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
    parser.add_argument("--limit", type=int, default=50, help="images per data set")
    arguments = parser.parse_args()
    table = Table(title=f"refinement of coarse ground-truth maps, first {arguments.limit} images")
    for column in ("dataset", "refinement", "mIoU", "pixel acc.", "s / image"):
        table.add_column(column)
    for name, ignore_index in DATASETS.items():
        for option, (miou, accuracy, seconds) in study(name, ignore_index, arguments.limit).items():
            table.add_row(name, option, f"{miou:.3f}", f"{accuracy:.3f}", f"{seconds:.3f}")
    Console().print(table)


if __name__ == "__main__":
    main()
