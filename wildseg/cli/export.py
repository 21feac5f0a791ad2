"""`wildseg export`, and the data sets `wildseg segment --coco/--yolo` writes after its run."""

from pathlib import Path
from typing import Optional

import click
from rich.console import Console

from ..errors import WildsegError
from .checks import check_export_options
from .options import export_options
from .progress import status


def write_exports(console: Console, report: Console, folder: Path, coco_path: Optional[Path],
                  yolo_folder: Optional[Path], min_region: Optional[float], instances: bool = False) -> None:
    """Write the COCO file and the YOLO data set of the images done in `folder` (`wildseg.export`; per object with
    `instances`), saying what was written."""
    from ..export import MIN_REGION, write_coco, write_yolo

    if coco_path is not None:
        with status(console, f"writing {coco_path}"):
            dataset = write_coco(folder, coco_path, instances)
        report.print(f"wrote {coco_path}: {len(dataset['images'])} images, {len(dataset['categories'])} categories, "
                     f"{len(dataset['annotations'])} annotations", soft_wrap=True, markup=False, highlight=False)
    if yolo_folder is not None:
        with status(console, f"writing the YOLO data set into {yolo_folder}"):
            images, unlinked = write_yolo(folder, yolo_folder, MIN_REGION if min_region is None else min_region,
                                          instances)
        report.print(f"wrote {yolo_folder / 'data.yaml'} and the labels of {images} images", soft_wrap=True,
                     markup=False, highlight=False)
        if unlinked:
            click.echo(f"wildseg: warning: {unlinked} images were not found from here to link into "
                       f"{yolo_folder / 'images'}: run from the folder wildseg segment ran in, or put them there",
                       err=True)


@click.command()
@click.argument("masks_dir", type=click.Path(path_type=Path))
@export_options
@click.option("--quiet", "-q", is_flag=True, help="Print nothing but errors.")
def export(masks_dir, coco_path, yolo_folder, yolo_min_region, instances, quiet):
    """Write the outputs of `wildseg segment` in MASKS_DIR (its --out folder) as a COCO file (--coco FILE) or an
    Ultralytics YOLO data set (--yolo DIR), without the model; with --instances, one annotation per object of a
    `wildseg segment --instances` run."""
    if coco_path is None and yolo_folder is None:
        raise WildsegError("give --coco FILE.json, --yolo DIR or both")
    if not masks_dir.is_dir():
        raise WildsegError(f"{masks_dir} is not a folder: give the --out folder of wildseg segment")
    check_export_options(coco_path, yolo_folder, yolo_min_region)
    from ..export import check_objects, segmented_images

    images = segmented_images(masks_dir)
    if not images:
        raise WildsegError(f"{masks_dir} holds no image wildseg segment finished (NAME.json records with their "
                           "NAME.png masks): give the --out folder of a run")
    if instances:
        check_objects(images)
    write_exports(Console(stderr=True, quiet=quiet), Console(quiet=quiet), masks_dir, coco_path, yolo_folder,
                  yolo_min_region, instances)
