"""Segmentation methods as plug-ins: how CLIP's image tower and the label embeddings become a map per label.

Every method is one module of this package, `wildseg/methods/<name>.py`, whose `build(config)` returns a
`base.Method`; its published evaluation protocols, where it has any, are the file `<name>.json` beside it
(`published_protocols`). Adding a method is its module, its protocol file, its tests and one line of REGISTRY.

A method belongs to a family, which decides everything around it (`pipeline`):
- `relevance`: test-time views of the image at the model's input size; maps on the patch grid scored by their
  min-max normalised values (Zabari & Hoshen).
- `dense`: windows of the image resized for the model, as the official dense segmenters slide them; maps are
  patch-label cosines, scored by softmax(logit scale x cosine) with background words. `--method dense
  --attention NAME` chooses one.

This module imports nothing heavy: the command line lists the methods from it before torch is loaded.
"""

import importlib
import json
from dataclasses import dataclass
from importlib import resources
from typing import Optional

RELEVANCE, DENSE = "relevance", "dense"


@dataclass(frozen=True)
class MethodEntry:
    """A method's registry line: its name (the module's), family, one line for help texts, and its paper."""

    name: str
    family: str
    summary: str
    paper: str


REGISTRY = {entry.name: entry for entry in (
    MethodEntry("relevance", RELEVANCE, "Chefer et al. relevance of each label in CLIP's attention (Zabari & Hoshen)",
                "Chefer, Gur & Wolf, ICCV 2021; Zabari & Hoshen, arXiv 2112.03185"),
    MethodEntry("vanilla", DENSE, "CLIP's own last block: the reference the others depart from", "Radford et al. 2021"),
    MethodEntry("maskclip", DENSE, "each patch keeps its value embedding", "Zhou, Loy & Dai, ECCV 2022"),
    MethodEntry("sclip", DENSE, "correlative self-attention q-q + k-k", "Wang, Mei & Yuille, ECCV 2024"),
    MethodEntry("clearclip", DENSE, "q-q attention without residual or feed-forward", "Lan et al., ECCV 2024"),
    MethodEntry("naclip", DENSE, "k-k attention with a Gaussian neighbourhood", "Hajimiri, Ben Ayed & Dolz, WACV 2025"),
    MethodEntry("scclip", DENSE, "anomalous tokens fixed, mid-layer similarities aggregate and attend, levels fused",
                "Bai et al., arXiv 2411.15869"),
    MethodEntry("rfclip", DENSE, "sink tokens denoised, guides enhance, key-key attention of all blocks decodes, "
                "prompts clustered and adjusted, global semantics mixed", "Li et al., AAAI 2026, arXiv 2511.16170"),
    MethodEntry("corrclip", DENSE, "patch correlations scoped to regions and valued by DINO, region class tokens, "
                "each region's majority label", "Zhang et al., ICCV 2025, arXiv 2411.10086"),
)}
"""Every method wildseg offers, by name."""


PROTOCOL_FALLBACK = "naclip"
"""The method whose published protocols a dense method without any of its own follows."""


def names(family: str) -> tuple[str, ...]:
    """The names of the methods of a family, in registry order."""
    return tuple(name for name, entry in REGISTRY.items() if entry.family == family)


def load_method(name: str):
    """The module of a registered method (imported on first use: it brings in torch)."""
    if name not in REGISTRY:
        raise KeyError(name)
    return importlib.import_module(f"{__name__}.{name}")


def published_protocols(name: str) -> Optional[dict]:
    """A method's published evaluation protocols (`<name>.json` beside its module), or None when it has none.

    The file holds `source` (the official code and where the numbers come from), `common` (settings of every data
    set), `datasets` (per data-set key: the settings that differ, `config`, `class_list`, `published_miou` and
    optionally `area_threshold`), `pixel_mean` and `pixel_std` (the normalisation of the official code, in 0-255
    units, as its config writes them), optionally `window_padding` ("zero" where the official code zero-pads a
    window whose sides are no multiple of the patch size) and `known_deviations` (how every wildseg run of it is
    known to differ).
    """
    entry = resources.files(__name__).joinpath(f"{name}.json")
    return json.loads(entry.read_text(encoding="utf-8")) if entry.is_file() else None


def official_normalization(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The pixel mean and standard deviation (0-255 units) the official code of dense method `name` normalises
    with: its published protocols' `pixel_mean` and `pixel_std`, or those of PROTOCOL_FALLBACK for a method
    without published protocols."""
    published = published_protocols(name) or published_protocols(PROTOCOL_FALLBACK)
    return tuple(published["pixel_mean"]), tuple(published["pixel_std"])
