"""Everything a GPU must show, in one call: the tests that need CUDA, the pipeline's speed and memory, fp16 against
fp32, the torch CRF against pydensecrf, Ray with one GPU worker against one process, and the region sources.

    python benchmarks/gpu_check.py --json gpu_check.json                 # on a GPU (sized for 8 minutes on an H100)
    python benchmarks/gpu_check.py --device cpu --small --json check.json  # the script itself, on the CPU

Each step runs as its own process (the shipped scripts, with random ViT-B/16 weights unless --model is given) and
its outcome, seconds and figures are collected; a step that fails is reported and the others still run. Steps:

- `tests`: `pytest -m gpu` (the CUDA tests: the fast path in fp16 against the CPU's fp32, the torch CRF on the GPU
  against pydensecrf), passed / failed / skipped;
- `relevance_crf`, `dense_pamr`: `bench.py` with 21 labels on 512 images (images/s, peak GPU memory) for the default
  pipeline (relevance method, default TTA, CRF) and for NACLIP with PAMR, in `--precision` (default auto);
- `corrclip_dino`: `bench.py` for CorrCLIP (64 images; its DINO ViT-B/8 random too, SLIC regions), the DINO path;
- `fp16_agreement`: `precision.py --precision fp16` (speed ratio and pixels agreeing with fp32);
- `ray`: `ray_bench.py` with one worker against one process;
- `regions`: `region_speed.py` (SLIC, Felzenszwalb, SAM 2 Hiera-L) on the given images.

`--small` runs every step at smoke size (few images and labels, no TTA). The JSON holds each step's record; a
table sums them up. Exit code 1 when a step failed.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from rich.console import Console
from rich.table import Table

BENCHMARKS = Path(__file__).resolve().parent
ROOT = BENCHMARKS.parent
STEP_TIMEOUT_S = 600
SMOKE_DINO = {"embed_dim": 64, "depth": 3, "num_heads": 2}
"""The DINO of the CorrCLIP step at smoke size: ViT-B/8's layout at width 64, 3 blocks, 2 heads."""


def model_arguments(model: str, config: Optional[Path]) -> list[str]:
    """The model options the benchmark scripts share: an open_clip model and the config file that registers it."""
    return ["--model", model, *(["--model-config", str(config)] if config is not None else [])]


def steps(arguments, folder: Path) -> dict[str, list[str]]:
    """Each step's command line; its JSON goes to `folder / <step>.json` (the tests write a JUnit XML there)."""
    small = arguments.small
    device, model = ["--device", arguments.device], model_arguments(arguments.model, arguments.model_config)
    corrclip_model = model_arguments(arguments.corrclip_model or arguments.model,
                                     arguments.corrclip_model_config or arguments.model_config)
    light = ["--tta", "none", "--templates", "photo"] if small else []
    images, labels = ("4", "2") if small else ("512", "21")
    bench = [str(BENCHMARKS / "bench.py"), *device, *light, "--labels", labels, "--precision", arguments.precision]
    pipeline = [*bench, *model, "--images", images, "--reference-images", "1" if small else "4"]
    tiny_dino = ["--dino-architecture", json.dumps(SMOKE_DINO)] if small else []
    commands = {
        "tests": ["-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", *map(str, arguments.tests),
                  f"--junitxml={folder / 'tests.xml'}"],
        "relevance_crf": [*pipeline, "--method", "relevance", "--refine", "crf",
                          "--json", str(folder / "relevance_crf.json")],
        "dense_pamr": [*pipeline, "--method", "dense", "--attention", "naclip", "--refine", "pamr",
                       "--json", str(folder / "dense_pamr.json")],
        "corrclip_dino": [*bench, *corrclip_model, "--images", "2" if small else "64", "--reference-images", "1",
                          "--method", "dense", "--attention", "corrclip", "--refine", "none", *tiny_dino,
                          "--json", str(folder / "corrclip_dino.json")],
        "fp16_agreement": [str(BENCHMARKS / "precision.py"), *device, *model, *light, "--precision", "fp16",
                           "--labels", labels, "--limit", "1" if small else "8",
                           "--images", *map(str, arguments.images), "--json", str(folder / "fp16_agreement.json")],
        "ray": [str(BENCHMARKS / "ray_bench.py"), *device, *model, *light, "--images", "4" if small else "64",
                "--workers", "1", "--labels", labels, *(["--ray-address", arguments.ray_address]
                                                        if arguments.ray_address else []),
                "--json", str(folder / "ray.json")],
        "regions": [str(BENCHMARKS / "region_speed.py"), *device, "--images", str(arguments.images[0]),
                    "--limit", "1" if small else "5",
                    *(["--sam2-model", arguments.sam2_model] if arguments.sam2_model else []),
                    "--json", str(folder / "regions.json")],
    }
    return {name: [sys.executable, *command] for name, command in commands.items()}


