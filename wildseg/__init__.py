"""wildseg: training-free, zero-shot semantic segmentation with CLIP (Zabari & Hoshen, arXiv 2112.03185).

>>> from wildseg import Segmenter, SegmenterConfig, load_backbone
>>> segmenter = Segmenter(load_backbone("ViT-B-16"), SegmenterConfig(method="dense", refine="pamr"))
>>> segmenter.segment("photo.jpg", "cat, sofa").mask
"""

from .errors import WildsegError, WildsegWarning
from .version import __version__

__all__ = ["Backbone", "SegmentationResult", "Segmenter", "SegmenterConfig", "WildsegError", "WildsegWarning",
           "__version__", "load_backbone"]
LAZY = {"Segmenter": "segmenter", "SegmentationResult": "result", "SegmenterConfig": "config",
        "load_backbone": "backbone", "Backbone": "backbone"}
"""Imported on first use: they bring in torch and open_clip, which the command line's help and usage errors do
without."""


def __getattr__(name: str):
    if name in LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{LAZY[name]}"), name)
    raise AttributeError(f"module 'wildseg' has no attribute {name!r}")
