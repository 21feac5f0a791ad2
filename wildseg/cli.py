"""The `wildseg` command: a thin click layer over the Python API.

Every error a user can fix is printed as one line `wildseg: error: ...` with exit code 2, no traceback. The
model libraries (torch, open_clip) are imported only where a command needs them, so that help, version,
usage errors and the checks made before the model loads answer at once.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import math
import os
import signal
import sys
import time
import warnings
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import click
from PIL import Image
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from rich.text import Text

from . import __version__
from .choices import (
    ACTIVATIONS,
    ATTENTIONS,
    AUTO_MIN_AREA,
    AUTO_MIN_SCORES,
    CRF_BACKENDS,
    CRF_ITERATIONS,
    DATASETS,
    DEFAULT_ATTENTION,
    DEFAULT_BG_THRESHOLD,
    DEFAULT_MAX_SIDE,
    DEFAULT_START_BLOCK,
    DEFAULT_TEMPLATES,
    DEFAULT_VOCABULARY,
    DENSE_LOGIT_SCALE,
    DENSE_SHORT_SIDE,
    DENSE_WINDOW,
    METHODS,
    MIN_WORKING_SIDE,
    PAMR_ITERATIONS,
    REFINEMENTS,
    TTA_POLICIES,
    VOCABULARIES,
)
from .errors import WildsegError
from .labels import BACKGROUND, clean_labels

from .options import build_segmenter, refuse_misplaced

if TYPE_CHECKING:
    from .batch import BatchSummary
    from .segmenter import Segmenter

AUTO = "auto"
USAGE_ERROR = 2
INTERRUPTED = 130


class OneLineErrors(click.Group):
    """A click group whose usage errors and WildsegErrors print a single line and exit with code 2."""

    def main(self, *args, **kwargs):
        try:
            return super().main(*args, standalone_mode=False, **kwargs)
        except click.exceptions.NoArgsIsHelpError as help_request:
            click.echo(help_request.ctx.get_help())
            sys.exit(0)
        except click.exceptions.Abort:
            _fail("interrupted")
        except click.ClickException as error:
            _fail(error.format_message().replace("\n", " "))
        except WildsegError as error:
            _fail(str(error))


def _fail(message: str) -> None:
    click.echo(f"wildseg: error: {message}", err=True)
    sys.exit(USAGE_ERROR)


def _warn_in_one_line(message, category, filename, lineno, file=None, line=None):
    """A warning as one line on stderr, written through `sys.stderr` so that a live progress display (which
    redirects it) prints it above itself."""
    print(f"wildseg: warning: {message}", file=sys.stderr)


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="wildseg")
def main():
    """Training-free zero-shot semantic segmentation with CLIP."""
    warnings.showwarning = _warn_in_one_line
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    logging.getLogger().setLevel(logging.ERROR)


def export_options(command):
    """The options that write the outputs as a data set other tools load (`export`)."""
    options = [
        click.option("--coco", "coco_path", type=click.Path(path_type=Path), metavar="FILE",
                     help="Write the output folder's images as one COCO instance-segmentation file (RLE masks)."),
        click.option("--yolo", "yolo_folder", type=click.Path(path_type=Path), metavar="DIR",
                     help="Write the output folder's images as an Ultralytics YOLO segmentation data set here."),
        click.option("--yolo-min-region", type=click.FloatRange(0.0, 1.0),
                     help="With --yolo: least share of the image a region must cover to become a polygon "
                          "[default: 0.0001]."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def ray_options(command):
    """The options that run a command on a Ray cluster (`distributed`)."""
    options = [
        click.option("--ray", "ray_address", is_flag=False, flag_value="local", metavar="[ADDRESS]",
                     help="Run on a Ray cluster: alone (or `local`) a Ray instance on this machine using all its "
                          "GPUs (else CPUs); `auto` or HOST:PORT a running cluster, whose nodes see the inputs and "
                          "outputs at the same paths. pip install 'wildseg[ray]'."),
        click.option("--ray-workers", type=click.IntRange(min=1),
                     help="With --ray: workers (each loads the model once) [default: one per GPU, else per CPU]."),
        click.option("--ray-gpus-per-worker", type=click.FloatRange(min=0),
                     help="With --ray: GPUs each worker reserves, e.g. 0.5 for two per GPU [default: 1 where the "
                          "cluster has GPUs, else 0]."),
        click.option("--ray-cpus-per-worker", type=click.FloatRange(min=0, min_open=True),
                     help="With --ray: CPUs each worker reserves (its torch threads on the CPU) [default: 1]."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def segmenter_options(bg_threshold_help: str, defaults_help: str):
    """The options that build a Segmenter, shared by the commands that segment. Options whose default depends
    on the method or the command (`defaults_help` says how) default to None here and are resolved by
    `build_segmenter`."""
    options = [
        click.option("--model", default="ViT-B-16", show_default=True,
                     help="open_clip architecture (see `wildseg models`)."),
        click.option("--pretrained", default="openai", show_default=True,
                     help="open_clip pretrained tag, downloaded and cached on first use; 'none' for random weights."),
        click.option("--model-config", type=click.Path(path_type=Path),
                     help="An open_clip model config JSON to register first: --model then names it by its file stem."),
        click.option("--checkpoint", type=click.Path(path_type=Path),
                     help="Local weights: open_clip state dict (.pt/.bin/.safetensors) or OpenAI JIT archive."),
        click.option("--cache-dir", type=click.Path(path_type=Path), help="Where open_clip caches downloaded weights."),
        click.option("--activation", type=click.Choice(list(ACTIVATIONS)), default="auto", show_default=True,
                     help="MLP activation: auto follows the weights (QuickGELU for OpenAI's), else gelu or quickgelu."),
        click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True,
                     help="auto = CUDA when available (fp16), else CPU (fp32)."),
        click.option("--method", type=click.Choice(list(METHODS)), default="relevance", show_default=True,
                     help="relevance: Chefer et al. relevance (Zabari & Hoshen); dense: patch tokens with a "
                          "changed last block (MaskCLIP/SCLIP/ClearCLIP/NACLIP)."),
        click.option("--attention", type=click.Choice(ATTENTIONS),
                     help=f"Dense method: last-block attention [default: {DEFAULT_ATTENTION}]."),
        click.option("--window", type=click.IntRange(min=0),
                     help="Dense method: sliding-window side in pixels, 0 for the whole image in one pass "
                          f"[default: {DENSE_WINDOW}]."),
        click.option("--stride", type=click.IntRange(min=1),
                     help="Dense method: window stride [default: half the window]."),
        click.option("--short-side", type=click.IntRange(min=16),
                     help="Dense method: the image is seen at this short side "
                          f"[default: {DENSE_SHORT_SIDE}]."),
        click.option("--logit-scale", type=click.FloatRange(min=0, min_open=True),
                     help="Dense method: softmax scale of the patch-label cosines "
                          f"[default: {DENSE_LOGIT_SCALE:g}]."),
        click.option("--tta", type=click.Choice(TTA_POLICIES),
                     help="Test-time augmentation views (see README) [default: default]."),
        click.option("--refine", type=click.Choice(list(REFINEMENTS)),
                     help="Refinement of the pseudo-labels: dense CRF, PAMR (on the model's device), both "
                          "[default: crf]."),
        click.option("--crf-iters", type=click.IntRange(min=1),
                     help=f"Mean-field iterations of the dense CRF [default: {CRF_ITERATIONS}]."),
        click.option("--crf-backend", type=click.Choice(list(CRF_BACKENDS)),
                     help="Dense CRF implementation: torch (on the model's device) or pydensecrf (CPU) "
                          "[default: auto = torch on a GPU, pydensecrf on the CPU]."),
        click.option("--pamr-iters", type=click.IntRange(min=1),
                     help=f"PAMR iterations [default: {PAMR_ITERATIONS}]."),
        click.option("--bg-threshold", type=click.FloatRange(0.0, 1.0), help=bg_threshold_help),
        click.option("--max-side", type=click.IntRange(min=MIN_WORKING_SIDE),
                     help="Working resolution: larger images are segmented at this long side; masks are full size "
                          f"[default: {DEFAULT_MAX_SIDE}]."),
        click.option("--start-block", type=int,
                     help=f"Relevance method: first block whose attention enters the relevance (-1 = last only, "
                          f"0 = all) [default: {DEFAULT_START_BLOCK}]."),
        click.option("--templates", default=DEFAULT_TEMPLATES, show_default=True,
                     help="Prompt templates: imagenet80 (CLIP's 80), photo ('a photo of a {}.'), or a file with one "
                          "template per line containing {} (blank lines and # comments ignored)."),
        click.option("--text-cache", type=click.Path(path_type=Path),
                     help="Folder caching label embeddings across runs [default: $WILDSEG_CACHE_DIR, else "
                          "~/.cache/wildseg]."),
        click.option("--no-text-cache", is_flag=True, default=None,
                     help="Compute label embeddings afresh, without reading or writing the cache."),
    ]

    def decorate(command):
        for option in reversed(options):
            command = option(command)
        command.__doc__ = f"{command.__doc__.rstrip()}\n\n    {defaults_help}"
        return command

    return decorate





SEGMENT_OPTIONS = segmenter_options(
    "Background threshold: relevance method, normalised relevance (default 0.4); dense method, label probability "
    "(default 0.1); below it a pixel is background.",
    "Dense method defaults: attention naclip, window 224, stride 112, short side 336, logit scale 40, background "
    "words of PASCAL VOC's background class; both methods: tta default, refine crf.")
"""The segmenter options of the commands that segment images of the user's (segment, demo)."""


