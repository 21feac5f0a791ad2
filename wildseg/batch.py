"""Segmenting a batch of image files into an output folder: the labels of each image, `segment_many` with the
outputs written behind it, and the run's summary. The same code runs in one process (`wildseg segment`) and in
each Ray worker (`distributed`), so that both write the same files.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Callable, ContextManager, Iterable, Optional

from .choices import DEFAULT_VOCABULARY
from .errors import WildsegError, first_line
from .labels import clean_labels

if TYPE_CHECKING:
    from .autolabels import AutoLabelRule
    from .segmenter import BatchItem, Segmenter

AUTO = "auto"


@dataclass(frozen=True)
class ImageOutcome:
    """What became of one image: `error` None when its outputs were written (then `classes` holds its
    `SegmentationResult.summary()` rows), else the one-line reason it failed."""

    image: Path
    error: Optional[str] = None
    classes: Optional[list[dict]] = None


@dataclass(frozen=True)
class LabelOptions:
    """The label options of `wildseg segment`, as given: `--labels` (names or auto), `--labels-file`, and the
    automatic labels' `--vocab`, `--auto-min-area`, `--auto-min-score`."""

    labels: Optional[str] = None
    labels_file: Optional[Path] = None
    vocab: Optional[str] = None
    min_area: Optional[float] = None
    min_score: Optional[float] = None


def labels_source(options: LabelOptions):
    """Checks the label options; returns a function from the segmenter to the labels of an image (the same
    --labels for all, its entry in --labels-file, or (--labels auto) those found in the vocabulary), and every
    label the run may embed."""
    from .autolabels import AutoLabelRule, load_vocabulary
    from .inputs import read_labels_file

    labels, labels_file = options.labels, options.labels_file
    if (labels is None) == (labels_file is None):
        raise WildsegError('give --labels "a,b" (the same for every image) or --labels-file FILE, one of the two')
    for option, value in (("--vocab", options.vocab), ("--auto-min-area", options.min_area),
                          ("--auto-min-score", options.min_score)):
        if value is not None and labels != AUTO:
            raise WildsegError(f"{option} is for --labels {AUTO}: leave it out, or ask for automatic labels")
    if labels == AUTO:
        vocabulary_name = options.vocab or DEFAULT_VOCABULARY
        rule = AutoLabelRule(min_score=options.min_score,
                             **({} if options.min_area is None else {"min_area": options.min_area}))
        vocabulary = load_vocabulary(vocabulary_name)
        prompts = [prompt for entry in vocabulary for prompt in entry.prompts]
        return partial(AutoLabeler, vocabulary_name, vocabulary, rule), prompts
    if labels is not None:
        names = clean_labels(labels)
        return partial(_same_labels, names), names
    table = read_labels_file(labels_file)
    return partial(_listed_labels, table, labels_file), [label for names in table.values() for label in names]


def _same_labels(names: list[str], segmenter: Segmenter) -> Callable[[Path], list[str]]:
    return lambda path: names


def _listed_labels(table: dict[Path, list[str]], labels_file: Path, segmenter: Segmenter
                   ) -> Callable[[Path], list[str]]:
    def labels_of(path: Path) -> list[str]:
        if path.absolute() not in table:
            raise WildsegError(f"no labels for this image in {labels_file}")
        return table[path.absolute()]

    return labels_of


class AutoLabeler:
    """The labels of an image found in a vocabulary; keeps each image's candidates for its JSON record."""

    def __init__(self, vocabulary_name: str, vocabulary, rule: AutoLabelRule, segmenter: Segmenter):
        from .autolabels import rule_for

        self.vocabulary_name, self.vocabulary, self.segmenter = vocabulary_name, vocabulary, segmenter
        self.rule = rule_for(rule, segmenter.method)
        self.records: dict[Path, dict] = {}

    def __call__(self, path: Path) -> list[str]:
        from .autolabels import auto_label_record, find_labels, found_labels

        candidates = find_labels(self.segmenter, path, self.vocabulary, self.rule)
        self.records[path] = auto_label_record(self.vocabulary_name, self.rule, candidates)
        return found_labels(candidates, self.rule)


