"""Batch streaming: many images through one Segmenter's pipeline with the model kept busy.

Images are decoded by threads ahead of the model; the views of successive images with the same labels share model
batches (`tta.ViewStream`); each model step's finished images are refined together (PAMR and the torch CRF on the
model's device), or their pydensecrf CRF runs in worker processes (`RefinePool`, one pool per Segmenter) while the
model goes on. A failure of one image is that image's `BatchItem.error`; the others go on.
"""

import itertools
import multiprocessing
import signal
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

import numpy as np
import torch

from .errors import failure_reason
from .images import ImageInput
from .labels import BACKGROUND
from .pipeline import Decoded, Pipeline, as_array, checked_labels, finish_segmentation, timed
from .result import SegmentationResult
from .tta import ViewStream

OUT_OF_MEMORY = "out of GPU memory even with one view per batch: lower max_side (--max-side)"
OUT_OF_MEMORY_AFTER = "out of GPU memory making its {}: lower max_side (--max-side)"


@dataclass
class BatchItem:
    """The outcome for one image of a batch: `result` (a SegmentationResult, or the probabilities or scores array of
    a query or score run) or the one-line reason it failed; `auto_labels`, the record of how its labels were found
    (`autolabels`); `decoded`, the decoded image where a score run keeps it for the pass after it."""

    source: Any
    result: Optional[Union[SegmentationResult, np.ndarray]] = None
    error: Optional[str] = None
    auto_labels: Optional[dict] = None
    decoded: Optional[Decoded] = None