@main.command()
@click.argument("inputs", nargs=-1)
@click.option("--labels", "-l",
              help='Comma-separated names of what is in every image, e.g. "cat,sofa"; "auto" finds them in --vocab.')
@click.option("--vocab", help=f"With --labels auto: {', '.join(VOCABULARIES)} or a class-name file "
                              f"[default: {DEFAULT_VOCABULARY}].")
@click.option("--auto-min-area", type=click.FloatRange(0.0, 1.0),
              help=f"With --labels auto: least share of the image a found class covers [default: "
                   f"{AUTO_MIN_AREA}].")
@click.option("--auto-min-score", type=click.FloatRange(0.0, 1.0),
              help="With --labels auto: least mean score of a found class over its pixels [default: "
                   f"{AUTO_MIN_SCORES['relevance']} relevance, {AUTO_MIN_SCORES['dense']} dense].")
@click.option("--labels-file", type=click.Path(path_type=Path),
              help="Per-image labels: CSV rows `image,label,...` or a JSON object {image: labels}.")
@click.option("--out", "-o", "out_dir", type=click.Path(path_type=Path), default=Path("wildseg_out"), show_default=True,
              help="Folder for each image's mask PNG, overlay JPEG and JSON record (sub-folders mirror the inputs).")
@click.option("--save-scores", is_flag=True,
              help="Also write <name>_scores.npz: per-class probabilities (float16, working resolution) and labels.")
@click.option("--heatmaps", is_flag=True,
              help="Also write <name>_heatmap_<i>_<label>.jpg: each label's probability as a colour map on the photo.")
@export_options
@click.option("--recursive", "-r", is_flag=True, help="Search folders and ** patterns into their sub-folders.")
@click.option("--shard", metavar="K/N",
              help="Segment only shard K of N (by a hash of each image's output path: the same in any listing "
                   "order and on resume; N runs with K = 1..N cover every image once), e.g. for array jobs.")
