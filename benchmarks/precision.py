"""A 16-bit precision against fp32 in one run: seconds per image and how many mask pixels agree.

    python benchmarks/precision.py --images data/camvid/images data/voc/JPEGImages --limit 4 --precision bf16

The same model (the same random weights, drawn under one seed, unless --checkpoint is given) is loaded once per
precision. Each segments the first `--limit` images of every folder by `Segmenter.segment_many` (the default
pipeline unless told otherwise: relevance method, default TTA, CRF) after one untimed warm-up image. The report
gives each precision's seconds per image, the speed ratio (fp32 seconds over the other's: above 1 is faster than
fp32) and the share of pixels whose label equals fp32's, per folder and over all. With random weights, the masks
mean nothing, but their agreement measures the rounding. Not a test: it reports figures.
"""

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import open_clip
import torch
from rich.console import Console
from rich.table import Table

from wildseg import Segmenter, SegmenterConfig
from wildseg.autolabels import load_vocabulary
from wildseg.backbone import load_backbone
from wildseg.images import IMAGE_SUFFIXES

SEED = 0


def folder_images(folder: Path, limit: int) -> list[Path]:
    """The first `limit` images of `folder`, by name."""
    return sorted(path for path in folder.iterdir() if path.suffix.lower() in IMAGE_SUFFIXES)[:limit]


def run_precision(precision: str, arguments, images: list[Path], labels: list[str]
                  ) -> tuple[float, dict[Path, np.ndarray]]:
    """Seconds per image of one precision over `images` (after a warm-up on the first) and each image's mask."""
    torch.manual_seed(SEED)
    backbone = load_backbone(arguments.model, pretrained=None, checkpoint=arguments.checkpoint,
                             device=arguments.device, activation=arguments.activation, precision=precision,
                             text_cache=False)
    options = {"method": arguments.method, "attention": arguments.attention if arguments.method == "dense" else None,
               "tta": arguments.tta, "refine": arguments.refine, "templates": arguments.templates}
    segmenter = Segmenter(backbone, SegmenterConfig.from_options({key: value for key, value in options.items()
                                                                  if value is not None}))
    segmenter.segment(images[0], labels)
    started = time.perf_counter()
    masks = {}
    for item in segmenter.segment_many(images, labels):
        if item.error is not None:
            raise SystemExit(f"{item.source}: {item.error}")
        masks[item.source] = item.result.mask
    return (time.perf_counter() - started) / len(images), masks


def parse_arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, nargs="+", required=True, help="folders of images")
    parser.add_argument("--limit", type=int, default=4, help="images per folder")
    parser.add_argument("--precision", choices=["fp16", "bf16"], default="bf16", help="compared with fp32")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--labels", type=int, default=21, help="how many COCO class names to segment (at most 80)")
    parser.add_argument("--method", choices=["relevance", "dense"], default="relevance")
    parser.add_argument("--attention", default="naclip", help="dense method's attention")
    parser.add_argument("--tta", default="default")
    parser.add_argument("--templates", default="imagenet80")
    parser.add_argument("--refine", default="crf")
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--model-config", type=Path, help="an open_clip model config (JSON) to register first")
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--activation", default="auto")
    parser.add_argument("--json", type=Path, help="write the results here")
    return parser.parse_args(argv)


def main() -> None:
    arguments = parse_arguments()
    if arguments.model_config is not None:
        open_clip.add_model_config(arguments.model_config)
    folders = {folder: folder_images(folder, arguments.limit) for folder in arguments.images}
    images = [image for paths in folders.values() for image in paths]
    labels = [entry.name for entry in load_vocabulary("coco")][: arguments.labels]
    seconds, masks = {}, {}
    for precision in ("fp32", arguments.precision):
        seconds[precision], masks[precision] = run_precision(precision, arguments, images, labels)
    agreement = {str(folder): float(np.mean([(masks[arguments.precision][image] == masks["fp32"][image]).mean()
                                             for image in paths])) for folder, paths in folders.items()}
    agreement["all"] = float(np.mean([(masks[arguments.precision][image] == masks["fp32"][image]).mean()
                                      for image in images]))
    result = {
        "device": torch.cuda.get_device_name() if arguments.device == "cuda"
        else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "model": arguments.model, "weights": str(arguments.checkpoint or "random"), "method": arguments.method,
        "images": len(images), "seconds_per_image": seconds,
        "speed_ratio": seconds["fp32"] / seconds[arguments.precision], "pixel_agreement": agreement,
        "torch": torch.__version__,
    }
    table = Table(title=f"{result['device']}: {arguments.precision} against fp32, {len(images)} images")
    table.add_column("")
    table.add_column("value", justify="right")
    for precision, value in seconds.items():
        table.add_row(f"{precision} s / image", f"{value:.3f}")
    table.add_row("speed ratio (fp32 s / other s)", f"{result['speed_ratio']:.2f}")
    for folder, value in agreement.items():
        table.add_row(f"pixels agreeing: {folder}", f"{value:.4%}")
    Console().print(table)
    if arguments.json is not None:
        arguments.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
