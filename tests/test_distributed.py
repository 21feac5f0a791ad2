"""`--ray`: the same outputs as one process, the images of a killed worker or of a lost node redone elsewhere
once, Ctrl-C, usage errors; on the session's local Ray cluster (`ray_cluster`: a head of 2 CPUs, to which a test adds
a node), the CLI in subprocesses as users run it."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import TINY_MODEL, record_count, shared_dataset, tiny_cli_args
from PIL import Image

from wildseg.cli import main
from wildseg.distributed.cluster import IN_FLIGHT_PER_WORKER, ChunkRun, chunk_size, chunked

CONFIG = Path(__file__).parent / "configs" / f"{TINY_MODEL}.json"
WORKER_TITLE = b"ray::SegmentWorker"


def camvid_pictures(folder: Path, count: int) -> Path:
    """The first `count` CamVid test images, shrunk to 96 x 72 so that a run takes seconds."""
    folder.mkdir(parents=True)
    for path in sorted((shared_dataset("camvid") / "images").iterdir())[:count]:
        Image.open(path).convert("RGB").resize((96, 72)).save(folder / f"{path.stem}.png")
    return folder


def segment_command(folder: Path, out: Path, checkpoint: Path, *extra) -> list[str]:
    return [sys.executable, "-m", "wildseg.cli", "segment", str(folder), "-l", "road,car,sky,building", "-o",
            str(out), "-q", "--model-config", str(CONFIG), *map(str, tiny_cli_args(checkpoint)), "--tta", "none",
            "--crf-iters", "2", *map(str, extra)]


def worker_pids() -> set[int]:
    """The processes of this machine's Ray actors of wildseg's SegmentWorker (Ray titles them ray::<class>)."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "cmdline").read_bytes().startswith(WORKER_TITLE):
                    pids.add(int(entry.name))
            except OSError:
                continue
    return pids


def wait_for(condition, process, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"the run ended before {what}: {process.communicate()}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def outputs(out: Path, score_tolerance: float = 1e-5) -> dict[str, object]:
    """Every output file: masks and overlays byte for byte, records without their timings and with each class's
    mean score to `score_tolerance`: model batches hold the views of other images in a chunk than in one process,
    and float32 sums over other batch shapes can differ in the last bits."""
    files = {}
    for path in sorted(out.iterdir()):
        if path.suffix == ".json":
            record = json.loads(path.read_text())
            record.pop("timings_s")
            for row in record["classes"]:
                row["mean_score"] = pytest.approx(row["mean_score"], abs=score_tolerance)
            for found in record.get("instances", []):
                found["score"] = pytest.approx(found["score"], abs=score_tolerance)
            files[path.name] = record
        else:
            files[path.name] = path.read_bytes()
    return files


def assert_done_once(out: Path, summary: Path, written: dict[str, int], total: int, single: Path,
                     score_tolerance: float = 1e-5) -> None:
    """After a fault mid-run: some images were left when it came (`written`: the records then, by inode), every
    image is counted done once, those written before were not written again, and the files are one process's."""
    assert len(written) < total, "the fault came with images left to do"
    counts = json.loads(summary.read_text())
    assert (counts["done"], counts["failed"], counts["skipped"]) == (total, 0, 0), "every image counted once"
    assert {path.name: path.stat().st_ino for path in out.glob("*.json") if path.name in written} == written, \
        "images finished before the fault are not segmented again"
    assert outputs(out, score_tolerance) == outputs(single, score_tolerance), \
        "the same files as one process, no temporary one left"


def test_a_killed_worker_loses_and_repeats_no_image_and_the_outputs_are_one_process_s(
        ray_address, tmp_path, tiny_checkpoint):
    folder = camvid_pictures(tmp_path / "images", 16)
    objects = ["--refine", "regions+crf", "--regions", "slic", "--instances"]  # the object maps travel too
    single = subprocess.run(segment_command(folder, tmp_path / "single", tiny_checkpoint, *objects),
                            capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})  # the workers' thread count
    assert single.returncode == 0, single.stderr
    assert len(list((tmp_path / "single").glob("*_instances.png"))) == 16
    out, summary = tmp_path / "ray", tmp_path / "summary.json"
    run = subprocess.Popen(segment_command(folder, out, tiny_checkpoint, *objects, "--ray", ray_address,
                                           "--summary", summary),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: record_count(out) >= 2, run, "two images were done")
    before = worker_pids()
    assert len(before) == 2, "one actor per CPU of the 2-CPU cluster"
    written = {path.name: path.stat().st_ino for path in out.glob("*.json")}
    os.kill(min(before), signal.SIGKILL)  # Ray restarts it, unless the other worker finishes the run first
    _, errors = run.communicate(timeout=180)
    assert run.returncode == 0, errors
    assert_done_once(out, summary, written, 16, tmp_path / "single")