@click.option("--overwrite", is_flag=True, help="Segment again images whose JSON record says they are done.")
@click.option("--summary", "summary_path", type=click.Path(path_type=Path),
              help="Write the run's summary, with every failure and its reason, as JSON here.")
@click.option("--workers", type=click.IntRange(min=1), default=2, show_default=True,
              help="Threads decoding images ahead of the model; twice as many write the outputs behind it.")
@click.option("--refine-workers", type=click.IntRange(min=0),
              help="With --crf-backend pydensecrf: processes running the CRF beside the model (default: half the "
                   "cores on GPU, 0 on CPU).")
@SEGMENT_OPTIONS
@ray_options
@click.option("--quiet", "-q", is_flag=True, help="No progress display and no summary.")
def segment(inputs, labels, vocab, auto_min_area, auto_min_score, labels_file, out_dir, save_scores, heatmaps,
            coco_path, yolo_folder, yolo_min_region, recursive, shard, overwrite, summary_path, workers, refine_workers, ray_address, ray_workers,
            ray_gpus_per_worker, ray_cpus_per_worker, quiet, **segmenter_arguments):
    """Segment images (files, folders, glob patterns, @list.txt) into background and their labels.

    Writes <name>.png (mask), <name>_overlay.jpg and <name>.json per image; images whose JSON exists are
    skipped unless --overwrite. Exit code 0: all done, 1: some images failed, 2: usage error.
    With --labels auto, each image is first segmented with the whole vocabulary and the classes that cover
    --auto-min-area of it with mean score --auto-min-score are segmented as given (see README).
    With --ray, the images are segmented by workers on a Ray cluster into the same files (see README).
    """
    started = time.perf_counter()
    from .batch import BatchSummary, LabelOptions, labels_source
    from .distributed import check_ray_options

    if not inputs:
        taken = " (--ray took the folder after it for its address: put --ray after the inputs)" if (
            ray_address is not None and Path(ray_address).exists()) else ""
        raise WildsegError(f"give the images to segment: files, folders, glob patterns or @lists{taken}")
    label_options = LabelOptions(labels, labels_file, vocab, auto_min_area, auto_min_score)
    source_of_labels, known_labels = labels_source(label_options)
    cluster = check_ray_options(ray_address, ray_workers, ray_gpus_per_worker, ray_cpus_per_worker)
    from .inputs import expand_inputs, in_shard, parse_shard

    images = expand_inputs(inputs, recursive, exclude=out_dir)
    if not images:
        raise WildsegError("the inputs hold no image (jpg, jpeg, png, bmp, tif, tiff, webp): check the paths")
    if shard is not None:
        images = [image for image in images if in_shard(image, parse_shard(shard))]
    from .outputs import is_done, output_paths, remove_stale_temporaries, write_json  # OpenCV: inputs found
    heatmap_labels = [BACKGROUND, *clean_labels(labels)] if heatmaps and labels not in (None, AUTO) else None
    jobs = {image.path: output_paths(image.stem, out_dir, scores=save_scores, heatmap_labels=heatmap_labels)
            for image in images}
    _refuse_to_overwrite_inputs(jobs)
    _check_output_folder(out_dir, [path for paths in jobs.values() for path in paths.values()])
    if summary_path is not None:
        _check_output_folder(summary_path.parent, [summary_path], "--summary")
    _check_export_options(coco_path, yolo_folder, yolo_min_region)
    remove_stale_temporaries([path for paths in jobs.values() for path in paths.values()])
    todo = [path for path, paths in jobs.items() if overwrite or not is_done(paths)]
    console = Console(stderr=True, quiet=quiet)
    run = BatchSummary(total=len(jobs), skipped=len(jobs) - len(todo))
    extras = {"save_scores": save_scores, "heatmaps": heatmaps}
    with Interrupts() as interrupts:
        try:
            if todo and cluster is not None:
                _segment_on_ray(cluster, todo, jobs, label_options, extras, overwrite, workers, refine_workers,
                                segmenter_arguments, run, console, interrupts)
            elif todo:
                _segment_here(todo, jobs, source_of_labels, known_labels, extras, workers, refine_workers,
                              segmenter_arguments, run, console, interrupts)
        except KeyboardInterrupt:  # while the model loads, the labels are embedded or Ray starts: nothing in flight
            run.interrupted = True
            interrupts.finishing()
        run.seconds = time.perf_counter() - started
        report = Console(quiet=quiet)
        if len(jobs) == 1 and run.done == 1:
            paths = next(iter(jobs.values()))
            report.print(_summary_table(run.last_classes))
            report.print(f"wrote {paths['mask']}, {paths['overlay'].name}, {paths['record'].name}", soft_wrap=True)
        report.print(run.line(), soft_wrap=True, markup=False, highlight=False)
        if summary_path is not None:
            write_json(summary_path, run.as_dict(), "the summary")
        _export(console, report, out_dir, coco_path, yolo_folder, yolo_min_region)
    sys.exit(INTERRUPTED if run.interrupted else 1 if run.failures else 0)


@main.command()
@SEGMENT_OPTIONS
@click.option("--vocab", help=f"For labels 'auto' in the page: {', '.join(VOCABULARIES)} or a class-name file "
                              f"[default: {DEFAULT_VOCABULARY}].")
@click.option("--auto-min-area", type=click.FloatRange(0.0, 1.0),
              help=f"For labels 'auto': the page's first least share of the image [default: {AUTO_MIN_AREA}].")
@click.option("--auto-min-score", type=click.FloatRange(0.0, 1.0),
              help="For labels 'auto': the page's first least mean score [default: "
                   f"{AUTO_MIN_SCORES['relevance']} relevance, {AUTO_MIN_SCORES['dense']} dense].")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to serve on: 0.0.0.0 lets other machines reach the page.")
