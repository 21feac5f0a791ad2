"""Every shipped script (examples/, benchmarks/) run as a user runs it, on the tiny model: a smoke run each,
with its outputs checked."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import torch
from conftest import TINY_MODEL, camvid_coarse_confusions, shared_dataset

from wildseg.backbone import load_backbone
from wildseg.choices import DEFAULT_DINO_MODEL
from wildseg.metrics import mean_iou

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = ROOT / "tests" / "configs" / f"{TINY_MODEL}.json"
TINY_L12 = "wildseg-tiny-l12-openai"
"""A tiny open_clip ViT of 12 blocks: CorrCLIP's spatial branch averages middle blocks."""


def run_script(*arguments, cwd=ROOT) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, *map(str, arguments)], capture_output=True, text=True, cwd=cwd,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    return result


def test_make_random_checkpoint_writes_the_seeded_random_model_that_wildseg_loads(tmp_path):
    """The README's no-weights recipe: open_clip's own initialisation under the seed, loaded through wildseg."""
    path = tmp_path / "random.pt"
    result = run_script(ROOT / "examples" / "make_random_checkpoint.py", path, "--model", "ViT-B-32", "--seed", 3)
    assert result.stdout.startswith(f"wrote {path}: random ViT-B-32 weights (seed 3)") and "mean nothing" in (
        result.stdout), "it says what it wrote and what masks made with it mean"
    torch.manual_seed(3)
    expected = open_clip.create_model("ViT-B-32").state_dict()
    loaded = load_backbone("ViT-B-32", checkpoint=path, device="cpu", activation="gelu").model.state_dict()
    assert loaded.keys() == expected.keys() and all(torch.equal(loaded[key], expected[key]) for key in loaded)


def test_segment_examples_writes_every_photo_into_out(tmp_path, tiny_checkpoint):
    out = tmp_path / "out"
    result = run_script(ROOT / "examples" / "segment_examples.py", "--out", out, "--model", TINY_MODEL,
                        "--model-config", TINY_CONFIG, "--checkpoint", tiny_checkpoint, "--device", "cpu")
    for name in ("astronaut", "chelsea", "coffee"):
        assert {path.name for path in out.glob(f"{name}*")} == {f"{name}.png", f"{name}_overlay.jpg", f"{name}.json"}
        record = json.loads((out / f"{name}.json").read_text())
        assert record["labels"][0] == "background" and record["settings"]["model"] == TINY_MODEL
        assert f"{name}.jpg: background" in result.stdout
    assert not list((ROOT / "examples" / "images").glob("*.png")), "nothing lands beside the inputs"


def test_refinement_study_measures_the_coarse_maps_as_the_tests_do():
    """Its CamVid 'none' row on the first image is the coarse maps' mIoU, computed here independently."""
    result = run_script(ROOT / "benchmarks" / "refinement_study.py", "--camvid", shared_dataset("camvid"),
                        "--nyuv2", shared_dataset("nyuv2"), "--limit", 1)
    rows = [line.split("│")[1:-1] for line in result.stdout.splitlines() if line.count("│") == 6]
    values = {(cells[0].strip(), cells[1].strip()): float(cells[2]) for cells in rows if cells[0].strip()}
    assert len(values) == 18
    coarse, _ = camvid_coarse_confusions(lambda image, probabilities: probabilities, images=1)
    assert values[("camvid", "none")] == np.round(float(mean_iou(coarse)), 3)


def test_precision_compares_bf16_with_fp32_on_the_same_weights(tmp_path):
    """One CamVid frame and the VOC photo with the tiny model: both precisions timed, and the masks of the same
    random weights agree on nearly every pixel."""
    report = tmp_path / "precision.json"
    run_script(ROOT / "benchmarks" / "precision.py", "--images", shared_dataset("camvid") / "images",
               shared_dataset("voc2012") / "JPEGImages", "--limit", 1, "--labels", 4, "--tta", "none",
               "--model", TINY_MODEL, "--model-config", TINY_CONFIG, "--activation", "gelu", "--json", report)
    result = json.loads(report.read_text())
    assert result["images"] == 2 and set(result["seconds_per_image"]) == {"fp32", "bf16"}
    assert result["speed_ratio"] == result["seconds_per_image"]["fp32"] / result["seconds_per_image"]["bf16"]
    assert len(result["pixel_agreement"]) == 3 and 0.95 <= result["pixel_agreement"]["all"] <= 1


