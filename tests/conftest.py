"""Shared fixtures: a tiny randomly initialised open_clip ViT (registered from tests/configs) and real data paths."""

import os
import re
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import numpy as np
import open_clip
import pytest
import torch
from coarse_maps import coarse_probabilities
from PIL import Image

from wildseg import Segmenter, SegmenterConfig
from wildseg.backbone import load_backbone
from wildseg.cli.app import flag
from wildseg.errors import WildsegError
from wildseg.evaluation import dense_protocol
from wildseg.metrics import confusion_matrix

TINY_MODEL = "wildseg-tiny-vit"
TINY_RESNET = "wildseg-tiny-resnet"
BESIDE_THE_CLONE = Path(__file__).resolve().parents[1].parent / "shared"
TEST_DATA = Path(os.environ.get("WILDSEG_TEST_DATA") or BESIDE_THE_CLONE / "data")
"""Real images with human labels (docs/development.md): $WILDSEG_TEST_DATA, else shared/data beside the clone."""
ORACLES = Path(os.environ.get("WILDSEG_ORACLES") or BESIDE_THE_CLONE / "oracles")
"""The official implementations' outputs on tiny random weights: $WILDSEG_ORACLES, else shared/oracles beside the
clone."""
ORACLE_MODEL = "tiny_openclip_config"
"""The tiny CLIP (OpenAI's architecture, QuickGELU) that the official implementations ran with."""
REAL_DATA = {
    "camvid": "real CamVid street frames with their masks (images/, masks/, classes.txt)",
    "nyuv2": "real NYUv2 indoor photos with their masks (images/, masks/, classes.txt)",
    "voc2012": "a PASCAL VOC 2012 folder with real photos (JPEGImages/, SegmentationClass/, ImageSets/)",
}

open_clip.add_model_config(Path(__file__).parent / "configs")
if (ORACLES / f"{ORACLE_MODEL}.json").is_file():
    open_clip.add_model_config(ORACLES / f"{ORACLE_MODEL}.json")


MODEL_LIBRARIES = ("torch", "open_clip", "torchvision", "cv2")
"""The libraries whose import takes seconds: what a command's quick answers must not import."""

CLI_PROBE = """
import sys
from wildseg.cli import main
sys.argv = ["wildseg", *sys.argv[1:]]
code = 0
try:
    main()
except SystemExit as exit:
    code = exit.code
print("IMPORTED", ",".join(sorted(name for name in {libraries} if name in sys.modules)), code, file=sys.stderr)
"""


@dataclass(frozen=True)
class CliRun:
    """A command line run in a subprocess: its exit code, stderr lines (the probe's own left out), stdout, and which
    model libraries it had imported when it ended."""

    code: int
    lines: list[str]
    stdout: str
    imported: list[str]


def wildseg_in_subprocess(*arguments, cwd: Path, env: Optional[dict] = None,
                          libraries: tuple[str, ...] = MODEL_LIBRARIES) -> CliRun:
    """Run the command line as a user's shell would, watching which of `libraries` it imports."""
    result = subprocess.run([sys.executable, "-c", CLI_PROBE.format(libraries=libraries), *map(str, arguments)],
                            capture_output=True, text=True, cwd=cwd, env={**os.environ, **(env or {})}, timeout=300)
    lines = result.stderr.splitlines()
    probe = next(line for line in reversed(lines) if line.startswith("IMPORTED "))
    _, imported, code = probe.split(" ")
    return CliRun(int(code), [line for line in lines if line != probe], result.stdout,
                  [name for name in imported.split(",") if name])


def record_count(out: Path) -> int:
    """JSON records in `out` so far, as a test watching a running command counts them: 0 while the folder comes and
    goes (the command probes that it is writable by making it, writing a file and removing both)."""
    try:
        return len(list(out.rglob("*.json")))
    except FileNotFoundError:
        return 0


