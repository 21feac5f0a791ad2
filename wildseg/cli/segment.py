"""`wildseg segment`: images (files, folders, glob patterns, @lists) to masks, overlays and records, in this process
or on Ray workers, resumable, with a summary and optionally the COCO and YOLO data sets of the output folder."""

from __future__ import annotations

import contextlib
import functools
import glob
import sys
import time
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import click
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from ..choices import AUTO_MIN_AREA, AUTO_MIN_SCORES, DEFAULT_VOCABULARY, VOCABULARIES
from ..errors import WildsegError
from ..factory import build_segmenter
from ..interrupts import Interrupts
from ..labels import BACKGROUND, clean_labels
from .app import INTERRUPTED
from .checks import check_export_options, check_output_folder
from .export import write_exports
from .options import SEGMENT_OPTIONS, export_options, ray_options, segmenter_values
from .progress import advance, embed_ahead, image_progress, model_loading, report_failure, status

if TYPE_CHECKING:
    from ..batch import BatchSummary, Labeling
    from ..planning import RunPlan

AUTO = "auto"
HAND_OUT_AFTER_S = 2.0
"""How long a `--ray` run that can hand out its images as it lists them (`planning.hands_out_as_listed`) plans
before it starts the cluster: a shorter listing is whole, and all of its checks made, before Ray starts."""


@click.command()
@click.argument("inputs", nargs=-1)
@click.option("--labels", "-l",
              help='Comma-separated names of what is in every image, e.g. "cat,sofa"; "auto" finds them in --vocab.')
@click.option("--vocab", help=f"With --labels auto: {', '.join(VOCABULARIES)} or a class-name file "
                              f"[default: {DEFAULT_VOCABULARY}].")
@click.option("--auto-min-area", type=click.FloatRange(0.0, 1.0),
              help=f"With --labels auto: least share of the image a found class covers [default: {AUTO_MIN_AREA}].")
@click.option("--auto-min-score", type=click.FloatRange(0.0, 1.0),
              help="With --labels auto: least mean score of a found class over its pixels [default: "
                   f"{AUTO_MIN_SCORES['relevance']} relevance, {AUTO_MIN_SCORES['dense']} dense].")
@click.option("--labels-file", type=click.Path(path_type=Path),
              help="Per-image labels: CSV rows `image,label,...` or a JSON object {image: labels}.")
@click.option("--skip-unlisted", is_flag=True,
              help="With --labels-file: segment only the images it lists (the others are counted as skipped).")