@click.option("--port", type=click.IntRange(1, 65535), default=7860, show_default=True, help="Port to serve on.")
@click.option("--quiet", "-q", is_flag=True, help="No status line while the model loads.")
def demo(vocab, auto_min_area, auto_min_score, host, port, quiet, **segmenter_arguments):
    """Serve a web page (Gradio) to try labels on your images with one model kept loaded.

    Upload an image, type labels (or auto), choose method, attention and refinement, and see the overlay, the
    classes and each label's heat map; download the mask and JSON. The page starts with this command's settings.
    Needs pip install 'wildseg[demo]'. Ctrl-C stops it.
    """
    from .demo import launch  # Gradio: a one-line error with the install command where it is missing

    launch(segmenter_arguments, host, port, vocab, auto_min_area, auto_min_score, quiet)


def _check_export_options(coco_path: Optional[Path], yolo_folder: Optional[Path], min_region: Optional[float]
                          ) -> None:
    """Fail before any work when the data set files could not be written."""
    if min_region is not None and yolo_folder is None:
        raise WildsegError("--yolo-min-region is an option of --yolo: add --yolo DIR or leave it out")
    if coco_path is not None:
        _check_output_folder(coco_path.parent, [coco_path], "--coco")
    if yolo_folder is not None:
        if yolo_folder.exists() and not yolo_folder.is_dir():
            raise WildsegError(f"--yolo {yolo_folder} is a file: give a folder for the YOLO data set")
        _check_output_folder(yolo_folder, [], "--yolo")


def _export(console: Console, report: Console, folder: Path, coco_path: Optional[Path], yolo_folder: Optional[Path],
            min_region: Optional[float]) -> None:
    """Write the COCO file and the YOLO data set of the images done in `folder` (`export`), saying what was
    written."""
    from .export import MIN_REGION, write_coco, write_yolo

    if coco_path is not None:
        with _status(console, f"writing {coco_path}"):
            dataset = write_coco(folder, coco_path)
        report.print(f"wrote {coco_path}: {len(dataset['images'])} images, {len(dataset['categories'])} categories, "
                     f"{len(dataset['annotations'])} annotations", soft_wrap=True, markup=False, highlight=False)
    if yolo_folder is not None:
        with _status(console, f"writing the YOLO data set into {yolo_folder}"):
            images, unlinked = write_yolo(folder, yolo_folder, MIN_REGION if min_region is None else min_region)
        report.print(f"wrote {yolo_folder / 'data.yaml'} and the labels of {images} images", soft_wrap=True,
                     markup=False, highlight=False)
        if unlinked:
            click.echo(f"wildseg: warning: {unlinked} images were not found from here to link into "
                       f"{yolo_folder / 'images'}: run from the folder wildseg segment ran in, or put them there",
                       err=True)


@main.command()
@click.argument("masks_dir", type=click.Path(path_type=Path))
@export_options
@click.option("--quiet", "-q", is_flag=True, help="Print nothing but errors.")
def export(masks_dir, coco_path, yolo_folder, yolo_min_region, quiet):
    """Write the outputs of `wildseg segment` in MASKS_DIR (its --out folder) as a COCO file (--coco FILE) or an
    Ultralytics YOLO data set (--yolo DIR), without the model."""
    if coco_path is None and yolo_folder is None:
        raise WildsegError("give --coco FILE.json, --yolo DIR or both")
    if not masks_dir.is_dir():
        raise WildsegError(f"{masks_dir} is not a folder: give the --out folder of wildseg segment")
    _check_export_options(coco_path, yolo_folder, yolo_min_region)
    from .export import segmented_images

    if not segmented_images(masks_dir):
        raise WildsegError(f"{masks_dir} holds no image wildseg segment finished (NAME.json records with their "
                           "NAME.png masks): give the --out folder of a run")
    _export(Console(stderr=True, quiet=quiet), Console(quiet=quiet), masks_dir, coco_path, yolo_folder,
            yolo_min_region)


def _segment_here(todo: list[Path], jobs: dict[Path, dict[str, Path]], source_of_labels, known_labels: list[str],
                  extras: dict[str, bool], workers: int, refine_workers: Optional[int], segmenter_arguments: dict,
                  run: BatchSummary, console: Console, interrupts: Interrupts) -> None:
    """Segment the images to do in this process (`batch.segment_and_write`) with one progress bar, counting
    each image in `run` with the seconds of each stage."""
    from .batch import segment_and_write

    clock = time.perf_counter()
    segmenter = build_segmenter(console, protocol={}, **segmenter_arguments)
    run.stages_s["model_load_s"] = time.perf_counter() - clock
    if refine_workers is not None and not ("crf" in segmenter.refine and segmenter.crf_backend == "pydensecrf"):
        raise WildsegError("--refine-workers is an option of pydensecrf's CRF (--refine crf or pamr+crf with "
                           "--crf-backend pydensecrf, auto's choice on the CPU): leave it out")
    clock = time.perf_counter()
    _embed_ahead(console, segmenter, known_labels)
    run.stages_s["label_embeddings_s"] = time.perf_counter() - clock
    clock = time.perf_counter()
    with _image_progress(console) as progress:
        task = progress.add_task("segmenting", total=len(todo))
        run.interrupted = segment_and_write(
            segmenter, todo, source_of_labels(segmenter), jobs, extras,
            partial(_account, run, progress, task), workers, refine_workers,
            deferred=interrupts.deferred, finishing=interrupts.finishing)
    run.stages_s["segmenting_s"] = time.perf_counter() - clock