def test_a_lost_node_loses_and_repeats_no_image_and_the_outputs_are_one_process_s(ray_cluster, tmp_path,
                                                                                  tiny_checkpoint):
    """A second node of 2 CPUs joins the session's cluster; 4 workers, 2 on each node; once images are done, the
    node is killed with its workers and the chunks they held. Its workers' restarts find no room (the head's 2
    CPUs are its own workers'), so the driver gives them up and the head's workers do the rest: every image once,
    the files those of one process."""
    folder = camvid_pictures(tmp_path / "images", 24)
    single = subprocess.run(segment_command(folder, tmp_path / "single", tiny_checkpoint), capture_output=True,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert single.returncode == 0, single.stderr
    node = ray_cluster.add_node(num_cpus=2)
    try:
        out, summary = tmp_path / "ray", tmp_path / "summary.json"
        run = subprocess.Popen(segment_command(folder, out, tiny_checkpoint, "--ray", ray_cluster.address,
                                               "--ray-workers", 4, "--summary", summary),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_for(lambda: record_count(out) >= 1, run, "an image was done")
    finally:
        ray_cluster.remove_node(node, allow_graceful=False)
    try:
        written = {path.name: path.stat().st_ino for path in out.glob("*.json")}
        _, errors = run.communicate(timeout=240)
    finally:
        ray_cluster.wait_for_nodes()  # until Ray sees the node gone, lest the next run's workers be placed there
    assert run.returncode == 0, errors
    # Measured: masks byte for byte; mean scores up to 3.0e-5 apart, on classes of one to a few pixels (a mean of
    # one or a few probabilities) in chunks put back, which ran again with fewer images per model batch.
    assert_done_once(out, summary, written, 24, tmp_path / "single", score_tolerance=1e-4)


def test_ctrl_c_stops_the_workers_and_the_summary_counts_what_they_wrote(ray_address, tmp_path, tiny_checkpoint):
    folder = camvid_pictures(tmp_path / "images", 24)
    out, summary = tmp_path / "out", tmp_path / "summary.json"
    run = subprocess.Popen(segment_command(folder, out, tiny_checkpoint, "--ray", ray_address, "--summary", summary),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: record_count(out) >= 2, run, "two images were done")
    run.send_signal(signal.SIGINT)
    _, errors = run.communicate(timeout=180)
    assert run.returncode == 130 and "Traceback" not in errors, errors
    counts = json.loads(summary.read_text())
    assert counts["interrupted"] and counts["done"] == len(list(out.glob("*.json"))) < 24
    assert not list(out.glob(".*")), "no half-written file"
    resumed = subprocess.run(segment_command(folder, out, tiny_checkpoint, "--summary", summary),
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(summary.read_text())["skipped"] == counts["done"], "a Ray run resumes in one process"


def test_ctrl_c_while_the_workers_load_the_model_writes_the_summary(ray_address, tmp_path, tiny_checkpoint):
    folder = camvid_pictures(tmp_path / "images", 4)
    out, summary = tmp_path / "out", tmp_path / "summary.json"
    run = subprocess.Popen(segment_command(folder, out, tiny_checkpoint, "--ray", ray_address, "--summary", summary),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(worker_pids, run, "the workers started")
    run.send_signal(signal.SIGINT)
    _, errors = run.communicate(timeout=180)
    assert run.returncode == 130 and "Traceback" not in errors, errors
    counts = json.loads(summary.read_text())
    assert counts["interrupted"] and counts["done"] == 0 and not out.exists()


HELD_LISTING = """
import sys, time
from pathlib import Path
import wildseg.cli.segment, wildseg.planning
from wildseg.cli import main

listed, out, before = wildseg.planning.unique_inputs, Path(sys.argv[1]), int(sys.argv[2])

def held(*arguments):
    listing = listed(*arguments)
    for _ in range(before):
        yield next(listing)
    deadline = time.monotonic() + 120
    while not any(out.rglob("*.json")):
        if time.monotonic() > deadline:
            sys.exit("the listing waited 120 s for a record: no image was handed out while it listed")
        time.sleep(0.05)
    yield from listing

wildseg.planning.unique_inputs = held
wildseg.cli.segment.HAND_OUT_AFTER_S = 0.0
sys.argv = ["wildseg", *sys.argv[3:]]
main()
"""
"""`wildseg segment` with its listing held after the first N images until a record is written under OUT (argv:
OUT N ARGUMENTS...), and the hand-out begun at once: a run ends only if its images are handed out as listed."""


def held_listing_command(out: Path, before: int, command: list[str]) -> list[str]:
    """`command` (a `segment_command`) run by HELD_LISTING, its listing held after `before` images."""
    return [sys.executable, "-c", HELD_LISTING, str(out), str(before), *command[3:]]


def test_a_first_run_of_a_folder_is_handed_out_as_it_is_listed_and_writes_one_process_s_files(
        ray_address, tmp_path, tiny_checkpoint):
    folder = camvid_pictures(tmp_path / "images", 8)
    single = subprocess.run(segment_command(folder, tmp_path / "single", tiny_checkpoint), capture_output=True,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert single.returncode == 0, single.stderr
    out, summary = tmp_path / "ray", tmp_path / "summary.json"
    run = subprocess.run(held_listing_command(out, 7, segment_command(folder, out, tiny_checkpoint, "--ray",
                                                                      ray_address, "--summary", summary)),
                         capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr
    counts = json.loads(summary.read_text())
    assert (counts["images"], counts["done"], counts["skipped"], counts["failed"]) == (8, 8, 0, 0), \
        "the summary counts the whole listing, which ended after the first images were done"
    assert outputs(out) == outputs(tmp_path / "single")


def test_a_collision_found_while_handing_out_stops_the_run_with_whole_files_that_a_rerun_keeps(
        ray_address, tmp_path, tiny_checkpoint):
    """`zz.jpg` and `zz.png` would write the same outputs: the listing finds it after the first images were handed
    out. The run stops with the one-line error, every record it wrote is whole, none half-written; once the user
    removes one of the two, a run in one process keeps what was done."""
    folder = camvid_pictures(tmp_path / "images", 6)
    Image.open(folder / sorted(path.name for path in folder.iterdir())[0]).save(folder / "zz.jpg")
    (folder / "zz.png").write_bytes((folder / "zz.jpg").read_bytes())
    out = tmp_path / "out"
    run = subprocess.run(held_listing_command(out, 7, segment_command(folder, out, tiny_checkpoint, "--ray",
                                                                      ray_address)),
                         capture_output=True, text=True, timeout=240)
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip().splitlines()[-1] == (
        f"wildseg: error: {folder / 'zz.jpg'} and {folder / 'zz.png'} would write the same outputs zz.*: give their "
        "common folder instead, or segment them in two runs")
    records = sorted(out.glob("*.json"))
    assert records and not list(out.glob(".*")), "images were done before the error, and no file is half-written"
    assert all((out / f"{record.stem}.png").is_file() for record in records)
    (folder / "zz.png").unlink()
    summary = tmp_path / "summary.json"
    resumed = subprocess.run(segment_command(folder, out, tiny_checkpoint, "--summary", summary),
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    counts = json.loads(summary.read_text())
    assert (counts["skipped"], counts["done"]) == (len(records), 7 - len(records)), \
        "the records of the stopped run count as done with these settings"


def test_ray_usage_errors_are_one_line(tmp_path, monkeypatch, tiny_checkpoint):
    image = tmp_path / "a.png"
    Image.new("RGB", (32, 24)).save(image)
    runner = CliRunner()
    arguments = ["-l", "cat", "-o", str(tmp_path / "out"), *map(str, tiny_cli_args(tiny_checkpoint))]
    cases = {
        (str(image), "--ray-workers", "2"): "--ray-workers is an option of --ray: add --ray or leave it out",
        (str(image), "--ray", str(image)): f"--ray took {image} for the cluster's address: put --ray after the inputs",
        ("--ray", str(tmp_path)): "give the images to segment: files, folders, glob patterns or @lists (--ray took "
                                  "the folder after it for its address: put --ray after the inputs)",
    }
    for extra, message in cases.items():
        result = runner.invoke(main, ["segment", *extra, *arguments])
        assert result.exit_code == 2 and result.output.count("\n") == 1 and message in result.output, result.output
    base = ["segment", str(image), *arguments]
    monkeypatch.setitem(sys.modules, "ray", None)
    result = runner.invoke(main, [*base, "--ray"])
    assert result.exit_code == 2
    assert result.output == "wildseg: error: --ray needs Ray, which is not installed: pip install 'wildseg[ray]'\n"


def test_an_address_where_nothing_listens_is_one_line_at_once(tmp_path, tiny_checkpoint):
    pytest.importorskip("ray", reason="the ray extra is not installed (needed to reach a cluster): pip install -e "
                                      "'.[ray]'")
    image = tmp_path / "a.png"
    Image.new("RGB", (32, 24)).save(image)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        nobody = f"127.0.0.1:{probe.getsockname()[1]}"
    started = time.monotonic()
    result = CliRunner().invoke(main, ["segment", str(image), "--ray", nobody, "-l", "cat", "-o", str(tmp_path / "out"),
                                       *map(str, tiny_cli_args(tiny_checkpoint))])
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert result.output.startswith(f"wildseg: error: cannot connect to the Ray cluster at {nobody} (")
    assert time.monotonic() - started < 30
    unlisted = CliRunner().invoke(main, ["segment", str(tmp_path / "missing.png"), "--ray", nobody, "-l", "cat",
                                         *map(str, tiny_cli_args(tiny_checkpoint))])
    assert unlisted.output == result.output, "the address is checked before the inputs are listed"


def test_chunks_keep_the_order_cover_every_image_once_and_shrink_for_few_images():
    images = list(range(100))
    chunks = list(chunked(images, chunk_size(len(images), workers=2)))
    assert [image for chunk in chunks for image in chunk] == images
    assert {len(chunk) for chunk in chunks[:-1]} == {13} and len(chunks) == 8
    assert list(chunked(images[:3], chunk_size(3, workers=4))) == [[0], [1], [2]]
    assert chunk_size(10_000, workers=2) == 32


def test_chunks_are_taken_from_their_stream_only_as_actors_are_free_for_them():
    """Two actors hold IN_FLIGHT_PER_WORKER chunks each: handing out takes that many from a stream of a million
    images and no more, so that a Ray driver never holds the whole plan."""
    taken = []

    def stream():
        for index in range(1_000_000):
            taken.append(index)
            yield index

    run = ChunkRun(["first", "second"], chunked(stream(), 10), call=lambda actor, chunk: (actor, chunk[0]),
                   on_result=None, on_error=None)
    run.hand_out()
    assert len(taken) == 2 * IN_FLIGHT_PER_WORKER * 10
    assert sorted(run.running) == [("first", 0), ("first", 10), ("second", 20), ("second", 30)]


def test_eval_on_ray_sums_the_workers_confusions_into_the_one_process_matrix(ray_address, tmp_path, tiny_checkpoint):
    arguments = ["eval", "--dataset", "folder", "--root", str(shared_dataset("camvid")), "--ignore-index", "11",
                 "--limit", "10", "-q", *map(str, tiny_cli_args(tiny_checkpoint)), "--max-side", "96",
                 "--crf-iters", "2"]
    alone = CliRunner().invoke(main, [*arguments, "--report", str(tmp_path / "alone.json")])
    assert alone.exit_code == 0, alone.output
    on_ray = subprocess.run([sys.executable, "-m", "wildseg.cli", *arguments, "--model-config", str(CONFIG),
                             "--report", str(tmp_path / "ray.json"), "--ray", ray_address],
                            capture_output=True, text=True)
    assert on_ray.returncode == 0, on_ray.stderr
    reports = [json.loads((tmp_path / name).read_text()) for name in ("alone.json", "ray.json")]
    assert reports[1]["images"] == {"evaluated": 10, "reused": 0, "failed": 0, "failures": []}
    assert reports[1]["confusion"] == reports[0]["confusion"] and reports[1]["metrics"] == reports[0]["metrics"]


def test_a_worker_that_cannot_load_the_model_is_a_one_line_error(ray_address, tmp_path, tiny_checkpoint):
    folder = camvid_pictures(tmp_path / "images", 1)
    missing = tmp_path / "missing.pt"
    run = subprocess.run(segment_command(folder, tmp_path / "out", missing, "--ray", ray_address),
                         capture_output=True, text=True)
    assert run.returncode == 2
    assert run.stderr == f"wildseg: error: checkpoint not found: {missing} (check the path given to --checkpoint)\n"
