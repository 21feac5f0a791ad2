"""Speed of the whole pipeline on VOC-sized images: the fast path against the straightforward one, same run.

    python benchmarks/bench.py --device cpu --labels 21 --images 8 --reference-images 2 --json bench.json
    python benchmarks/bench.py --device cuda --labels 21 --images 512 --reference-images 4 --json bench.json

Both paths segment 500 x 375 JPEGs (the example photos, resized) with the same settings and write their
outputs (mask, overlay, JSON) like `wildseg segment`, from decoding to writing:

- fast: `Segmenter.segment_many`: decode threads ahead of the model, views of several images per model
  batch, all labels from one forward and one batched backward, `--precision` (auto: fp16 autocast on CUDA,
  fp32 on the CPU), label embeddings cached, PAMR and (on CUDA, by default) the torch CRF on the model's
  device, or pydensecrf's CRF in worker processes; outputs written by background threads.
- straightforward: `Segmenter.segment_reference` one image after the other: label embeddings computed
  per image, one view at a time, one forward and one backward per label and view, fp32, pydensecrf's
  CRF, then writing.

The straightforward path runs first in a child process, then the fast path in this one, each after one untimed
warm-up image: each peak memory is its own (the child is started before this process has done any work, as Linux
keeps a process's peak across the start of a program). The
table gives images per second, seconds per image of each stage (stages overlap in the fast path, so they
may add up to more than the wall time) and peak memory; `--json FILE` writes it with `images_per_s` (fast
path) and `speedup` (fast over straightforward) at the top level. Weights are random (`--pretrained none`)
unless --checkpoint is given: speed does not depend on their values; with `--method dense --attention corrclip`,
CorrCLIP's DINO (`--dino-model`) is random too, and its regions are SLIC's. Not a test: it reports figures.
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import open_clip
import torch
from PIL import Image
from rich.console import Console
from rich.table import Table

import wildseg
from wildseg import Segmenter, SegmenterConfig
from wildseg.autolabels import load_vocabulary
from wildseg.backbone import load_backbone
from wildseg.backbone.dino import load_dino
from wildseg.backbone.loading import resolve_precision
from wildseg.choices import DEFAULT_DINO_MODEL
from wildseg.outputs import BackgroundWriter, output_paths, write_outputs
from wildseg.timing import StageTimes

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "images"
VOC_SIZE = (500, 375)
STAGES = ("decode", "text", "forward", "backward", "tta_merge", "pseudo_labels", "refine", "write")
PATHS = ("fast", "straightforward")
WRITE_THREADS = 4
"""Writer threads on the fast path: `wildseg segment`'s with its default --workers 2."""


def write_images(folder: Path, count: int) -> list[Path]:
    """`count` VOC-sized JPEGs cycling through the example photos."""
    photos = [Image.open(path).convert("RGB").resize(VOC_SIZE, Image.BICUBIC)
              for path in sorted(EXAMPLES.glob("*.jpg"))]
    paths = []
    for index in range(count):
        path = folder / f"{index:05d}.jpg"
        photos[index % len(photos)].save(path, quality=90)
        paths.append(path)
    return paths


def build_segmenter(arguments, path_name: str) -> Segmenter:
    """The Segmenter of the arguments for a path (the straightforward one in fp32), on random weights unless a
    checkpoint is given (`SegmenterConfig.from_options` drops what the method and refinement do not use)."""
    if arguments.model_config is not None:
        open_clip.add_model_config(arguments.model_config)
    backbone = load_backbone(arguments.model, pretrained=None, checkpoint=arguments.checkpoint, device=arguments.device,
                             precision=arguments.precision if path_name == "fast" else "fp32")
    options = {"method": arguments.method, "tta": arguments.tta, "refine": arguments.refine,
               "templates": arguments.templates, "view_batch": arguments.view_batch}
    defaults = {"crf_backend": arguments.crf_backend, "attention": arguments.attention, "background_words": ()}
    config = SegmenterConfig.from_options(options, defaults)
    dino = random_dino(arguments) if config.method_name == "corrclip" else None
    return Segmenter(backbone, config, dino=dino)