def save_outputs(item: BatchItem, paths: dict[str, Path], segmenter: Segmenter, auto_record: Optional[dict],
                 extras: dict[str, bool]) -> list[dict]:
    """Write one image's outputs (JSON last) with the `extras` asked for and its automatic-label record if any;
    returns the record's class rows. A write that fails raises a WildsegError naming the folder."""
    from .outputs import write_outputs

    result = item.result
    record = {
        "image": str(item.source),
        "image_size": {"width": int(result.mask.shape[1]), "height": int(result.mask.shape[0])},
        "labels": result.labels,
        "classes": result.summary(),
        "settings": segmenter.settings(),
        "timings_s": result.timings,
        **({"auto_labels": auto_record} if auto_record is not None else {}),
    }
    try:
        write_outputs(paths, *result.preview(), result.mask, result.labels, record, scores=result.scores, **extras)
    except OSError as error:
        raise WildsegError(f"cannot write the outputs into {paths['record'].parent}: {first_line(error)}") from error
    return record["classes"]


def segment_and_write(
    segmenter: Segmenter,
    images: Iterable[Path],
    labels_of: Callable[[Path], list[str]],
    jobs: dict[Path, dict[str, Path]],
    extras: dict[str, bool],
    on_outcome: Callable[[ImageOutcome], None],
    workers: int = 2,
    refine_workers: Optional[int] = None,
    deferred: Callable[[], ContextManager] = contextlib.nullcontext,
    finishing: Callable[[], None] = lambda: None,
) -> bool:
    """Segment `images` (`Segmenter.segment_many`) and write each one's outputs to its `jobs` paths in 2 x
    `workers` writer threads behind the model, with the `extras` asked for (scores, heat maps), reporting every
    image's `ImageOutcome` once its files are written or it failed. The bookkeeping of an image runs inside
    `deferred()` (where a stop signal waits). A KeyboardInterrupt ends the model's work; then `finishing()` is
    called and the writes in flight are finished and reported. Returns whether it was interrupted."""
    from .outputs import BackgroundWriter

    classes: dict[Path, list[dict]] = {}
    interrupted = False

    def write(item: BatchItem, auto_record: Optional[dict]) -> None:
        """In a writer thread: the outputs, then the class rows they hold for the image's outcome."""
        classes[item.source] = save_outputs(item, jobs[item.source], segmenter, auto_record, extras)

    def report(written) -> None:
        for image, error in written:
            if error is None:
                on_outcome(ImageOutcome(image, classes=classes.pop(image)))
            else:
                on_outcome(ImageOutcome(image, str(error) if isinstance(error, WildsegError) else first_line(error)))

    with BackgroundWriter(2 * workers) as writer:
        try:
            for item in segmenter.segment_many(images, labels_of, decode_workers=workers,
                                               refine_workers=refine_workers):
                auto_record = getattr(labels_of, "records", {}).pop(item.source, None)
                with deferred():
                    if item.error is not None:
                        on_outcome(ImageOutcome(item.source, item.error))
                        continue
                    writer.submit(item.source, partial(write, item, auto_record))
                    report(writer.finished())
        except KeyboardInterrupt:
            interrupted = True
        finishing()
        report(writer.finished(wait_all=True))
    return interrupted


class BatchSummary:
    """Counts of a batch run, its failures with their reasons, whether it was interrupted, the seconds of its
    stages (loading the model, embedding the labels ahead, segmenting), and the class rows of the last image
    written (the one-image run prints them)."""

    def __init__(self, total: int, skipped: int):
        self.total, self.skipped, self.done, self.seconds = total, skipped, 0, 0.0
        self.stages_s: dict[str, float] = {}
        self.failures: dict[Path, str] = {}
        self.interrupted, self.last_classes = False, None

    def account(self, outcome: ImageOutcome) -> None:
        """Count an image whose outputs were written or that failed, with its reason."""
        if outcome.error is None:
            self.done += 1
            self.last_classes = outcome.classes
        else:
            self.failures[outcome.image] = outcome.error

    def line(self) -> str:
        state = "interrupted: " if self.interrupted else ""
        rate = self.done / self.seconds if self.seconds else 0.0
        stages = "".join(f"; {name.removesuffix('_s').replace('_', ' ')} {seconds:.1f} s"
                         for name, seconds in self.stages_s.items())
        return (f"{state}{self.done} done, {self.skipped} skipped (done before), {len(self.failures)} failed, "
                f"of {self.total} images in {self.seconds:.1f} s ({rate:.2f} images/s{stages})")

    def as_dict(self) -> dict:
        return {
            "images": self.total,
            "done": self.done,
            "skipped": self.skipped,
            "failed": len(self.failures),
            "interrupted": self.interrupted,
            "seconds": self.seconds,
            "stages_s": self.stages_s,
            "failures": [{"image": str(path), "reason": reason} for path, reason in self.failures.items()],
        }
