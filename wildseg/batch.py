"""Segmenting a batch of image files into an output folder: the labels of each image, `segment_many` (or the
automatic labels' two passes) with the outputs written behind it, and the run's summary. The same code runs in one
process (`wildseg segment`) and in each Ray worker (`distributed`), so that both write the same files.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from functools import cached_property, partial
from pathlib import Path
from typing import TYPE_CHECKING, Callable, ContextManager, Iterable, Iterator, Optional

from .choices import DEFAULT_VOCABULARY
from .errors import WildsegError, WildsegWarning, failure_reason, first_line, setting
from .labels import clean_labels
from .inputs import table_key

if TYPE_CHECKING:
    from .autolabels import AutoLabelRule
    from .datasets.classes import ClassName
    from .segmenter import Segmenter
    from .streaming import BatchItem

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
    """The label options of `wildseg segment`, as given: `labels` (names or auto), `labels_file`, and the automatic
    labels' `vocab`, `min_area`, `min_score`."""

    labels: Optional[str] = None
    labels_file: Optional[Path] = None
    vocab: Optional[str] = None
    min_area: Optional[float] = None
    min_score: Optional[float] = None


@dataclass(frozen=True)
class Labeling:
    """How the images of a batch get their labels: the same `names` for all, their entry in a labels file's
    `table` (keyed by absolute path), or those found in a `vocabulary` by a `rule`; `known` is every label the
    run may embed."""

    known: list[str]
    names: Optional[list[str]] = None
    table: Optional[dict[Path, list[str]]] = None
    labels_file: Optional[Path] = None
    vocabulary_name: Optional[str] = None
    vocabulary: Optional[list[ClassName]] = field(default=None, repr=False)
    rule: Optional[AutoLabelRule] = None

    def labels_of(self, image: Path, folder: Path) -> list[str]:
        """The given labels of an image (a path relative to `folder`)."""
        if self.names is not None:
            return self.names
        key = table_key(folder / image)
        if key not in self.table:
            raise WildsegError(f"no labels for this image in {self.labels_file}")
        return self.table[key]

    def asked(self, image: Path) -> dict:
        """What decides the labels of an image (absolute path) for its request (`provenance.image_request`): the
        labels given, its labels file entry, or the automatic labels' vocabulary and rule."""
        if self.vocabulary is not None:
            return self.automatic_request
        if self.names is not None:
            return {"labels": self.names}
        return {"labels_file": self.labels_of(image, Path())}

    @cached_property
    def automatic_request(self) -> dict:
        """The automatic labels' vocabulary and rule as a request holds them (`provenance.automatic_labels_request`),
        made once for every image."""
        from .provenance import automatic_labels_request

        return automatic_labels_request(self.vocabulary_name, self.vocabulary, self.rule)

    def segment(self, segmenter: Segmenter, images: Iterable[Path], folder: Path, workers: int,
                refine_workers: Optional[int]) -> Iterator[BatchItem]:
        """BatchItems of `images` (paths relative to `folder`, read from there), as each finishes."""
        read = partial(_under, folder)
        if self.vocabulary is not None:
            from .autolabels import segment_with_found_labels

            return segment_with_found_labels(segmenter, images, self.vocabulary_name, self.vocabulary, self.rule,
                                             workers, refine_workers, read)
        return segmenter.segment_many(images, partial(self.labels_of, folder=folder), decode_workers=workers,
                                      refine_workers=refine_workers, read=read)


def _under(folder: Path, image: Path) -> Path:
    return folder / image


def labeling(options: LabelOptions) -> Labeling:
    """The checked label options as a Labeling (a one-line error for a contradiction or a file that cannot be used)."""
    from .autolabels import AutoLabelRule, load_vocabulary, vocabulary_prompts
    from .inputs import read_labels_file

    labels, labels_file = options.labels, options.labels_file
    if labels is None and labels_file is None:
        raise WildsegError(f'give {setting("labels")} "a,b" (the same for every image) or {setting("labels_file")} '
                           "FILE, one of the two")
    if labels is not None and labels_file is not None:
        raise WildsegError(f"both {setting('labels')} and {setting('labels_file')} were given: keep "
                           f"{setting('labels')} for the same labels in every image, or {setting('labels_file')} "
                           "for each image's own")
    for option, value in (("vocab", options.vocab), ("auto_min_area", options.min_area),
                          ("auto_min_score", options.min_score)):
        if value is not None and labels != AUTO:
            raise WildsegError(f"{setting(option)} is for {setting('labels')} {AUTO}: leave it out, or ask for "
                               "automatic labels")
    if labels == AUTO:
        name = options.vocab or DEFAULT_VOCABULARY
        rule = AutoLabelRule(min_score=options.min_score,
                             **({} if options.min_area is None else {"min_area": options.min_area}))
        vocabulary = load_vocabulary(name)
        return Labeling(vocabulary_prompts(vocabulary), vocabulary_name=name, vocabulary=vocabulary, rule=rule)
    if labels is not None:
        names = clean_labels(labels)
        for name in names:
            warn_of_other_separators(name)
        return Labeling(names, names=names)
    table = read_labels_file(labels_file)
    return Labeling([label for names in table.values() for label in names], table=table, labels_file=labels_file)


OTHER_SEPARATORS = ";|\t"
"""Characters label lists are often separated by elsewhere; only commas separate wildseg's."""


def warn_of_other_separators(name: str) -> None:
    """A WildsegWarning when label `name` holds a character of OTHER_SEPARATORS: it stays one label."""
    found = [character for character in OTHER_SEPARATORS if character in name]
    if found:
        warnings.warn(f"label {name!r} holds {' and '.join(map(repr, found))}: it stays one label, as only commas "
                      f"separate labels (write {' and '.join(map(repr, found))} as commas for several)",
                      WildsegWarning, stacklevel=3)