def random_dino(arguments) -> torch.nn.Module:
    """CorrCLIP's DINO (`--dino-model`, with `--dino-architecture`'s timm arguments) with random weights, loaded by
    `backbone.dino.load_dino` from a state dict of timm's initialisation, as a local checkpoint is."""
    import timm

    architecture = json.loads(arguments.dino_architecture)
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = Path(folder) / "dino.pt"
        torch.save(timm.create_model(arguments.dino_model, pretrained=False, num_classes=0, **architecture)
                   .state_dict(), checkpoint)
        return load_dino(arguments.dino_model, checkpoint, arguments.device, **architecture)


def run_path(path_name: str, arguments) -> dict:
    """Segment and write the images by one path; seconds, stage seconds per image and peak memory."""
    segmenter = build_segmenter(arguments, path_name)
    labels = [entry.name for entry in load_vocabulary("coco")][: arguments.labels]
    count = arguments.images if path_name == "fast" else arguments.reference_images
    with tempfile.TemporaryDirectory() as folder:
        images = write_images(Path(folder), count + 1)
        outputs = Path(folder) / "out"
        segment(segmenter, path_name, images[:1], labels, outputs, StageTimes(segmenter.backbone.device))
        if segmenter.backbone.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        stages = StageTimes(segmenter.backbone.device)
        started = time.perf_counter()
        segment(segmenter, path_name, images[1:], labels, outputs, stages)
        seconds = time.perf_counter() - started
    return {
        "images": count,
        "seconds": seconds,
        "images_per_s": count / seconds,
        "stage_s_per_image": {stage: stages.seconds.get(stage, 0.0) / count for stage in STAGES},
        "peak_cpu_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_gpu_memory_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
    }


def segment(segmenter: Segmenter, path_name: str, images: list[Path], labels: list[str], out: Path,
            stages: StageTimes) -> None:
    """Run one path over `images`, writing each image's outputs (in background threads on the fast path, as
    `wildseg segment` does; in turn on the straightforward one); stage seconds go to `stages`."""
    segmenter.stages = stages
    if path_name == "fast":
        results = ((item.source, item.result) for item in segmenter.segment_many(images, labels))
    else:
        results = ((image, segmenter.segment_reference(image, labels)) for image in images)
    write_seconds = []
    with BackgroundWriter(WRITE_THREADS) as writer:
        for image, result in results:
            stages.seconds["decode"] += result.timings["decode_s"]
            stages.seconds["text"] += result.timings.get("text_s", 0.0)
            stages.seconds["refine"] += result.timings.get("crf_s", 0.0)
            write = partial(timed_write, image.stem, out, result, write_seconds)
            if path_name == "fast":
                writer.submit(image, write)
                check_written(writer.finished())
            else:
                write()
        check_written(writer.finished(wait_all=True))
    stages.seconds["write"] += sum(write_seconds)


def timed_write(stem: str, out: Path, result, seconds: list[float]) -> None:
    """Write an image's mask, overlay and JSON; append the seconds it took to `seconds`."""
    started = time.perf_counter()
    write_outputs(output_paths(stem, out), *result.preview(), result.mask, result.labels,
                  {"labels": result.labels, "classes": result.summary()})
    seconds.append(time.perf_counter() - started)


def check_written(outcomes) -> None:
    for image, error in outcomes:
        if error is not None:
            raise RuntimeError(f"writing the outputs of {image} failed") from error


def environment(arguments) -> dict:
    cuda = arguments.device == "cuda"
    return {
        "device": torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or platform.machine()}, "
                                                            f"{os.cpu_count()} cores)",
        "dtype": f"{resolve_precision(arguments.precision, torch.device(arguments.device))} (fast), fp32 "
                 "(straightforward)",
        "versions": {"wildseg": wildseg.__version__, "torch": torch.__version__, "open_clip": open_clip.__version__,
                     "python": platform.python_version(), "cuda": torch.version.cuda if cuda else None},
    }