def test_gpu_check_runs_every_step_on_the_cpu_at_smoke_size(ray_address, tiny_sam2_folder, tmp_path):
    """`gpu_check.py --device cpu --small`: every step ran and reported its figures; the CUDA tests are collected
    and skipped here (no GPU). Its steps are the other benchmarks' smoke runs: bench.py (both paths, in bf16,
    every stage timed; CorrCLIP with a tiny random DINO too), ray_bench.py (one process and Ray, both done, Ray's
    start-up timed apart) and region_speed.py (with a saved tiny SAM 2 on one CamVid frame: a row per source, the
    superpixel counts those of scikit-image run here)."""
    from PIL import Image

    from wildseg.refinement.regions import superpixels

    report = tmp_path / "check.json"
    gpu_tests = [ROOT / "tests" / "test_precision.py", ROOT / "tests" / "test_lattice.py"]  # where the marks are
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--small",
                             "--model", TINY_MODEL, "--model-config", str(TINY_CONFIG), "--corrclip-model",
                             TINY_L12, "--corrclip-model-config", str(ROOT / "tests" / "configs" / f"{TINY_L12}.json"),
                             "--images",
                             str(shared_dataset("camvid") / "images"), "--sam2-model", str(tiny_sam2_folder),
                             "--ray-address", ray_address, "--precision", "bf16", "--tests", *map(str, gpu_tests),
                             "--json", str(report)],
                            capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr
    steps = json.loads(report.read_text())["steps"]
    assert list(steps) == ["tests", "relevance_crf", "dense_pamr", "corrclip_dino", "fp16_agreement", "ray", "regions"]
    assert all(step["ok"] and "figures" in step for step in steps.values()), result.stdout
    tests = steps["tests"]["figures"]
    assert tests["passed"] == tests["failed"] == 0 and tests["skipped"] >= 5, "the gpu tests, skipped without one"
    bench = steps["relevance_crf"]["figures"]
    assert bench["settings"]["model"] == TINY_MODEL and bench["settings"]["refine"] == "crf"
    assert bench["dtype"] == "bf16 (fast), fp32 (straightforward)"
    assert bench["paths"]["fast"]["images"] == 4 and bench["paths"]["straightforward"]["images"] == 1
    for path in bench["paths"].values():
        ran = {stage for stage, seconds in path["stage_s_per_image"].items() if seconds > 0}
        assert {"decode", "forward", "backward", "refine", "write"} <= ran, "each stage that ran is timed"
        assert path["peak_cpu_memory_mb"] > 0 and path["peak_gpu_memory_mb"] is None
    assert steps["dense_pamr"]["figures"]["settings"]["attention"] == "naclip"
    corrclip = steps["corrclip_dino"]["figures"]
    assert corrclip["settings"]["attention"] == "corrclip" and corrclip["settings"]["dino_model"] == DEFAULT_DINO_MODEL
    assert [corrclip["paths"][name]["images"] for name in ("fast", "straightforward")] == [2, 1]
    assert set(steps["fp16_agreement"]["figures"]["seconds_per_image"]) == {"fp32", "fp16"}
    ray = steps["ray"]["figures"]
    assert [ray["summaries"][name]["done"] for name in ("one process", "ray")] == [4, 4], "each run did every image"
    assert {"ray_start_s", "segmenting_s"} <= set(ray["summaries"]["ray"]["stages_s"]), "Ray's start-up apart"
    assert re.fullmatch(r"[0-4]/4", ray["identical_masks"]), "the masks of both runs are compared"
    regions = steps["regions"]["figures"]
    assert set(regions["sources"]) == {"slic", "felzenszwalb", "sam2"} and regions["size"] == "480 x 360"
    first = np.array(Image.open(sorted((shared_dataset("camvid") / "images").iterdir())[0]).convert("RGB"))
    assert regions["sources"]["slic"]["mean_regions"] == len(np.unique(superpixels(first, "slic"))), "scikit-image's"
    assert all(row["seconds_per_image"] > 0 for row in regions["sources"].values())


def test_planning_plans_an_empty_shard_a_first_and_a_resumed_run_and_one_on_ray(tmp_path, ray_address):
    """Two small counts: each run without Ray ends without work (exit 0); the dry runs say that a first run would
    segment every input and a resumed one, whose records the script made, none; the shard it picked holds none of the
    inputs, by `in_shard`. On Ray, the shard of the first input is handed out: each of its images (empty files)
    fails in the worker (exit 1), and the summary counts them."""
    from wildseg.inputs import expand_inputs, in_shard, parse_shard

    report, on_ray_report = tmp_path / "planning.json", tmp_path / "ray.json"
    run_script(ROOT / "benchmarks" / "planning.py", "--counts", 300, 2000, "--folder", tmp_path, "--json", report)
    run_script(ROOT / "benchmarks" / "planning.py", "--counts", 300, "--folder", tmp_path, "--ray", ray_address,
               "--json", on_ray_report)
    rows = json.loads(report.read_text())["inputs"]
    on_ray, planned_whole = (json.loads(on_ray_report.read_text())["inputs"]["300"][case] for case in
                             ("ray", "ray_whole"))
    assert set(rows) == {"300", "2000"}
    for count, row in rows.items():
        runs = [row[case] for case in ("empty_shard", "first_run", "resumed")]
        assert all(run["exit_code"] == 0 and run["seconds"] > 0 and run["peak_memory_mb"] > 0 for run in runs)
        assert row["first_run"]["said"] == f"would segment {count} images: 0 skipped (done before), of {count} images"
        assert row["resumed"]["said"] == f"would segment 0 images: {count} skipped (done before), of {count} images"
        assert "ray" not in row
    assert on_ray["exit_code"] == 1 and on_ray["done"] == 0 and on_ray["failed"] == on_ray["images"] >= 1
    assert {"ray_start_s", "segmenting_s"} <= set(on_ray["stages_s"]) and on_ray["peak_memory_mb"] > 0
    assert {key: planned_whole[key] for key in ("exit_code", "shard", "images", "done", "failed")} == {
        key: on_ray[key] for key in ("exit_code", "shard", "images", "done", "failed")}, "the same run, planned whole"
    folder = tmp_path / "again"
    folder.mkdir()
    from planning import make_inputs

    shard = make_inputs(folder, 300)
    assert shard == rows["300"]["shard"]
    images = expand_inputs([str(folder)], recursive=True)
    assert len(images) == 300 and not any(in_shard(image, parse_shard(shard)) for image in images)
    ray_shard = parse_shard(on_ray["shard"])
    assert in_shard(images[0], ray_shard) and on_ray["images"] == sum(
        in_shard(image, ray_shard) for image in images), "the Ray run's shard: the first input's, counted whole"
