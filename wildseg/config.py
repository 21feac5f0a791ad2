"""`SegmenterConfig`: what a Segmenter does with the loaded model, checked when it is made.

Every setting a method or refinement does not use defaults to None and is refused when given for another one
(say `window` with the relevance method), so that nothing given is silently ignored; `resolved(name)` is the value
a setting has in effect. Errors name the settings as this class does (`errors.setting`): the command line words
them as its flags.
"""

import importlib.util
from dataclasses import dataclass, fields
from functools import cached_property
from pathlib import Path
from typing import Any, Optional, Union

from . import methods
from .choices import (
    CRF_BACKENDS,
    DEFAULT_ATTENTION,
    DEFAULT_BG_THRESHOLD,
    DEFAULT_DINO_MODEL,
    DEFAULT_DENSE_BG_THRESHOLD,
    DEFAULT_MAX_SIDE,
    DEFAULT_START_BLOCK,
    DEFAULT_TEMPERATURE,
    DEFAULT_TEMPLATES,
    DENSE_LOGIT_SCALE,
    DENSE_SHORT_SIDE,
    DEFAULT_REGIONS,
    DEFAULT_SAM2_MODEL,
    DENSE_WINDOW,
    GLOBAL_CONTEXTS,
    METHODS,
    MIN_WORKING_SIDE,
    NORMALIZATIONS,
    REFINEMENTS,
    REGION_MODELS,
    RFCLIP_DEFAULTS,
    SUPERPIXELS,
    TTA_POLICIES,
)
from .errors import WildsegError, setting
from .refinement.settings import CrfSettings, MaskGeneration, PamrSettings
from .templates import TemplateSet, check_templates, resolve_templates

DENSE_LONG_SIDE = 2048
DEFAULTS = {
    "attention": DEFAULT_ATTENTION,
    "start_block": DEFAULT_START_BLOCK,
    "window": DENSE_WINDOW,
    "short_side": DENSE_SHORT_SIDE,
    "long_side": DENSE_LONG_SIDE,
    "logit_scale": DENSE_LOGIT_SCALE,
    "normalization": "auto",
    "crf_iterations": CrfSettings.iterations,
    "crf_backend": "auto",
    "pamr_iterations": PamrSettings.iterations,
    "pamr_dilations": PamrSettings.dilations,
    "regions": DEFAULT_REGIONS,
    "sam2_model": DEFAULT_SAM2_MODEL,
    "sam2_points": MaskGeneration.points_per_side,
    "dino_model": DEFAULT_DINO_MODEL,
    **RFCLIP_DEFAULTS,
}
"""What the settings that default to None mean (`stride`, `bg_threshold` and `background_words` depend on others)."""
SCOPES = {
    **{name: ("method", "dense") for name in ("attention", "window", "stride", "short_side", "long_side",
                                              "logit_scale", "normalization", "background_words")},
    "start_block": ("method", "relevance"),
    **{name: ("refine", "crf") for name in ("crf_iterations", "crf_backend")},
    **{name: ("refine", "pamr") for name in ("pamr_iterations", "pamr_dilations")},
    "regions": ("refine", "regions"),
    **{name: ("regions", "sam2") for name in ("sam2_model", "sam2_points")},
    **{name: ("attention", "rfclip") for name in RFCLIP_DEFAULTS},
    **{name: ("attention", "corrclip") for name in ("dino_model", "dino_checkpoint")},
}
"""The settings of one method, dense method, refinement or region source: (setting that chooses it, the choice).
The regions are also CorrCLIP's, whatever the refinement (`REGION_METHODS`)."""
METHOD_DEFAULTS = {"corrclip": {"window": 336, "stride": 112}}
"""Dense methods whose own windows differ from wildseg's defaults: CorrCLIP slides 336-pixel windows every 112."""
REGION_METHODS = ("corrclip",)
"""The dense methods that need regions of every image (`refinement.regions`)."""


