"""`Segmenter`: the one object users call. Image + label names -> mask, scores (Zabari & Hoshen, 2112.03185).

Pipeline: Chefer et al. relevance of each label in every test-time view (`relevance`, `tta`), views merged
back into image coordinates, normalised into per-pixel label scores with a background class
(`pseudolabels`), refined by a dense CRF (`refine`).
"""

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional, Union

import numpy as np
import torch

from . import __version__
from .backbone import DEFAULT_TEMPLATES, TEMPLATE_SETS, Backbone, load_backbone
from .errors import WildsegError
from .images import ImageInput, load_image
from .labels import BACKGROUND, clean_labels
from .pseudolabels import (
    DEFAULT_BG_THRESHOLD,
    DEFAULT_TEMPERATURE,
    check_settings,
    label_scores,
    scores_to_probabilities,
)
from .refine import REFINEMENTS, CrfSettings, dense_crf
from .relevance import DEFAULT_START_BLOCK, check_vision_tower, relevance_maps, resolve_start_block
from .tta import POLICIES, merge_views, plan_views

MAX_LABELS = 255


@dataclass
class SegmentationResult:
    """A segmentation of one image.

    `mask` (H x W) holds class indices: 0 is background, i the i-th label given. `scores` (classes x H x W)
    are per-pixel class probabilities (after refinement) in the same order, `labels[i]` names class i.
    """

    mask: np.ndarray
    scores: np.ndarray
    labels: list[str]
    image: np.ndarray = field(repr=False)
    timings: dict[str, float] = field(default_factory=dict)

    def summary(self) -> list[dict]:
        """Per class: name, fraction of the image's pixels and mean probability over those pixels."""
        counts = np.bincount(self.mask.ravel(), minlength=len(self.labels))
        rows = []
        for index, name in enumerate(self.labels):
            selected = self.mask == index
            mean_score = float(self.scores[index][selected].mean()) if counts[index] else 0.0
            rows.append({"label": name, "pixel_fraction": counts[index] / self.mask.size, "mean_score": mean_score})
        return rows


class Segmenter:
    """Training-free semantic segmentation with CLIP for given label names.

    >>> segmenter = Segmenter(checkpoint="ViT-B-16.pt", device="cpu")
    >>> result = segmenter.segment("photo.jpg", ["cat", "sofa"])
    >>> result.mask.shape, result.labels
    """

    def __init__(
        self,
        model: str = "ViT-B-16",
        pretrained: Optional[str] = "openai",
        checkpoint: Optional[Union[str, Path]] = None,
        device: str = "auto",
        cache_dir: Optional[Union[str, Path]] = None,
        tta: str = "default",
        refine: str = "crf",
        crf: CrfSettings = CrfSettings(),
        bg_threshold: float = DEFAULT_BG_THRESHOLD,
        temperature: float = DEFAULT_TEMPERATURE,
        start_block: int = DEFAULT_START_BLOCK,
        templates: str = DEFAULT_TEMPLATES,
        view_batch: int = 8,
    ):
        _check_choice("TTA policy", tta, POLICIES)
        _check_choice("refinement", refine, REFINEMENTS)
        _check_choice("template set", templates, TEMPLATE_SETS)
        if crf.iterations < 1:
            raise WildsegError(f"--crf-iters must be at least 1, got {crf.iterations}")
        if view_batch < 1:
            raise WildsegError(f"the view batch size must be at least 1, got {view_batch}")
        check_settings(bg_threshold, temperature)
        self.backbone: Backbone = load_backbone(model, pretrained, checkpoint, device, cache_dir)
        check_vision_tower(self.backbone.model.visual, model)
        resolve_start_block(start_block, len(self.backbone.model.visual.transformer.resblocks))
        self.tta, self.refine, self.crf = tta, refine, crf
        self.bg_threshold, self.temperature = bg_threshold, temperature
        self.start_block, self.templates, self.view_batch = start_block, templates, view_batch

    def settings(self) -> dict:
        """Everything that determines the output, for records and reports."""
        backbone = self.backbone
        return {
            "wildseg_version": __version__,
            "model": backbone.model_name,
            "weights": backbone.weights,
            "device": backbone.device.type,
            "precision": "fp16" if backbone.half_precision else "fp32",
            "image_size": backbone.image_size,
            "templates": self.templates,
            "start_block": self.start_block,
            "tta": self.tta,
            "bg_threshold": self.bg_threshold,
            "temperature": self.temperature,
            "refine": self.refine,
            "crf": vars(self.crf) if self.refine == "crf" else None,
        }

    def segment(
        self,
        image: ImageInput,
        labels: Union[str, Iterable[str]],
        on_progress: Callable[[int, int], None] = lambda done, total: None,
    ) -> SegmentationResult:
        """Segment `image` (path, PIL image or array) into background and `labels` (list or comma-separated).

        `on_progress(done, total)` is called as test-time views are processed.
        """
        timings = {}
        clock = time.perf_counter()
        names = clean_labels(labels)
        if len(names) > MAX_LABELS:
            raise WildsegError(f"{len(names)} labels given, at most {MAX_LABELS} fit in one mask: split the label list")
        rgb = load_image(image)
        timings["decode_s"] = time.perf_counter() - clock

        clock = time.perf_counter()
        text = self.backbone.embed_labels(names, self.templates)
        timings["text_s"] = time.perf_counter() - clock

        clock = time.perf_counter()
        relevance = self._merged_relevance(rgb, text, on_progress)
        timings["relevance_s"] = time.perf_counter() - clock

        clock = time.perf_counter()
        probabilities = scores_to_probabilities(label_scores(relevance, self.bg_threshold), self.temperature).numpy()
        if self.refine == "crf":
            probabilities = dense_crf(rgb, probabilities, self.crf)
        mask = probabilities.argmax(axis=0).astype(np.uint8)
        timings["refine_s"] = time.perf_counter() - clock
        return SegmentationResult(mask, probabilities, [BACKGROUND, *names], rgb, timings)

    def _merged_relevance(
        self, rgb: np.ndarray, text: torch.Tensor, on_progress: Callable[[int, int], None]
    ) -> torch.Tensor:
        """Relevance maps of all labels averaged over the test-time views, at image resolution, on the CPU."""
        backbone = self.backbone
        height, width = rgb.shape[:2]
        views = plan_views(height, width, self.tta)
        pixels = torch.from_numpy(rgb).to(backbone.device).permute(2, 0, 1).float() / 255.0
        mean = torch.tensor(backbone.mean, device=backbone.device)[:, None, None]
        std = torch.tensor(backbone.std, device=backbone.device)[:, None, None]
        normalized = (pixels - mean) / std

        def map_views(batch: torch.Tensor) -> torch.Tensor:
            with backbone.autocast():
                return relevance_maps(backbone.model, batch, text.to(backbone.device), self.start_block)

        on_progress(0, len(views))
        merged = merge_views(
            normalized,
            views,
            backbone.image_size,
            map_views,
            batch_size=self.view_batch,
            on_batch=lambda done: on_progress(done, len(views)),
        )
        return merged.cpu()


def _check_choice(what: str, value: str, choices: Iterable[str]) -> None:
    if value not in choices:
        raise WildsegError(f"unknown {what} {value!r}: use one of {', '.join(choices)}")
