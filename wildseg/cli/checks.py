"""Checks made before any work: the files a command will write can be written, no input is overwritten, every image
has its labels, and no output done with other settings is taken as done with these."""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Optional

from ..errors import WildsegError, first_line, setting
from ..inputs import table_key

if TYPE_CHECKING:
    from ..batch import Labeling

SHOWN_IMAGES = 3
"""How many of the images a usage error concerns it names (then how many there are)."""


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


def unlisted_images(images: list[Path], labeling: Labeling, skip: bool) -> set[Path]:
    """The images a labels file gives no labels (none without one); unless `skip`, a usage error naming the first
    few of them and how many there are."""
    if labeling.table is None:
        return set()
    unlisted = [image for image in images if table_key(image) not in labeling.table]
    if unlisted and not skip:
        named = ", ".join(str(image) for image in unlisted[:SHOWN_IMAGES])
        more = f" and {len(unlisted) - SHOWN_IMAGES} more" if len(unlisted) > SHOWN_IMAGES else ""
        raise WildsegError(f"{len(unlisted)} of the {len(images)} images have no entry in {setting('labels_file')} "
                           f"{labeling.labels_file} ({named}{more}): add their rows, or give --skip-unlisted to "
                           "segment only the images it lists")
    return set(unlisted)


def refuse_outdated_outputs(records: dict[Path, dict], labeling: Labeling, request: dict, out_dir: Path) -> None:
    """Fail when images done before in `out_dir` (image -> its JSON record, read) were made with settings that differ
    from this run's `request` (`provenance.outdated_outputs`): naming each differing setting and for how many
    images, with --overwrite and another --out as the ways on."""
    from ..provenance import UNRECORDED, outdated_outputs

    images, settings = outdated_outputs({image.absolute(): record for image, record in records.items()},
                                        labeling.asked, request)
    if images:
        differing = ", ".join(f"{name if name == UNRECORDED else setting(name)} for {count}"
                              for name, count in settings.most_common())
        raise WildsegError(f"{images} of the {len(records)} images done before in {out_dir} were made with other "
                           f"settings ({differing}): give --overwrite to segment them again with these, or "
                           "choose another --out")