def _segment_on_ray(cluster_options, todo: list[Path], jobs: dict[Path, dict[str, Path]], label_options,
                    extras: dict[str, bool], overwrite: bool, workers: int, refine_workers: Optional[int],
                    segmenter_arguments: dict, run: BatchSummary, console: Console, interrupts: Interrupts) -> None:
    """Segment the images to do on Ray workers (`distributed`), in chunks, with one progress bar for the whole
    cluster, counting each image in `run`."""
    from .batch import ImageOutcome
    from .distributed import RayCluster, SegmentJob, SegmentWorker, chunked, run_chunks, worker_shape

    clock = time.perf_counter()
    with contextlib.ExitStack() as stack:
        with _status(console, f"starting {cluster_options.address} Ray workers"):
            cluster = stack.enter_context(RayCluster(cluster_options))
            shape = worker_shape(cluster_options, cluster.resources, segmenter_arguments["device"])
            options = {**segmenter_arguments, **({"device": "cpu"} if shape.gpus == 0 else {})}
            job = SegmentJob(options, label_options, extras, workers, refine_workers, overwrite)
            actors = cluster.start(SegmentWorker, shape, job)
        run.stages_s["ray_start_s"] = time.perf_counter() - clock
        clock = time.perf_counter()
        with _image_progress(console) as progress:
            task = progress.add_task(f"segmenting on {shape.workers} Ray workers", total=len(todo))
            account = partial(_account, run, progress, task)
            run.interrupted = run_chunks(
                actors, chunked(todo, shape.workers),
                call=lambda actor, chunk: actor.segment.remote({image: jobs[image] for image in chunk}),
                on_result=lambda chunk, outcomes: [account(outcome) for outcome in outcomes],
                on_error=lambda chunk, reason: [account(ImageOutcome(image, reason)) for image in chunk],
                finishing=interrupts.finishing, deferred=interrupts.deferred)
        run.stages_s["segmenting_s"] = time.perf_counter() - clock
        interrupts.finishing()  # every image is counted: a stop signal while Ray shuts down is only noted


def _account(run: BatchSummary, progress: Progress, task, outcome) -> None:
    """Count an image's outcome, print its failure, advance the bar."""
    run.account(outcome)
    if outcome.error is not None:
        _report_failure(progress.console, outcome.image, outcome.error)
    advance(progress, task)


def _status(console: Console, message: str):
    """A status line while `message` goes on, on a terminal."""
    return console.status(message) if console.is_terminal else contextlib.nullcontext()


def _report_failure(console: Console, image: Path, reason: str) -> None:
    """One line per failed image on stderr, above the progress bar, also with -q."""
    line = f"wildseg: failed: {image}: {reason}"
    if console.quiet:
        click.echo(line, err=True)
    else:
        console.print(line, soft_wrap=True, markup=False, highlight=False)


def _embed_ahead(console: Console, segmenter: Segmenter, labels: list[str]) -> None:
    """Embed the run's labels before the first image (`Segmenter.prepare_labels`), with a progress bar of their
    own when the cache does not hold them all."""
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True, disable=not console.is_terminal) as progress:
        task = progress.add_task(f"embedding labels ({len(segmenter.templates.templates)} prompts each)", total=None)
        segmenter.prepare_labels(labels, lambda done, total: progress.update(task, completed=done, total=total))


class Interrupts:
    """Ctrl-C and SIGTERM stop a batch: model work stops at once, the bookkeeping of an image (in `deferred()`)
    first ends; after `finishing()`, signals are only noted while the outputs being written are finished (see
    BackgroundWriter) and the summary is written, so that no output is left half-written or uncounted. Once
    stopped, further signals are ignored on the way out (the process then exits with 130)."""

    def __init__(self):
        self.deferring, self.pending, self.stopped = False, False, False

    def __enter__(self):
        self.previous = {number: signal.signal(number, self._stop) for number in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc_info):
        for number, handler in self.previous.items():
            signal.signal(number, signal.SIG_IGN if self.stopped else handler)

    def _stop(self, number, frame):
        self.stopped = True
        if self.deferring:
            self.pending = True
        else:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def deferred(self):
        self.deferring = True
        try:
            yield
        finally:
            self.deferring = False
        if self.pending:
            raise KeyboardInterrupt

    def finishing(self) -> None:
        self.deferring = True


def _refuse_to_overwrite_inputs(jobs: dict[Path, dict[str, Path]]) -> None:
    inputs = {path.absolute() for path in jobs}
    for image, paths in jobs.items():
        if any(path.absolute() in inputs for path in paths.values()):
            raise WildsegError(f"the outputs of {image} would overwrite the input images: choose another --out folder")


def _check_output_folder(out_dir: Path, outputs, option: str = "--out") -> None:
    """Fail before any work when the outputs could not be written: the folder under a file, unwritable, or taken."""
    nearest = next(folder for folder in (out_dir.absolute(), *out_dir.absolute().parents) if folder.exists())
    if not nearest.is_dir():
        raise WildsegError(f"{nearest} is a file, not a folder: choose another {option}")
    if not os.access(nearest, os.W_OK | os.X_OK):
        raise WildsegError(f"cannot write into {nearest}: choose a {option} you can write to")
    for path in outputs:
        if path.is_dir():
            raise WildsegError(f"the output path {path} is a folder: move it away or choose another {option}")


def _summary_table(rows: list[dict]) -> Table:
    table = Table()
    table.add_column("class", justify="right")
    table.add_column("label")
    table.add_column("pixels", justify="right")
    table.add_column("mean score", justify="right")
    for index, row in enumerate(rows):
        if row["pixel_fraction"] > 0:
            table.add_row(str(index), row["label"], f"{row['pixel_fraction']:.1%}", f"{row['mean_score']:.2f}")
    return table


