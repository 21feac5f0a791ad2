"""Seconds per image of each region source (`--regions`): scikit-image's SLIC and Felzenszwalb superpixels, and
SAM 2's automatic masks (CorrCLIP's settings: 8 x 8 points), on real images.

SAM 2 is Hiera-L (the architecture of `facebook/sam2-hiera-large`, the checkpoint CorrCLIP uses) built by
transformers' config classes with random weights, since the weights cannot be had here; its cost does not depend
on them. `--sam2-model` times a saved model instead (a folder or Hub name).

    python benchmarks/region_speed.py --images data/camvid/images --limit 5 --json regions.json
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from rich.console import Console
from rich.table import Table

from wildseg.backbone.sam2 import Sam2, load_sam2
from wildseg.refinement.automatic_masks import automatic_masks, painted_regions
from wildseg.refinement.regions import superpixels
from wildseg.refinement.settings import MaskGeneration

HIERA_LARGE = {"hidden_size": 144, "num_attention_heads": 2, "blocks_per_stage": [2, 6, 36, 4],
               "embed_dim_per_stage": [144, 288, 576, 1152], "num_attention_heads_per_stage": [2, 4, 8, 16],
               "global_attention_blocks": [23, 33, 43], "window_positional_embedding_background_size": [7, 7],
               "window_size_per_stage": [8, 4, 16, 8]}
"""SAM 2 Hiera-L's image encoder, as Meta's `sam2_hiera_l.yaml` gives it (neck channels the stages' reversed)."""


def random_hiera_large(device: torch.device) -> Sam2:
    """SAM 2 with Hiera-L's architecture and transformers' random initialisation, with its default processor."""
    from transformers import (Sam2Config, Sam2HieraDetConfig, Sam2ImageProcessor, Sam2Model, Sam2Processor,
                              Sam2VisionConfig)

    vision = Sam2VisionConfig(backbone_config=Sam2HieraDetConfig(**HIERA_LARGE),
                              backbone_channel_list=HIERA_LARGE["embed_dim_per_stage"][::-1])
    model = Sam2Model(Sam2Config(vision_config=vision)).eval().to(device)
    model.mask_decoder.dynamic_multimask_via_stability = False
    return Sam2(model, Sam2Processor(image_processor=Sam2ImageProcessor()), "random Hiera-L", device)


def seconds_per_image(make_regions, images: list[np.ndarray]) -> tuple[float, float]:
    """(mean seconds per image after a first warm-up call, mean number of regions)."""
    make_regions(images[0])
    started, counts = time.perf_counter(), []
    for image in images:
        counts.append(len(np.unique(make_regions(image))))
    return (time.perf_counter() - started) / len(images), float(np.mean(counts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, required=True, help="A folder of images (.png, .jpg).")
    parser.add_argument("--limit", type=int, default=5, help="Images timed (after one warm-up).")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--sam2-model", help="A saved SAM 2 (folder or Hub name) instead of a random Hiera-L.")
    parser.add_argument("--json", type=Path, help="Write the figures here.")
    arguments = parser.parse_args()
    files = sorted(path for path in arguments.images.iterdir() if path.suffix.lower() in (".png", ".jpg"))
    images = [np.array(Image.open(path).convert("RGB")) for path in files[: arguments.limit]]
    device = torch.device(arguments.device)
    sam2 = load_sam2(arguments.sam2_model, device) if arguments.sam2_model else random_hiera_large(device)
    sources = {
        "slic": lambda image: superpixels(image, "slic"),
        "felzenszwalb": lambda image: superpixels(image, "felzenszwalb"),
        "sam2": lambda image: painted_regions(automatic_masks(sam2, image, MaskGeneration()), image.shape[:2]),
    }
    rows = {}
    for name, make_regions in sources.items():
        seconds, regions = seconds_per_image(make_regions, images)
        rows[name] = {"seconds_per_image": round(seconds, 3), "mean_regions": regions}
    height, width = images[0].shape[:2]
    report = {"images": len(images), "size": f"{width} x {height}", "device": arguments.device,
              "threads": torch.get_num_threads(), "sam2_model": sam2.name, "sources": rows}
    table = Table(title=f"region sources, {len(images)} images of {width} x {height}, {arguments.device}")
    for column in ("source", "s / image", "regions"):
        table.add_column(column)
    for name, row in rows.items():
        table.add_row(name if name != "sam2" else f"sam2 ({sam2.name})", f"{row['seconds_per_image']:.3f}",
                      f"{row['mean_regions']:.1f}")
    Console().print(table)
    if arguments.json:
        arguments.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
