"""Images per second of `Segmenter.segment_many` over a folder of VOC-sized (500 x 375) images.

    python benchmarks/batch_speed.py --images 16                 # CPU, and the GPU too when one is present
    python benchmarks/batch_speed.py --images 200 --device cuda --checkpoint ViT-B-16.pt

Weights are random unless --checkpoint is given: speed does not depend on their values. Label embeddings
are computed before the clock starts (they are cached per label in a run). Not a test: it reports figures.
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from wildseg import Segmenter

LABELS = ["person", "dog", "sofa", "chair", "bottle", "car", "bicycle", "bird", "cat", "horse"]


def write_images(folder: Path, count: int) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for index in range(count):
        pixels = rng.integers(0, 255, (375 // 25, 500 // 25, 3), dtype=np.uint8)
        path = folder / f"{index:05d}.jpg"
        Image.fromarray(pixels).resize((500, 375), Image.BILINEAR).save(path, quality=90)
        paths.append(path)
    return paths


def measure(paths: list[Path], device: str, arguments) -> dict:
    segmenter = Segmenter(model=arguments.model, pretrained=None, checkpoint=arguments.checkpoint, device=device,
                          tta=arguments.tta, refine=arguments.refine, view_batch=arguments.view_batch)
    labels = LABELS[: arguments.labels]
    segmenter.backbone.embed_labels(labels, segmenter.templates)
    started = time.perf_counter()
    failed = sum(item.error is not None for item in segmenter.segment_many(paths, labels))
    seconds = time.perf_counter() - started
    return {"device": device, "images": len(paths), "failed": failed, "seconds": seconds,
            "images_per_s": len(paths) / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--device", choices=["cpu", "cuda", "both"], default="both")
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--tta", default="default")
    parser.add_argument("--refine", default="crf")
    parser.add_argument("--labels", type=int, default=3, help=f"how many of {LABELS} to segment")
    parser.add_argument("--view-batch", type=int, default=8)
    arguments = parser.parse_args()
    devices = ["cpu", "cuda"] if arguments.device == "both" else [arguments.device]
    devices = [device for device in devices if device == "cpu" or torch.cuda.is_available()]
    with tempfile.TemporaryDirectory() as folder:
        paths = write_images(Path(folder), arguments.images)
        for device in devices:
            row = measure(paths, device, arguments)
            print(f"{arguments.model} {device} tta={arguments.tta} refine={arguments.refine} labels={arguments.labels}: "
                  f"{row['images']} images in {row['seconds']:.1f} s = {row['images_per_s']:.2f} images/s "
                  f"({row['failed']} failed; torch {torch.__version__})")


if __name__ == "__main__":
    main()