@main.command()
@click.option("--all", "show_all", is_flag=True, help="Also list the architectures wildseg cannot use, with why.")
def models(show_all):
    """List the open_clip architectures both methods work with, and their pretrained tags."""
    import open_clip

    from .relevance import vision_config_problem

    table = Table("--model", "--pretrained tags", *(["cannot be used"] if show_all else []))
    usable = unusable = 0
    for name in open_clip.list_models():
        config = open_clip.get_model_config(name)
        problem = vision_config_problem(config)
        usable, unusable = usable + (problem is None), unusable + (problem is not None)
        if problem is not None and not show_all:
            continue
        marked = name + (" (+)" if config.get("text_cfg", {}).get("hf_model_name") else "")
        table.add_row(marked, ", ".join(open_clip.list_pretrained_tags_by_model(name)) or "-",
                      *([problem or ""] if show_all else []))
    console = Console()
    console.print(table)
    console.print(f"{usable} architectures work with both methods (relevance, dense); (+): a Hugging Face text tower, "
                  f"pip install transformers. {unusable} have no ViT class-token tower of open_clip's own (ResNet, "
                  "ConvNeXt and other timm towers, CoCa, pooled outputs)"
                  + (": listed with why." if show_all else ": `wildseg models --all` lists them."))


def advance(progress: Progress, task) -> None:
    """One image more; the first one done marks where the rate starts (`steady_rate`)."""
    progress.advance(task)
    if "first_done" not in progress.tasks[task].fields:
        progress.update(task, first_done=(progress.get_time(), progress.tasks[task].completed))


def steady_rate(task) -> Optional[float]:
    """Images per second since the first image was done, so that the model's warm-up and the label embeddings
    before it do not count and a burst of images finished by one model batch does not read as the rate; None
    until a second image is done."""
    if "first_done" not in task.fields:
        return None
    started, count = task.fields["first_done"]
    elapsed = task.get_time() - started
    return (task.completed - count) / elapsed if task.completed > count and elapsed > 0 else None


class RateColumn(ProgressColumn):
    """Images per second (`steady_rate`)."""

    def render(self, task) -> Text:
        rate = steady_rate(task)
        return Text("- img/s" if rate is None else f"{rate:.2f} img/s")


class TimeLeftColumn(ProgressColumn):
    """Time left at the steady rate ('-:--:--' until there is one)."""

    def render(self, task) -> Text:
        rate = steady_rate(task)
        if rate is None or task.total is None:
            return Text("-:--:-- left")
        return Text(f"{datetime.timedelta(seconds=round((task.total - task.completed) / rate))} left")


def _image_progress(console: Console) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(),
                    TimeElapsedColumn(), TimeLeftColumn(), console=console, transient=True,
                    disable=not console.is_terminal)


@main.command(name="eval")
@click.option("--dataset", "-d", "dataset_name", type=click.Choice(DATASETS), required=True,
              help="Benchmark (see README for each one's --root layout).")
@click.option("--root", type=click.Path(path_type=Path), help="The data set's folder in its released layout.")
@click.option("--split", help="Split to evaluate (default val; folder datasets have none).")
@click.option("--download", type=click.Path(path_type=Path),
              help="VOC only: fetch the official VOC2012 trainval archive into this folder (MD5-checked) and use it.")
@click.option("--ignore-index", type=click.IntRange(0, 65535),
              help="Folder datasets: mask value that is not scored (e.g. 11 for CamVid's void).")
@click.option("--class-names", type=click.Path(path_type=Path),
              help="Own class-name list: one line per class in the data set's order, synonyms after commas.")
@click.option("--given-labels", is_flag=True,
              help="Label-given protocol: each image is segmented with the classes of its ground truth.")
@click.option("--limit", type=click.IntRange(min=1), help="Evaluate only the first N images (after --ids).")
@click.option("--ids", "ids_file", type=click.Path(path_type=Path), help="Evaluate only the image ids listed here.")
@click.option("--report", type=click.Path(path_type=Path), help="Write settings, metrics and timings as JSON here.")
@click.option("--save-predictions", type=click.Path(path_type=Path),
              help="Save each predicted mask as <id>.png here; a rerun with the same settings reuses them.")
@segmenter_options("Background threshold; default where background is a class 0.4 (relevance) or the protocol's "
                   "(dense), else 0 (no background).",
                   "With --method dense, options not given follow the published protocol of the segmenter that "
                   "--attention names (NACLIP, SCLIP or ClearCLIP; NACLIP's for the others) on the data set, with "
                   "its class list (wildseg/dense_protocols.json); the report records it and every deviation.")
@click.option("--compare", help="Evaluate several methods on the same images, each under its own protocol: a "
                                 "comma-separated list of relevance and dense attentions (naclip, sclip, clearclip, "
                                 "maskclip, vanilla); the report holds every run and a table of mIoU.")
@click.option("--workers", type=click.IntRange(min=1), default=2, show_default=True,
              help="Threads reading images and ground truth ahead of the model.")
