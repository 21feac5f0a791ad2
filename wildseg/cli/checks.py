"""Checks made before any work: the folders and files a command will write can be written (the checks of each
image's outputs are part of planning a run, `planning.plan_run`)."""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Iterable, Optional

from ..errors import WildsegError, first_line


def check_output_folder(out_dir: Path, outputs: Iterable[Path], option: str = "--out") -> None:
    """Fail when the outputs could not be written: the folder under a file, not creatable or not writable (it is
    created, a probe file written into it and removed, and the folders made for it removed again), or an output
    path taken by a folder."""
    folder = out_dir.absolute()
    nearest = next(each for each in (folder, *folder.parents) if each.exists())
    if not nearest.is_dir():
        raise WildsegError(f"{nearest} is a file, not a folder: choose another {option}")
    missing = [each for each in (folder, *folder.parents) if not each.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".wildseg-probe-"):
            pass
    except OSError as error:
        reason = error.strerror or first_line(error)
        raise WildsegError(f"cannot write into {out_dir} ({reason}): choose a {option} you can write to") from None
    finally:
        for made in missing:
            with contextlib.suppress(OSError):
                made.rmdir()
    for path in outputs:
        if path.is_dir():
            raise WildsegError(f"the output path {path} is a folder: move it away or choose another {option}")


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
