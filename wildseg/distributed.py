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

import importlib.util
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

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
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR,
                     configure_logging=True)
        except (ConnectionError, RuntimeError, ValueError) as error:
            raise WildsegError(f"cannot connect to the Ray cluster at {self.options.address}: {first_line(error)}; "
                               "start it with `ray start --head`, or use --ray local") from None
        self.resources = ray.cluster_resources()
        return self

    def __exit__(self, *exc_info) -> None:
        import ray

        ray.shutdown()

    def start(self, worker_class: type, shape: WorkerShape, *arguments) -> list:
        """`shape.workers` actors of `worker_class(*arguments)`, restarted by Ray when their process dies, their
        unfinished calls then run again; three calls at a time (two chunks and `stop`)."""
        import ray

        actor = ray.remote(worker_class).options(
            num_gpus=shape.gpus, num_cpus=shape.cpus, max_restarts=ACTOR_RESTARTS, max_task_retries=-1,
            max_concurrency=IN_FLIGHT_PER_WORKER + 1)
        return [actor.remote(*arguments) for _ in range(shape.workers)]


def chunked(items: list, workers: int) -> list[list]:
    """`items` in order, cut into about CHUNKS_PER_WORKER chunks per worker of at most MAX_CHUNK items."""
    size = max(1, min(MAX_CHUNK, math.ceil(len(items) / (workers * CHUNKS_PER_WORKER))))
    return [items[start : start + size] for start in range(0, len(items), size)]


def run_chunks(actors: list, chunks: list, call: Callable[[Any, Any], Any], on_result: Callable[[Any, Any], None],
               on_error: Callable[[Any, str], None], finishing: Callable[[], None] = lambda: None) -> bool:
    """Run `call(actor, chunk)` (a Ray actor method's `remote`) for every chunk, IN_FLIGHT_PER_WORKER at a time
    per actor, reporting `on_result(chunk, result)` as each returns, or `on_error(chunk, reason)` where the
    worker raised. The chunks of an actor that is gone for good go to the others. Ctrl-C (KeyboardInterrupt)
    stops handing out chunks and asks each actor to `stop`; then `finishing()` is called and the chunks in
    flight are collected for up to STOP_GRACE_S. Returns whether it was interrupted."""
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

    def collect(timeout: Optional[float]) -> None:
        ready, _ = ray.wait(list(running), num_returns=1, timeout=timeout)
        for reference in ready:
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
            collect(timeout=None)
            hand_out()
        return False
    except KeyboardInterrupt:
        waiting.clear()
        for actor in load:
            actor.stop.remote()
        finishing()
        deadline = time.monotonic() + STOP_GRACE_S
        while running and time.monotonic() < deadline:
            collect(timeout=max(0.0, deadline - time.monotonic()))
        return True


@dataclass(frozen=True)
class SegmentJob:
    """What every worker of a `wildseg segment --ray` run needs: the Segmenter's options, the label options, the
    extras to write, its threads, whether done images are segmented again, and when the run started (an image
    whose record was written since then was done by an earlier attempt of its chunk)."""

    segmenter_options: dict
    labels: LabelOptions
    extras: dict[str, bool]
    threads: int
    refine_workers: Optional[int]
    overwrite: bool
    started: float = field(default_factory=time.time)


class SegmentWorker:
    """A Ray actor that keeps one Segmenter and segments chunks of images into their output paths."""

    def __init__(self, job: SegmentJob):
        from rich.console import Console

        from .options import build_segmenter

        self.job = job
        self.segmenter = build_segmenter(Console(quiet=True), protocol={}, **job.segmenter_options)
        source, known_labels = labels_source(job.labels)
        self.labels_of = source(self.segmenter)
        self.segmenter.prepare_labels(known_labels)
        self.turn, self.stopping = threading.Lock(), threading.Event()

    def segment(self, chunk: dict[Path, dict[str, Path]]) -> list[ImageOutcome]:
        """Segment the chunk's images (image -> output paths), one chunk at a time; the outcomes of those it
        finished, counting as done those written by an earlier attempt of this chunk."""
        with self.turn:
            outcomes = [ImageOutcome(image, classes=classes) for image, classes in
                        ((image, self._written_by_this_run(paths)) for image, paths in chunk.items())
                        if classes is not None]
            finished = {outcome.image for outcome in outcomes}
            todo = [image for image in chunk if image not in finished]
            images = (image for image in todo if not self.stopping.is_set())
            segment_and_write(self.segmenter, images, self.labels_of, chunk, self.job.extras, outcomes.append,
                              self.job.threads, self.job.refine_workers)
            return outcomes

    def stop(self) -> None:
        """Start no new image; those under way finish."""
        self.stopping.set()

    def _written_by_this_run(self, paths: dict[str, Path]) -> Optional[list[dict]]:
        """The class rows of an image whose outputs this run already wrote, else None."""
        import json

        from .outputs import is_done

        if not is_done(paths) or (self.job.overwrite and paths["record"].stat().st_mtime < self.job.started):
            return None
        return json.loads(paths["record"].read_text()).get("classes")
