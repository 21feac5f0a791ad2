"""The per-image steps of segmentation (Zabari & Hoshen, arXiv 2112.03185), as a Segmenter and its batch streaming
(`streaming`) run them.

decode -> plan the views -> map the views with the method (merged back by `tta`) -> per-pixel scores with a
background class (`pseudolabels`) -> probabilities -> PAMR on the model's device (`refinement.pamr`) -> the dense
CRF, in torch on the device or by pydensecrf (`refinement.crf`) -> the full-size mask (`resolution`).

The method's family decides the views and the scores: relevance maps of TTA views of the working image at the
model's input size, min-max normalised; or (dense) cosine maps of windows of the image resized for the model,
softmax-scored with background words and PAMR-refined before scoring as NACLIP does.
"""

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F

from . import methods
from .backbone import Backbone, ProgressCallback
from .config import SegmenterConfig
from .errors import WildsegError
from .images import ImageInput, load_image
from .labels import BACKGROUND, clean_labels
from .methods.base import Method
from .pseudolabels import dense_scores, label_scores, scores_to_probabilities
from .refinement.crf import dense_crf, mean_field_crf
from .refinement.pamr import pamr
from .methods.corrclip import majority_labels
from .refinement.regions import RegionSource, image_regions, region_vote, resized_regions
from .refinement.settings import CrfSettings
from .resolution import downscale, resize_for_model, upsample_argmax, working_size
from .result import SegmentationResult
from .timing import NoStageTimes
from .tta import View, merge_views, plan_views, plan_windows

DEFAULT_VIEW_BATCH = {"cuda": 32, "cpu": 8}
"""Views per model batch: large on a GPU for throughput (halved automatically when memory runs out)."""
CRF_BATCH_VALUES = 2**25
"""Pixels x classes of the images the torch CRF refines in one call (16 VOC-sized images with 22 classes, about
1 GB: it holds about 8 float32 buffers of that size)."""


@dataclass
class Decoded:
    """An image as displayed (`rgb`), at working resolution (`working`), and as the model's views are cut from it
    (`source`: the working image for the relevance method, the image resized for the dense method), and with the
    region vote its regions at working resolution (`refinement.regions.image_regions`)."""

    rgb: np.ndarray
    working: np.ndarray
    source: np.ndarray
    regions: Optional[np.ndarray] = None


@dataclass(frozen=True)
class Normalization:
    """How pixels are normalised: (pixel / scale - mean) / std, with 8-bit pixels; `source` says whose constants
    these are ("model": the model's own, in 0-1 units with scale 255; "official": the dense method's official code's,
    in 0-255 units with scale 1, computed as mmseg does)."""

    source: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    scale: float

    def in_pixel_units(self) -> dict:
        """The constants in 0-255 units, with their source, for records and reports."""
        factor = self.scale
        return {"source": self.source, "mean": [value * factor for value in self.mean],
                "std": [value * factor for value in self.std]}


OFFICIAL_ROUNDING = 1e-3
"""How far (0-255 units) a model's own constants may be from a dense method's official ones for `auto` to take the
official ones: mmseg's constants are CLIP's rounded to three decimals."""


def pixel_normalization(backbone: Backbone, config: SegmenterConfig) -> Normalization:
    """The normalisation a configuration uses on a backbone: the model's own for the relevance method (as Chefer et
    al.'s notebook preprocesses); for the dense method per `config.normalization` (`choices.NORMALIZATIONS`): the
    official code's constants (`methods.official_normalization`), the model's own, or with "auto" the official ones
    when they are the model's own rounded (within OFFICIAL_ROUNDING), else the model's.

    Args:
        backbone: the loaded model (its `mean` and `std`, 0-1 units).
        config: the configuration.

    Returns:
        The Normalization.
    """
    model = Normalization("model", tuple(backbone.mean), tuple(backbone.std), 255.0)
    choice = config.resolved("normalization")
    if config.method != "dense" or choice == "model":
        return model
    mean, std = methods.official_normalization(config.method_name)
    official = Normalization("official", mean, std, 1.0)
    if choice == "official":
        return official
    own = model.in_pixel_units()
    rounds_to = all(abs(ours - theirs) <= OFFICIAL_ROUNDING
                    for ours, theirs in zip([*own["mean"], *own["std"]], [*mean, *std]))
    return official if rounds_to else model


