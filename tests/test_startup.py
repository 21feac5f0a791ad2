"""Help, version and usage errors answer without importing the model libraries (torch, open_clip, torchvision,
OpenCV), each of which takes seconds; and the light table of choices the command line is built from names
exactly what the implementations offer."""

import pytest
from conftest import wildseg_in_subprocess

from wildseg import __version__, choices, methods
from wildseg.config import SegmenterConfig
from wildseg.datasets import DATASETS
from wildseg.tta import POLICIES


@pytest.mark.parametrize("arguments, code", [
    (["--help"], 0),
    (["--version"], 0),
    (["segment", "--help"], 0),
    (["eval", "--help"], 0),
    (["segment", "photo.jpg"], 2),
    (["segment", "photo.jpg", "--labels", "cat", "--method", "dense", "--start-block", "0"], 2),
    (["eval", "-d", "folder"], 2),
    (["eval", "-d", "voc", "--root", "/nonexistent"], 2),
])
def test_help_version_and_usage_errors_import_no_model_library(arguments, code, tmp_path):
    result = wildseg_in_subprocess(*arguments, cwd=tmp_path)
    assert (result.code, result.imported) == (code, []), result.lines
    if arguments == ["--version"]:
        assert result.stdout == f"wildseg, version {__version__}\n"


def test_the_choices_are_those_the_implementations_offer():
    assert choices.TTA_POLICIES == tuple(POLICIES)
    assert choices.DATASETS == tuple(DATASETS)
    for name, entry in methods.REGISTRY.items():
        models = {"dino": object()} if name == "corrclip" else {}
        method = methods.load_method(name).build(SegmenterConfig(), **models)
        assert (method.name, method.family) == (name, entry.family)
