"""What Ray adds: the same images segmented by `wildseg segment` in one process and with `--ray` on Ray workers.

    python benchmarks/ray_bench.py --images 64 --workers 2 --json ray_bench.json
    python benchmarks/ray_bench.py --device cuda --images 512 --workers 1 --json ray_bench_gpu.json

Both runs are the command users type, on the same 500 x 375 JPEGs (the example photos, resized) with the same
weights (random, seeded, unless --checkpoint is given: speed does not depend on their values) and settings.
An untimed run on one image first fills a fresh label-embedding cache, which both timed runs then read. Each
run's `--summary` gives its stages: one process loads the model and reads the labels, then segments; with
Ray, the cluster starts and every worker loads the model (`ray_start_s`, a local Ray instance started for
the run unless --ray-address names a running one), then they segment. Reported: both rates over the
segmenting stage and end to end, the fixed start-up cost Ray adds, the wall seconds per image it adds (or
saves) while segmenting, and whether the two runs wrote the same masks. Not a test: it reports figures.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import open_clip
import torch
from bench import write_images
from rich.console import Console
from rich.table import Table

import wildseg
from wildseg.autolabels import load_vocabulary
from wildseg.backbone import register_model_config

RUNS = ("one process", "ray")


def random_checkpoint(model: str, path: Path) -> Path:
    """open_clip's initialisation of `model` under seed 0, saved as a state dict."""
    torch.manual_seed(0)
    torch.save(open_clip.create_model(model).state_dict(), path)
    return path


def run_segment(images: Path, out: Path, summary: Path, arguments, checkpoint: Path, extra: list[str],
                environment: dict) -> dict:
    """`wildseg segment` on the folder; its summary."""
    labels = ",".join(entry.name for entry in load_vocabulary("coco")[: arguments.labels])
    command = [sys.executable, "-m", "wildseg.cli", "segment", str(images), "-l", labels, "-o", str(out), "-q",
               "--summary", str(summary), "--model", arguments.model, "--checkpoint", str(checkpoint),
               "--activation", "gelu", "--device", arguments.device, "--tta", arguments.tta, "--templates",
               arguments.templates, *(["--model-config", str(arguments.model_config)] if arguments.model_config
                                      else []), *extra]
    child = subprocess.run(command, capture_output=True, text=True, env=environment, check=False)
    if child.returncode != 0:
        sys.exit(f"wildseg segment {' '.join(extra)} failed:\n{child.stderr}")
    return json.loads(summary.read_text())


def same_masks(first: Path, second: Path) -> tuple[int, int]:
    """How many of the first run's masks the second wrote byte for byte, of how many."""
    masks = sorted(first.glob("*.png"))
    return sum(mask.read_bytes() == (second / mask.name).read_bytes() for mask in masks), len(masks)


def measure(arguments) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        (folder / "images").mkdir()
        write_images(folder / "images", arguments.images)
        checkpoint = arguments.checkpoint or random_checkpoint(arguments.model, folder / "weights.pt")
        environment = {**os.environ, "WILDSEG_CACHE_DIR": str(folder / "text-cache")}
        (folder / "warm-up").mkdir()
        write_images(folder / "warm-up", 1)
        run_segment(folder / "warm-up", folder / "warm-up-out", folder / "warm-up.json", arguments, checkpoint, [],
                    environment)
        ray = ["--ray", arguments.ray_address or "local", "--ray-workers", str(arguments.workers)]
        summaries = {
            "one process": run_segment(folder / "images", folder / "one", folder / "one.json", arguments,
                                       checkpoint, [], environment),
            "ray": run_segment(folder / "images", folder / "ray", folder / "ray.json", arguments, checkpoint, ray,
                               environment),
        }
        identical, masks = same_masks(folder / "one", folder / "ray")
    one, on_ray = summaries["one process"], summaries["ray"]
    images = arguments.images
    segmenting = {name: summary["stages_s"]["segmenting_s"] for name, summary in summaries.items()}
    return {
        "images": images,
        "workers": arguments.workers,
        "segmenting_images_per_s": {name: images / seconds for name, seconds in segmenting.items()},
        "end_to_end_images_per_s": {name: images / summary["seconds"] for name, summary in summaries.items()},
        "start_up_s": {"one process": one["stages_s"]["model_load_s"] + one["stages_s"]["label_embeddings_s"],
                       "ray": on_ray["stages_s"]["ray_start_s"]},
        "ray_overhead_s_per_image": (segmenting["ray"] - segmenting["one process"]) / images,
        "identical_masks": f"{identical}/{masks}",
        "summaries": summaries,
    }


def environment_record(arguments) -> dict:
    cuda = arguments.device == "cuda"
    return {
        "device": torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or platform.machine()}, "
                                                            f"{os.cpu_count()} cores)",
        "versions": {"wildseg": wildseg.__version__, "torch": torch.__version__, "ray": _ray_version(),
                     "python": platform.python_version()},
        "settings": {"model": arguments.model, "weights": str(arguments.checkpoint or "random (seed 0)"),
                     "labels": arguments.labels, "tta": arguments.tta, "templates": arguments.templates},
        "command": " ".join(["python", "benchmarks/ray_bench.py", *sys.argv[1:]]),
    }


def _ray_version() -> str:
    import ray

    return ray.__version__


def report(result: dict) -> Table:
    table = Table(title=f"{result['images']} images, {result['workers']} Ray workers ({result['device']})")
    table.add_column("")
    for name in RUNS:
        table.add_column(name, justify="right")
    rows = (("images/s while segmenting", "segmenting_images_per_s", "{:.3f}"),
            ("images/s end to end", "end_to_end_images_per_s", "{:.3f}"),
            ("start-up s (model, labels; Ray: cluster and workers)", "start_up_s", "{:.1f}"))
    for title, key, form in rows:
        table.add_row(title, *(form.format(result[key][name]) for name in RUNS))
    table.caption = (f"Ray adds {result['ray_overhead_s_per_image']:+.3f} s per image while segmenting; "
                     f"identical masks {result['identical_masks']}")
    return table


def parse_arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2, help="Ray workers (--ray-workers)")
    parser.add_argument("--ray-address", help="a running Ray cluster (default: a local instance for the run)")
    parser.add_argument("--labels", type=int, default=21, help="how many COCO class names to segment (at most 80)")
    parser.add_argument("--tta", default="default")
    parser.add_argument("--templates", default="imagenet80")
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--model-config", type=Path, help="an open_clip model config (JSON) to register first")
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--json", type=Path, help="write the results here")
    return parser.parse_args(argv)


def main() -> None:
    arguments = parse_arguments()
    if arguments.model_config is not None:
        register_model_config(arguments.model_config)
    result = {**measure(arguments), **environment_record(arguments)}
    Console().print(report(result))
    if arguments.json is not None:
        arguments.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