class Pipeline:
    """The steps of one Segmenter: a loaded backbone, a checked configuration and its method.

    Args:
        backbone: the loaded model.
        config: what to do with it.
        method: the configuration's method, checked against the backbone.
        stages: a `timing.StageTimes` to time the stages (benchmarks/bench.py does), or none.
        sam2: the loaded SAM 2 of region source sam2 (`backbone.sam2.load_sam2`).
    """

    def __init__(self, backbone: Backbone, config: SegmenterConfig, method: Method, stages=NoStageTimes(),
                 sam2=None):
        self.backbone, self.config, self.method, self.stages, self.sam2 = backbone, config, method, stages, sam2
        self.dense = method.family == "dense"
        backend = config.resolved("crf_backend")
        if backend == "auto":
            backend = "torch" if backbone.device.type == "cuda" else "pydensecrf"
        self.crf_backend = backend
        self.view_batch = config.view_batch or DEFAULT_VIEW_BATCH[backbone.device.type]
        self.crf: Optional[CrfSettings] = config.crf if "crf" in config.refine else None
        self.pamr = config.pamr if "pamr" in config.refine else None
        self.regions = RegionSource(config.resolved("regions")) if config.uses_regions else None
        self.voting = "regions" in config.refine.split("+")
        self.normalization = pixel_normalization(backbone, config)

    def decode(self, image: Union[ImageInput, Decoded], stem: Optional[str] = None) -> Decoded:
        """The image as displayed (RGB uint8), at working resolution, and as the model's views are cut from it; an
        image already decoded (`Decoded`) is used as it is. `stem` names an image given as pixels, whose region map
        a folder holds under that name (a file's own stem otherwise)."""
        if isinstance(image, Decoded):
            return image
        rgb = load_image(image)
        working = downscale(rgb, working_size(*rgb.shape[:2], self.config.max_side))
        regions = None
        if self.regions is not None:
            stem = Path(image).stem if isinstance(image, (str, Path)) else stem
            regions = image_regions(self.regions, stem, rgb, working, self.sam2, self.config.mask_generation)
        if not self.dense:
            return Decoded(rgb, working, working, regions)
        return Decoded(rgb, working, resize_for_model(rgb, self.config.resolved("short_side"),
                                                      self.config.resolved("long_side")), regions)

    def normalized(self, rgb: np.ndarray) -> torch.Tensor:
        """The image as a normalised float tensor (3 x H x W) on the model's device: (pixel - mean) / std in float32,
        in the units the constants are given in (`Normalization`)."""
        device, normalization = self.backbone.device, self.normalization
        pixels = torch.from_numpy(rgb).to(device).permute(2, 0, 1).float()
        if normalization.scale != 1:
            pixels = pixels / normalization.scale
        mean = torch.tensor(normalization.mean, device=device)[:, None, None]
        std = torch.tensor(normalization.std, device=device)[:, None, None]
        return (pixels - mean) / std

    def plan(self, source: np.ndarray) -> list[View]:
        """The views of the image they are cut from: TTA views of the working image at the model's input size, or
        for the dense method the windows of the resized image."""
        height, width = source.shape[:2]
        if not self.dense:
            return plan_views(height, width, self.backbone.image_size, self.config.tta)
        return plan_windows(height, width, self.config.resolved("window"), self.config.window_stride, self.config.tta)

    def queries(self, names: list[str]) -> list[str]:
        """What is embedded for the labels `names`: the labels, then (dense) the background words that are not
        labels."""
        if not self.dense:
            return names
        taken = {name.casefold() for name in names}
        return [*names, *(word for word in self.config.dense_background_words if word.casefold() not in taken)]

    def embed(self, names: list[str], cached: bool = True, on_progress: Optional[ProgressCallback] = None
              ) -> torch.Tensor:
        """Text embeddings of `queries(names)` with the configuration's templates (`Backbone.embed_labels`)."""
        return self.backbone.embed_labels(self.queries(names), self.config.template_set, cached, on_progress)

    def view_mapper(self, text: torch.Tensor, half_precision: bool = True) -> Callable[..., torch.Tensor]:
        """The method's maps (views x labels x rows x columns) of a batch of rendered views for the labels' `text`
        (and, for a method that `uses_image_context`, the views' contexts, `view_context`); in fp16 on CUDA unless
        `half_precision` is False."""
        backbone = self.backbone

        def map_views(batch: torch.Tensor, contexts: Optional[list] = None) -> torch.Tensor:
            extra = {} if contexts is None else {"contexts": contexts}
            with backbone.autocast() if half_precision else contextlib.nullcontext():
                return self.method.map_views(backbone.tower, batch, text.to(backbone.device), self.stages, **extra)

        return map_views

    def view_context(self, half_precision: bool = True) -> Optional[Callable[[torch.Tensor], Any]]:
        """What the method needs of each whole image (`methods.base.Method.uses_image_context`) from its normalised
        tensor, timed as the stage "forward", in fp16 on CUDA unless `half_precision` is False; None for a method
        that needs nothing."""
        if not self.method.uses_image_context:
            return None
        backbone = self.backbone

        def context(image: torch.Tensor):
            with backbone.autocast() if half_precision else contextlib.nullcontext(), self.stages.stage("forward"):
                return self.method.image_context(backbone.tower, image)

        return context

    def view_tensor(self, decoded: Decoded) -> torch.Tensor:
        """The tensor the views are cut from: the normalised image (`normalized`), and for a method that
        `uses_regions` (CorrCLIP) a fourth channel of region ids, the regions resized by nearest neighbour."""
        pixels = self.normalized(decoded.source)
        if not self.method.uses_regions:
            return pixels
        regions = resized_regions(decoded.regions, decoded.source.shape[:2])
        return torch.cat([pixels, torch.from_numpy(regions).to(pixels)[None]])

    def majority(self, decoded: Decoded) -> Optional[np.ndarray]:
        """The regions whose majority label the mask takes (a method that `uses_regions`), else None."""
        return decoded.regions if self.method.uses_regions else None

    def merged_maps(self, decoded: Decoded, text: torch.Tensor, timings: dict[str, float],
                    on_progress: Callable[[int, int], None] = lambda done, total: None) -> torch.Tensor:
        """Maps for the `text` embeddings (labels x h x w) merged over all views of the image they are cut from;
        their seconds go to `timings["maps_s"]`."""
        clock = time.perf_counter()
        views = self.plan(decoded.source)
        on_progress(0, len(views))
        maps = merge_views(self.view_tensor(decoded), views, self.view_mapper(text), self.view_batch,
                           on_batch=lambda done: on_progress(done, len(views)), stages=self.stages,
                           context=self.view_context())
        timings["maps_s"] = time.perf_counter() - clock
        return maps

    def scores(self, maps: torch.Tensor, labels: int) -> torch.Tensor:
        """Per-pixel scores (background first) from merged maps at working resolution by the family's rule."""
        if self.dense:
            return dense_scores(maps, labels, self.config.resolved("logit_scale"), self.config.background_threshold)
        return label_scores(maps, self.config.background_threshold)

    def unrefined_scores(self, maps: torch.Tensor, decoded: Decoded, labels: int) -> torch.Tensor:
        """The scores of merged maps at working resolution without any refinement (what automatic labels read)."""
        if self.dense:
            maps = resized(maps, decoded.working.shape[:2])
        return self.scores(maps, labels)

    def probabilities(self, maps: torch.Tensor, decoded: Decoded, labels: int) -> tuple[torch.Tensor, float]:
        """Per-pixel class probabilities (background first) at working resolution from merged maps, on the model's
        device, PAMR-refined if asked: the dense method's cosines before its scores, as NACLIP refines them, the
        relevance method's probabilities; with PAMR's seconds."""
        pamr_s = 0.0
        if self.dense:
            maps, pamr_s = self.dense_maps_at_working(maps, decoded)
        with self.stages.stage("pseudo_labels"):
            probabilities = scores_to_probabilities(self.scores(maps, labels), self.config.temperature)
        if not self.dense and self.pamr is not None:
            pixels = torch.from_numpy(decoded.working).to(probabilities.device).permute(2, 0, 1).float()
            probabilities, pamr_s = self.run_pamr(pixels, probabilities)
        return self.voted(probabilities, decoded), pamr_s

    def voted(self, probabilities: torch.Tensor, decoded: Decoded) -> torch.Tensor:
        """The probabilities (classes x working resolution) after the region vote where `refine` asks for it
        (`refinement.regions.region_vote`), timed as the stage "refine"."""
        if decoded.regions is None or not self.voting:
            return probabilities
        with self.stages.stage("refine"):
            return region_vote(probabilities, torch.from_numpy(decoded.regions).to(probabilities.device))

    def dense_maps_at_working(self, maps: torch.Tensor, decoded: Decoded) -> tuple[torch.Tensor, float]:
        """The dense method's merged cosines (at the resized image's size) bilinearly resized to working resolution
        and, with PAMR, refined there with the normalised resized image resized likewise as the guide, as NACLIP
        does; with PAMR's seconds."""
        size = decoded.working.shape[:2]
        maps = resized(maps, size)
        if self.pamr is None:
            return maps, 0.0
        return self.run_pamr(resized(self.normalized(decoded.source), size), maps)

    def query_probabilities(self, maps: torch.Tensor, decoded: Decoded) -> np.ndarray:
        """softmax(logit scale x cosine) over the queries at working resolution, after PAMR where asked."""
        cosines, _ = self.dense_maps_at_working(maps, decoded)
        probabilities = torch.softmax(self.config.resolved("logit_scale") * cosines, dim=0)
        return self.voted(probabilities, decoded).cpu().numpy()

    def run_pamr(self, guide: torch.Tensor, maps: torch.Tensor) -> tuple[torch.Tensor, float]:
        """PAMR of `maps` on `guide`, timed (synchronised on CUDA)."""
        clock = time.perf_counter()
        with self.stages.stage("refine"):
            maps = pamr(guide, maps, self.pamr)
        if maps.device.type == "cuda":
            torch.cuda.synchronize(maps.device)
        return maps, time.perf_counter() - clock

    @property
    def cpu_crf(self) -> Optional[CrfSettings]:
        """The CRF settings where the CRF runs in pydensecrf once the probabilities have left the device."""
        return self.crf if self.crf_backend == "pydensecrf" else None

    def device_crf(self, workings: list[np.ndarray], probabilities: list[torch.Tensor]
                   ) -> tuple[list[torch.Tensor], float]:
        """The torch CRF on the model's device where that backend is chosen (else the probabilities unchanged),
        images batched up to `CRF_BATCH_VALUES` pixels x classes per call; with its seconds per image."""
        if self.crf is None or self.crf_backend != "torch":
            return probabilities, 0.0
        clock = time.perf_counter()
        device = probabilities[0].device
        refined, batch, values = [], [], 0
        for index, image_probabilities in enumerate(probabilities):
            if batch and values + image_probabilities.numel() > CRF_BATCH_VALUES:
                refined += self.crf_batch([workings[i] for i in batch], [probabilities[i] for i in batch])
                batch, values = [], 0
            batch.append(index)
            values += image_probabilities.numel()
        refined += self.crf_batch([workings[i] for i in batch], [probabilities[i] for i in batch])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return refined, (time.perf_counter() - clock) / len(workings)

    def crf_batch(self, workings: list[np.ndarray], probabilities: list[torch.Tensor]) -> list[torch.Tensor]:
        """The torch CRF on a batch, halved while the device runs out of memory; an image that does not fit alone is
        refined by pydensecrf on the CPU instead (the same marginals, see tests/test_lattice.py)."""
        device = probabilities[0].device
        try:
            return mean_field_crf([torch.from_numpy(working).to(device) for working in workings], probabilities,
                                  self.crf)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
        if len(workings) == 1:
            return [torch.from_numpy(dense_crf(workings[0], as_array(probabilities[0]), self.crf)).to(device)]
        half = len(workings) // 2
        return (self.crf_batch(workings[:half], probabilities[:half])
                + self.crf_batch(workings[half:], probabilities[half:]))

    def ran(self, timings: dict[str, float]) -> dict[str, float]:
        """The stage seconds of a result without those of refinements that `refine` does not run."""
        skipped = [f"{refinement}_s" for refinement in ("pamr", "crf") if refinement not in self.config.refine]
        return {stage: seconds for stage, seconds in timings.items() if stage not in skipped}

    def finish(self, maps: torch.Tensor, names: list[str], decoded: Decoded, timings: dict[str, float]
               ) -> SegmentationResult:
        """Probabilities, refinement and the full-size mask of one image from its merged maps."""
        probabilities, timings["pamr_s"] = self.probabilities(maps, decoded, len(names))
        (probabilities,), device_crf_s = self.device_crf([decoded.working], [probabilities])
        mask, probabilities, crf_s = finish_segmentation(decoded.working, probabilities, self.cpu_crf,
                                                         decoded.rgb.shape[:2], self.majority(decoded))
        timings["crf_s"] = device_crf_s + crf_s
        return SegmentationResult(mask, probabilities, [BACKGROUND, *names], decoded.rgb, self.ran(timings),
                                  decoded.regions)