@pytest.fixture
def unreachable_hub(monkeypatch):
    """The Hugging Face hub at an address where nothing listens (127.0.0.1:9), online, its retries without waits."""
    import huggingface_hub.constants
    import huggingface_hub.utils._http

    unreachable = "http://127.0.0.1:9"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", unreachable)
    monkeypatch.setattr(huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        unreachable + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(huggingface_hub.utils._http.time, "sleep", lambda seconds: None)


NO_SKIPS = "WILDSEG_NO_SKIPS"
"""Set (as CI, which installs every extra and has the data, sets it), a skipped test fails, but one marked gpu
where no CUDA GPU is."""


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped, with that reason, where there is none")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU, which PyTorch does not see here"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get(NO_SKIPS) and item.get_closest_marker("gpu") is None:
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped where every test must run ({NO_SKIPS} is set): {reason}"


@pytest.fixture(scope="session", autouse=True)
def text_cache_folder(tmp_path_factory):
    """Label embeddings are cached in a folder of the test session (subprocesses inherit it), never the user's."""
    folder = tmp_path_factory.mktemp("text-cache")
    previous = os.environ.get("WILDSEG_CACHE_DIR")
    os.environ["WILDSEG_CACHE_DIR"] = str(folder)
    yield folder
    if previous is None:
        del os.environ["WILDSEG_CACHE_DIR"]
    else:
        os.environ["WILDSEG_CACHE_DIR"] = previous


def make_tiny_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return open_clip.create_model(TINY_MODEL).eval()


@pytest.fixture(scope="session")
def tiny_model() -> torch.nn.Module:
    return make_tiny_model()


def as_command_line_says(error) -> str:
    """An error's or warning's message with its settings worded as the command line's flags."""
    return error.worded(flag)


@contextmanager
def raises_worded(pattern: str):
    """Like pytest.raises(WildsegError, match=pattern), matched against the message as the command line words it."""
    with pytest.raises(WildsegError) as caught:
        yield caught
    message = as_command_line_says(caught.value)
    assert re.search(pattern, message), f"{pattern!r} not in {message!r}"


def tiny_segmenter(checkpoint, activation: str = "auto", templates: str = "photo", **config) -> Segmenter:
    """A Segmenter on the tiny model loaded from `checkpoint`, with the SegmenterConfig settings `config`."""
    backbone = load_backbone(TINY_MODEL, checkpoint=checkpoint, device="cpu", activation=activation)
    return Segmenter(backbone, SegmenterConfig(templates=templates, **config))


def tiny_cli_args(checkpoint) -> list:
    """CLI options that load the tiny model from `checkpoint`; its random weights were made with GELU."""
    return ["--model", TINY_MODEL, "--checkpoint", checkpoint, "--activation", "gelu", "--device", "cpu",
            "--templates", "photo"]


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "tiny.pt"
    torch.save(make_tiny_model().state_dict(), path)
    return path


def camvid_coarse_confusions(refine, images: int = 24, seed: int = 0):
    """Confusion matrices (11 x 11) over the first `images` CamVid test images of the coarse_maps.py maps of their
    ground truth (patch average, blur, noise with `seed`), before and after `refine(image, probabilities)`."""
    root = shared_dataset("camvid")
    coarse = torch.zeros(11, 11, dtype=torch.long)
    refined = torch.zeros(11, 11, dtype=torch.long)
    for image_id in sorted(path.stem for path in (root / "images").iterdir())[:images]:
        image = np.array(Image.open(root / "images" / f"{image_id}.png").convert("RGB"))
        truth = np.array(Image.open(root / "masks" / f"{image_id}.png"))
        probabilities = coarse_probabilities(truth, classes=11, seed=seed, ignore_index=11)
        coarse += confusion_matrix(probabilities.argmax(0), truth, 11, ignore_index=11)
        refined += confusion_matrix(refine(image, probabilities).argmax(0), truth, 11, ignore_index=11)
    return coarse, refined


def oracle_file(name: str) -> Path:
    """A file of the official implementations' outputs (`ORACLES`), or skip the test saying what is missing."""
    path = ORACLES / name
    if not path.is_file():
        pytest.skip(f"compares with the official implementation's outputs, and {path} is absent: set "
                    "WILDSEG_ORACLES to their folder (docs/development.md)")
    return path


def shared_dataset(name: str) -> Path:
    """A data set of real images (`TEST_DATA`), or skip the test saying what is missing."""
    root = TEST_DATA / name
    if not root.is_dir():
        pytest.skip(f"needs {REAL_DATA[name]} in {root}, which is absent: set WILDSEG_TEST_DATA to the folder "
                    f"holding {name}/ (docs/development.md)")
    return root


ORACLE_IMAGES = {"voc_2007_000123": ("voc2012", "JPEGImages/2007_000123.jpg"),
                 "camvid_0001TP_008550": ("camvid", "images/0001TP_008550.png")}
"""The real images the SC-CLIP, RF-CLIP and CorrCLIP oracles ran on, by their key prefix: (data set, file)."""


def oracle_image_file(key: str) -> Path:
    """The file of an oracle image (`ORACLE_IMAGES`)."""
    dataset, name = ORACLE_IMAGES[key]
    return shared_dataset(dataset) / name


def dense_protocol_segmenter(backbone, attention: str, dataset: str) -> Segmenter:
    """A Segmenter of the dense method `attention` under its published protocol for `dataset` (voc: background is
    class 0), without background words, as the official code queries."""
    options = dense_protocol(attention, dataset, SimpleNamespace(background_class=0 if dataset == "voc" else None))
    return Segmenter(backbone, SegmenterConfig.from_options(
        {"method": "dense", "attention": attention, "background_words": ()}, options["options"]))


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole test session, made with Ray's test utilities so that a test can add a
    node to it and remove it: a head node of 2 CPUs, which `--ray ADDRESS` runs in subprocesses join; stopped when
    the session ends. Its health checks are frequent, so that a removed node is known dead in seconds (Ray's
    defaults take about 15)."""
    pytest.importorskip("ray", reason="the ray extra is not installed: pip install -e '.[dev,ray]'")
    from ray.cluster_utils import Cluster

    health_checks = {"health_check_period_ms": 500, "health_check_failure_threshold": 3}  # a lost node seen in 2 s
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False,
                                                            "_system_config": health_checks})
    yield cluster
    cluster.shutdown()


@pytest.fixture(scope="session")
def ray_address(ray_cluster):
    """The address of the session's Ray cluster (`ray_cluster`)."""
    return ray_cluster.address


TINY_SAM2_SIDE = 256
"""The input side of the tiny SAM 2 (SAM 2's own is 1024)."""


def make_tiny_sam2(seed: int = 0):
    """A tiny SAM 2 built by transformers' config classes (Hiera with 5 blocks, 256-pixel inputs), its weights
    redrawn with `seed` (transformers' initialisation zeroes layers that make every point's mask alike; its prompt
    encoder's random frequencies are a buffer, drawn from torch's seed): the model and its processor."""
    transformers = pytest.importorskip("transformers", reason="SAM 2 region masks need the sam2 extra (transformers)")
    side = TINY_SAM2_SIDE
    backbone = transformers.Sam2HieraDetConfig(
        hidden_size=16, blocks_per_stage=[1, 1, 2, 1], embed_dim_per_stage=[16, 32, 64, 128],
        num_attention_heads_per_stage=[1, 1, 1, 1], image_size=[side, side], global_attention_blocks=[3],
        window_size_per_stage=[4, 4, 4, 4], window_positional_embedding_background_size=[4, 4])
    vision = transformers.Sam2VisionConfig(backbone_config=backbone, backbone_channel_list=[128, 64, 32, 16],
                                           backbone_feature_sizes=[[side // 4] * 2, [side // 8] * 2, [side // 16] * 2],
                                           fpn_hidden_size=32)
    prompts = transformers.Sam2PromptEncoderConfig(hidden_size=32, image_size=side)
    config = transformers.Sam2Config(
        vision_config=vision, prompt_encoder_config=prompts,
        mask_decoder_config=transformers.Sam2MaskDecoderConfig(hidden_size=32, mlp_dim=64, iou_head_hidden_dim=32,
                                                               num_attention_heads=2))
    torch.manual_seed(seed)
    model = transformers.Sam2Model(config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if parameter.dim() > 1:
                parameter.copy_(noise / parameter.shape[1] ** 0.5)
            else:
                parameter.copy_(noise * 0.1 + (1.0 if name.endswith("weight") else 0.0))
    processor = transformers.Sam2Processor(
        image_processor=transformers.Sam2ImageProcessor(size={"height": side, "width": side}), target_size=side)
    return model, processor


@pytest.fixture(scope="session")
def tiny_sam2_folder(tmp_path_factory) -> Path:
    """The tiny SAM 2 saved as transformers saves models (config, weights, processor), for `--sam2-model`."""
    model, processor = make_tiny_sam2()
    folder = tmp_path_factory.mktemp("sam2") / "tiny-sam2"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
