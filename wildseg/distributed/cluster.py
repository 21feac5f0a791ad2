"""Ray clusters for `--ray`: the options, how many workers fit and what each reserves, the connection, and the
chunks handed to the workers with their faults and Ctrl-C (`run_chunks`). Ray is imported only when used, so that
the command line checks these options at once."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
import os
import socket
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Optional

from ..errors import WildsegError, first_line, setting

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
    given = {"ray_workers": workers, "ray_gpus_per_worker": gpus_per_worker, "ray_cpus_per_worker": cpus_per_worker}
    if address is None:
        for option, value in given.items():
            if value is not None:
                raise WildsegError(f"{setting(option)} is an option of {setting('ray')}: add {setting('ray')} or "
                                   "leave it out")
        return None
    if address not in (LOCAL, "auto") and Path(address).exists():
        raise WildsegError(f"{setting('ray')} took {address} for the cluster's address: put {setting('ray')} after the "
                           f"inputs, or write {setting('ray')} local, {setting('ray')} auto or {setting('ray')} "
                           "HOST:PORT")
    if importlib.util.find_spec("ray") is None:
        raise WildsegError(f"{setting('ray')} needs Ray, which is not installed: {INSTALL_RAY}")
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
        raise WildsegError(f"{setting('device')} cuda needs GPUs on the Ray cluster: the cluster has none or "
                           f"{setting('ray_gpus_per_worker')} is 0")
    cpus = options.cpus_per_worker if options.cpus_per_worker is not None else 1.0
    if options.workers is not None:
        return WorkerShape(options.workers, gpus, cpus)
    fits = math.floor(resources.get("GPU", 0) / gpus) if gpus else math.floor(resources.get("CPU", 0) / cpus)
    if fits < 1:
        raise WildsegError(f"the Ray cluster ({_resources_text(resources)}) has no room for one worker of "
                           f"{gpus:g} GPU and {cpus:g} CPU: lower {setting('ray_gpus_per_worker')} or "
                           f"{setting('ray_cpus_per_worker')}")
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
            with tempfile.TemporaryDirectory(prefix="wildseg-ray-") as empty:
                ray.init(address=address, include_dashboard=False, log_to_driver=False,
                         logging_level=logging.ERROR, configure_logging=True, runtime_env={"working_dir": empty})
        except (ConnectionError, RuntimeError, ValueError) as error:
            raise WildsegError(f"cannot connect to the Ray cluster at {self.options.address} ({_first_sentence(error)})"
                               f": start it with `ray start --head`, or use {setting('ray')} local") from None
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
                           f"`ray start --head`, check the address, or use {setting('ray')} local") from None


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