def finish_segmentation(working: np.ndarray, probabilities: Union[np.ndarray, torch.Tensor],
                        crf: Optional[CrfSettings], full_size: tuple[int, int], majority: Optional[np.ndarray] = None
                        ) -> tuple[np.ndarray, np.ndarray, float]:
    """The last step of an image, in this process or a refinement worker's.

    Args:
        working: the image at working resolution (RGB uint8).
        probabilities: its class probabilities (an array, or a tensor on any device).
        crf: pydensecrf's dense CRF settings, or None for no CRF here.
        full_size: the image's (height, width) as displayed.
        majority: region ids (at working resolution) whose regions each take their majority label in the mask
            (CorrCLIP's map correction, `methods.corrclip.majority_labels`), or None.

    Returns:
        The full-size mask (made where the probabilities are), the probabilities as an array, and the seconds taken.
    """
    clock = time.perf_counter()
    if crf is not None:
        probabilities = dense_crf(working, as_array(probabilities), crf)
    mask = upsample_argmax(probabilities, *full_size)
    if majority is not None:
        mask = majority_labels(mask, resized_regions(majority, full_size))
    return mask, as_array(probabilities), time.perf_counter() - clock


def resized(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Maps (channels x h x w) bilinearly resized to `size` (align_corners=False, as the official code does)."""
    return F.interpolate(maps[None], size=size, mode="bilinear", align_corners=False)[0]


def as_array(probabilities: Union[np.ndarray, torch.Tensor]) -> np.ndarray:
    """Probabilities as a float32 array on the CPU."""
    return probabilities.float().cpu().numpy() if isinstance(probabilities, torch.Tensor) else probabilities


def checked_labels(labels: Optional[Union[str, Iterable[str]]]) -> list[str]:
    """The cleaned labels of an image (`labels.clean_labels`), or a one-line error when it has none."""
    if labels is None:
        raise WildsegError("no labels given for this image")
    return clean_labels(labels)


def timed(function, *arguments):
    """function(*arguments) and the seconds it took."""
    clock = time.perf_counter()
    return function(*arguments), time.perf_counter() - clock
