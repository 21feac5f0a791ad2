"""wildseg: training-free, zero-shot semantic segmentation with CLIP (Zabari & Hoshen, arXiv 2112.03185)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("wildseg")
except PackageNotFoundError:
    __version__ = "0.0.0+unknown"

from .errors import WildsegError, WildsegWarning

__all__ = ["Segmenter", "SegmentationResult", "WildsegError", "WildsegWarning", "__version__"]


def __getattr__(name: str):
    """`Segmenter` and `SegmentationResult` are imported on first use: they bring in torch and open_clip, which
    the command line's help and usage errors do without."""
    if name in ("Segmenter", "SegmentationResult"):
        from . import segmenter

        return getattr(segmenter, name)
    raise AttributeError(f"module 'wildseg' has no attribute {name!r}")
