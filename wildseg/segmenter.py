"""`Segmenter`: the one object users call. Image + label names -> mask, scores (Zabari & Hoshen, 2112.03185).

Pipeline: a map of each label in every test-time view, by one of two methods: Chefer et al. relevance
(`relevance`, the paper's method) or patch-text cosines with a changed last block (`dense`) over sliding
windows; views merged back into image coordinates (`tta`), turned into per-pixel label scores with a
background class (`pseudolabels`), refined by PAMR on the model's device and/or a dense CRF (`pamr`,
`refine`).
"""

import contextlib
import itertools
import multiprocessing
import os
import signal
import time
from collections import deque
from concurrent.futures import (
    FIRST_COMPLETED,
    Future,
    ProcessPoolExecutor,
    ThreadPoolExecutor,
    wait,
)
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F

from . import __version__
from .backbone import DEFAULT_TEMPLATES, Backbone, ProgressCallback, load_backbone, resolve_templates
from .choices import (
    CRF_BACKENDS,
    DEFAULT_BG_THRESHOLD,
    DEFAULT_DENSE_BG_THRESHOLD,
    METHODS,
    MIN_WORKING_SIDE,
    REFINEMENTS,
)
from .dense import DenseSettings, check_attention, dense_label_maps, resize_for_model
from .errors import WildsegError, first_line
from .images import ImageInput, load_image
from .labels import BACKGROUND, clean_labels
from .pamr import PamrSettings, pamr
from .pseudolabels import (
    DEFAULT_TEMPERATURE,
    check_settings,
    dense_scores,
    label_scores,
    scores_to_probabilities,
)
from .refine import CrfSettings, dense_crf, mean_field_crf
from .relevance import (
    DEFAULT_START_BLOCK,
    check_vision_tower,
    relevance_maps,
    resolve_start_block,
)
from .resolution import DEFAULT_MAX_SIDE, downscale, upsample_argmax, working_size
from .timing import NoStageTimes
from .tta import POLICIES, View, ViewStream, merge_views, plan_views, plan_windows

DEFAULT_VIEW_BATCH = {"cuda": 32, "cpu": 8}
"""Views per model batch: large on a GPU for throughput (halved automatically when memory runs out)."""
CRF_BATCH_VALUES = 2**25
"""Pixels x classes of the images the torch CRF refines in one call (16 VOC-sized images with 22 classes,
about 1 GB: it holds about 8 float32 buffers of that size)."""
DEFAULT_BG_THRESHOLDS = {"relevance": DEFAULT_BG_THRESHOLD, "dense": DEFAULT_DENSE_BG_THRESHOLD}


@dataclass
class SegmentationResult:
    """A segmentation of one image.

    `mask` (H x W, the image as displayed) holds class indices: 0 is background, i the i-th label given.
    `scores` (classes x h x w) are per-pixel class probabilities (after refinement) in the same order at the
    working resolution (the image's size unless its long side exceeds `max_side`); `labels[i]` names class i.
    """

    mask: np.ndarray
    scores: np.ndarray
    labels: list[str]
    image: np.ndarray = field(repr=False)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def working_mask(self) -> np.ndarray:
        """The mask at the working resolution of `scores` (the mask itself unless the image is large)."""
        if self.mask.shape == self.scores.shape[1:]:
            return self.mask
        return self.scores.argmax(axis=0).astype(np.uint8)

    def preview(self) -> tuple[np.ndarray, np.ndarray]:
        """The image and its mask at the working resolution (the full ones unless the image is large)."""
        return downscale(self.image, self.scores.shape[1:]), self.working_mask

    def summary(self) -> list[dict]:
        """Per class: name, fraction of the image's pixels and mean probability over those pixels (the latter
        at working resolution)."""
        counts = np.bincount(self.mask.ravel(), minlength=len(self.labels))
        working_mask = self.working_mask
        rows = []
        for index, name in enumerate(self.labels):
            selected = working_mask == index
            mean_score = float(self.scores[index][selected].mean()) if selected.any() else 0.0
            rows.append({"label": name, "pixel_fraction": counts[index] / self.mask.size, "mean_score": mean_score})
        return rows


@dataclass
class Decoded:
    """An image as displayed (`rgb`), at working resolution (`working`), and as the model's views are cut from
    it (`source`: the working image for the relevance method, the image resized for the dense method)."""

    rgb: np.ndarray
    working: np.ndarray
    source: np.ndarray


