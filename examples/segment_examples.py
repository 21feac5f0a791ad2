"""Segment the example photos with the Python API and save their outputs (mask, overlay, JSON) in --out.

    python examples/segment_examples.py --out examples_out                      # OpenAI CLIP weights (downloads once)
    python examples/segment_examples.py --checkpoint random_vitb16.pt --device cpu

The photos are public-domain images that ship with scikit-image (astronaut, chelsea the cat, coffee).
"""

import argparse
from pathlib import Path

import open_clip

from wildseg import Segmenter, load_backbone
from wildseg.outputs import output_paths, write_outputs

EXAMPLES = {
    "astronaut.jpg": ["person", "flag", "rocket"],
    "chelsea.jpg": ["cat"],
    "coffee.jpg": ["coffee cup", "saucer", "spoon", "table"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("examples_out"))
    parser.add_argument("--model", default="ViT-B-16", help="open_clip architecture")
    parser.add_argument("--model-config", type=Path, help="an open_clip model config (JSON) to register first")
    parser.add_argument("--checkpoint", help="local weights instead of the OpenAI download")
    parser.add_argument("--device", default="auto")
    arguments = parser.parse_args()
    if arguments.model_config is not None:
        open_clip.add_model_config(arguments.model_config)
    segmenter = Segmenter(load_backbone(arguments.model, checkpoint=arguments.checkpoint, device=arguments.device))
    for name, labels in EXAMPLES.items():
        path = Path(__file__).parent / "images" / name
        result = segmenter.segment(path, labels)
        record = {"image": str(path), "labels": result.labels, "classes": result.summary(),
                  "settings": segmenter.settings()}
        paths = output_paths(Path(name).stem, arguments.out)
        write_outputs(paths, *result.preview(), result.mask, result.labels, record)
        found = ", ".join(f"{row['label']} {row['pixel_fraction']:.0%}" for row in result.summary())
        print(f"{name}: {found} -> {paths['mask']}")


if __name__ == "__main__":
    main()
