"""Help, version and usage errors answer without importing the model libraries (torch, open_clip, torchvision,
OpenCV), each of which takes seconds; and the light table of choices the command line is built from names
exactly what the implementations offer."""

import subprocess
import sys

import pytest

from wildseg import __version__, choices, methods
from wildseg.config import SegmenterConfig
from wildseg.datasets import DATASETS
from wildseg.tta import POLICIES

HEAVY = ("torch", "open_clip", "torchvision", "cv2")

PROBE = """
import sys
from wildseg.cli import main
sys.argv = ["wildseg", *sys.argv[1:]]
code = 0
try:
    main()
except SystemExit as exit:
    code = exit.code
print("IMPORTED", sorted(name for name in {heavy} if name in sys.modules), code, file=sys.stderr)
"""


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
    result = subprocess.run([sys.executable, "-c", PROBE.format(heavy=HEAVY), *arguments], capture_output=True,
                            text=True, cwd=tmp_path, timeout=60)
    assert f"IMPORTED [] {code}" in result.stderr.splitlines()[-1], result.stderr
    if arguments == ["--version"]:
        assert result.stdout == f"wildseg, version {__version__}\n"


def test_the_choices_are_those_the_implementations_offer():
    assert choices.TTA_POLICIES == tuple(POLICIES)
    assert choices.DATASETS == tuple(DATASETS)
    for name, entry in methods.REGISTRY.items():
        method = methods.load_method(name).build(SegmenterConfig())
        assert (method.name, method.family) == (name, entry.family)
