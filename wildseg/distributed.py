"""Running `wildseg segment` and `wildseg eval` on a Ray cluster (`--ray`).

The driver (the command) lists the work as it does on one machine, skips what is done, and hands chunks of
images to Ray actors, one per GPU (or per `cpus_per_worker` CPUs), two chunks in flight per actor so that none
waits between chunks. Each actor loads the model once and runs the single-machine code on its chunks
(`batch.segment_and_write` for segment, `evaluation.evaluate` for eval), so the files it writes to the shared
`--out` are the ones a one-process run writes. Faults: an actor whose process dies is restarted by Ray and its
unfinished chunks are run again (`max_restarts`, `max_task_retries`); a chunk run again skips the images whose
outputs its first attempt wrote; the chunks of an actor that cannot be restarted go to the others. Ctrl-C
tells every actor to stop after the images it is on, and the driver counts what they finished.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
import os
import socket
import tempfile
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Optional

from .batch import ImageOutcome, LabelOptions, labels_source, segment_and_write
from .errors import WildsegError, first_line

LOCAL = "local"
"""`--ray` without an address: a Ray instance on this machine, started for the run and stopped after it."""
INSTALL_RAY = "pip install 'wildseg[ray]'"
CHUNKS_PER_WORKER = 4
"""The images are cut into about this many chunks per worker (fewer when that leaves chunks of one image), so
that a lost worker costs little work and the last chunks end close together."""
MAX_CHUNK = 32
IN_FLIGHT_PER_WORKER = 2
ACTOR_RESTARTS = 3
CONNECT_TIMEOUT_S = 5.0
STOP_GRACE_S = 120.0
"""After Ctrl-C, how long the driver waits for the workers to finish the images they are on."""


@dataclass(frozen=True)
class RayOptions:
    """Where to run and how to cut the cluster into workers: `address` (`local`, `auto` or the address of a
    running cluster), `workers` (default: as many as the resources allow), GPUs and CPUs per worker (default:
    one GPU each where the cluster has GPUs and the device allows, else one CPU each)."""

    address: str = LOCAL
    workers: Optional[int] = None
    gpus_per_worker: Optional[float] = None
    cpus_per_worker: Optional[float] = None


def check_ray_options(address: Optional[str], workers: Optional[int], gpus_per_worker: Optional[float],
                cpus_per_worker: Optional[float]) -> Optional[RayOptions]:
    """The checked --ray options (None without --ray); a one-line error when Ray is not installed, when a
    --ray-* option comes without --ray, or when --ray took an input path for its address."""
    given = {"--ray-workers": workers, "--ray-gpus-per-worker": gpus_per_worker,
             "--ray-cpus-per-worker": cpus_per_worker}
    if address is None:
        for option, value in given.items():
            if value is not None:
                raise WildsegError(f"{option} is an option of --ray: add --ray or leave it out")
        return None
    if address not in (LOCAL, "auto") and Path(address).exists():
        raise WildsegError(f"--ray took {address} for the cluster's address: put --ray after the inputs, or write "
                           "--ray local, --ray auto or --ray HOST:PORT")
    if importlib.util.find_spec("ray") is None:
        raise WildsegError(f"--ray needs Ray, which is not installed: {INSTALL_RAY}")
    return RayOptions(address, workers, gpus_per_worker, cpus_per_worker)


@dataclass(frozen=True)
class WorkerShape:
    """How many actors to start and what each one reserves."""

    workers: int
    gpus: float
    cpus: float


def worker_shape(options: RayOptions, resources: dict[str, float], device: str) -> WorkerShape:
    """Workers for the cluster's `resources` (Ray's cluster_resources): one per GPU unless --device cpu or the
    cluster has none, else one per CPU, as far as the options do not say otherwise."""
    gpus = options.gpus_per_worker
    if gpus is None:
        gpus = 1.0 if resources.get("GPU", 0) >= 1 and device != "cpu" else 0.0
    if gpus == 0 and device == "cuda":
        raise WildsegError("--device cuda needs GPUs on the Ray cluster: the cluster has none or "
                           "--ray-gpus-per-worker is 0")
    cpus = options.cpus_per_worker if options.cpus_per_worker is not None else 1.0
    if options.workers is not None:
        return WorkerShape(options.workers, gpus, cpus)
    fits = math.floor(resources.get("GPU", 0) / gpus) if gpus else math.floor(resources.get("CPU", 0) / cpus)
    if fits < 1:
        raise WildsegError(f"the Ray cluster ({_resources_text(resources)}) has no room for one worker of "
                           f"{gpus:g} GPU and {cpus:g} CPU: lower --ray-gpus-per-worker or --ray-cpus-per-worker")
    return WorkerShape(fits, gpus, cpus)


def _resources_text(resources: dict[str, float]) -> str:
    return f"{resources.get('CPU', 0):g} CPU, {resources.get('GPU', 0):g} GPU"


class RayCluster:
    """A connection to a Ray cluster for one run (a local instance is started and stopped with it), and actors
    on it: `with RayCluster(options) as cluster: actors = cluster.start(WorkerClass, shape, job)`."""

    def __init__(self, options: RayOptions):
        self.options = options

    def __enter__(self) -> "RayCluster":
        import ray

        address = None if self.options.address == LOCAL else self.options.address
        _check_reachable(address if address not in (None, "auto") else os.environ.get("RAY_ADDRESS"))
        try:
            with tempfile.TemporaryDirectory(prefix="wildseg-ray-") as neutral, _working_folder(neutral):
                ray.init(address=address, include_dashboard=False, log_to_driver=False,
                         logging_level=logging.ERROR, configure_logging=True)
        except (ConnectionError, RuntimeError, ValueError) as error:
            raise WildsegError(f"cannot connect to the Ray cluster at {self.options.address} ({_first_sentence(error)})"
                               ": start it with `ray start --head`, or use --ray local") from None
        self.resources = ray.cluster_resources()
        return self

    def __exit__(self, *exc_info) -> None:
        import ray

        ray.shutdown()

    def start(self, worker_class: type, shape: WorkerShape, job) -> list:
        """`shape.workers` actors of `worker_class(job)` once all have loaded the model (else a WildsegError with
        the first one's reason), restarted by Ray when their process dies, their unfinished calls then run
        again; three calls at a time (two chunks and `stop`)."""
        import ray
        from ray.exceptions import RayActorError

        actor = ray.remote(worker_class).options(
            num_gpus=shape.gpus, num_cpus=shape.cpus, max_restarts=ACTOR_RESTARTS, max_task_retries=-1,
            max_concurrency=IN_FLIGHT_PER_WORKER + 1)
        actors = [actor.remote(job) for _ in range(shape.workers)]
        try:
            readiness = [actor.ready.options(max_task_retries=0).remote() for actor in actors]
            problems = [problem for problem in ray.get(readiness) if problem]
        except RayActorError as error:
            problems = [f"a Ray worker could not start: {_last_line(error)}"]
        if problems:
            self.stop(actors)
            raise WildsegError(problems[0])
        return actors

    def stop(self, actors: list) -> None:
        """End the actors of a finished run (the next run of an `eval --compare` starts its own)."""
        import ray

        for actor in actors:
            ray.kill(actor)


def _check_reachable(address: Optional[str]) -> None:
    """A one-line error, at once, when nothing listens at a HOST:PORT address (Ray would wait for it forever);
    `ray://` client addresses and none are left to Ray."""
    if not address or "://" in address or ":" not in address:
        return
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except (OSError, ValueError) as error:
        raise WildsegError(f"cannot connect to the Ray cluster at {address} ({first_line(error)}): start it with "
                           "`ray start --head`, check the address, or use --ray local") from None


@contextlib.contextmanager
def _working_folder(folder: str):
    """Run in `folder`, then go back. Ray adds the driver's working folder to every worker's import path at
    `ray.init`; an empty one keeps a folder named like a package there (a clone of wildseg, say) from shadowing
    the installed package in the workers, which enter the driver's folder only once they are running."""
    previous = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(previous)


def _first_sentence(error: BaseException) -> str:
    """The first sentence of an error's text (Ray's go on with advice about flags of its own)."""
    return first_line(error).split(". ")[0].rstrip(".")


def _last_line(error: BaseException) -> str:
    """The last non-empty line of an error's text: for an error raised in a Ray worker, the original error."""
    return next((line.strip() for line in reversed(str(error).splitlines()) if line.strip()), repr(error))


def chunked(items: list, workers: int) -> list[list]:
    """`items` in order, cut into about CHUNKS_PER_WORKER chunks per worker of at most MAX_CHUNK items."""
    size = max(1, min(MAX_CHUNK, math.ceil(len(items) / (workers * CHUNKS_PER_WORKER))))
    return [items[start : start + size] for start in range(0, len(items), size)]


def run_chunks(actors: list, chunks: list, call: Callable[[Any, Any], Any], on_result: Callable[[Any, Any], None],
               on_error: Callable[[Any, str], None], finishing: Callable[[], None] = lambda: None,
               deferred: Callable[[], ContextManager] = contextlib.nullcontext) -> bool:
    """Run `call(actor, chunk)` (a Ray actor method's `remote`) for every chunk, IN_FLIGHT_PER_WORKER at a time
    per actor, reporting `on_result(chunk, result)` as each returns, or `on_error(chunk, reason)` where the
    worker raised, inside `deferred()` (where a stop signal waits, so that a chunk is counted whole). The chunks
    of an actor that is gone for good go to the others. Ctrl-C (KeyboardInterrupt) stops handing out chunks and
    asks each actor to `stop`; then `finishing()` is called and the chunks in flight are collected for up to
    STOP_GRACE_S. Returns whether it was interrupted."""
    import ray
    from ray.exceptions import RayActorError, RayError

    waiting, running = deque(chunks), {}
    load = {actor: 0 for actor in actors}

    def hand_out() -> None:
        for actor in list(load):
            while load.get(actor, IN_FLIGHT_PER_WORKER) < IN_FLIGHT_PER_WORKER and waiting:
                chunk = waiting.popleft()
                running[call(actor, chunk)] = (actor, chunk)
                load[actor] += 1

    def collect(timeout: Optional[float], guard: Callable[[], ContextManager]) -> None:
        ready, _ = ray.wait(list(running), num_returns=1, timeout=timeout)
        for reference in ready:
            with guard():
                take(reference)

    def take(reference) -> None:
        actor, chunk = running.pop(reference)
        if actor in load:
            load[actor] -= 1
        try:
            result = ray.get(reference)
        except RayActorError:
            load.pop(actor, None)
            waiting.appendleft(chunk)
            if not load:
                raise WildsegError("every Ray worker died (see the cluster's logs, e.g. /tmp/ray/session_latest/"
                                   "logs): check that each node can load the model and read the inputs") from None
        except RayError as error:
            on_error(chunk, f"Ray worker: {first_line(error.__cause__ or error)}")
        else:
            on_result(chunk, result)

    try:
        hand_out()
        while running:
            collect(None, deferred)
            hand_out()
        return False
    except KeyboardInterrupt:
        waiting.clear()
        for actor in load:
            actor.stop.remote()
        finishing()
        deadline = time.monotonic() + STOP_GRACE_S
        while running and time.monotonic() < deadline:
            collect(max(0.0, deadline - time.monotonic()), contextlib.nullcontext)  # signals now only noted
        return True


@dataclass(frozen=True)
class SegmentJob:
    """What every worker of a `wildseg segment --ray` run needs: the Segmenter's options, the label options, the
    extras to write, its threads, whether done images are segmented again, and when the run started (an image
    whose record was written since then was done by an earlier attempt of its chunk), and the driver's working
    folder."""

    segmenter_options: dict
    labels: LabelOptions
    extras: dict[str, bool]
    threads: int
    refine_workers: Optional[int]
    overwrite: bool
    started: float = field(default_factory=time.time)
    folder: str = field(default_factory=os.getcwd)


class _ModelWorker(ABC):
    """What the Ray actors share: the driver's working folder where the node has it (so that relative paths
    mean what they mean to the driver), a Segmenter loaded once (a WildsegError on the way is kept for `ready`
    to report, so that the driver prints it in one line), one chunk at a time, and `stop`."""

    def __init__(self, job):
        self.job, self.problem = job, None
        self.turn, self.stopping = threading.Lock(), threading.Event()
        if os.path.isdir(job.folder):
            os.chdir(job.folder)
        try:
            self._load(job)
        except WildsegError as error:
            self.problem = str(error)

    @abstractmethod
    def _load(self, job) -> None:
        """Load the model and what the job's chunks need."""

    def ready(self) -> Optional[str]:
        """None once the model is loaded, else why it could not be."""
        return self.problem

    def stop(self) -> None:
        """Start no new image or chunk; those under way finish."""
        self.stopping.set()


class SegmentWorker(_ModelWorker):
    """A Ray actor that keeps one Segmenter and segments chunks of images into their output paths."""

    def _load(self, job: SegmentJob) -> None:
        from rich.console import Console

        from .options import build_segmenter

        self.segmenter = build_segmenter(Console(quiet=True), protocol={}, **job.segmenter_options)
        source, known_labels = labels_source(job.labels)
        self.labels_of = source(self.segmenter)
        self.segmenter.prepare_labels(known_labels)

    def segment(self, chunk: dict[Path, dict[str, Path]]) -> list[ImageOutcome]:
        """Segment the chunk's images (image -> output paths), one chunk at a time; the outcomes of those it
        finished, counting as done those written by an earlier attempt of this chunk, whose temporary files
        (of a worker killed while writing) are removed first."""
        from .outputs import remove_stale_temporaries

        with self.turn:
            remove_stale_temporaries([path for paths in chunk.values() for path in paths.values()])
            outcomes = [ImageOutcome(image, classes=classes) for image, classes in
                        ((image, self._written_by_this_run(paths)) for image, paths in chunk.items())
                        if classes is not None]
            finished = {outcome.image for outcome in outcomes}
            todo = [image for image in chunk if image not in finished]
            images = (image for image in todo if not self.stopping.is_set())
            segment_and_write(self.segmenter, images, self.labels_of, chunk, self.job.extras, outcomes.append,
                              self.job.threads, self.job.refine_workers)
            return outcomes

    def _written_by_this_run(self, paths: dict[str, Path]) -> Optional[list[dict]]:
        """The class rows of an image whose outputs this run already wrote, else None."""
        import json

        from .outputs import is_done

        if not is_done(paths) or (self.job.overwrite and paths["record"].stat().st_mtime < self.job.started):
            return None
        return json.loads(paths["record"].read_text()).get("classes")


@dataclass(frozen=True)
class EvaluationJob:
    """What every worker of a `wildseg eval --ray` run needs: the Segmenter's options over the protocol's
    defaults, the data set (its class lists as the run uses them), the protocol, SCLIP's area threshold, and
    the threads that read samples ahead, and the driver's working folder."""

    segmenter_defaults: dict
    segmenter_options: dict
    dataset: Any
    protocol: str
    area_threshold: Optional[float]
    threads: int
    folder: str = field(default_factory=os.getcwd)


class EvaluationWorker(_ModelWorker):
    """A Ray actor that keeps one Segmenter and evaluates chunks of a data set's images."""

    def _load(self, job: EvaluationJob) -> None:
        from rich.console import Console

        from .options import build_segmenter

        self.segmenter = build_segmenter(Console(quiet=True), protocol=job.segmenter_defaults,
                                         **job.segmenter_options)
        self.segmenter.prepare_labels([prompt for index in job.dataset.scored_classes
                                       for prompt in job.dataset.classes[index].prompts])

    def settings(self) -> dict:
        return self.segmenter.settings()

    def evaluate(self, ids: list[str], store):
        """`evaluation.evaluate` of the chunk's images (none once told to stop), one chunk at a time."""
        from .evaluation import evaluate

        with self.turn:
            return evaluate(self.segmenter, self.job.dataset, [] if self.stopping.is_set() else ids,
                            self.job.protocol, store, area_threshold=self.job.area_threshold,
                            workers=self.job.threads)


def worker_settings(actor) -> dict:
    """The Segmenter settings of a started EvaluationWorker (for the report and the saved predictions)."""
    import ray

    return ray.get(actor.settings.remote())


def evaluate_on_ray(actors: list, ids: list[str], classes: int, store, on_images: Callable[[int], None],
                    finishing: Callable[[], None] = lambda: None):
    """Evaluate `ids` on EvaluationWorkers in chunks and add up their Evaluations (confusion matrices, counts,
    failures, stage seconds), calling `on_images(count)` as each chunk returns. A chunk that failed as a whole
    counts its images as failed with the reason. Ctrl-C ends the run with KeyboardInterrupt once the chunks in
    flight are in."""
    import torch

    from .evaluation import Evaluation

    total = Evaluation(torch.zeros(classes, classes, dtype=torch.int64))

    def add(chunk: list[str], part: Evaluation) -> None:
        total.add(part)
        on_images(len(chunk))

    def fail(chunk: list[str], reason: str) -> None:
        total.failed.extend({"id": image_id, "reason": reason} for image_id in chunk)
        on_images(len(chunk))

    clock = time.perf_counter()
    if run_chunks(actors, chunked(ids, len(actors)), lambda actor, chunk: actor.evaluate.remote(chunk, store), add,
                  fail, finishing):
        raise KeyboardInterrupt
    total.timings_s["total_s"] = time.perf_counter() - clock
    return total
