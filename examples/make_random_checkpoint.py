"""Save a randomly initialised open_clip model as a checkpoint, to try wildseg where no weights can be downloaded.

    python examples/make_random_checkpoint.py random_vitb16.pt --model ViT-B-16

Masks from random weights are meaningless; the file exercises the real loading path and the full pipeline.
"""

import argparse
import logging

import open_clip
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", help="where to write the state dict (.pt)")
    parser.add_argument("--model", default="ViT-B-16", help="open_clip architecture")
    parser.add_argument("--seed", type=int, default=0)
    arguments = parser.parse_args()
    logging.getLogger().setLevel(logging.ERROR)  # open_clip's notice that no pretrained weights were loaded
    torch.manual_seed(arguments.seed)
    torch.save(open_clip.create_model(arguments.model).state_dict(), arguments.path)
    print(f"wrote {arguments.path}: random {arguments.model} weights (seed {arguments.seed}). Masks made with them "
          "exercise the loading path and the whole pipeline but mean nothing: "
          f"wildseg segment IMAGE --labels cat --model {arguments.model} --checkpoint {arguments.path}")


if __name__ == "__main__":
    main()