@dataclass
class BatchItem:
    """The outcome for one image of `Segmenter.segment_many` (a SegmentationResult) or `query_probabilities_many`
    (its probabilities), or the one-line reason it failed."""

    source: Any
    result: Optional[Union[SegmentationResult, np.ndarray]] = None
    error: Optional[str] = None


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
        activation: str = "auto",
        text_cache=None,
        method: str = "relevance",
        dense: Optional[DenseSettings] = None,
        tta: str = "default",
        refine: str = "crf",
        crf: CrfSettings = CrfSettings(),
        crf_backend: str = "auto",
        pamr_settings: PamrSettings = PamrSettings(),
        bg_threshold: Optional[float] = None,
        temperature: float = DEFAULT_TEMPERATURE,
        start_block: int = DEFAULT_START_BLOCK,
        templates: Union[str, Path] = DEFAULT_TEMPLATES,
        view_batch: Optional[int] = None,
        max_side: int = DEFAULT_MAX_SIDE,
        backbone: Optional[Backbone] = None,
    ):
        """`dense` defaults to DenseSettings(); `bg_threshold` to the method's (0.4 for relevance, 0.1 for dense);
        `view_batch` to 32 views per model batch on CUDA, 8 on the CPU; `crf_backend` (`CRF_BACKENDS`) to torch
        on a GPU, pydensecrf on the CPU; `activation` (`backbone.ACTIVATIONS`) to the one the weights were trained
        with; `text_cache` (`text_cache.TextCacheSetting`) to the user's cache folder for label embeddings;
        `templates` is a built-in set's name or a file of templates (`backbone.resolve_templates`). A loaded
        `backbone` (another Segmenter's) is used as it is, with its label embeddings, instead of loading the model
        the first seven arguments name."""
        _check_choice("method", method, METHODS)
        _check_choice("TTA policy", tta, POLICIES)
        _check_choice("refinement", refine, REFINEMENTS)
        template_set = resolve_templates(templates)
        _check_choice("CRF backend", crf_backend, CRF_BACKENDS)
        dense = dense if dense is not None else DenseSettings()
        _check_dense(dense)
        if crf.iterations < 1:
            raise WildsegError(f"--crf-iters must be at least 1, got {crf.iterations}")
        if pamr_settings.iterations < 1:
            raise WildsegError(f"--pamr-iters must be at least 1, got {pamr_settings.iterations}")
        bg_threshold = DEFAULT_BG_THRESHOLDS[method] if bg_threshold is None else bg_threshold
        if max_side < MIN_WORKING_SIDE:
            raise WildsegError(f"--max-side must be at least {MIN_WORKING_SIDE} pixels, got {max_side}")
        if view_batch is not None and view_batch < 1:
            raise WildsegError(f"the view batch size must be at least 1, got {view_batch}")
        check_settings(bg_threshold, temperature)
        self.backbone: Backbone = backbone or load_backbone(model, pretrained, checkpoint, device, cache_dir,
                                                            activation, text_cache)
        model = self.backbone.model_name
        check_vision_tower(self.backbone.model.visual, model)
        patch = self.backbone.model.visual.patch_size[0]
        if method == "dense" and dense.window % patch:
            raise WildsegError(f"--window {dense.window} is not a multiple of {model}'s {patch}-pixel patches")
        resolve_start_block(start_block, len(self.backbone.model.visual.transformer.resblocks))
        self.method, self.dense, self.pamr_settings = method, dense, pamr_settings
        self.tta, self.refine, self.crf = tta, refine, crf
        if crf_backend == "auto":
            crf_backend = "torch" if self.backbone.device.type == "cuda" else "pydensecrf"
        self.crf_backend = crf_backend
        self.bg_threshold, self.temperature = bg_threshold, temperature
        self.start_block, self.templates = start_block, template_set
        self.view_batch = view_batch or DEFAULT_VIEW_BATCH[self.backbone.device.type]
        self.max_side = max_side
        self.stages = NoStageTimes()
        """Attach a `timing.StageTimes` to time the stages (benchmarks/bench.py does)."""

    def settings(self) -> dict:
        """Everything that determines the output, for records and reports."""
        backbone = self.backbone
        return {
            "wildseg_version": __version__,
            "model": backbone.model_name,
            "weights": backbone.weights,
            "activation": backbone.activation,
            "activation_source": backbone.activation_source,
            "device": backbone.device.type,
            "precision": "fp16" if backbone.half_precision else "fp32",
            "image_size": backbone.image_size,
            "templates": self.templates.identity,
            "method": self.method,
            "start_block": self.start_block if self.method == "relevance" else None,
            "dense": {**vars(self.dense), "stride": self.dense.window_stride} if self.method == "dense" else None,
            "tta": self.tta,
            "max_side": self.max_side,
            "bg_threshold": self.bg_threshold,
            "temperature": self.temperature,
            "refine": self.refine,
            "pamr": vars(self.pamr_settings) if "pamr" in self.refine else None,
            "crf": {**vars(self.crf), "backend": self.crf_backend} if "crf" in self.refine else None,
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
        names = _checked_labels(labels)
        decoded, timings["decode_s"] = _timed(self._decode, image)
        text, timings["text_s"] = _timed(self._embed_query, names)
        maps = self._merged_maps(decoded.source, text, timings, on_progress)
        return self._finish(maps, names, decoded, timings)

    def label_scores(self, image: ImageInput, labels: Union[str, Iterable[str]]) -> np.ndarray:
        """Scores ((1 + labels) x h x w, background first, at working resolution) by the method's rule
        (`pseudolabels`): what `segment` turns into probabilities and refines. Their argmax is an unrefined mask."""
        names = _checked_labels(labels)
        decoded = self._decode(image)
        maps = self._merged_maps(decoded.source, self._embed_query(names), {})
        if self.method == "dense":
            maps = _resized(maps, decoded.working.shape[:2])
        return self._scores(maps, len(names)).cpu().numpy()

    def query_probabilities(self, image: ImageInput, queries: list[str]) -> np.ndarray:
        """Dense method: per pixel at working resolution, softmax(logit scale x cosine) over `queries` (any words,
        `background` included, in the order given), after PAMR where `refine` asks for it: what the official
        dense segmenters (NACLIP, SCLIP, ClearCLIP) turn into class scores, a class's the max over its queries.
        The CRF, which refines class probabilities, has no place here and is not applied."""
        if self.method != "dense":
            raise WildsegError("query probabilities are the dense method's: build the Segmenter with method='dense'")
        decoded = self._decode(image)
        maps = self._merged_maps(decoded.source, self.backbone.embed_labels(queries, self.templates), {})
        return self._query_probabilities(maps, decoded)

    def _query_probabilities(self, maps: torch.Tensor, decoded: Decoded) -> np.ndarray:
        """softmax(logit scale x cosine) over the queries at working resolution, after PAMR where asked."""
        cosines, _ = self._dense_maps_at_working(maps, decoded)
        return torch.softmax(self.dense.logit_scale * cosines, dim=0).cpu().numpy()

    def _decode(self, image: ImageInput) -> Decoded:
        """The image as displayed (RGB uint8), at working resolution, and as the model's views are cut from it."""
        rgb, working = _decode(image, self.max_side)
        return Decoded(rgb, working, resize_for_model(rgb, self.dense) if self.method == "dense" else working)

    def _merged_maps(self, source: np.ndarray, text: torch.Tensor, timings: dict[str, float],
                     on_progress: Callable[[int, int], None] = lambda done, total: None) -> torch.Tensor:
        """Maps for the `text` embeddings (labels x h x w) merged over all views of the image they are cut from."""
        clock = time.perf_counter()
        views = self._plan(source)
        on_progress(0, len(views))
        maps = merge_views(self._normalized(source), views, self._map_views(text), self.view_batch,
                           on_batch=lambda done: on_progress(done, len(views)), stages=self.stages)
        timings["maps_s"] = time.perf_counter() - clock
        return maps

    def segment_reference(self, image: ImageInput, labels: Union[str, Iterable[str]]) -> SegmentationResult:
        """The straightforward pipeline, which the fast one (`segment`, `segment_many`) is tested and benchmarked
        against: label embeddings computed afresh, one view at a time, one forward (and for the relevance
        method one backward) per label and view, fp32 on every device, the CRF by pydensecrf in this process."""
        timings = {}
        names = _checked_labels(labels)
        decoded, timings["decode_s"] = _timed(self._decode, image)
        text, timings["text_s"] = _timed(partial(self._embed_query, cached=False), names)
        clock = time.perf_counter()
        per_label = [self._map_views(text[row : row + 1], half_precision=False) for row in range(len(text))]
        maps = merge_views(self._normalized(decoded.source), self._plan(decoded.source),
                           lambda view: torch.cat([map_label(view) for map_label in per_label], dim=1),
                           batch_size=1, stages=self.stages)
        timings["maps_s"] = time.perf_counter() - clock
        probabilities, timings["pamr_s"] = self._probabilities(maps, decoded, len(names))
        crf = self.crf if "crf" in self.refine else None
        mask, probabilities, timings["crf_s"] = finish_segmentation(decoded.working, probabilities, crf,
                                                                    decoded.rgb.shape[:2])
        return SegmentationResult(mask, probabilities, [BACKGROUND, *names], decoded.rgb, self._ran(timings))

    def segment_many(
        self,
        images: Iterable[Any],
        labels: Union[str, Iterable[str], Callable[[Any], Union[str, Iterable[str]]]],
        decode_workers: int = 2,
        refine_workers: Optional[int] = None,
        read: Optional[Callable[[Any], ImageInput]] = None,
    ) -> Iterator[BatchItem]:
        """Segment many images, yielding a BatchItem for each as it finishes (not necessarily in order).

        `labels` is one label list for every image, or a function from an image to its labels. Images are
        decoded by `decode_workers` threads ahead of the model; views of successive images with the same
        labels share model batches. The torch CRF (`crf_backend`, the default on a GPU) runs in this process on
        the model's device, over the images each model step finishes; pydensecrf's CRF runs in
        `refine_workers` processes while the model goes on (default: half the CPU cores when the model is on a
        GPU; 0, in this process, when the model already keeps the CPU busy). A failure (unreadable image,
        missing labels, out of GPU memory with one view per batch) is yielded as that item's `error`; the others
        go on. With `read`, the images are any keys and `read(key)` (in a decode thread) gives each one's pixels;
        `labels(key)` is asked once they are read.
        """
        labels_of = labels if callable(labels) else (lambda source: labels)
        if refine_workers is None:
            refine_workers = max(1, (os.cpu_count() or 2) // 2) if self.backbone.device.type == "cuda" else 0
        run = _BatchRun(self, labels_of, decode_workers, refine_workers if self._cpu_crf is not None else 0, read)
        try:
            yield from run.items(iter(images))
        finally:
            run.close()

    def query_probabilities_many(
        self,
        images: Iterable[Any],
        queries: Callable[[Any], list[str]],
        decode_workers: int = 2,
        read: Optional[Callable[[Any], ImageInput]] = None,
    ) -> Iterator[BatchItem]:
        """`query_probabilities` of many images through `segment_many`'s machinery (decoding ahead, views of
        successive images with the same queries in shared model batches): a BatchItem per image whose `result`
        is its probabilities array, as each finishes; `queries(image)` its queries, `read` as in segment_many."""
        if self.method != "dense":
            raise WildsegError("query probabilities are the dense method's: build the Segmenter with method='dense'")
        run = _QueryRun(self, queries, decode_workers, 0, read)
        try:
            yield from run.items(iter(images))
        finally:
            run.close()

    def _normalized(self, rgb: np.ndarray) -> torch.Tensor:
        """The image as a normalised float tensor (3 x H x W) on the model's device."""
        backbone = self.backbone
        pixels = torch.from_numpy(rgb).to(backbone.device).permute(2, 0, 1).float() / 255.0
        mean = torch.tensor(backbone.mean, device=backbone.device)[:, None, None]
        std = torch.tensor(backbone.std, device=backbone.device)[:, None, None]
        return (pixels - mean) / std

    @property
    def _cpu_crf(self) -> Optional[CrfSettings]:
        """The CRF settings where the CRF runs in pydensecrf once the probabilities have left the device."""
        return self.crf if "crf" in self.refine and self.crf_backend == "pydensecrf" else None

    def _plan(self, source: np.ndarray) -> list[View]:
        """The views of the image they are cut from: TTA views of the working image at the model's input size,
        or for the dense method the windows of the resized image."""
        height, width = source.shape[:2]
        if self.method == "relevance":
            return plan_views(height, width, self.backbone.image_size, self.tta)
        return plan_windows(height, width, self.dense.window, self.dense.window_stride, self.tta)

    def prepare_labels(self, labels: Iterable[str], on_progress: Optional[ProgressCallback] = None) -> None:
        """Embed labels (and the dense method's background words) ahead of segmenting, reporting
        `on_progress(done, total)`; `segment` and `segment_many` then find them cached."""
        self._embed_query(list(dict.fromkeys(labels)), on_progress=on_progress)

    def _embed_query(self, names: list[str], cached: bool = True, on_progress: Optional[ProgressCallback] = None
                     ) -> torch.Tensor:
        """Text embeddings of the labels, then (dense method) of the background words that are not labels."""
        taken = {name.casefold() for name in names}
        words = [word for word in self.dense.background_words if word.casefold() not in taken]
        queries = names if self.method == "relevance" else [*names, *words]
        return self.backbone.embed_labels(queries, self.templates, cached, on_progress)

    def _map_views(self, text: torch.Tensor, half_precision: bool = True) -> Callable[[torch.Tensor], torch.Tensor]:
        """Maps (views x labels x g x g) of a batch of rendered views for the labels' `text`; in fp16 on CUDA
        unless `half_precision` is False."""
        backbone = self.backbone
        variant = check_attention(self.dense.attention)

        def map_views(batch: torch.Tensor) -> torch.Tensor:
            with backbone.autocast() if half_precision else contextlib.nullcontext():
                if self.method == "dense":
                    with self.stages.stage("forward"):
                        return dense_label_maps(backbone.model.visual, batch, text.to(backbone.device), variant)
                return relevance_maps(backbone.model, batch, text.to(backbone.device), self.start_block, self.stages)

        return map_views

    def _scores(self, maps: torch.Tensor, labels: int) -> torch.Tensor:
        """Per-pixel scores (background first) from merged maps by the method's rule."""
        if self.method == "dense":
            return dense_scores(maps, labels, self.dense.logit_scale, self.bg_threshold)
        return label_scores(maps, self.bg_threshold)

    def _probabilities(self, maps: torch.Tensor, decoded: Decoded, labels: int) -> tuple[torch.Tensor, float]:
        """Per-pixel class probabilities (background first) at working resolution from merged maps, on the model's
        device, PAMR-refined if asked: the dense method's cosines before its scores, as NACLIP refines them, the
        relevance method's probabilities; with PAMR's seconds."""
        pamr_s = 0.0
        if self.method == "dense":
            maps, pamr_s = self._dense_maps_at_working(maps, decoded)
        with self.stages.stage("pseudo_labels"):
            probabilities = scores_to_probabilities(self._scores(maps, labels), self.temperature)
        if self.method == "relevance" and "pamr" in self.refine:
            pixels = torch.from_numpy(decoded.working).to(probabilities.device).permute(2, 0, 1).float()
            probabilities, pamr_s = self._pamr(pixels, probabilities)
        return probabilities, pamr_s

    def _dense_maps_at_working(self, maps: torch.Tensor, decoded: Decoded) -> tuple[torch.Tensor, float]:
        """The dense method's merged cosines (at the resized image's size) bilinearly resized to working resolution
        and, with PAMR, refined there with the normalised resized image resized likewise as the guide, as NACLIP
        does; with PAMR's seconds."""
        size = decoded.working.shape[:2]
        maps = _resized(maps, size)
        if "pamr" not in self.refine:
            return maps, 0.0
        return self._pamr(_resized(self._normalized(decoded.source), size), maps)

    def _pamr(self, guide: torch.Tensor, maps: torch.Tensor) -> tuple[torch.Tensor, float]:
        """PAMR of `maps` on `guide`, timed (synchronised on CUDA)."""
        clock = time.perf_counter()
        with self.stages.stage("refine"):
            maps = pamr(guide, maps, self.pamr_settings)
        if maps.device.type == "cuda":
            torch.cuda.synchronize(maps.device)
        return maps, time.perf_counter() - clock

    def _ran(self, timings: dict[str, float]) -> dict[str, float]:
        """The stage seconds of a result without those of refinements that `refine` does not run."""
        skipped = [f"{refinement}_s" for refinement in ("pamr", "crf") if refinement not in self.refine]
        return {stage: seconds for stage, seconds in timings.items() if stage not in skipped}

    def _device_crf(self, workings: list[np.ndarray], probabilities: list[torch.Tensor]
                    ) -> tuple[list[torch.Tensor], float]:
        """The torch CRF on the model's device where that backend is chosen (else the probabilities unchanged),
        images batched up to `CRF_BATCH_VALUES` pixels x classes per call; with its seconds per image."""
        if "crf" not in self.refine or self.crf_backend != "torch":
            return probabilities, 0.0
        clock = time.perf_counter()
        device = probabilities[0].device
        refined, batch, values = [], [], 0
        for index, image_probabilities in enumerate(probabilities):
            if batch and values + image_probabilities.numel() > CRF_BATCH_VALUES:
                refined += self._crf_batch([workings[i] for i in batch], [probabilities[i] for i in batch])
                batch, values = [], 0
            batch.append(index)
            values += image_probabilities.numel()
        refined += self._crf_batch([workings[i] for i in batch], [probabilities[i] for i in batch])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return refined, (time.perf_counter() - clock) / len(workings)

    def _crf_batch(self, workings: list[np.ndarray], probabilities: list[torch.Tensor]) -> list[torch.Tensor]:
        """The torch CRF on a batch, halved while the device runs out of memory; an image that does not fit alone
        is refined by pydensecrf on the CPU instead (the same marginals, see tests/test_lattice.py)."""
        device = probabilities[0].device
        try:
            return mean_field_crf([torch.from_numpy(working).to(device) for working in workings], probabilities,
                                  self.crf)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
        if len(workings) == 1:
            return [torch.from_numpy(dense_crf(workings[0], _as_array(probabilities[0]), self.crf)).to(device)]
        half = len(workings) // 2
        return (self._crf_batch(workings[:half], probabilities[:half])
                + self._crf_batch(workings[half:], probabilities[half:]))

    def _finish(self, maps: torch.Tensor, names: list[str], decoded: Decoded, timings: dict[str, float]
                ) -> SegmentationResult:
        """Probabilities, refinement and the full-size mask of one image from its merged maps."""
        probabilities, timings["pamr_s"] = self._probabilities(maps, decoded, len(names))
        (probabilities,), device_crf_s = self._device_crf([decoded.working], [probabilities])
        mask, probabilities, crf_s = finish_segmentation(decoded.working, probabilities, self._cpu_crf,
                                                         decoded.rgb.shape[:2])
        timings["crf_s"] = device_crf_s + crf_s
        return SegmentationResult(mask, probabilities, [BACKGROUND, *names], decoded.rgb, self._ran(timings))


def finish_segmentation(
    working: np.ndarray,
    probabilities: Union[np.ndarray, torch.Tensor],
    crf: Optional[CrfSettings],
    full_size: tuple[int, int],
) -> tuple[np.ndarray, np.ndarray, float]:
    """Refine probabilities (an array, or a tensor on any device) by pydensecrf's dense CRF (unless `crf` is
    None) at working resolution; return the full-size mask (made where the probabilities are), the
    probabilities as an array and the seconds taken."""
    clock = time.perf_counter()
    if crf is not None:
        probabilities = dense_crf(working, _as_array(probabilities), crf)
    mask = upsample_argmax(probabilities, *full_size)
    return mask, _as_array(probabilities), time.perf_counter() - clock


def _resized(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Maps (channels x h x w) bilinearly resized to `size` (align_corners=False, as the official code does)."""
    return F.interpolate(maps[None], size=size, mode="bilinear", align_corners=False)[0]


def _as_array(probabilities: Union[np.ndarray, torch.Tensor]) -> np.ndarray:
    return probabilities.float().cpu().numpy() if isinstance(probabilities, torch.Tensor) else probabilities


def _checked_labels(labels: Optional[Union[str, Iterable[str]]]) -> list[str]:
    if labels is None:
        raise WildsegError("no labels given for this image")
    return clean_labels(labels)


def _decode(image: ImageInput, max_side: int) -> tuple[np.ndarray, np.ndarray]:
    """The image as displayed (RGB uint8) and its copy at working resolution."""
    rgb = load_image(image)
    return rgb, downscale(rgb, working_size(*rgb.shape[:2], max_side))


def _start_refine_worker() -> None:
    """A refinement worker uses one thread and leaves Ctrl-C to the main process, which stops it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)


@dataclass
class _Pending:
    """An image between decoding and its finished result."""

    source: ImageInput
    names: list[str]
    decoded: Decoded
    timings: dict[str, float]


class _BatchRun:
    """The machinery of one `segment_many` call: decode threads, a view stream per label list, CRF processes."""

    def __init__(self, segmenter: "Segmenter", labels_of, decode_workers: int, refine_workers: int,
                 read: Optional[Callable[[Any], ImageInput]] = None):
        self.segmenter, self.labels_of = segmenter, labels_of
        self.decode = segmenter._decode if read is None else (lambda key: segmenter._decode(read(key)))
        self.decoder = ThreadPoolExecutor(max(1, decode_workers), thread_name_prefix="wildseg-decode")
        self.prefetch = 2 * max(1, decode_workers)
        self.refiner = (
            ProcessPoolExecutor(refine_workers, mp_context=multiprocessing.get_context("spawn"),
                                initializer=_start_refine_worker)
            if refine_workers > 0 else None
        )
        self.max_refining = 2 * max(1, refine_workers)
        self.stream, self.stream_names, self.pending, self.keys = None, None, {}, itertools.count()
        self.refining: dict[Future, _Pending] = {}

    def items(self, sources: Iterator[ImageInput]) -> Iterator[BatchItem]:
        decoding: deque = deque()
        self._top_up(decoding, sources)
        while decoding:
            source, decoded = decoding.popleft()
            self._top_up(decoding, sources)
            try:
                image, decode_s = decoded.result()
                names = self._names(source)
            except Exception as error:  # one image's labels or pixels (any library's error) never stop the batch
                yield BatchItem(source, error=first_line(error))
                continue
            timings = {"decode_s": decode_s}
            if names != self.stream_names:
                yield from self._drain_stream()
                timings["text_s"] = self._open_stream(names)
            key = next(self.keys)
            self.pending[key] = _Pending(source, names, image, timings)
            yield from self._map(partial(self.stream.add, key, self.segmenter._normalized(image.source),
                                         self.segmenter._plan(image.source)))
            yield from self._collect(block=len(self.refining) >= self.max_refining)
        yield from self._drain_stream()
        while self.refining:
            yield from self._collect(block=True)

    def close(self) -> None:
        self.decoder.shutdown(wait=True, cancel_futures=True)
        if self.refiner is not None:
            self.refiner.shutdown(wait=True, cancel_futures=True)

    def _top_up(self, decoding: deque, sources: Iterator[ImageInput]) -> None:
        while len(decoding) < self.prefetch:
            source = next(sources, _END)
            if source is _END:
                return
            decoding.append((source, self.decoder.submit(_timed, self.decode, source)))

    def _open_stream(self, names: list[str]) -> float:
        """A view stream for the label list `names`; the seconds its label embeddings took (the first image of the
        stream records them)."""
        segmenter = self.segmenter
        text, seconds = _timed(self._embed, names)
        self.stream = ViewStream(segmenter._map_views(text), segmenter.view_batch,
                                 stages=segmenter.stages)
        self.stream_names = names
        return seconds

    def _names(self, source) -> list[str]:
        """The checked labels of an image."""
        return _checked_labels(self.labels_of(source))

    def _embed(self, names: list[str]) -> torch.Tensor:
        """The text embeddings a stream for the labels `names` maps views with."""
        return self.segmenter._embed_query(names)

    def _drain_stream(self) -> Iterator[BatchItem]:
        if self.stream is not None:
            yield from self._map(self.stream.flush)

    def _map(self, step) -> Iterator[BatchItem]:
        """Run a view-stream step; hand finished images to refinement. Out of memory fails the stream's images."""
        try:
            finished = step()
        except torch.cuda.OutOfMemoryError:
            failed, self.pending, self.stream, self.stream_names = list(self.pending.values()), {}, None, None
            for lost in failed:
                yield BatchItem(lost.source, error="out of GPU memory even with one view per batch: lower max_side")
            return
        items = [self.pending.pop(key) for key, _ in finished]
        for item, (key, _) in zip(items, finished):
            item.timings["maps_s"] = self.stream.seconds.pop(key)
        if items:
            yield from self._refine(items, [maps for _, maps in finished])

    def _refine(self, items: list[_Pending], maps: list[torch.Tensor]) -> Iterator[BatchItem]:
        """Probabilities and refinement of the images a model step finished: PAMR per image and the torch CRF
        over all of them on the device, or pydensecrf in the worker processes. Yields the images that ran out of
        GPU memory on the way as failed."""
        segmenter = self.segmenter
        kept, probabilities = [], []
        for item, item_maps in zip(items, maps):
            try:
                item_probabilities, item.timings["pamr_s"] = segmenter._probabilities(item_maps, item.decoded,
                                                                                       len(item.names))
            except torch.cuda.OutOfMemoryError:
                yield BatchItem(item.source, error="out of GPU memory making its probabilities: lower max_side")
                continue
            kept.append(item)
            probabilities.append(item_probabilities)
        if not kept:
            return
        probabilities, device_crf_s = segmenter._device_crf([item.decoded.working for item in kept], probabilities)
        for item, item_probabilities in zip(kept, probabilities):
            item.timings["crf_s"] = device_crf_s
            future = Future()
            try:
                if self.refiner is None:
                    future.set_result(finish_segmentation(item.decoded.working, item_probabilities,
                                                          segmenter._cpu_crf, item.decoded.rgb.shape[:2]))
                else:
                    future = self.refiner.submit(finish_segmentation, item.decoded.working,
                                                 _as_array(item_probabilities), segmenter._cpu_crf,
                                                 item.decoded.rgb.shape[:2])
            except Exception as error:  # a CRF error, or a worker pool that died: the image fails in _collect
                future.set_exception(error)
            self.refining[future] = item

    def _collect(self, block: bool) -> Iterator[BatchItem]:
        if not self.refining:
            return
        done, _ = wait(self.refining, timeout=None if block else 0, return_when=FIRST_COMPLETED)
        for future in done:
            item = self.refining.pop(future)
            try:
                mask, probabilities, crf_s = future.result()
            except Exception as error:  # raised in this process or in a worker
                yield BatchItem(item.source, error=first_line(error))
                continue
            timings = self.segmenter._ran({**item.timings, "crf_s": item.timings["crf_s"] + crf_s})
            result = SegmentationResult(mask, probabilities, [BACKGROUND, *item.names], item.decoded.rgb, timings)
            yield BatchItem(item.source, result=result)


class _QueryRun(_BatchRun):
    """The machinery of `query_probabilities_many`: the queries embedded as given (no background words), and
    each image's query probabilities instead of refinement."""

    def _names(self, source) -> list[str]:
        return list(self.labels_of(source))

    def _embed(self, names: list[str]) -> torch.Tensor:
        return self.segmenter.backbone.embed_labels(names, self.segmenter.templates)

    def _refine(self, items: list[_Pending], maps: list[torch.Tensor]) -> Iterator[BatchItem]:
        for item, item_maps in zip(items, maps):
            try:
                probabilities = self.segmenter._query_probabilities(item_maps, item.decoded)
            except torch.cuda.OutOfMemoryError:
                yield BatchItem(item.source, error="out of GPU memory making its probabilities: lower max_side")
                continue
            yield BatchItem(item.source, result=probabilities)


_END = object()


def _timed(function, *arguments):
    """function(*arguments) and the seconds it took."""
    clock = time.perf_counter()
    return function(*arguments), time.perf_counter() - clock


def _check_dense(dense: DenseSettings) -> None:
    """Refuse dense settings that cannot work, naming the option to change."""
    check_attention(dense.attention)
    if 0 < dense.window < 16 or dense.window < 0:
        raise WildsegError(f"--window must be 0 (the whole image) or at least 16 pixels, got {dense.window}")
    if dense.window and not 0 < dense.window_stride <= dense.window:
        raise WildsegError(f"--stride must lie in 1..{dense.window} (the window), got {dense.window_stride}")
    if dense.short_side < 16:
        raise WildsegError(f"--short-side must be at least 16 pixels, got {dense.short_side}")
    if dense.logit_scale <= 0:
        raise WildsegError(f"--logit-scale must be positive, got {dense.logit_scale}")


def _check_choice(what: str, value: str, choices: Iterable[str]) -> None:
    if value not in choices:
        raise WildsegError(f"unknown {what} {value!r}: use one of {', '.join(choices)}")
