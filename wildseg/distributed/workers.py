"""The Ray actors of `wildseg segment --ray` and `wildseg eval --ray`, and the evaluator that drives the latter."""

from __future__ import annotations

import contextlib
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ContextManager, Optional

from ..batch import ImageOutcome, Labeling, segment_and_write
from ..errors import WildsegError
from ..evaluation import Evaluation, Evaluator, PredictionStore, RunProtocol, evaluate
from ..evaluation.runner import scored_prompts
from .cluster import RayCluster, chunk_size, chunked, run_chunks, worker_shape


@dataclass(frozen=True)
class SegmentJob:
    """What every worker of a `wildseg segment --ray` run needs: the Segmenter's options (paths absolute), how the
    images get their labels, the extras to write, the run's request (`provenance.run_request`), its threads,
    whether done images are segmented again, when the run started (an image whose record was written since then
    was done by an earlier attempt of its chunk), and the driver's working folder, which the images' and outputs'
    relative paths start from."""

    segmenter_options: dict
    labels: Labeling
    extras: dict[str, bool]
    request: dict
    threads: int
    refine_workers: Optional[int]
    overwrite: bool
    started: float = field(default_factory=time.time)
    folder: Path = field(default_factory=Path.cwd)


class ModelWorker(ABC):
    """What the Ray actors share: a Segmenter loaded once (a WildsegError on the way is kept for `ready` to report,
    so that the driver prints it in one line), one chunk at a time, and `stop`."""

    def __init__(self, job):
        self.job, self.problem = job, None
        self.turn, self.stopping = threading.Lock(), threading.Event()
        try:
            self.load(job)
        except WildsegError as error:
            self.problem = error.args[0]

    @abstractmethod
    def load(self, job) -> None:
        """Load the model and what the job's chunks need."""

    def ready(self) -> Optional[str]:
        """None once the model is loaded, else why it could not be (its settings marked, for the driver to word)."""
        return self.problem

    def stop(self) -> None:
        """Start no new image or chunk; those under way finish."""
        self.stopping.set()


class SegmentWorker(ModelWorker):
    """A Ray actor that keeps one Segmenter and segments chunks of images into their output paths."""

    def load(self, job: SegmentJob) -> None:
        from ..factory import build_segmenter

        self.segmenter = build_segmenter(job.segmenter_options)
        self.segmenter.prepare_labels(job.labels.known)

    def segment(self, chunk: dict[Path, dict[str, Path]]) -> list[ImageOutcome]:
        """Segment the chunk's images (image -> output paths), one chunk at a time; the outcomes of those it
        finished, counting as done those written by an earlier attempt of this chunk, whose temporary files (of a
        worker killed while writing) are removed first."""
        from ..outputs import remove_stale_temporaries

        folder = self.job.folder
        with self.turn:
            remove_stale_temporaries([folder / path for paths in chunk.values() for path in paths.values()])
            outcomes = [ImageOutcome(image, classes=classes) for image, classes in
                        ((image, self.written_by_this_run(paths)) for image, paths in chunk.items())
                        if classes is not None]
            finished = {outcome.image for outcome in outcomes}
            todo = [image for image in chunk if image not in finished]
            jobs = ((image, chunk[image]) for image in todo if not self.stopping.is_set())
            segment_and_write(self.segmenter, jobs, self.job.labels, self.job.extras, self.job.request,
                              outcomes.append,
                              self.job.threads, self.job.refine_workers, folder=folder)
            return outcomes

    def written_by_this_run(self, paths: dict[str, Path]) -> Optional[list[dict]]:
        """The class rows of an image whose outputs this run already wrote, else None."""
        import json

        from ..outputs import is_done

        paths = {kind: self.job.folder / path for kind, path in paths.items()}
        if not is_done(paths) or (self.job.overwrite and paths["record"].stat().st_mtime < self.job.started):
            return None
        return json.loads(paths["record"].read_text()).get("classes")


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