def start_refine_worker() -> None:
    """A refinement worker uses one thread and leaves Ctrl-C to the main process, which stops it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)


class RefinePool:
    """The processes that run pydensecrf's CRF beside the model: one spawn pool, made on first need and reused by
    every batch of its Segmenter (a Ray worker's included), remade when another size is asked for or a worker
    died; `close` ends it."""

    def __init__(self):
        self.executor: Optional[ProcessPoolExecutor] = None
        self.workers, self.broken = 0, False

    def executor_for(self, workers: int) -> Optional[ProcessPoolExecutor]:
        """The pool of `workers` processes (None for 0: refine in this process)."""
        if self.executor is not None and (self.broken or self.workers != workers):
            self.close()
        if workers > 0 and self.executor is None:
            self.executor = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                                initializer=start_refine_worker)
            self.workers, self.broken = workers, False
        return self.executor if workers > 0 else None

    def close(self) -> None:
        """End the processes (waiting for the refinements under way)."""
        if self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=True)
        self.executor = None


@dataclass
class Pending:
    """An image between decoding and its finished result."""

    source: ImageInput
    names: list[str]
    decoded: Decoded
    timings: dict[str, float]


class BatchRun:
    """The machinery of one `Segmenter.segment_many` call: decode threads, a view stream per label list, the
    refinement of each model step's images.

    Args:
        pipeline: the Segmenter's steps.
        labels_of: the labels of an image (key), asked once it is decoded.
        decode_workers: threads decoding ahead (each keeps two images in flight).
        refiner: the Segmenter's pydensecrf processes, or None.
        refine_workers: how many of them to use (0: refine in this process).
        read: the pixels of a key (None: the keys are the images).
    """

    def __init__(self, pipeline: Pipeline, labels_of: Callable[[Any], Any], decode_workers: int,
                 refiner: Optional[RefinePool] = None, refine_workers: int = 0,
                 read: Optional[Callable[[Any], ImageInput]] = None):
        self.pipeline, self.labels_of = pipeline, labels_of
        self.decode = pipeline.decode if read is None else (lambda key: pipeline.decode(read(key), Path(str(key)).stem))
        self.decoder = ThreadPoolExecutor(max(1, decode_workers), thread_name_prefix="wildseg-decode")
        self.prefetch = 2 * max(1, decode_workers)
        self.refiner = refiner
        self.executor = refiner.executor_for(refine_workers) if refiner is not None else None
        self.max_refining = 2 * max(1, refine_workers)
        self.stream, self.stream_names, self.pending, self.keys = None, None, {}, itertools.count()
        self.refining: dict[Future, Pending] = {}

    def items(self, sources: Iterator[Any]) -> Iterator[BatchItem]:
        """A BatchItem per source, as each finishes."""
        decoding: deque = deque()
        self.top_up(decoding, sources)
        while decoding:
            source, decoded = decoding.popleft()
            self.top_up(decoding, sources)
            try:
                image, decode_s = decoded.result()
                names = self.names(source)
            except Exception as error:  # one image's pixels or labels never stop the batch
                yield BatchItem(source, error=failure_reason(error, source))
                continue
            timings = {"decode_s": decode_s}
            if names != self.stream_names:
                yield from self.drain_stream()
                timings["text_s"] = self.open_stream(names)
            key = next(self.keys)
            self.pending[key] = Pending(source, names, image, timings)
            yield from self.map(partial(self.stream.add, key, self.pipeline.view_tensor(image),
                                        self.pipeline.plan(image.source)))
            yield from self.collect(block=len(self.refining) >= self.max_refining)
        yield from self.drain_stream()
        while self.refining:
            yield from self.collect(block=True)

    def close(self) -> None:
        """Stop the decode threads; refinements not yet started are cancelled."""
        self.decoder.shutdown(wait=True, cancel_futures=True)
        for future in self.refining:
            future.cancel()

    def top_up(self, decoding: deque, sources: Iterator[Any]) -> None:
        """Queue sources for decoding until `prefetch` are in flight or none is left."""
        while len(decoding) < self.prefetch:
            source = next(sources, END)
            if source is END:
                return
            decoding.append((source, self.decoder.submit(timed, self.decode, source)))

    def open_stream(self, names: list[str]) -> float:
        """A view stream for the label list `names`; the seconds its label embeddings took (the first image of the
        stream records them)."""
        text, seconds = timed(self.embed, names)
        self.stream = ViewStream(self.pipeline.view_mapper(text), self.pipeline.view_batch,
                                 stages=self.pipeline.stages, context=self.pipeline.view_context())
        self.stream_names = names
        return seconds

    def names(self, source) -> list[str]:
        """The checked labels of an image."""
        return checked_labels(self.labels_of(source))

    def embed(self, names: list[str]) -> torch.Tensor:
        """The text embeddings a stream for the labels `names` maps views with."""
        return self.pipeline.embed(names)

    def drain_stream(self) -> Iterator[BatchItem]:
        """Map the views still waiting in the stream."""
        if self.stream is not None:
            yield from self.map(self.stream.flush)

    def map(self, step) -> Iterator[BatchItem]:
        """Run a view-stream step; hand finished images on (`finished`). Out of memory fails the stream's images."""
        try:
            finished = step()
        except torch.cuda.OutOfMemoryError:
            failed, self.pending, self.stream, self.stream_names = list(self.pending.values()), {}, None, None
            for lost in failed:
                yield BatchItem(lost.source, error=OUT_OF_MEMORY)
            return
        items = [self.pending.pop(key) for key, _ in finished]
        for item, (key, _) in zip(items, finished):
            item.timings["maps_s"] = self.stream.seconds.pop(key)
        if items:
            yield from self.finished(items, [maps for _, maps in finished])

    def finished(self, items: list[Pending], maps: list[torch.Tensor]) -> Iterator[BatchItem]:
        """Probabilities and refinement of the images a model step finished: PAMR per image and the torch CRF over
        all of them on the device, or pydensecrf in the worker processes. Yields the images that ran out of GPU
        memory on the way as failed."""
        pipeline = self.pipeline
        kept, probabilities = [], []
        for item, item_maps in zip(items, maps):
            try:
                item_probabilities, item.timings["pamr_s"] = pipeline.probabilities(item_maps, item.decoded,
                                                                                    len(item.names))
            except torch.cuda.OutOfMemoryError:
                yield BatchItem(item.source, error=OUT_OF_MEMORY_AFTER.format("probabilities"))
                continue
            kept.append(item)
            probabilities.append(item_probabilities)
        if not kept:
            return
        probabilities, device_crf_s = pipeline.device_crf([item.decoded.working for item in kept], probabilities)
        for item, item_probabilities in zip(kept, probabilities):
            item.timings["crf_s"] = device_crf_s
            future = Future()
            try:
                if self.executor is None:
                    future.set_result(finish_segmentation(item.decoded.working, item_probabilities,
                                                          pipeline.cpu_crf, item.decoded.rgb.shape[:2],
                                                          pipeline.majority(item.decoded)))
                else:
                    future = self.executor.submit(finish_segmentation, item.decoded.working,
                                                  as_array(item_probabilities), pipeline.cpu_crf,
                                                  item.decoded.rgb.shape[:2], pipeline.majority(item.decoded))
            except Exception as error:  # the image fails in `collect`, with the reason
                future.set_exception(error)
            self.refining[future] = item

    def collect(self, block: bool) -> Iterator[BatchItem]:
        """The images whose refinement ended (waiting for one when `block`)."""
        if not self.refining:
            return
        done, _ = wait(self.refining, timeout=None if block else 0, return_when=FIRST_COMPLETED)
        for future in done:
            item = self.refining.pop(future)
            try:
                mask, probabilities, crf_s = future.result()
            except Exception as error:  # raised in this process or in a worker
                if isinstance(error, BrokenProcessPool) and self.refiner is not None:
                    self.refiner.broken = True
                yield BatchItem(item.source, error=failure_reason(error, item.source))
                continue
            timings = self.pipeline.ran({**item.timings, "crf_s": item.timings["crf_s"] + crf_s})
            result = SegmentationResult(mask, probabilities, [BACKGROUND, *item.names], item.decoded.rgb, timings,
                                        item.decoded.regions)
            yield BatchItem(item.source, result=result)


class QueryRun(BatchRun):
    """The machinery of `Segmenter.query_probabilities_many`: the queries embedded as given (no background words),
    and each image's query probabilities instead of refinement."""

    def names(self, source) -> list[str]:
        return list(self.labels_of(source))

    def embed(self, names: list[str]) -> torch.Tensor:
        return self.pipeline.backbone.embed_labels(names, self.pipeline.config.template_set)

    def finished(self, items: list[Pending], maps: list[torch.Tensor]) -> Iterator[BatchItem]:
        for item, item_maps in zip(items, maps):
            try:
                probabilities = self.pipeline.query_probabilities(item_maps, item.decoded)
            except torch.cuda.OutOfMemoryError:
                yield BatchItem(item.source, error=OUT_OF_MEMORY_AFTER.format("probabilities"))
                continue
            yield BatchItem(item.source, result=probabilities, decoded=item.decoded)


class ScoreRun(BatchRun):
    """The machinery of `Segmenter.label_scores_many`: each image's unrefined scores (background first, at working
    resolution), with its decoded image kept in the item for a pass after it."""

    def finished(self, items: list[Pending], maps: list[torch.Tensor]) -> Iterator[BatchItem]:
        for item, item_maps in zip(items, maps):
            try:
                scores = self.pipeline.unrefined_scores(item_maps, item.decoded, len(item.names))
            except torch.cuda.OutOfMemoryError:
                yield BatchItem(item.source, error=OUT_OF_MEMORY_AFTER.format("scores"))
                continue
            yield BatchItem(item.source, result=scores.cpu().numpy(), decoded=item.decoded)


END = object()
"""The end of the sources."""
