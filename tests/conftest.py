"""Shared fixtures: a tiny randomly initialised open_clip ViT (registered from tests/configs) and real data paths."""

from pathlib import Path

import open_clip
import pytest
import torch

TINY_MODEL = "wildseg-tiny-vit"
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

open_clip.add_model_config(Path(__file__).parent / "configs" / f"{TINY_MODEL}.json")


def make_tiny_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return open_clip.create_model(TINY_MODEL).eval()


@pytest.fixture(scope="session")
def tiny_model() -> torch.nn.Module:
    return make_tiny_model()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "tiny.pt"
    torch.save(make_tiny_model().state_dict(), path)
    return path


def shared_dataset(name: str) -> Path:
    """A data set under ../shared/data, or skip the test with the reason."""
    root = SHARED_DATA / name
    if not root.is_dir():
        pytest.skip(f"real data {root} is absent (see shared/data/README.md)")
    return root