@ray_options
@click.option("--quiet", "-q", is_flag=True, help="No progress display and no tables.")
def evaluate_command(dataset_name, root, split, download, ignore_index, class_names, given_labels, limit, ids_file,
                     report, save_predictions, compare, workers, ray_address, ray_workers, ray_gpus_per_worker,
                     ray_cpus_per_worker, quiet, bg_threshold, **segmenter_arguments):
    """Evaluate on a benchmark: per-class IoU, mIoU, pixel and mean class accuracy.

    Images are read ahead and segmented in batches; with --ray, by workers on a Ray cluster (see README)."""
    from .distributed import check_ray_options

    cluster_options = check_ray_options(ray_address, ray_workers, ray_gpus_per_worker, ray_cpus_per_worker)
    from .datasets import open_dataset

    dataset = open_dataset(dataset_name, root, split, ignore_index, download, class_names)
    from .evaluation import load_ids  # torch: once the data set is found
    from .outputs import write_json

    ids = load_ids(ids_file, dataset) if ids_file else list(dataset.ids)
    ids = ids[:limit] if limit else ids
    runs = _compared_runs(compare, segmenter_arguments)
    if save_predictions is not None:
        _check_output_folder(save_predictions, [], "--save-predictions")
    if report is not None:
        _check_output_folder(report.parent, [report], "--report")
    console, output = Console(stderr=True, quiet=quiet), Console(quiet=quiet)
    selection = {"images": len(ids), "limit": limit, "ids_file": None if ids_file is None else str(ids_file)}
    results, failed, backbone = {}, False, None
    with contextlib.ExitStack() as stack:
        cluster = None
        if cluster_options is not None:
            from .distributed import RayCluster

            with _status(console, f"connecting to Ray ({cluster_options.address})"):
                cluster = stack.enter_context(RayCluster(cluster_options))
        for name, method, attention in runs:
            if results:
                dataset = open_dataset(dataset_name, root, split, ignore_index, download, class_names)
            predictions = (None if save_predictions is None else save_predictions / name if compare
                           else save_predictions)
            arguments = {**segmenter_arguments, "method": method, "attention": attention,
                         "bg_threshold": bg_threshold}
            result, backbone = _evaluate_run(console, dataset, dataset_name, ids, given_labels, class_names,
                                             predictions, selection, arguments, backbone, cluster, workers)
            results[name] = result
            if not compare:
                output.print(_per_class_table(result["per_class"]))
            for failure in result["images"]["failures"]:
                click.echo(f"wildseg: failed: {name + ': ' if compare else ''}{failure['id']}: {failure['reason']}",
                           err=True)
            output.print(f"{name}: " * bool(compare) + _summary_line(result), soft_wrap=True)
            failed = failed or bool(result["images"]["failures"])
    if compare:
        comparison = [_comparison_row(name, result) for name, result in results.items()]
        output.print(_comparison_table(comparison))
    if report is not None:
        write_json(report, {"comparison": comparison, "runs": results} if compare else results[runs[0][0]],
                   "the report")
    if failed:
        sys.exit(1)


def _compared_runs(compare: Optional[str], options: dict) -> list[tuple[str, str, Optional[str]]]:
    """(name, method, attention) of each run: the one --method/--attention name, or each entry of --compare."""
    if compare is None:
        return [("run", options["method"], options["attention"])]
    if options["method"] != "relevance" or options["attention"] is not None:
        raise WildsegError("--compare names the methods itself: leave out --method and --attention")
    names = list(dict.fromkeys(name.strip() for name in compare.split(",") if name.strip()))
    unknown = [name for name in names if name != "relevance" and name not in ATTENTIONS]
    if unknown or not names:
        raise WildsegError(f"--compare takes relevance and dense attentions ({', '.join(ATTENTIONS)}), "
                           f"comma-separated; got {compare!r}")
    runs = [(name, "relevance", None) if name == "relevance" else (name, "dense", name) for name in names]
    for _, method, _ in runs:
        given = {name: value for name, value in options.items() if value is not None and name != "attention"}
        refuse_misplaced(given, method, options.get("refine") or ("pamr" if method == "dense" else "crf"))
    return runs


def _evaluate_run(console: Console, dataset, dataset_key: str, ids: list[str], given_labels: bool,
                  class_names: Optional[Path], save_predictions: Optional[Path], selection: dict, options: dict,
                  backbone, cluster, workers: int) -> tuple[dict, Optional[object]]:
    """One method over the images: its protocol (the published one of a dense attention), the segmenter (on
    `backbone` when one is loaded) or the Ray workers of `cluster`, the evaluation and its report; with the
    backbone a next run can reuse."""
    from .evaluation import PredictionStore, build_report, check_dataset, protocol_bg_threshold, run_settings

    protocol = "given" if given_labels else "open"
    published = None
    if options["method"] == "dense":
        published = _published_protocol(dataset_key, dataset, class_names, protocol, options)
    check_dataset(dataset, protocol)
    defaults = (published["options"] if published is not None
                else {"bg_threshold": protocol_bg_threshold(dataset, DEFAULT_BG_THRESHOLD)})
    defaults = {**defaults, "background_words": ()}
    area_threshold = published and published["area_threshold"]
    evaluator = (_RayEvaluator(console, cluster, defaults, options, dataset, protocol, area_threshold, workers)
                 if cluster is not None else
                 _LocalEvaluator(console, defaults, options, backbone, dataset, protocol, area_threshold, workers))
    with evaluator:
        settings = {**run_settings(dataset, protocol, evaluator.settings()), "dense_protocol": published}
        store = PredictionStore(save_predictions, settings, len(dataset.classes)) if save_predictions else None
        if published is not None and published["deviations"]:
            attention = options["attention"] or DEFAULT_ATTENTION
            console.print(f"{attention}: deviations from {published['follows']}'s protocol: "
                          f"{'; '.join(published['deviations'])}", markup=False, highlight=False, soft_wrap=True)
        with _image_progress(console) as progress:
            task = progress.add_task(f"{dataset.name} {dataset.split or ''}{evaluator.where}", total=len(ids))
            evaluation = evaluator.evaluate(ids, store, lambda count: [advance(progress, task) for _ in range(count)])
    evaluation.timings_s.update(evaluator.stages)
    return build_report(dataset, settings, selection, evaluation), evaluator.backbone


class _LocalEvaluator:
    """Evaluation in this process: the segmenter is built (or put on a loaded backbone) and its labels embedded
    on entry."""

    where = ""

    def __init__(self, console: Console, defaults: dict, options: dict, backbone, dataset, protocol: str,
                 area_threshold: Optional[float], workers: int):
        self.console, self.defaults, self.options, self.backbone = console, defaults, options, backbone
        self.dataset, self.protocol, self.area_threshold, self.workers = dataset, protocol, area_threshold, workers
        self.stages: dict[str, float] = {}

    def __enter__(self) -> "_LocalEvaluator":
        clock = time.perf_counter()
        self.segmenter = build_segmenter(self.console, protocol=self.defaults, backbone=self.backbone, **self.options)
        self.backbone = self.segmenter.backbone
        self.stages["model_load_s"] = time.perf_counter() - clock
        clock = time.perf_counter()
        _embed_ahead(self.console, self.segmenter, [prompt for index in self.dataset.scored_classes
                                                    for prompt in self.dataset.classes[index].prompts])
        self.stages["label_embeddings_s"] = time.perf_counter() - clock
        return self

    def __exit__(self, *exc_info) -> None:
        pass

    def settings(self) -> dict:
        return self.segmenter.settings()

    def evaluate(self, ids: list[str], store, on_images):
        from .evaluation import evaluate

        return evaluate(self.segmenter, self.dataset, ids, self.protocol, store,
                        on_image=lambda image_id, outcome: on_images(1), area_threshold=self.area_threshold,
                        workers=self.workers)


