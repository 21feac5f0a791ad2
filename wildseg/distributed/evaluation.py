"""`wildseg eval --ray`: its Ray actors and the evaluator that drives them."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Callable, ContextManager, Optional

from ..evaluation import Evaluation, Evaluator, PredictionStore, RunProtocol, evaluate
from ..evaluation.runner import scored_prompts
from .cluster import RayCluster, chunk_size, chunked, run_chunks, worker_shape
from .workers import ModelWorker


@dataclass(frozen=True)
class EvaluationJob:
    """What every worker of a `wildseg eval --ray` run needs: the Segmenter's options (paths absolute), the run's
    protocol (its defaults and its data set, which reads by absolute paths), `open` or `given`, and the threads
    that read samples ahead."""

    segmenter_options: dict
    protocol: RunProtocol
    protocol_name: str
    threads: int


class EvaluationWorker(ModelWorker):
    """A Ray actor that keeps one Segmenter and evaluates chunks of a data set's images."""

    def load(self, job: EvaluationJob) -> None:
        from ..factory import build_segmenter

        self.segmenter = build_segmenter(job.segmenter_options, job.protocol.defaults)
        self.segmenter.prepare_labels(scored_prompts(job.protocol))

    def settings(self) -> dict:
        return self.segmenter.settings()

    def evaluate(self, ids: list[str], store: Optional[PredictionStore]) -> Evaluation:
        """`evaluation.evaluate` of the chunk's images (none once told to stop), one chunk at a time."""
        with self.turn:
            return evaluate(self.segmenter, self.job.protocol.dataset, [] if self.stopping.is_set() else ids,
                            self.job.protocol_name, store, area_threshold=self.job.protocol.area_threshold,
                            workers=self.job.threads)


def evaluate_on_ray(actors: list, ids: list[str], classes: int, store: Optional[PredictionStore],
                    on_images: Callable[[int], None], finishing: Callable[[], None] = lambda: None) -> Evaluation:
    """Evaluate `ids` on EvaluationWorkers in chunks and add up their Evaluations (confusion matrices, counts,
    failures, stage seconds), calling `on_images(count)` as each chunk returns. A chunk that failed as a whole
    counts its images as failed with the reason. Ctrl-C ends the run with KeyboardInterrupt once the chunks in
    flight are in."""
    import torch

    total = Evaluation(torch.zeros(classes, classes, dtype=torch.int64))

    def add(chunk: list[str], part: Evaluation) -> None:
        total.add(part)
        on_images(len(chunk))

    def fail(chunk: list[str], reason: str) -> None:
        total.failed.extend({"id": image_id, "reason": reason} for image_id in chunk)
        on_images(len(chunk))

    clock = time.perf_counter()
    chunks = chunked(ids, chunk_size(len(ids), len(actors)))
    if run_chunks(actors, chunks, lambda actor, chunk: actor.evaluate.remote(chunk, store), add,
                  fail, finishing):
        raise KeyboardInterrupt
    total.timings_s["total_s"] = time.perf_counter() - clock
    return total


class RayEvaluator(Evaluator):
    """Evaluation on EvaluationWorkers of a connected Ray cluster, started on entry and stopped on exit.

    Args:
        cluster: the connected cluster.
        options: the run's option values (`factory.build_segmenter`).
        protocol: the run's protocol.
        protocol_name: `open` or `given`.
        workers: threads reading samples ahead in each worker.
        starting: a context around starting the workers (a status line).
    """

    def __init__(self, cluster: RayCluster, options: dict, protocol: RunProtocol, protocol_name: str, workers: int,
                 starting: Callable[[str], ContextManager] = lambda message: contextlib.nullcontext()):
        super().__init__()
        self.cluster, self.protocol, self.starting = cluster, protocol, starting
        self.shape = worker_shape(cluster.options, cluster.resources, options.get("device") or "auto")
        options = {**options, **({"device": "cpu"} if self.shape.gpus == 0 else {})}
        self.job = EvaluationJob(options, protocol, protocol_name, workers)
        self.where = f" on {self.shape.workers} Ray workers"

    def __enter__(self) -> "RayEvaluator":
        import ray

        clock = time.perf_counter()
        with self.starting(f"starting {self.shape.workers} Ray workers"):
            self.actors = self.cluster.start(EvaluationWorker, self.shape, self.job)
            self.worker_settings = ray.get(self.actors[0].settings.remote())
        self.stages["workers_ready_s"] = time.perf_counter() - clock
        return self

    def __exit__(self, *exc_info) -> None:
        self.cluster.stop(self.actors)

    def settings(self) -> dict:
        return self.worker_settings

    def evaluate(self, ids: list[str], store: Optional[PredictionStore], on_images: Callable[[int], None]
                 ) -> Evaluation:
        return evaluate_on_ray(self.actors, ids, len(self.protocol.dataset.classes), store, on_images)
