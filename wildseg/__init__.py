"""wildseg: training-free, zero-shot semantic segmentation with CLIP (Zabari & Hoshen, arXiv 2112.03185)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("wildseg")
except PackageNotFoundError:
    __version__ = "0.0.0+unknown"

from .errors import WildsegError, WildsegWarning
from .segmenter import SegmentationResult, Segmenter

__all__ = ["Segmenter", "SegmentationResult", "WildsegError", "WildsegWarning", "__version__"]
