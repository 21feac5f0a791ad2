"""What planning a huge run costs before its first image: listing, sharding and the done-check of N inputs.

    python benchmarks/planning.py --counts 10000 100000 1000000 --json planning.json

For each count, makes that many empty `.jpg` files (in folders of 1,000) in a temporary folder and times, each in a
process of its own, `wildseg segment FOLDER --recursive --labels thing` planning:
- an empty shard: `--shard K/1000000`, K the first shard that holds none of the inputs (every input is listed,
  checked for repeats and hashed into its shard, and none is left to do, so the run ends before any model loads);
- a first run: `--dry-run`, no output yet (every image planned to do, in the plan file);
- a resumed run: `--dry-run` again once every image has a record (made with this run's request, so done) and a
  mask: every record is read and compared, and none is left to do;
- with `--ray ADDRESS`, a first run on Ray: `--ray ADDRESS --ray-workers 1 --pretrained none --shard K/1000`, K the
  shard of the first input (about one input in 1,000 handed out, each an empty file that fails in the worker), into
  an empty output folder: a run whose images are handed out as they are listed once its listing takes 2 s; and the
  same run into an output folder that holds an unrelated file, which is planned whole before Ray starts.
Reports seconds and the peak memory of that process (for Ray, the driver's), and for Ray the run's summary: the
cost of planning. Not a test: it reports figures.
"""

import argparse
import inspect
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from wildseg.inputs import shard_index

FILES_PER_FOLDER = 1000
SHARDS = 1_000_000
RAY_SHARDS = 1000
CASES = {"empty_shard": "empty shard", "first_run": "first run", "resumed": "resumed",
         "ray": "on Ray, handed out as listed", "ray_whole": "on Ray, planned whole"}
MEASURED_RUN = """
import resource, runpy, sys

sys.argv = sys.argv[1:]
exit_code = 0
try:
    runpy.run_module("wildseg", run_name="__main__")
except SystemExit as error:
    exit_code = error.code
print("peak_kb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
sys.exit(exit_code)
"""
"""`python -m wildseg ARGS...` that prints its peak memory (KB) on stderr before it exits."""
RECORD_TEXT = f"""
import sys

sys.path.insert(0, {str(Path(__file__).parent)!r})
from planning import done_record_text

print(done_record_text(sys.argv[1]))
"""
"""Prints `done_record_text` in a process of its own: this one stays small, as the peak memory of the runs it starts
counts their parent's (Linux keeps it across exec)."""


def input_stem(index: int) -> str:
    """The output stem of input `index` of `make_inputs`."""
    return f"{index // FILES_PER_FOLDER:05d}/{index:08d}"


def make_inputs(folder: Path, count: int) -> str:
    """`count` empty .jpg files under `folder`, `FILES_PER_FOLDER` per sub-folder; returns the first shard K/SHARDS
    that holds none of them (`wildseg.inputs.shard_index` of their output stems)."""
    used = set()
    for index in range(count):
        if index % FILES_PER_FOLDER == 0:
            sub_folder = folder / f"{index // FILES_PER_FOLDER:05d}"
            sub_folder.mkdir()
        os.close(os.open(sub_folder / f"{index:08d}.jpg", os.O_CREAT | os.O_WRONLY, 0o644))
        used.add(shard_index(input_stem(index), SHARDS))
    return f"{next(shard for shard in range(1, SHARDS + 1) if shard not in used)}/{SHARDS}"


def done_record_text(labels: str) -> str:
    """The JSON record of an image done by `wildseg segment --labels LABELS` with the default settings, as it writes
    one: its labels and the request this run would compare (`provenance.image_request`) with its digest."""
    from wildseg.batch import LabelOptions, labeling
    from wildseg.cli.options import segmenter_values
    from wildseg.cli.segment import segment
    from wildseg.provenance import image_request, request_digest, run_request

    given = segment.make_context("segment", ["image.jpg", "--labels", labels]).params
    named = inspect.signature(segment.callback).parameters
    options = segmenter_values({name: value for name, value in given.items() if name not in named})
    asked = labeling(LabelOptions(labels))
    request = image_request(run_request(options), asked.asked(Path("image.jpg")))
    return json.dumps({"labels": ["background", *asked.known], "request": request,
                       "request_digest": request_digest(request)}, indent=2)