def save_outputs(item: BatchItem, paths: dict[str, Path], segmenter: Segmenter, extras: dict[str, bool],
                 request: dict) -> list[dict]:
    """Write one image's outputs (JSON last) with the `extras` asked for (`save_scores`, `heatmaps`, `instances`: the
    object map and the record's objects, `SegmentationResult.objects`), its `request` (`provenance.image_request`)
    with its `request_digest` and its automatic-label record if any; returns the record's class rows. A write that
    fails raises a WildsegError naming the folder."""
    from .outputs import write_outputs
    from .provenance import request_digest

    result = item.result
    objects = result.objects() if extras.get("instances") else None
    record = {
        "image": str(item.source),
        "image_size": {"width": int(result.mask.shape[1]), "height": int(result.mask.shape[0])},
        "labels": result.labels,
        "classes": result.summary(),
        "settings": segmenter.settings(),
        "request": request,
        "request_digest": request_digest(request),
        "timings_s": result.timings,
        **({"auto_labels": item.auto_labels} if item.auto_labels is not None else {}),
        **({} if objects is None else {"instances": [found.as_record(result.labels) for found in objects.objects]}),
    }
    try:
        write_outputs(paths, *result.preview(), result.mask, result.labels, record, scores=result.scores,
                      save_scores=extras.get("save_scores", False), heatmaps=extras.get("heatmaps", False),
                      object_map=None if objects is None else objects.map)
    except OSError as error:
        raise WildsegError(f"cannot write the outputs into {paths['record'].parent}: {first_line(error)}") from error
    return record["classes"]


def segment_and_write(
    segmenter: Segmenter,
    jobs: Iterable[tuple[Path, dict[str, Path]]],
    labels: Labeling,
    extras: dict[str, bool],
    request: dict,
    on_outcome: Callable[[ImageOutcome], None],
    workers: int = 2,
    refine_workers: Optional[int] = None,
    deferred: Callable[[], ContextManager] = contextlib.nullcontext,
    finishing: Callable[[], None] = lambda: None,
    folder: Path = Path(),
) -> bool:
    """Segment the images of `jobs` (image, its output paths), taken one by one as the model is ready for them,
    and write each one's outputs to its paths in 2 x `workers` writer threads behind the model, with the `extras`
    asked for (scores, heat maps) and each image's request (`request`, the run's `provenance.run_request`, with its
    labels) in its record, reporting every image's `ImageOutcome` once its files are written or it failed.
    Relative image and output paths are taken from `folder`. The bookkeeping of an image runs inside `deferred()`
    (where a stop signal waits). A KeyboardInterrupt ends the model's work; then `finishing()` is called and the
    writes in flight are finished and reported. Returns whether it was interrupted."""
    from .outputs import BackgroundWriter
    from .provenance import image_request

    outputs: dict[Path, dict[str, Path]] = {}
    classes: dict[Path, list[dict]] = {}
    interrupted = False

    def images() -> Iterator[Path]:
        """The images of `jobs`, each one's output paths kept until it is written or has failed."""
        for image, paths in jobs:
            outputs[image] = paths
            yield image

    def write(item: BatchItem) -> None:
        """In a writer thread: the outputs, then the class rows they hold for the image's outcome."""
        paths = {kind: folder / path for kind, path in outputs.pop(item.source).items()}
        asked = image_request(request, labels.asked(folder / item.source))
        classes[item.source] = save_outputs(item, paths, segmenter, extras, asked)

    def report(written) -> None:
        for image, error in written:
            if error is None:
                on_outcome(ImageOutcome(image, classes=classes.pop(image)))
            else:
                on_outcome(ImageOutcome(image, failure_reason(error, image)))

    with BackgroundWriter(2 * workers) as writer:
        try:
            for item in labels.segment(segmenter, images(), folder, workers, refine_workers):
                with deferred():
                    if item.error is not None:
                        outputs.pop(item.source, None)
                        on_outcome(ImageOutcome(item.source, item.error))
                        continue
                    writer.submit(item.source, partial(write, item))
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

    def __init__(self, total: int, skipped: int, unlisted: int = 0):
        self.total, self.skipped, self.unlisted, self.done, self.seconds = total, skipped, unlisted, 0, 0.0
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
        """The run in one line: counts, seconds, rate and the seconds of each stage."""
        state = "interrupted: " if self.interrupted else ""
        details = [f"{self.done / self.seconds:.2f} images/s"] if self.done and self.seconds else []
        details += [f"{name.removesuffix('_s').replace('_', ' ')} {seconds:.1f} s"
                    for name, seconds in self.stages_s.items()]
        unlisted = f"{self.unlisted} skipped (not in the labels file), " if self.unlisted else ""
        rate = f" ({'; '.join(details)})" if details else ""
        return (f"{state}{self.done} done, {self.skipped} skipped (done before), {unlisted}{len(self.failures)} "
                f"failed, of {self.total} images in {self.seconds:.1f} s{rate}")

    def as_dict(self) -> dict:
        """The summary as the --summary JSON holds it."""
        return {
            "images": self.total,
            "done": self.done,
            "skipped": self.skipped,
            "unlisted": self.unlisted,
            "failed": len(self.failures),
            "interrupted": self.interrupted,
            "seconds": self.seconds,
            "stages_s": self.stages_s,
            "failures": [{"image": str(path), "reason": reason} for path, reason in self.failures.items()],
        }
