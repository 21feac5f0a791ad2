"""`wildseg eval`: a benchmark's images segmented by one method, or several under their own protocols
(`--compare`), in this process or on Ray workers, with per-class IoU, mIoU and accuracies."""

from __future__ import annotations

import contextlib
import math
import sys
from pathlib import Path
from typing import Optional

import click
from rich.console import Console
from rich.table import Table

from .. import methods
from ..choices import DATASETS, DEFAULT_ATTENTION
from ..config import SegmenterConfig
from ..errors import WildsegError
from .checks import check_output_folder
from .options import ray_options, segmenter_options, segmenter_values
from .progress import advance, embed_ahead, image_progress, model_loading, status

COMPARABLE = ("relevance", *methods.names(methods.DENSE))


@click.command(name="eval")
@click.option("--dataset", "-d", "dataset_name", type=click.Choice(DATASETS), required=True,
              help="Benchmark (see docs/eval.md for each one's --root layout).")
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
                   "With --method dense, options not given follow the published protocol of the method that "
                   "--attention names (NACLIP, SCLIP or ClearCLIP; NACLIP's for the others) on the data set, with "
                   "its class list (docs/eval.md); the report records it and every deviation.")
@click.option("--compare", help="Evaluate several methods on the same images, each under its own protocol: a "
                                f"comma-separated list of {', '.join(COMPARABLE)}; the report holds every run and a "
                                "table of mIoU beside the published numbers.")
@click.option("--workers", type=click.IntRange(min=1), default=2, show_default=True,
              help="Threads reading images and ground truth ahead of the model.")
@ray_options
@click.option("--quiet", "-q", is_flag=True, help="No progress display and no tables.")
def evaluate_command(dataset_name, root, split, download, ignore_index, class_names, given_labels, limit, ids_file,
                     report, save_predictions, compare, workers, ray_address, ray_workers, ray_gpus_per_worker,
                     ray_cpus_per_worker, quiet, **segmenter_arguments):
    """Evaluate on a benchmark: per-class IoU, mIoU, pixel and mean class accuracy.

    Images are read ahead and segmented in batches; with --ray, by workers on a Ray cluster (see docs/ray.md)."""
    from ..distributed.cluster import check_ray_options

    options = segmenter_values(segmenter_arguments)
    cluster_options = check_ray_options(ray_address, ray_workers, ray_gpus_per_worker, ray_cpus_per_worker)
    runs = compared_runs(compare, options)
    from ..datasets import open_dataset

    dataset = open_dataset(dataset_name, root, split, ignore_index, download, class_names)
    from ..evaluation import load_ids  # torch: once the data set is found
    from ..files import write_json

    ids = load_ids(ids_file, dataset) if ids_file else list(dataset.ids)
    ids = ids[:limit] if limit else ids
    if save_predictions is not None:
        check_output_folder(save_predictions, [], "--save-predictions")
    if report is not None:
        check_output_folder(report.parent, [report], "--report")
    console, output = Console(stderr=True, quiet=quiet), Console(quiet=quiet)
    selection = {"images": len(ids), "limit": limit, "ids_file": None if ids_file is None else str(ids_file)}
    protocol = "given" if given_labels else "open"
    results, failed, backbone = {}, False, None
    with contextlib.ExitStack() as stack:
        cluster = None
        if cluster_options is not None:
            from ..distributed.cluster import RayCluster

            with status(console, f"connecting to Ray ({cluster_options.address})"):
                cluster = stack.enter_context(RayCluster(cluster_options))
        for name, method, attention in runs:
            predictions = save_predictions / name if save_predictions is not None and compare else save_predictions
            run_options = {**options, "method": method, "attention": attention}
            result, backbone = evaluate_run(console, dataset, dataset_name, ids, protocol, class_names, predictions,
                                            selection, run_options, backbone, cluster, workers)
            results[name] = result
            if not compare:
                output.print(per_class_table(result["per_class"]))
            for failure in result["images"]["failures"]:
                click.echo(f"wildseg: failed: {name + ': ' if compare else ''}{failure['id']}: {failure['reason']}",
                           err=True)
            output.print(f"{name}: " * bool(compare) + summary_line(result), soft_wrap=True)
            failed = failed or bool(result["images"]["failures"])
    if compare:
        comparison = [comparison_row(name, result) for name, result in results.items()]
        output.print(comparison_table(comparison))
    if report is not None:
        write_json(report, {"comparison": comparison, "runs": results} if compare else results[runs[0][0]],
                   "the report")
    if failed:
        sys.exit(1)


def compared_runs(compare: Optional[str], options: dict) -> list[tuple[str, str, Optional[str]]]:
    """(name, method, attention) of each run: the one --method/--attention name, or each entry of --compare; each
    run's options are checked here, before the data set is read."""
    if compare is None:
        runs = [("run", options["method"], options["attention"])]
    else:
        if options["method"] != "relevance" or options["attention"] is not None:
            raise WildsegError("--compare names the methods itself: leave out --method and --attention")
        names = list(dict.fromkeys(name.strip() for name in compare.split(",") if name.strip()))
        if not names or any(name not in COMPARABLE for name in names):
            raise WildsegError(f"--compare takes {', '.join(COMPARABLE)}, comma-separated; got {compare!r}")
        runs = [(name, "relevance", None) if name == "relevance" else (name, "dense", name) for name in names]
    for _, method, attention in runs:
        SegmenterConfig.from_options({**options, "method": method, "attention": attention},
                                     {"refine": "pamr" if method == "dense" else "crf"})
    return runs


