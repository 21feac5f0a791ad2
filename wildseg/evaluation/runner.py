"""Where an evaluation's images are segmented: the interface of evaluators, and the one in this process (the
one on Ray workers is `distributed.RayEvaluator`)."""

import time
from abc import ABC, abstractmethod
from contextlib import nullcontext
from typing import Callable, ContextManager, Optional

from ..backbone import Backbone
from .loop import Evaluation, evaluate
from .predictions import PredictionStore
from .protocols import RunProtocol


def scored_prompts(protocol: RunProtocol) -> list[str]:
    """Every query of the run's scored classes: what its segmenters embed ahead."""
    dataset = protocol.dataset
    return [prompt for index in dataset.scored_classes for prompt in dataset.classes[index].prompts]


class Evaluator(ABC):
    """Segments a run's images. As a context manager, its segmenters are ready on entry and released on exit.

    `where` completes the progress line (" on 2 Ray workers"); `stages` holds the seconds of getting ready
    (`model_load_s`, `label_embeddings_s` or `workers_ready_s`); `backbone` is a model loaded here that a next run
    may reuse (None when there is none).
    """

    where = ""
    backbone: Optional[Backbone] = None

    def __init__(self):
        self.stages: dict[str, float] = {}

    def __enter__(self) -> "Evaluator":
        return self

    def __exit__(self, *exc_info) -> None:
        pass

    @abstractmethod
    def settings(self) -> dict:
        """The segmenter's settings (`Segmenter.settings`), for the report and the saved predictions."""

    @abstractmethod
    def evaluate(self, ids: list[str], store: Optional[PredictionStore], on_images: Callable[[int], None]
                 ) -> Evaluation:
        """Evaluate the images `ids`, calling `on_images(count)` as images are counted."""


class LocalEvaluator(Evaluator):
    """Evaluation in this process: the segmenter is built on entry (on `backbone` when one is loaded), its labels
    embedded ahead.

    Args:
        options: the run's option values (`factory.build_segmenter`).
        protocol: the run's protocol (its defaults and data set).
        protocol_name: `open` or `given`.
        workers: threads reading samples ahead.
        backbone: a loaded model to reuse.
        loading: a context around building the segmenter (a status line).
        prepare: embeds the labels ahead (default: `Segmenter.prepare_labels`; a progress bar).
    """

    def __init__(self, options: dict, protocol: RunProtocol, protocol_name: str, workers: int,
                 backbone: Optional[Backbone] = None, loading: Callable[[], ContextManager] = nullcontext,
                 prepare: Optional[Callable] = None):
        super().__init__()
        self.options, self.protocol, self.protocol_name, self.workers = options, protocol, protocol_name, workers
        self.backbone, self.loading = backbone, loading
        self.prepare = prepare or (lambda segmenter, labels: segmenter.prepare_labels(labels))

    def __enter__(self) -> "LocalEvaluator":
        clock = time.perf_counter()
        with self.loading():
            from ..factory import build_segmenter

            self.segmenter = build_segmenter(self.options, self.protocol.defaults, self.backbone)
        self.backbone = self.segmenter.backbone
        self.stages["model_load_s"] = time.perf_counter() - clock
        clock = time.perf_counter()
        self.prepare(self.segmenter, scored_prompts(self.protocol))
        self.stages["label_embeddings_s"] = time.perf_counter() - clock
        return self

    def __exit__(self, *exc_info) -> None:
        self.segmenter.close()

    def settings(self) -> dict:
        return self.segmenter.settings()

    def evaluate(self, ids: list[str], store: Optional[PredictionStore], on_images: Callable[[int], None]
                 ) -> Evaluation:
        return evaluate(self.segmenter, self.protocol.dataset, ids, self.protocol_name, store,
                        on_image=lambda image_id, outcome: on_images(1), area_threshold=self.protocol.area_threshold,
                        workers=self.workers)