def dense_shorthand(method: str, attention: Optional[str]) -> tuple[str, Optional[str]]:
    """(method, attention) with a dense method named as the method (`method="corrclip"`) read as `method="dense",
    attention="corrclip"`; other values as they are."""
    if method not in methods.names(methods.DENSE):
        return method, attention
    if attention not in (None, method):
        raise WildsegError(f"{setting('method')} {method} is the dense method {method}: leave {setting('attention')} "
                           f"out, or give {setting('method')} dense {setting('attention')} {attention}")
    return "dense", method


def uses_regions(method: str, refine: str, attention: Optional[str] = None) -> bool:
    """Whether images need regions: for the region vote of `refine`, or for a dense method that needs them."""
    return "regions" in refine.split("+") or (method == "dense" and attention in REGION_METHODS)


def applies(name: str, method: str, refine: str, attention: Optional[str] = None, regions: Optional[str] = None
            ) -> bool:
    """Whether setting `name` is used by `method` (with dense method `attention`, default naclip), refinement
    `refine` and region source `regions` (default slic)."""
    if name not in SCOPES:
        return True
    chooser, choice = SCOPES[name]
    if chooser == "attention":
        return method == "dense" and (attention or DEFAULT_ATTENTION) == choice
    if name == "regions":
        return uses_regions(method, refine, attention)
    if chooser == "regions":
        return uses_regions(method, refine, attention) and (regions or DEFAULT_REGIONS) == choice
    return method == choice if chooser == "method" else choice in refine