def make_outputs(out: Path, count: int, record: str) -> None:
    """The record and an (empty) mask of each of `count` inputs made by `make_inputs`, where the run writes them."""
    for index in range(count):
        if index % FILES_PER_FOLDER == 0:
            sub_folder = out / f"{index // FILES_PER_FOLDER:05d}"
            sub_folder.mkdir(parents=True)
        (sub_folder / f"{index:08d}.json").write_text(record)
        os.close(os.open(sub_folder / f"{index:08d}.png", os.O_CREAT | os.O_WRONLY, 0o644))


def plan(folder: Path, out: Path, options: list[str]) -> dict:
    """Seconds and peak memory (MB) of one `wildseg segment` over `folder` with `options`, in a process of its
    own, with its exit code and its last line of output (the dry run's plan)."""
    command = [sys.executable, "-c", MEASURED_RUN, "wildseg", "segment", str(folder), "--recursive", "--labels",
               "thing", "-o", str(out), *options]
    started = time.perf_counter()
    finished = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    peak = [line for line in finished.stderr.splitlines() if line.startswith("peak_kb")]
    if not peak:
        raise SystemExit(f"the run failed:\n{finished.stderr[-2000:]}")
    return {"seconds": seconds, "peak_memory_mb": int(peak[-1].split()[1]) / 1024, "exit_code": finished.returncode,
            "said": (finished.stdout.strip().splitlines() or [""])[-1]}


def on_ray(folder: Path, out: Path, address: str, summary: Path, options: list[str]) -> dict:
    """`plan` of a first run on the Ray cluster at `address` (one worker, random weights) of the shard of the first
    input in RAY_SHARDS, with the counts and stages of its summary."""
    shard = f"{shard_index(input_stem(0), RAY_SHARDS)}/{RAY_SHARDS}"
    row = plan(folder, out, ["--ray", address, "--ray-workers", "1", "--pretrained", "none", "--shard", shard, "-q",
                             "--summary", str(summary), *options])
    counts = json.loads(summary.read_text())
    return {**row, "shard": shard, **{key: counts[key] for key in ("images", "done", "failed", "stages_s")}}


def parse_arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--folder", type=Path, help="where to make the inputs (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--ray", metavar="ADDRESS", help="also a first run on this Ray cluster (local: one started "
                                                         "for it)")
    parser.add_argument("segment_options", nargs="*", help="after --: more options of wildseg segment")
    return parser.parse_args(argv)


def main() -> None:
    arguments = parse_arguments()
    rows = {}
    record = subprocess.run([sys.executable, "-c", RECORD_TEXT, "thing"], capture_output=True, text=True,
                            check=True).stdout.strip()
    with tempfile.TemporaryDirectory(dir=arguments.folder) as temporary:
        for count in arguments.counts:
            folder, out = Path(temporary) / f"inputs_{count}", Path(temporary) / f"out_{count}"
            folder.mkdir()
            started = time.perf_counter()
            shard = make_inputs(folder, count)
            row = rows[count] = {"making_s": time.perf_counter() - started, "shard": shard}
            row["empty_shard"] = plan(folder, out, ["--shard", shard, "-q", *arguments.segment_options])
            row["first_run"] = plan(folder, out, ["--dry-run", *arguments.segment_options])
            make_outputs(out, count, record)
            row["resumed"] = plan(folder, out, ["--dry-run", *arguments.segment_options])
            if arguments.ray is not None:
                summary = Path(temporary) / f"summary_{count}.json"
                row["ray"] = on_ray(folder, Path(temporary) / f"out_{count}_ray", arguments.ray, summary,
                                    arguments.segment_options)
                kept = Path(temporary) / f"out_{count}_ray_whole"
                kept.mkdir()
                (kept / "notes.txt").write_text("not an output of wildseg\n")
                row["ray_whole"] = on_ray(folder, kept, arguments.ray, summary, arguments.segment_options)
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "command": "wildseg segment FOLDER --recursive --labels thing, with --shard K/1000000 (an empty shard) "
                         "or --dry-run (a first and a resumed run), or --ray ADDRESS --ray-workers 1 --pretrained none "
                         "--shard K/1000 (on Ray, into an empty folder: handed out as listed, and into a folder "
                         "holding a file: planned whole)", "inputs": rows}
    table = Table(title=f"planning N inputs: seconds and peak memory (MB) ({result['machine']})")
    table.add_column("inputs", justify="right")
    cases = [case for case in CASES if not case.startswith("ray") or arguments.ray is not None]
    for case in cases:
        table.add_column(CASES[case], justify="right")
    for count, row in rows.items():
        table.add_row(f"{count:,}", *(f"{row[case]['seconds']:.1f} s, {row[case]['peak_memory_mb']:.0f} MB"
                                      for case in cases))
    Console().print(table)
    if arguments.json is not None:
        arguments.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
