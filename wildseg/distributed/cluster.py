"""Ray clusters for `--ray`: the options, how many workers fit and what each reserves, the connection, and the
chunks handed to the workers with their faults and Ctrl-C (`run_chunks`). Ray is imported only when used, so that
the command line checks these options at once."""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import logging
import math
import os
import socket
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterable, Iterator, Optional

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
RESTART_WAIT_S = 60.0
"""How long the driver waits for Ray to restart a worker whose process died before it hands the worker's chunks
to the others for good (the restart of a worker on a lost node waits for room that may never come)."""
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

    @property
    def reached_address(self) -> Optional[str]:
        """The address Ray will connect to: the one given, or for `local` and `auto` the RAY_ADDRESS variable's."""
        return self.address if self.address not in (LOCAL, "auto") else os.environ.get("RAY_ADDRESS")


def check_ray_options(address: Optional[str], workers: Optional[int], gpus_per_worker: Optional[float],
                cpus_per_worker: Optional[float]) -> Optional[RayOptions]:
    """The checked --ray options (None without --ray); a one-line error when Ray is not installed, when a
    --ray-* option comes without --ray, when --ray took an input path for its address, or when nothing listens at
    the address (before the inputs are listed, which for millions of them takes seconds)."""
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
    options = RayOptions(address, workers, gpus_per_worker, cpus_per_worker)
    _check_reachable(options.reached_address)
    return options


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
        _check_reachable(self.options.reached_address)
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
        the first one's reason), restarted by Ray when their process dies (up to ACTOR_RESTARTS times; their
        unfinished calls fail, and `run_chunks` runs them again); three calls at a time (two chunks and `stop`)."""
        import ray
        from ray.exceptions import RayActorError

        actor = ray.remote(worker_class).options(
            num_gpus=shape.gpus, num_cpus=shape.cpus, max_restarts=ACTOR_RESTARTS, max_task_retries=0,
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


def chunk_size(count: int, workers: int) -> int:
    """How many of `count` items go in one chunk: about CHUNKS_PER_WORKER chunks per worker, at most MAX_CHUNK
    items each."""
    return max(1, min(MAX_CHUNK, math.ceil(count / (workers * CHUNKS_PER_WORKER))))


def chunked(items: Iterable, size: int) -> Iterator[list]:
    """`items` in order, in lists of `size` (the last shorter), each taken from `items` only when it is asked for."""
    items = iter(items)
    while chunk := list(itertools.islice(items, size)):
        yield chunk


def run_chunks(actors: list, chunks: Iterable, call: Callable[[Any, Any], Any], on_result: Callable[[Any, Any], None],
               on_error: Callable[[Any, str], None], finishing: Callable[[], None] = lambda: None,
               deferred: Callable[[], ContextManager] = contextlib.nullcontext) -> bool:
    """Run `call(actor, chunk)` (a Ray actor method's `remote`) for every chunk, IN_FLIGHT_PER_WORKER at a time
    per actor (each chunk taken from `chunks` when an actor is free for it, so that a stream of them is never held
    whole), reporting `on_result(chunk, result)` as each returns, or `on_error(chunk, reason)` where the
    worker raised, inside `deferred()` (where a stop signal waits, so that a chunk is counted whole); see
    `ChunkRun` for lost workers and nodes. Ctrl-C (KeyboardInterrupt), or a WildsegError from `chunks` (a listing
    that found a usage error while its images were handed out), stops handing out chunks and asks each actor to
    `stop`; then `finishing()` is called and the chunks in flight are collected for up to STOP_GRACE_S, so that no
    output is left half-written. Returns whether it was interrupted; raises the WildsegError."""
    run = ChunkRun(actors, chunks, call, on_result, on_error)
    try:
        run.hand_out()
        while run.running or (run.has_waiting() and run.restarting):
            run.collect(None, deferred)
            run.hand_out()
        return False
    except (KeyboardInterrupt, WildsegError) as stopped:
        run.stop()
        finishing()
        deadline = time.monotonic() + STOP_GRACE_S
        while run.running and time.monotonic() < deadline:
            run.collect(max(0.0, deadline - time.monotonic()), contextlib.nullcontext)  # signals now only noted
        if isinstance(stopped, WildsegError):
            raise
        return True


class ChunkRun:
    """The chunks of a `run_chunks` call: those put back, those not handed out yet (a stream), those in flight on
    which actor, and the actors that take chunks (with how many each holds) or are being restarted.

    A chunk whose actor died is put back first in line. The actor's other chunks in flight died with it, and the
    actor takes none until Ray has restarted it: a `ready` call with a deadline of RESTART_WAIT_S. Where the
    restart does not come in time (its node is gone and no other has room), the actor is killed for good, as it
    is where its restarts are used up or its model does not load. A chunk run again skips the images its first
    attempt wrote (`SegmentWorker.segment`). When no actor is left, a one-line error."""

    def __init__(self, actors: list, chunks: Iterable, call: Callable[[Any, Any], Any],
                 on_result: Callable[[Any, Any], None], on_error: Callable[[Any, str], None]):
        self.call, self.on_result, self.on_error = call, on_result, on_error
        self.waiting, self.fresh, self.running, self.restarting = deque(), iter(chunks), {}, {}
        self.load = {actor: 0 for actor in actors}
        self.stopping = False

    def hand_out(self) -> None:
        """Give each actor that takes chunks the next waiting ones, up to IN_FLIGHT_PER_WORKER in flight."""
        for actor in self.load:
            while self.load[actor] < IN_FLIGHT_PER_WORKER and self.has_waiting():
                chunk = self.waiting.popleft()
                self.running[self.call(actor, chunk)] = (actor, chunk)
                self.load[actor] += 1

    def has_waiting(self) -> bool:
        """Whether a chunk waits: one put back, or the next of the stream (then taken from it and kept first)."""
        if not self.waiting and not self.stopping:
            chunk = next(self.fresh, None)
            if chunk is not None:
                self.waiting.append(chunk)
        return bool(self.waiting)

    def collect(self, timeout: Optional[float], guard: Callable[[], ContextManager]) -> None:
        """Wait up to `timeout` (None: without end) for a chunk or a restarted actor, and take what came, each
        inside `guard()`; then give up the actors whose restart is overdue."""
        due = min((deadline for _, deadline in self.restarting.values()), default=None)
        if due is not None:
            left = max(0.0, due - time.monotonic())
            timeout = left if timeout is None else min(timeout, left)
        import ray

        ready, _ = ray.wait([*self.running, *self.restarting], num_returns=1, timeout=timeout)
        for reference in ready:
            with guard():
                if reference in self.running:
                    self.take(reference)
                elif reference in self.restarting:
                    self.restarted(reference)
        now = time.monotonic()
        for reference, (actor, deadline) in list(self.restarting.items()):
            if deadline <= now:
                del self.restarting[reference]
                self.give_up(actor)

    def take(self, reference) -> None:
        """Report a returned chunk, or put it back when its actor died (not after Ctrl-C, when none is run again)."""
        import ray
        from ray.exceptions import RayActorError, RayError

        actor, chunk = self.running.pop(reference)
        try:
            result = ray.get(reference)
        except RayActorError:
            if not self.stopping:
                self.waiting.appendleft(chunk)
                self.lost(actor)
        except RayError as error:
            self.load[actor] -= 1
            self.on_error(chunk, f"Ray worker: {first_line(error.__cause__ or error)}")
        else:
            self.load[actor] -= 1
            self.on_result(chunk, result)

    def lost(self, actor) -> None:
        """An actor's process died: its chunks in flight go back in line and its restart is awaited."""
        for reference, (owner, chunk) in list(self.running.items()):
            if owner is actor:
                del self.running[reference]
                self.waiting.appendleft(chunk)
        del self.load[actor]
        probe = actor.ready.options(max_task_retries=-1).remote()
        self.restarting[probe] = (actor, time.monotonic() + RESTART_WAIT_S)

    def restarted(self, reference) -> None:
        """A restarting actor answered: it takes chunks again once its model loaded, else it is given up."""
        import ray
        from ray.exceptions import RayError

        actor, _ = self.restarting.pop(reference)
        try:
            loaded = ray.get(reference) is None
        except RayError:  # its restarts are used up
            loaded = False
        if loaded:
            self.load[actor] = 0
        else:
            self.give_up(actor)

    def give_up(self, actor) -> None:
        """Kill an actor for good; a one-line error when it was the last."""
        import ray

        ray.kill(actor, no_restart=True)
        if not self.load and not self.restarting and not self.stopping:
            raise WildsegError("every Ray worker died (see the cluster's logs, e.g. /tmp/ray/session_latest/logs): "
                               "check that each node can load the model and read the inputs")

    def stop(self) -> None:
        """After Ctrl-C: no chunk is handed out or put back, each actor is told to `stop`, and restarts are not
        awaited."""
        self.stopping = True
        self.waiting.clear()
        self.restarting.clear()
        for actor in self.load:
            actor.stop.remote()