def settings(arguments) -> dict:
    return {"model": arguments.model, "weights": str(arguments.checkpoint or "random"), "method": arguments.method,
            "attention": arguments.attention if arguments.method == "dense" else None, "tta": arguments.tta,
            **({"dino_model": arguments.dino_model, "dino_architecture": json.loads(arguments.dino_architecture)}
               if arguments.method == "dense" and arguments.attention == "corrclip" else {}),
            "refine": arguments.refine, "crf_backend": arguments.crf_backend, "labels": arguments.labels,
            "templates": arguments.templates,
            "view_batch": arguments.view_batch, "image_size": list(VOC_SIZE)}


def report(result: dict) -> Table:
    fast, straightforward = result["paths"]["fast"], result["paths"]["straightforward"]
    table = Table(title=f"{result['device']}, {result['dtype']}: speed-up {result['speedup']:.1f}x")
    table.add_column("s / image")
    for name in PATHS:
        table.add_column(name, justify="right")
    table.add_row("images", str(fast["images"]), str(straightforward["images"]))
    table.add_row("images / s", f"{fast['images_per_s']:.3f}", f"{straightforward['images_per_s']:.3f}")
    for stage in STAGES:
        table.add_row(stage, *(f"{result['paths'][name]['stage_s_per_image'][stage]:.3f}" for name in PATHS))
    table.add_row("peak CPU memory (MB)", *(f"{result['paths'][name]['peak_cpu_memory_mb']:.0f}" for name in PATHS))
    gpu = [result["paths"][name]["peak_gpu_memory_mb"] for name in PATHS]
    table.add_row("peak GPU memory (MB)", *("-" if value is None else f"{value:.0f}" for value in gpu))
    return table


def parse_arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, default=16, help="images timed on the fast path")
    parser.add_argument("--reference-images", type=int, default=2, help="images timed on the straightforward path")
    parser.add_argument("--method", choices=["relevance", "dense"], default="relevance")
    parser.add_argument("--attention", default="naclip", help="dense method's attention")
    parser.add_argument("--dino-model", default=DEFAULT_DINO_MODEL, help="CorrCLIP's DINO, by timm's name")
    parser.add_argument("--dino-architecture", default="{}",
                        help="timm arguments (JSON) that override the DINO's (a tiny one for smoke runs)")
    parser.add_argument("--tta", default="default")
    parser.add_argument("--refine", default="crf")
    parser.add_argument("--crf-backend", default="auto",
                        help="fast path's CRF: auto (torch on CUDA, pydensecrf on CPU), torch or pydensecrf; the "
                             "straightforward path always uses pydensecrf")
    parser.add_argument("--labels", type=int, default=21, help="how many COCO class names to segment (at most 80)")
    parser.add_argument("--precision", choices=["auto", "fp32", "fp16", "bf16"], default="auto",
                        help="fast path's precision (auto: fp16 on CUDA, fp32 on the CPU); the straightforward path "
                             "is fp32")
    parser.add_argument("--templates", default="imagenet80")
    parser.add_argument("--view-batch", type=int,
                        help="views per model batch on the fast path (default 32 on CUDA, 8 on CPU)")
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--model-config", type=Path, help="an open_clip model config (JSON) to register first")
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--path", choices=PATHS, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main() -> None:
    arguments = parse_arguments()
    if arguments.path is not None:
        print(json.dumps(run_path(arguments.path, arguments)))
        return
    child = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--path", "straightforward"],
                           capture_output=True, text=True, check=False)
    if child.returncode != 0:
        sys.exit(f"the straightforward path failed:\n{child.stderr}")
    paths = {"fast": run_path("fast", arguments),
             "straightforward": json.loads(child.stdout.strip().splitlines()[-1])}
    result = {
        "images_per_s": paths["fast"]["images_per_s"],
        "speedup": paths["fast"]["images_per_s"] / paths["straightforward"]["images_per_s"],
        **environment(arguments),
        "settings": settings(arguments),
        "command": " ".join(["python", "benchmarks/bench.py", *sys.argv[1:]]),
        "paths": paths,
    }
    Console().print(report(result))
    if arguments.json is not None:
        arguments.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
