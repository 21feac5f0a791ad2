"""Seconds spent per pipeline stage, for benchmarks: off (free) unless a StageTimes is attached to a Segmenter.

On CUDA, kernels run asynchronously; a stage is timed between device synchronisations so that its seconds
are its own. Synchronising costs a little overlap, so it only happens while timing is on.
"""

import contextlib
import time
from collections import defaultdict

import torch


class StageTimes:
    """Accumulates wall seconds per named stage: `with times.stage("forward"): ...`."""

    def __init__(self, device: torch.device):
        self.seconds: dict[str, float] = defaultdict(float)
        self.synchronize = device.type == "cuda"

    @contextlib.contextmanager
    def stage(self, name: str):
        if self.synchronize:
            torch.cuda.synchronize()
        started = time.perf_counter()
        try:
            yield
        finally:
            if self.synchronize:
                torch.cuda.synchronize()
            self.seconds[name] += time.perf_counter() - started


class NoStageTimes:
    """Timing switched off: stages run as they are."""

    @contextlib.contextmanager
    def stage(self, name: str):
        yield