@click.option("--out", "-o", "out_dir", type=click.Path(path_type=Path), default=Path("wildseg_out"),
              show_default=True,
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
@click.option("--dry-run", is_flag=True,
              help="Plan the run and say how many images it would segment and skip; segment and write nothing.")
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
def segment(inputs, labels, vocab, auto_min_area, auto_min_score, labels_file, skip_unlisted, out_dir, save_scores,
            heatmaps,
            coco_path, yolo_folder, yolo_min_region, instances, recursive, shard, overwrite, dry_run, summary_path,
            workers,
            refine_workers, ray_address, ray_workers, ray_gpus_per_worker, ray_cpus_per_worker, quiet,
            **segmenter_arguments):
    """Segment images (files, folders, glob patterns, @list.txt) into background and their labels.

    Writes <name>.png (mask), <name>_overlay.jpg and <name>.json per image; images whose JSON exists are skipped
    unless --overwrite, and refused when it was made with other settings. Exit code 0: all done, 1: some images
    failed, 2: usage error. With --labels auto, each image is first segmented with the whole vocabulary and the
    classes that cover --auto-min-area of it with mean score --auto-min-score are segmented as given (see
    docs/segment.md). With --ray, the images are segmented by workers on a Ray cluster into the same files (see
    docs/ray.md).
    """
    started = time.perf_counter()
    from ..batch import BatchSummary, LabelOptions, labeling
    from ..config import SegmenterConfig
    from ..distributed.cluster import check_ray_options

    if not inputs:
        taken = " (--ray took the folder after it for its address: put --ray after the inputs)" if (
            ray_address is not None and Path(ray_address).exists()) else ""
        raise WildsegError(f"give the images to segment: files, folders, glob patterns or @lists{taken}")
    options = segmenter_values(segmenter_arguments)
    config = SegmenterConfig.from_options(options)
    if instances and not config.uses_regions:
        raise WildsegError("--instances makes objects of regions: add --refine regions (and --regions SOURCE) or use "
                           "--method corrclip")
    labels_plan = labeling(LabelOptions(labels, labels_file, vocab, auto_min_area, auto_min_score))
    if skip_unlisted and labels_file is None:
        raise WildsegError("--skip-unlisted is an option of --labels-file: add the file or leave it out")
    cluster = check_ray_options(ray_address, ray_workers, ray_gpus_per_worker, ray_cpus_per_worker)
    check_output_folder(out_dir, [])
    if summary_path is not None:
        check_output_folder(summary_path.parent, [summary_path], "--summary")
    check_export_options(coco_path, yolo_folder, yolo_min_region)
    from ..files import write_json
    from ..inputs import parse_shard
    from ..planning import OutputLayout, hands_out_as_listed, plan_run
    from ..provenance import run_request

    console = Console(stderr=True, quiet=quiet)
    heatmap_labels = (BACKGROUND, *clean_labels(labels)) if heatmaps and labels not in (None, AUTO) else None
    layout = OutputLayout(out_dir, save_scores, heatmap_labels, instances)
    request = functools.cache(partial(run_request, options))  # made once needed: a record to compare, or work
    streamed = cluster is not None and not dry_run and hands_out_as_listed(list(inputs), out_dir, labels_plan)
    with status(console, "planning: listing the inputs and the outputs done before"):
        plan = plan_run(inputs, layout, labels_plan, request, recursive=recursive,
                        shard=None if shard is None else parse_shard(shard), skip_unlisted=skip_unlisted,
                        overwrite=overwrite, given_labels=labels if labels != AUTO else None,
                        hand_out_after=HAND_OUT_AFTER_S if streamed else None)
    with plan:
        if plan.unlisted:
            console.print(f"skipping {plan.unlisted} of the {plan.images} images: {labels_file} does not list them",
                          markup=False, highlight=False, soft_wrap=True)
        report = Console(quiet=quiet)
        if dry_run:
            report.print(plan.line(), soft_wrap=True, markup=False, highlight=False)
            sys.exit(0)
        plan.remove_leftovers()
        run = BatchSummary(total=plan.images, skipped=plan.skipped, unlisted=plan.unlisted)
        extras = {"save_scores": save_scores, "heatmaps": heatmaps, "instances": instances}
        with Interrupts() as interrupts:
            try:
                if (plan.todo_count or not plan.listed) and cluster is not None:
                    segment_on_ray(cluster, plan, labels_plan, extras, request(), overwrite, workers, refine_workers,
                                   options, run, console, interrupts)
                elif plan.todo_count:
                    segment_here(plan, labels_plan, extras, request(), workers, refine_workers, options, run,
                                 console, interrupts)
            except KeyboardInterrupt:  # while the model loads, the labels are embedded or Ray starts: none in flight
                run.interrupted = True
                interrupts.finishing()
            plan.wait(None)  # a run handed out as listed counts the images of the whole listing
            run.total, run.skipped, run.unlisted = plan.images, plan.skipped, plan.unlisted
            run.seconds = time.perf_counter() - started
            if plan.only is not None and run.done == 1:
                report.print(summary_table(run.last_classes))
                report.print(f"wrote {', '.join(written_names(plan.only[1], heatmaps))}", soft_wrap=True,
                             markup=False, highlight=False)
            report.print(run.line(), soft_wrap=True, markup=False, highlight=False)
            if summary_path is not None:
                write_json(summary_path, run.as_dict(), "the summary")
            write_exports(console, report, out_dir, coco_path, yolo_folder, yolo_min_region, instances)
    sys.exit(INTERRUPTED if run.interrupted else 1 if run.failures else 0)


def segment_here(plan: RunPlan, labels: Labeling, extras: dict[str, bool], request: dict, workers: int,
                 refine_workers: Optional[int], options: dict, run: BatchSummary, console: Console,
                 interrupts: Interrupts) -> None:
    """Segment the plan's images to do in this process (`batch.segment_and_write`) with one progress bar, counting
    each image in `run` with the seconds of each stage."""
    from ..batch import segment_and_write

    clock = time.perf_counter()
    with model_loading(console, options):  # torch and open_clip are imported then, under the status line
        segmenter = build_segmenter(options)
    run.stages_s["model_load_s"] = time.perf_counter() - clock
    with segmenter:
        if refine_workers is not None and segmenter.pipeline.cpu_crf is None:
            raise WildsegError("--refine-workers is an option of pydensecrf's CRF (--refine crf or pamr+crf with "
                               "--crf-backend pydensecrf, auto's choice on the CPU): leave it out")
        clock = time.perf_counter()
        embed_ahead(console, segmenter, labels.known)
        run.stages_s["label_embeddings_s"] = time.perf_counter() - clock
        clock = time.perf_counter()
        with image_progress(console) as progress:
            task = progress.add_task("segmenting", total=plan.todo_count)
            run.interrupted = segment_and_write(
                segmenter, plan.todo(), labels, extras, request, partial(account, run, progress, task), workers,
                refine_workers, deferred=interrupts.deferred, finishing=interrupts.finishing)
        run.stages_s["segmenting_s"] = time.perf_counter() - clock


def segment_on_ray(cluster_options, plan: RunPlan, labels: Labeling, extras: dict[str, bool], request: dict,
                   overwrite: bool, workers: int, refine_workers: Optional[int], options: dict, run: BatchSummary,
                   console: Console, interrupts: Interrupts) -> None:
    """Segment the plan's images to do on Ray workers (`distributed`), in chunks read from the plan as workers
    take them (while it is still planned, for a run handed out as listed: the chunks' size then follows from the
    images planned once the workers are ready), with one progress bar for the whole cluster (its total known once
    the listing ends), counting each image in `run`."""
    from ..batch import ImageOutcome
    from ..distributed.cluster import RayCluster, chunk_size, chunked, run_chunks, worker_shape
    from ..distributed.workers import SegmentJob, SegmentWorker

    clock = time.perf_counter()
    with contextlib.ExitStack() as stack:
        with status(console, f"starting {cluster_options.address} Ray workers"):
            cluster = stack.enter_context(RayCluster(cluster_options))
            shape = worker_shape(cluster_options, cluster.resources, options.get("device") or "auto")
            worker_options = {**options, **({"device": "cpu"} if shape.gpus == 0 else {})}
            job = SegmentJob(worker_options, labels, extras, request, workers, refine_workers, overwrite)
            actors = cluster.start(SegmentWorker, shape, job)
        run.stages_s["ray_start_s"] = time.perf_counter() - clock
        clock = time.perf_counter()
        with image_progress(console) as progress:
            task = progress.add_task(f"segmenting on {shape.workers} Ray workers",
                                     total=plan.todo_count if plan.listed else None)

            def count(outcome: ImageOutcome) -> None:
                if plan.listed:  # the total, once the listing has ended
                    progress.update(task, total=plan.todo_count)
                account(run, progress, task, outcome)

            run.interrupted = run_chunks(
                actors, chunked(plan.todo(), chunk_size(plan.todo_count, shape.workers)),
                call=lambda actor, chunk: actor.segment.remote(dict(chunk)),
                on_result=lambda chunk, outcomes: [count(outcome) for outcome in outcomes],
                on_error=lambda chunk, reason: [count(ImageOutcome(image, reason)) for image, _ in chunk],
                finishing=interrupts.finishing, deferred=interrupts.deferred)
        run.stages_s["segmenting_s"] = time.perf_counter() - clock
        interrupts.finishing()  # every image is counted: a stop signal while Ray shuts down is only noted


def account(run: BatchSummary, progress: Progress, task, outcome) -> None:
    """Count an image's outcome, print its failure, advance the bar."""
    run.account(outcome)
    if outcome.error is not None:
        report_failure(progress.console, outcome.image, outcome.error)
    advance(progress, task)


def written_names(paths: dict[str, Path], heatmaps: bool) -> list[str]:
    """What one image's run wrote: its mask's path, then the names of the files beside it (the scores, and the heat
    maps when they were asked for, also those of labels found automatically), the record last."""
    mask, record = paths["mask"], paths["record"]
    heatmaps = sorted(mask.parent.glob(f"{glob.escape(mask.stem)}_heatmap_*.jpg")) if heatmaps else []
    others = dict.fromkeys(path for path in [*paths.values(), *heatmaps] if path not in (mask, record))
    return [str(mask), *(path.name for path in others if path.is_file()), record.name]


def summary_table(rows: list[dict]) -> Table:
    """The classes present in the one image segmented: share of the pixels and mean score."""
    table = Table()
    table.add_column("class", justify="right")
    table.add_column("label")
    table.add_column("pixels", justify="right")
    table.add_column("mean score", justify="right")
    for index, row in enumerate(rows):
        if row["pixel_fraction"] > 0:
            table.add_row(str(index), row["label"], f"{row['pixel_fraction']:.1%}", f"{row['mean_score']:.2f}")
    return table
