"""`Segmenter`: image + label names -> mask and scores (Zabari & Hoshen, arXiv 2112.03185), on a loaded backbone.

Loading is apart from use, as segment-anything's `SamPredictor` is apart from its model: `load_backbone` loads
CLIP once; a Segmenter puts a checked `SegmenterConfig` on it, and several Segmenters (methods, refinements) can
share one backbone and its label embeddings:

>>> backbone = load_backbone("ViT-B-16", pretrained="openai")
>>> segmenter = Segmenter(backbone, SegmenterConfig(method="dense", attention="naclip", refine="pamr"))
>>> result = segmenter.segment("photo.jpg", "cat, sofa")
>>> result.mask.shape, result.labels
"""

import os
import time
import weakref
from functools import partial
from typing import Any, Callable, Iterable, Iterator, Optional, Union

import numpy as np
import torch

from .backbone import Backbone, ProgressCallback
from .choices import RFCLIP_DEFAULTS
from .config import SegmenterConfig
from .errors import WildsegError, setting
from .images import ImageInput
from .labels import BACKGROUND
from .methods import load_method
from .pipeline import Pipeline, checked_labels, finish_segmentation, timed
from .result import SegmentationResult
from .streaming import BatchItem, BatchRun, QueryRun, RefinePool, ScoreRun
from .timing import NoStageTimes
from .tta import merge_views
from .version import __version__

LabelsOf = Union[str, Iterable[str], Callable[[Any], Union[str, Iterable[str]]]]
"""One label list for every image (a comma-separated string or names), or a function from an image to its labels."""


