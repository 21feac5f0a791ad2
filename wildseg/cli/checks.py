"""Checks made before any work: the files a command will write can be written, and no input is overwritten."""

import os
from pathlib import Path
from typing import Iterable, Optional

from ..errors import WildsegError


def check_output_folder(out_dir: Path, outputs: Iterable[Path], option: str = "--out") -> None:
    """Fail when the outputs could not be written: the folder under a file, unwritable, or an output path taken by
    a folder."""
    nearest = next(folder for folder in (out_dir.absolute(), *out_dir.absolute().parents) if folder.exists())
    if not nearest.is_dir():
        raise WildsegError(f"{nearest} is a file, not a folder: choose another {option}")
    if not os.access(nearest, os.W_OK | os.X_OK):
        raise WildsegError(f"cannot write into {nearest}: choose a {option} you can write to")
    for path in outputs:
        if path.is_dir():
            raise WildsegError(f"the output path {path} is a folder: move it away or choose another {option}")


def refuse_to_overwrite_inputs(jobs: dict[Path, dict[str, Path]]) -> None:
    """Fail when an image's outputs would be written over an input image."""
    inputs = {path.absolute() for path in jobs}
    for image, paths in jobs.items():
        if any(path.absolute() in inputs for path in paths.values()):
            raise WildsegError(f"the outputs of {image} would overwrite the input images: choose another --out folder")


def check_export_options(coco_path: Optional[Path], yolo_folder: Optional[Path], min_region: Optional[float]) -> None:
    """Fail when the data set files could not be written."""
    if min_region is not None and yolo_folder is None:
        raise WildsegError("--yolo-min-region is an option of --yolo: add --yolo DIR or leave it out")
    if coco_path is not None:
        check_output_folder(coco_path.parent, [coco_path], "--coco")
    if yolo_folder is not None:
        if yolo_folder.exists() and not yolo_folder.is_dir():
            raise WildsegError(f"--yolo {yolo_folder} is a file: give a folder for the YOLO data set")
        check_output_folder(yolo_folder, [], "--yolo")
