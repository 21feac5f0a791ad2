"""The Ray actors of `wildseg segment --ray`, and what the actors of both commands share (`ModelWorker`). The
driver imports this module, which imports no model library: a driver planning a million images stays small."""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..batch import ImageOutcome, Labeling, segment_and_write
from ..errors import WildsegError


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
