"""Segment the example photos with the Python API and save their outputs next to each other.

    python examples/segment_examples.py --out examples_out                      # OpenAI CLIP weights (downloads once)
    python examples/segment_examples.py --checkpoint random_vitb16.pt --device cpu

The photos are public-domain images that ship with scikit-image (astronaut, chelsea the cat, coffee).
"""

import argparse
from pathlib import Path

from wildseg import Segmenter
from wildseg.outputs import output_paths, write_outputs

EXAMPLES = {
    "astronaut.jpg": ["person", "flag", "rocket"],
    "chelsea.jpg": ["cat"],
    "coffee.jpg": ["coffee cup", "saucer", "spoon", "table"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("examples_out"))
    parser.add_argument("--checkpoint", help="local weights instead of the OpenAI download")
    parser.add_argument("--device", default="auto")
    arguments = parser.parse_args()
    segmenter = Segmenter(checkpoint=arguments.checkpoint, device=arguments.device)
    for name, labels in EXAMPLES.items():
        path = Path(__file__).parent / "images" / name
        result = segmenter.segment(path, labels)
        record = {"image": str(path), "labels": result.labels, "classes": result.summary()}
        write_outputs(output_paths(path, arguments.out), result.image, result.mask, result.labels, record)
        found = ", ".join(f"{row['label']} {row['pixel_fraction']:.0%}" for row in result.summary())
        print(f"{name}: {found}")


if __name__ == "__main__":
    main()