def test_counts(path: Path) -> dict:
    """Passed, failed and skipped tests of a JUnit XML file pytest wrote."""
    import xml.etree.ElementTree as ElementTree

    suite = ElementTree.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    total, failed = int(suite.get("tests", 0)), int(suite.get("failures", 0)) + int(suite.get("errors", 0))
    skipped = int(suite.get("skipped", 0))
    return {"passed": total - failed - skipped, "failed": failed, "skipped": skipped}


def run_step(name: str, command: list[str], folder: Path) -> dict:
    """Run one step; its outcome (ok, or the end of its error output), seconds and the figures it wrote."""
    started = time.perf_counter()
    try:
        finished = subprocess.run(command, capture_output=True, text=True, timeout=STEP_TIMEOUT_S, cwd=ROOT)
        failure = None if finished.returncode == 0 else (finished.stderr or finished.stdout)[-2000:]
    except subprocess.TimeoutExpired:
        failure = f"timed out after {STEP_TIMEOUT_S} s"
    record = {"ok": failure is None, "seconds": time.perf_counter() - started, "error": failure}
    if name == "tests" and (folder / "tests.xml").is_file():
        record["figures"] = test_counts(folder / "tests.xml")
    elif (folder / f"{name}.json").is_file():
        record["figures"] = json.loads((folder / f"{name}.json").read_text())
    return record


def headline(name: str, figures: dict) -> str:
    """A step's main figures in a few words."""
    if name == "tests":
        return f"{figures['passed']} passed, {figures['failed']} failed, {figures['skipped']} skipped"
    if name in ("relevance_crf", "dense_pamr", "corrclip_dino"):
        memory = figures["paths"]["fast"]["peak_gpu_memory_mb"]
        return (f"{figures['images_per_s']:.2f} images/s" + ("" if memory is None else f", {memory:.0f} MB GPU peak"))
    if name == "fp16_agreement":
        return f"ratio {figures['speed_ratio']:.2f}, {figures['pixel_agreement']['all']:.4%} of pixels agree"
    if name == "ray":
        return f"masks identical {figures['identical_masks']}"
    return ", ".join(f"{source} {row['seconds_per_image']:.3f} s" for source, row in figures["sources"].items())


def default_device() -> str:
    """cuda where torch finds a GPU, else cpu (torch is imported only here and in `device_name`: the steps import
    it themselves, and `--device cpu` starts faster without it)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def device_name() -> str:
    """The GPU's name, as torch gives it."""
    import torch

    return torch.cuda.get_device_name()


def parse_arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda where there is one")
    parser.add_argument("--small", action="store_true", help="every step at smoke size (for the CPU)")
    parser.add_argument("--images", type=Path, nargs="+", default=[ROOT / "examples" / "images"],
                        help="folders of real images for fp16_agreement and regions (default: the example photos)")
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--model-config", type=Path, help="an open_clip model config (JSON) to register first")
    parser.add_argument("--corrclip-model", help="the open_clip model of the corrclip_dino step (default: --model's; "
                                                     "CorrCLIP needs at least 5 blocks)")
    parser.add_argument("--corrclip-model-config", type=Path, help="its config file (default: --model-config)")
    parser.add_argument("--sam2-model", help="a saved SAM 2 for the regions step (default: random Hiera-L)")
    parser.add_argument("--ray-address", help="a running Ray cluster for the ray step (default: a local one)")
    parser.add_argument("--precision", choices=["auto", "fp32", "fp16", "bf16"], default="auto",
                        help="the bench steps' precision (auto: fp16 on CUDA, fp32 on the CPU)")
    parser.add_argument("--tests", type=Path, nargs="+", default=[ROOT / "tests"],
                        help="where the tests step collects the gpu-marked tests (default: all of tests/)")
    parser.add_argument("--only", nargs="+", help="run only these steps")
    parser.add_argument("--json", type=Path, help="write every step's record here")
    return parser.parse_args(argv)


def main() -> None:
    arguments = parse_arguments()
    arguments.device = arguments.device or default_device()
    result = {"device": device_name() if arguments.device == "cuda" else
              f"CPU ({os.cpu_count()} cores)", "small": arguments.small, "steps": {}}
    table = Table(title=f"gpu_check on {result['device']}")
    for column in ("step", "outcome", "seconds", "figures"):
        table.add_column(column)
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        for name, command in steps(arguments, folder).items():
            if arguments.only and name not in arguments.only:
                continue
            record = run_step(name, command, folder)
            result["steps"][name] = record
            figures = headline(name, record["figures"]) if record["ok"] and "figures" in record else ""
            table.add_row(name, "ok" if record["ok"] else "FAILED", f"{record['seconds']:.0f}", figures)
    Console().print(table)
    for name, record in result["steps"].items():
        if not record["ok"]:
            print(f"{name} failed:\n{record['error']}", file=sys.stderr)
    if arguments.json is not None:
        arguments.json.write_text(json.dumps(result, indent=2) + "\n")
    sys.exit(0 if all(record["ok"] for record in result["steps"].values()) else 1)


if __name__ == "__main__":
    main()