class Segmenter:
    """Training-free semantic segmentation with CLIP for given label names.

    Args:
        backbone: the loaded model (`load_backbone`), shared with other Segmenters as it is.
        config: what to do with it (`SegmenterConfig`), checked against the model here.
        stages: a `timing.StageTimes` to time the pipeline's stages (benchmarks do), or none.
        sam2: the SAM 2 of `regions="sam2"` (`backbone.sam2.load_sam2`), loaded apart as the backbone is.
        dino: the DINO of CorrCLIP (`backbone.dino.load_dino`), likewise.
    """

    def __init__(self, backbone: Backbone, config: SegmenterConfig = SegmenterConfig(), stages=NoStageTimes(),
                 sam2=None, dino=None):
        if config.uses_sam2 and sam2 is None:
            raise WildsegError(f"{setting('regions')} sam2 needs the SAM 2 model: load it with "
                               "wildseg.backbone.sam2.load_sam2 and give it as sam2=")
        models = {"dino": dino} if config.method_name == "corrclip" else {}
        method = load_method(config.method_name).build(config, **models)
        method.check(backbone.tower, backbone.model_name)
        window, patch = config.resolved("window"), backbone.tower.patch_size
        if method.family == "dense" and window % patch:
            raise WildsegError(f"{setting('window')} {window} is not a multiple of {backbone.model_name}'s "
                               f"{patch}-pixel patches")
        self.backbone, self.config, self.method = backbone, config, method
        self.pipeline = Pipeline(backbone, config, method, stages, sam2 if config.uses_regions else None)
        self.refine_pool = RefinePool()
        weakref.finalize(self, self.refine_pool.close)

    def settings(self) -> dict:
        """Everything that determines the output, for records and reports."""
        backbone, config, pipeline = self.backbone, self.config, self.pipeline
        dense = config.method == "dense"
        return {
            "wildseg_version": __version__,
            "model": backbone.model_name,
            "weights": backbone.weights,
            "activation": backbone.activation,
            "activation_source": backbone.activation_source,
            "device": backbone.device.type,
            "precision": backbone.precision,
            "image_size": backbone.image_size,
            "templates": config.template_set.identity,
            "method": config.method,
            "start_block": config.resolved("start_block") if not dense else None,
            "dense": {
                "attention": config.resolved("attention"), "window": config.resolved("window"),
                "stride": config.window_stride, "short_side": config.resolved("short_side"),
                "long_side": config.resolved("long_side"), "logit_scale": config.resolved("logit_scale"),
                "normalization": pipeline.normalization.in_pixel_units(), "patch_size": backbone.tower.patch_size,
                "background_words": config.dense_background_words,
                **({"rfclip": {name: config.resolved(name) for name in RFCLIP_DEFAULTS}}
                   if config.resolved("attention") == "rfclip" else {}),
                **({"corrclip": {"dino_model": config.resolved("dino_model"),
                                 "dino_checkpoint": str(config.dino_checkpoint) if config.dino_checkpoint else None}}
                   if config.resolved("attention") == "corrclip" else {}),
            } if dense else None,
            "tta": config.tta,
            "max_side": config.max_side,
            "bg_threshold": config.background_threshold,
            "temperature": config.temperature,
            "refine": config.refine,
            "pamr": vars(pipeline.pamr) if pipeline.pamr is not None else None,
            "regions": pipeline.regions.identity() if pipeline.regions is not None else None,
            "sam2": ({"model": pipeline.sam2.name, **vars(config.mask_generation)}
                     if pipeline.sam2 is not None else None),
            "crf": {**vars(pipeline.crf), "backend": pipeline.crf_backend} if pipeline.crf is not None else None,
        }

    @property
    def stages(self):
        """The `timing.StageTimes` the pipeline's stages are timed by."""
        return self.pipeline.stages

    @stages.setter
    def stages(self, stages) -> None:
        self.pipeline.stages = stages

    def segment(self, image: ImageInput, labels: Union[str, Iterable[str]],
                on_progress: Callable[[int, int], None] = lambda done, total: None) -> SegmentationResult:
        """Segment one image into background and its labels.

        Args:
            image: a path, a PIL image or an array (H x W, H x W x 3 or 4).
            labels: the names of what is in it: a list, or one comma-separated string.
            on_progress: called as `on_progress(done, total)` as the test-time views are mapped.

        Returns:
            The SegmentationResult: full-size mask (0 = background, i = the i-th label), probabilities, labels.
        """
        pipeline, timings = self.pipeline, {}
        names = checked_labels(labels)
        decoded, timings["decode_s"] = timed(pipeline.decode, image)
        text, timings["text_s"] = timed(pipeline.embed, names)
        maps = pipeline.merged_maps(decoded, text, timings, on_progress)
        return pipeline.finish(maps, names, decoded, timings)

    def segment_many(self, images: Iterable[Any], labels: LabelsOf, decode_workers: int = 2,
                     refine_workers: Optional[int] = None, read: Optional[Callable[[Any], ImageInput]] = None
                     ) -> Iterator[BatchItem]:
        """Segment many images, yielding a BatchItem for each as it finishes (not necessarily in order).

        Images are decoded by threads ahead of the model; views of successive images with the same labels share
        model batches. The torch CRF (the default on a GPU) runs in this process on the model's device over the
        images each model step finishes; pydensecrf's CRF runs in worker processes while the model goes on. A
        failure (unreadable image, missing labels, out of GPU memory with one view per batch) is that item's
        `error`; the others go on.

        Args:
            images: the images (paths, arrays, PIL images), or any keys with `read`.
            labels: one label list for every image, or a function from an image (key) to its labels, asked once it
                is read.
            decode_workers: threads decoding ahead of the model.
            refine_workers: processes running pydensecrf's CRF (default: half the CPU cores when the model is on a
                GPU; 0, in this process, when the model already keeps the CPU busy). The Segmenter keeps them for
                its later calls (`close` ends them).
            read: the pixels of a key (in a decode thread).

        Returns:
            An iterator of BatchItems whose `result` is a SegmentationResult.
        """
        labels_of = labels if callable(labels) else (lambda source: labels)
        if refine_workers is None:
            refine_workers = max(1, (os.cpu_count() or 2) // 2) if self.backbone.device.type == "cuda" else 0
        workers = refine_workers if self.pipeline.cpu_crf is not None else 0
        yield from _run(BatchRun(self.pipeline, labels_of, decode_workers, self.refine_pool, workers, read), images)

    def label_scores(self, image: ImageInput, labels: Union[str, Iterable[str]]) -> np.ndarray:
        """The unrefined scores of one image by the method's rule (`pseudolabels`): what `segment` turns into
        probabilities and refines; their argmax is an unrefined mask.

        Returns:
            (1 + labels) x h x w, background first, at working resolution.
        """
        pipeline = self.pipeline
        names = checked_labels(labels)
        decoded = pipeline.decode(image)
        maps = pipeline.merged_maps(decoded, pipeline.embed(names), {})
        return pipeline.unrefined_scores(maps, decoded, len(names)).cpu().numpy()

    def label_scores_many(self, images: Iterable[Any], labels: LabelsOf, decode_workers: int = 2,
                          read: Optional[Callable[[Any], ImageInput]] = None) -> Iterator[BatchItem]:
        """`label_scores` of many images through `segment_many`'s streaming: a BatchItem per image whose `result`
        is its scores and `decoded` its decoded image (for a pass after this one), as each finishes."""
        labels_of = labels if callable(labels) else (lambda source: labels)
        yield from _run(ScoreRun(self.pipeline, labels_of, decode_workers, read=read), images)

    def query_probabilities(self, image: ImageInput, queries: list[str]) -> np.ndarray:
        """Dense method: per pixel at working resolution, softmax(logit scale x cosine) over `queries` (any words,
        `background` included, in the order given), after PAMR where `refine` asks for it: what the official dense
        segmenters (NACLIP, SCLIP, ClearCLIP) turn into class scores, a class's the max over its queries. The CRF,
        which refines class probabilities, has no place here and is not applied.

        Returns:
            queries x h x w.
        """
        self._require_dense()
        pipeline = self.pipeline
        decoded = pipeline.decode(image)
        maps = pipeline.merged_maps(decoded, self.backbone.embed_labels(queries, self.config.template_set), {})
        return pipeline.query_probabilities(maps, decoded)

    def query_probabilities_many(self, images: Iterable[Any], queries: Callable[[Any], list[str]],
                                 decode_workers: int = 2, read: Optional[Callable[[Any], ImageInput]] = None
                                 ) -> Iterator[BatchItem]:
        """`query_probabilities` of many images through `segment_many`'s streaming: a BatchItem per image whose
        `result` is its probabilities array, as each finishes; `queries(image)` its queries, `read` as in
        segment_many."""
        self._require_dense()
        yield from _run(QueryRun(self.pipeline, queries, decode_workers, read=read), images)

    def segment_reference(self, image: ImageInput, labels: Union[str, Iterable[str]]) -> SegmentationResult:
        """The straightforward pipeline, which the fast one (`segment`, `segment_many`) is tested and benchmarked
        against: label embeddings computed afresh, one view at a time, one forward (and for the relevance method one
        backward) per label and view, fp32 on every device, the CRF by pydensecrf in this process."""
        pipeline, timings = self.pipeline, {}
        names = checked_labels(labels)
        decoded, timings["decode_s"] = timed(pipeline.decode, image)
        text, timings["text_s"] = timed(partial(pipeline.embed, cached=False), names)
        clock = time.perf_counter()
        groups = [text] if pipeline.dense else [text[row : row + 1] for row in range(len(text))]
        mappers = [pipeline.view_mapper(group, half_precision=False) for group in groups]
        maps = merge_views(pipeline.view_tensor(decoded), pipeline.plan(decoded.source),
                           lambda view, contexts=None: torch.cat([mapper(view, contexts) for mapper in mappers], dim=1),
                           batch_size=1, stages=pipeline.stages, context=pipeline.view_context(half_precision=False))
        timings["maps_s"] = time.perf_counter() - clock
        probabilities, timings["pamr_s"] = pipeline.probabilities(maps, decoded, len(names))
        mask, probabilities, timings["crf_s"] = finish_segmentation(decoded.working, probabilities, pipeline.crf,
                                                                    decoded.rgb.shape[:2], pipeline.majority(decoded))
        return SegmentationResult(mask, probabilities, [BACKGROUND, *names], decoded.rgb, pipeline.ran(timings),
                                  decoded.regions)

    def prepare_labels(self, labels: Iterable[str], on_progress: Optional[ProgressCallback] = None) -> None:
        """Embed labels (and the dense method's background words) ahead of segmenting, reporting
        `on_progress(done, total)`; `segment` and `segment_many` then find them cached."""
        self.pipeline.embed(list(dict.fromkeys(labels)), on_progress=on_progress)

    def close(self) -> None:
        """End the refinement processes `segment_many` started (they also end with the Segmenter)."""
        self.refine_pool.close()

    def __enter__(self) -> "Segmenter":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _require_dense(self) -> None:
        if self.config.method != "dense":
            raise WildsegError(f"query probabilities are the dense method's: set {setting('method')} dense")


def _run(run: BatchRun, images: Iterable[Any]) -> Iterator[BatchItem]:
    """The items of a batch run over `images`, its threads stopped however the iteration ends."""
    try:
        yield from run.items(iter(images))
    finally:
        run.close()