def evaluate_run(console: Console, dataset, dataset_key: str, ids: list[str], protocol: str,
                 class_names: Optional[Path], save_predictions: Optional[Path], selection: dict, options: dict,
                 backbone, cluster, workers: int) -> tuple[dict, Optional[object]]:
    """One method over the images under its protocol (`evaluation.run_protocol`), by a segmenter here (on
    `backbone` when one is loaded) or the Ray workers of `cluster`; its report, and the backbone a next run can
    reuse."""
    from ..distributed.evaluation import RayEvaluator
    from ..evaluation import (
        LocalEvaluator,
        PredictionStore,
        build_report,
        check_dataset,
        normalization_deviations,
        padding_deviations,
        run_protocol,
        run_settings,
    )

    plan = run_protocol(options, dataset_key, dataset, class_names, protocol)
    check_dataset(plan.dataset, protocol)
    if cluster is not None:
        evaluator = RayEvaluator(cluster, options, plan, protocol, workers,
                                 starting=lambda message: status(console, message))
    else:
        evaluator = LocalEvaluator(options, plan, protocol, workers, backbone,
                                   loading=lambda: model_loading(console, options) if backbone is None
                                   else status(console, f"preparing the {options['method']} method"),
                                   prepare=lambda segmenter, labels: embed_ahead(console, segmenter, labels))
    with evaluator:
        published = plan.published
        if published is not None:
            published = {**published, "deviations": [*published["deviations"],
                                                     *normalization_deviations(published, evaluator.settings())]}
        settings = {**run_settings(plan.dataset, protocol, evaluator.settings()), "dense_protocol": published}
        store = PredictionStore(save_predictions, settings, len(plan.dataset.classes)) if save_predictions else None
        if published is not None and published["deviations"]:
            print_deviations(console, options, published, published["deviations"])
        with image_progress(console) as progress:
            task = progress.add_task(f"{plan.dataset.name} {plan.dataset.split or ''}{evaluator.where}", total=len(ids))
            evaluation = evaluator.evaluate(ids, store, lambda count: [advance(progress, task) for _ in range(count)])
    evaluation.timings_s.update(evaluator.stages)
    report = build_report(plan.dataset, settings, selection, evaluation)
    if published is not None:
        padded = padding_deviations(published, settings["segmenter"], evaluation.image_sizes)
        if padded:
            print_deviations(console, options, published, padded)
            report["dense_protocol"] = {**published, "deviations": [*published["deviations"], *padded]}
    return report, evaluator.backbone


def print_deviations(console: Console, options: dict, published: dict, deviations: list[str]) -> None:
    """One line listing how a dense run departs from the protocol it follows."""
    console.print(f"{options['attention'] or DEFAULT_ATTENTION}: deviations from {published['follows']}'s protocol: "
                  f"{'; '.join(deviations)}", markup=False, highlight=False, soft_wrap=True)


def comparison_row(name: str, result: dict) -> dict:
    """One run of a comparison: its metrics beside the protocol it follows and the published mIoU."""
    published = result["dense_protocol"] or {}
    return {"run": name, "method": result["segmenter"]["method"], **result["metrics"],
            "follows": published.get("follows"), "published_miou": published.get("published_miou"),
            "deviations": len(published.get("deviations", []))}


def comparison_table(rows: list[dict]) -> Table:
    """The runs of a comparison side by side."""
    table = Table()
    for title in ("run", "mIoU %", "pixel acc %", "follows", "published mIoU %", "deviations"):
        table.add_column(title, justify="left" if title in ("run", "follows") else "right")
    for row in rows:
        published = "-" if row["published_miou"] is None else f"{row['published_miou']:.2f}"
        table.add_row(row["run"], percent(row["miou"]), percent(row["pixel_accuracy"]), row["follows"] or "-",
                      published, str(row["deviations"]) if row["follows"] else "-")
    return table


def per_class_table(rows: list[dict]) -> Table:
    """IoU, accuracy and pixel counts per class."""
    table = Table()
    for title in ("class", "name", "IoU %", "acc %", "truth px", "predicted px"):
        table.add_column(title, justify="left" if title == "name" else "right")
    for row in rows:
        table.add_row(str(row["class"]), row["name"], percent(row["iou"]), percent(row["accuracy"]),
                      str(row["truth_pixels"]), str(row["predicted_pixels"]))
    return table


def summary_line(result: dict) -> str:
    """The run's metrics in one line."""
    metrics, images = result["metrics"], result["images"]
    return (
        f"{' '.join(filter(None, (result['dataset'], result['split'])))} ({result['protocol']} protocol), "
        f"{images['evaluated']} images "
        f"({images['reused']} reused, {images['failed']} failed): mIoU {percent(metrics['miou'], '%')}, "
        f"pixel accuracy {percent(metrics['pixel_accuracy'], '%')}, "
        f"mean class accuracy {percent(metrics['mean_class_accuracy'], '%')}"
    )


def percent(value, sign: str = "") -> str:
    """A fraction in percent with one decimal, followed by `sign` (a table's column says %), or '-' where it is
    undefined."""
    return "-" if value is None or math.isnan(value) else f"{100 * value:.1f}{sign}"