@dataclass(frozen=True)
class SegmenterConfig:
    """What a `Segmenter` does: the method, its views, its background rule and the refinement.

    Args:
        method: "relevance" (Chefer et al. relevance, Zabari & Hoshen's method) or "dense" (patch-text cosines of a
            method of the dense family, `attention`); a dense method's name is short for "dense" with that attention.
        attention: dense: the method (`wildseg.methods.names("dense")`), default "naclip".
        tta: test-time views, "none", "default" or "heavy" (`tta.POLICIES`).
        refine: "crf", "pamr", "pamr+crf" (PAMR first) or "none".
        bg_threshold: the background threshold in [0, 1]: normalised relevance (default 0.4) or, dense, label
            probability (default 0.1).
        temperature: of the softmax turning scores into probabilities (> 0).
        max_side: working resolution: larger images are segmented at this long side (>= 32).
        templates: prompt templates: a built-in set's name, a template file or a TemplateSet.
        view_batch: views per model batch (default 32 on CUDA, 8 on the CPU; halved when CUDA runs out of memory).
        start_block: relevance: the first block whose attention enters the relevance (-1: the last only).
        window: dense: sliding-window side in pixels, 0 for the whole image in one pass (default 224).
        stride: dense: window stride (default half the window).
        short_side: dense: the image is resized to this short side for the model (default 336) ...
        long_side: ... with its long side at most this (default 2048), as mmcv resizes it.
        logit_scale: dense: the softmax scale of the patch-label cosines (default 40).
        normalization: dense: the pixel normalisation, "official" (the constants of the method's official code,
            mmseg's rounding of CLIP's), "model" (the model's own) or "auto" (the default: official when the
            model's own constants are CLIP's, else model; `choices.NORMALIZATIONS`).
        background_words: dense: words scored as background (default those of PASCAL VOC's background class; ()
            for none).
        crf_iterations: mean-field iterations of the dense CRF (default 5).
        crf_backend: "auto" (torch on a GPU, pydensecrf on the CPU), "torch" or "pydensecrf".
        pamr_iterations: PAMR iterations (default 10).
        pamr_dilations: PAMR's neighbourhood dilations (default 1, 2, 4, 8, 12, 24).
        regions: the region source of the region vote and of CorrCLIP: "slic" (default), "felzenszwalb", "sam2"
            (SAM 2's automatic masks, `refinement.automatic_masks`) or a folder of region maps (`refinement.regions`).
        sam2_model: regions sam2: the SAM 2 model, a Hugging Face Hub name (default facebook/sam2-hiera-large) or a
            folder saved by transformers (`backbone.sam2.load_sam2`).
        sam2_points: regions sam2: prompt points per side of the image (default 8, CorrCLIP's).
        dino_model: corrclip: the DINO model by timm's name (default vit_base_patch8_224.dino, DINO ViT-B/8;
            vit_small_patch8_224.dino is ViT-S/8; `backbone.dino.load_dino`).
        dino_checkpoint: corrclip: a local DINO state dict instead of timm's hub weights.
        global_weight: rfclip: the share of the global vector's label cosines in the map (default 0.1).
        prompt_shift: rfclip: how far a cluster's label moves towards its best patches (default 0.03).
        cluster_threshold: rfclip: the cosine distance at which label clusters are cut (default 0.1).
        global_context: rfclip: the global vector of the whole image ("image", default) or of each window
            ("window"; `methods.rfclip`).
    """

    method: str = "relevance"
    attention: Optional[str] = None
    tta: str = "default"
    refine: str = "crf"
    bg_threshold: Optional[float] = None
    temperature: float = DEFAULT_TEMPERATURE
    max_side: int = DEFAULT_MAX_SIDE
    templates: Union[str, Path, TemplateSet] = DEFAULT_TEMPLATES
    view_batch: Optional[int] = None
    start_block: Optional[int] = None
    window: Optional[int] = None
    stride: Optional[int] = None
    short_side: Optional[int] = None
    long_side: Optional[int] = None
    logit_scale: Optional[float] = None
    normalization: Optional[str] = None
    background_words: Optional[tuple[str, ...]] = None
    crf_iterations: Optional[int] = None
    crf_backend: Optional[str] = None
    pamr_iterations: Optional[int] = None
    pamr_dilations: Optional[tuple[int, ...]] = None
    regions: Optional[str] = None
    sam2_model: Optional[str] = None
    sam2_points: Optional[int] = None
    dino_model: Optional[str] = None
    dino_checkpoint: Optional[Path] = None
    global_weight: Optional[float] = None
    prompt_shift: Optional[float] = None
    cluster_threshold: Optional[float] = None
    global_context: Optional[str] = None

    def __post_init__(self):
        method, attention = dense_shorthand(self.method, self.attention)
        object.__setattr__(self, "method", method)
        object.__setattr__(self, "attention", attention)
        _choice("method", self.method, METHODS)
        _choice("tta", self.tta, TTA_POLICIES)
        _choice("refine", self.refine, REFINEMENTS)
        for item in fields(self):
            value = getattr(self, item.name)
            if value is not None and not applies(item.name, self.method, self.refine, self.attention, self.regions):
                chooser, choice = SCOPES[item.name]
                choices = choice if chooser != "refine" else " or ".join(
                    refinement for refinement in REFINEMENTS if choice in refinement.split("+"))
                if item.name == "regions":
                    choices += f" (or of {setting('method')} {' or '.join(REGION_METHODS)})"
                raise WildsegError(f"{setting(item.name)} is an option of {setting(chooser)} {choices}: add that or "
                                   "leave it out")
        if self.attention is not None:
            _choice("attention", self.attention, methods.names(methods.DENSE))
        if self.normalization is not None:
            _choice("normalization", self.normalization, NORMALIZATIONS)
        if self.crf_backend is not None:
            _choice("crf_backend", self.crf_backend, CRF_BACKENDS)
        if self.global_context is not None:
            _choice("global_context", self.global_context, GLOBAL_CONTEXTS)
        for name in ("global_weight", "prompt_shift"):
            if getattr(self, name) is not None and not 0.0 <= getattr(self, name) <= 1.0:
                raise WildsegError(f"{setting(name)} must lie in [0, 1], got {getattr(self, name)}")
        if self.cluster_threshold is not None and not 0.0 <= self.cluster_threshold <= 2.0:
            raise WildsegError(f"{setting('cluster_threshold')} must lie in [0, 2] (a cosine distance), got "
                               f"{self.cluster_threshold}")
        sources = (*SUPERPIXELS, *REGION_MODELS)
        if self.regions is not None and self.regions not in sources and not Path(self.regions).is_dir():
            raise WildsegError(f"{setting('regions')} {self.regions}: no such folder; give {' or '.join(sources)}, "
                               "or a folder of <image stem>.npz (key instance_mask) or .png region maps")
        _at_least("sam2_points", self.sam2_points, 1)
        if self.dino_checkpoint is not None and not Path(self.dino_checkpoint).is_file():
            raise WildsegError(f"{setting('dino_checkpoint')} {self.dino_checkpoint}: no such file; give a DINO state "
                               "dict, or leave it out for timm's weights")
        if self.uses_sam2:
            _check_sam2(self.resolved("sam2_model"))
        _at_least("max_side", self.max_side, MIN_WORKING_SIDE, "pixels")
        _at_least("view_batch", self.view_batch, 1)
        _at_least("crf_iterations", self.crf_iterations, 1)
        _at_least("pamr_iterations", self.pamr_iterations, 1)
        _at_least("short_side", self.short_side, 16, "pixels")
        _at_least("long_side", self.long_side, 16, "pixels")
        window = self.resolved("window")
        if window < 0 or 0 < window < 16:
            raise WildsegError(f"{setting('window')} must be 0 (the whole image) or at least 16 pixels, got {window}")
        if window and self.stride is not None and not 0 < self.stride <= window:
            raise WildsegError(f"{setting('stride')} must lie in 1..{window} (the window), got {self.stride}")
        if self.logit_scale is not None and self.logit_scale <= 0:
            raise WildsegError(f"{setting('logit_scale')} must be positive, got {self.logit_scale}")
        if not 0.0 <= self.background_threshold <= 1.0:
            raise WildsegError(f"{setting('bg_threshold')} must lie in [0, 1], got {self.bg_threshold}")
        if self.temperature <= 0:
            raise WildsegError(f"{setting('temperature')} must be positive, got {self.temperature}")
        dilations = self.resolved("pamr_dilations")
        if not dilations or any(not isinstance(each, int) or each < 1 for each in dilations):
            raise WildsegError(f"{setting('pamr_dilations')} must be positive whole numbers, got {dilations}")
        check_templates(self.templates)

    @classmethod
    def from_options(cls, options: dict, defaults: Optional[dict] = None) -> "SegmenterConfig":
        """The configuration of option values as a command gives them, over `defaults` (a command's or a published
        protocol's).

        Args:
            options: values given (None: not given); names that are no field of this class are ignored.
            defaults: values where none is given, kept only where the method and refinement in effect use them.

        Returns:
            The checked SegmenterConfig.
        """
        names = {item.name for item in fields(cls)}
        given = {name: value for name, value in options.items() if value is not None and name in names}
        defaults = {name: value for name, value in (defaults or {}).items() if name in names}
        method, attention = dense_shorthand(given.get("method", defaults.get("method", "relevance")),
                                            given.get("attention", defaults.get("attention")))
        refine = given.get("refine", defaults.get("refine", "crf"))
        regions = given.get("regions", defaults.get("regions"))
        usable = {name: value for name, value in defaults.items()
                  if applies(name, method, refine, attention, regions)}
        return cls(**{**usable, **given})

    def resolved(self, name: str) -> Any:
        """The value setting `name` has in effect: as given, else the dense method's own default
        (`METHOD_DEFAULTS`), else the default."""
        value = getattr(self, name)
        if value is not None:
            return value
        own = METHOD_DEFAULTS.get(self.attention, {}) if self.method == "dense" else {}
        return own.get(name, DEFAULTS.get(name))

    @property
    def method_name(self) -> str:
        """The registered method (`wildseg.methods.REGISTRY`): relevance, or the dense method `attention` names."""
        return "relevance" if self.method == "relevance" else self.resolved("attention")

    @property
    def background_threshold(self) -> float:
        """`bg_threshold` in effect: as given, else 0.4 for relevance and 0.1 for the dense method."""
        if self.bg_threshold is not None:
            return self.bg_threshold
        return DEFAULT_BG_THRESHOLD if self.method == "relevance" else DEFAULT_DENSE_BG_THRESHOLD

    @property
    def window_stride(self) -> int:
        """The dense method's window stride in effect: as given, else half the window."""
        if self.stride is not None:
            return self.stride
        own = METHOD_DEFAULTS.get(self.attention, {}) if self.method == "dense" else {}
        return own.get("stride", self.resolved("window") // 2)

    @property
    def dense_background_words(self) -> tuple[str, ...]:
        """The background words in effect: as given, else those of PASCAL VOC's background class."""
        if self.background_words is not None:
            return tuple(self.background_words)
        from .datasets.classes import builtin_class_names

        return next(entry.prompts for entry in builtin_class_names("voc21") if entry.is_background)

    @cached_property
    def template_set(self) -> TemplateSet:
        """The prompt templates (`backbone.resolve_templates`)."""
        return resolve_templates(self.templates)

    @property
    def crf(self) -> CrfSettings:
        """The dense CRF's parameters: `crf_iterations`, the kernels at pydensecrf's documented values."""
        return CrfSettings(iterations=self.resolved("crf_iterations"))

    @property
    def uses_regions(self) -> bool:
        """Whether images need regions (the region vote, or a method such as CorrCLIP)."""
        return uses_regions(self.method, self.refine, self.resolved("attention"))

    @property
    def uses_sam2(self) -> bool:
        """Whether images need SAM 2's automatic masks (regions in use, from `sam2`)."""
        return self.uses_regions and self.resolved("regions") in REGION_MODELS

    @property
    def mask_generation(self) -> MaskGeneration:
        """How SAM 2's automatic masks are made: `sam2_points` points per side, CorrCLIP's other settings."""
        return MaskGeneration(points_per_side=self.resolved("sam2_points"))

    @property
    def pamr(self) -> PamrSettings:
        """PAMR's parameters: `pamr_iterations` and `pamr_dilations`."""
        return PamrSettings(iterations=self.resolved("pamr_iterations"),
                            dilations=tuple(self.resolved("pamr_dilations")))

    def given(self) -> dict:
        """The settings given, those left to their defaults (None) omitted."""
        return {item.name: getattr(self, item.name) for item in fields(self) if getattr(self, item.name) is not None}


def _check_sam2(model: str) -> None:
    """Refuse SAM 2 region masks without transformers, or with a model path (not a Hub name, owner/name) that
    names no folder."""
    if importlib.util.find_spec("transformers") is None:
        raise WildsegError(f"{setting('regions')} sam2 needs transformers: pip install 'wildseg[sam2]'")
    looks_like_path = model.startswith((".", "/", "~")) or model.count("/") > 1 or "\\" in model
    if looks_like_path and not Path(model).expanduser().is_dir():
        raise WildsegError(f"{setting('sam2_model')} {model}: no such folder; give a Hugging Face Hub name such as "
                           f"{DEFAULT_SAM2_MODEL} or a folder saved by transformers")


def _choice(name: str, value, choices) -> None:
    if value not in choices:
        raise WildsegError(f"unknown {setting(name)} {value!r}: use one of {', '.join(choices)}")


def _at_least(name: str, value, least: int, unit: str = "") -> None:
    if value is not None and value < least:
        raise WildsegError(f"{setting(name)} must be at least {least}{' ' + unit if unit else ''}, got {value}")
