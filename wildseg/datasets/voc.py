"""PASCAL VOC 2012 segmentation through torchvision's `VOCSegmentation` (official layout, checksum-verified download).

VOC21 scores background as class 0; VOC20 scores the 20 object classes only (background pixels ignored).
Object borders (255) are ignored in both.
"""

from pathlib import Path
from typing import Optional

from ..errors import WildsegError, first_line, setting
from .base import IGNORE, PairedFiles, ids_from_list, shifted_lookup
from .classes import builtin_class_names

VOC_FOLDER = Path("VOCdevkit", "VOC2012")


def voc_dataset(root: Optional[Path], split: str = "val", background: bool = True, download: Optional[Path] = None):
    """VOC2012 `split` from `root` (the VOC2012 folder or one holding VOCdevkit/VOC2012).

    With `download`, the official trainval archive is fetched into that folder (once), its MD5 verified,
    and unpacked there.
    """
    if split not in ("train", "val", "trainval"):
        raise WildsegError(f"VOC2012 has no split {split!r}: use val, train or trainval")
    if download is not None:
        torchvision_root = _download(Path(download))
    elif root is None:
        raise WildsegError(f"give {setting('root')} (the VOCdevkit/VOC2012 folder) or {setting('download')} DIR to "
                           "fetch VOC2012")
    elif _has_voc_layout(Path(root)) and Path(root).parts[-2:] != VOC_FOLDER.parts:
        return _renamed_voc_folder(Path(root), split, background)
    else:
        torchvision_root = _torchvision_root(Path(root))
    from torchvision.datasets import VOCSegmentation  # torchvision takes seconds to import: only when reading

    try:
        voc = VOCSegmentation(str(torchvision_root), year="2012", image_set=split)
    except (OSError, RuntimeError) as error:
        raise WildsegError(
            f"cannot read VOC2012 {split} under {torchvision_root / VOC_FOLDER}: {first_line(error)}"
        ) from None
    ids = [Path(path).stem for path in voc.images]
    images = dict(zip(ids, map(Path, voc.images)))
    masks = dict(zip(ids, map(Path, voc.masks)))
    return _voc_pairs(images, masks, background)


def _voc_pairs(images: dict[str, Path], masks: dict[str, Path], background: bool) -> PairedFiles:
    if background:
        return PairedFiles("voc21", builtin_class_names("voc21"), images, masks, IGNORE, shifted_lookup(0, 21))
    return PairedFiles("voc20", builtin_class_names("voc20"), images, masks, IGNORE, shifted_lookup(1, 20))


def _has_voc_layout(root: Path) -> bool:
    return all((root / part).is_dir() for part in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"))


def _renamed_voc_folder(root: Path, split: str, background: bool) -> PairedFiles:
    """A VOC2012 folder moved out of VOCdevkit/, which torchvision cannot be pointed at: same files, read here."""
    ids = ids_from_list(root / "ImageSets" / "Segmentation" / f"{split}.txt", "PASCAL VOC 2012")
    images = {image_id: root / "JPEGImages" / f"{image_id}.jpg" for image_id in ids}
    masks = {image_id: root / "SegmentationClass" / f"{image_id}.png" for image_id in ids}
    return _voc_pairs(images, masks, background)


def _torchvision_root(root: Path) -> Path:
    """torchvision expects the folder that holds VOCdevkit/VOC2012."""
    if (root / VOC_FOLDER).is_dir():
        return root
    if root.parts[-2:] == VOC_FOLDER.parts and root.is_dir():
        return root.parent.parent
    raise WildsegError(
        f"{root} is not a PASCAL VOC 2012 folder: pass {setting('root')} .../VOCdevkit/VOC2012 (the folder holding "
        f"JPEGImages/, SegmentationClass/ and ImageSets/), or {setting('download')} DIR to fetch it"
    )


def _download(folder: Path) -> Path:
    if (folder / VOC_FOLDER / "ImageSets" / "Segmentation").is_dir():
        return folder
    from torchvision.datasets import VOCSegmentation
    from torchvision.datasets.utils import check_integrity
    from torchvision.datasets.voc import DATASET_YEAR_DICT

    archive = DATASET_YEAR_DICT["2012"]
    try:
        VOCSegmentation(str(folder), year="2012", image_set="val", download=True)
    except Exception as error:
        if not check_integrity(folder / archive["filename"], archive["md5"]):
            (folder / archive["filename"]).unlink(missing_ok=True)
        raise WildsegError(
            f"could not download and verify VOC2012 from {archive['url']} ({first_line(error)}): connect to the "
            f"network, or fetch {archive['filename']} (MD5 {archive['md5']}) by hand, unpack it and pass "
            f"{setting('root')}"
        ) from None
    return folder