class _RayEvaluator:
    """Evaluation on EvaluationWorkers of a connected Ray cluster (`distributed`), started on entry and stopped
    on exit."""

    backbone = None

    def __init__(self, console: Console, cluster, defaults: dict, options: dict, dataset, protocol: str,
                 area_threshold: Optional[float], workers: int):
        from .distributed import EvaluationJob, worker_shape

        self.console, self.cluster, self.dataset = console, cluster, dataset
        self.shape = worker_shape(cluster.options, cluster.resources, options["device"])
        options = {**options, **({"device": "cpu"} if self.shape.gpus == 0 else {})}
        self.job = EvaluationJob(defaults, options, dataset, protocol, area_threshold, workers)
        self.where = f" on {self.shape.workers} Ray workers"
        self.stages: dict[str, float] = {}

    def __enter__(self) -> "_RayEvaluator":
        from .distributed import EvaluationWorker, worker_settings

        clock = time.perf_counter()
        with _status(self.console, f"starting {self.shape.workers} Ray workers"):
            self.actors = self.cluster.start(EvaluationWorker, self.shape, self.job)
            self.worker_settings = worker_settings(self.actors[0])
        self.stages["workers_ready_s"] = time.perf_counter() - clock
        return self

    def __exit__(self, *exc_info) -> None:
        self.cluster.stop(self.actors)

    def settings(self) -> dict:
        return self.worker_settings

    def evaluate(self, ids: list[str], store, on_images):
        from .distributed import evaluate_on_ray

        return evaluate_on_ray(self.actors, ids, len(self.dataset.classes), store, on_images)


def _comparison_row(name: str, result: dict) -> dict:
    """One run of a comparison: its metrics beside the protocol it follows and the published mIoU."""
    published = result["dense_protocol"] or {}
    return {"run": name, "method": result["segmenter"]["method"], **result["metrics"],
            "follows": published.get("follows"), "published_miou": published.get("published_miou"),
            "deviations": len(published.get("deviations", []))}


def _comparison_table(rows: list[dict]) -> Table:
    table = Table()
    for title in ("run", "mIoU %", "pixel acc %", "follows", "published mIoU %", "deviations"):
        table.add_column(title, justify="left" if title in ("run", "follows") else "right")
    for row in rows:
        published = "-" if row["published_miou"] is None else f"{row['published_miou']:.2f}"
        table.add_row(row["run"], _percent(row["miou"]), _percent(row["pixel_accuracy"]), row["follows"] or "-",
                      published, str(row["deviations"]) if row["follows"] else "-")
    return table


def _published_protocol(dataset_key: str, dataset, class_names: Optional[Path], protocol: str, options: dict
                        ) -> dict:
    """The dense protocol for the run (`evaluation.dense_protocol`): the data set takes its published class list
    unless --class-names was given, and every given option, class list or protocol that departs from the
    published run is added to its deviations. Refuses the CRF, which the official scoring has no place for."""
    from .evaluation import dense_protocol, use_published_class_list

    published = dense_protocol(options["attention"] or DEFAULT_ATTENTION, dataset_key, dataset)
    if "crf" in (options["refine"] or published["options"]["refine"]):
        raise WildsegError("the dense method's eval scores as the official dense segmenters do, with PAMR or no "
                           "refinement: use --refine pamr or none")
    deviations = published["deviations"]
    if class_names is not None and published["class_list"] is not None:
        deviations.append(f"--class-names {class_names} instead of the published list {published['class_list']}")
    elif published["class_list"] is not None:
        use_published_class_list(dataset, published["class_list"])
    if protocol != "open":
        deviations.append("the label-given protocol instead of the published open-vocabulary one")
    expected = {"stride": (published["options"].get("window", 0) // 2) or None, "templates": DEFAULT_TEMPLATES,
                **published["options"]}
    for name, value in options.items():
        if name in expected and value is not None and value != expected[name]:
            deviations.append(f"--{name.replace('_', '-')} {value} instead of {expected[name]}")
    return published


def _per_class_table(rows: list[dict]) -> Table:
    table = Table()
    for title in ("class", "name", "IoU %", "acc %", "truth px", "predicted px"):
        table.add_column(title, justify="left" if title == "name" else "right")
    for row in rows:
        table.add_row(str(row["class"]), row["name"], _percent(row["iou"]), _percent(row["accuracy"]),
                      str(row["truth_pixels"]), str(row["predicted_pixels"]))
    return table


def _summary_line(result: dict) -> str:
    metrics, images = result["metrics"], result["images"]
    return (
        f"{' '.join(filter(None, (result['dataset'], result['split'])))} ({result['protocol']} protocol), "
        f"{images['evaluated']} images "
        f"({images['reused']} reused, {images['failed']} failed): mIoU {_percent(metrics['miou'])}, "
        f"pixel accuracy {_percent(metrics['pixel_accuracy'])}, "
        f"mean class accuracy {_percent(metrics['mean_class_accuracy'])}"
    )


def _percent(value) -> str:
    return "-" if value is None or math.isnan(value) else f"{100 * value:.1f}"


if __name__ == "__main__":
    main()
