"""What planning a huge run costs before its first image: listing, sharding and the done-check of N inputs.

    python benchmarks/planning.py --counts 10000 100000 1000000 --json planning.json

For each count, makes that many empty `.jpg` files (in folders of 1,000) in a temporary folder, then times `wildseg
segment FOLDER --recursive --shard K/1000000 --labels thing` in a process of its own, K the first shard that holds
none of them: every input is listed, checked for repeats and hashed into its shard, and none is left to do, so the
run ends before any model loads. Reports seconds and the peak memory of that process: the cost of planning. Not a
test: it reports figures.
"""

import argparse
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


def make_inputs(folder: Path, count: int) -> str:
    """`count` empty .jpg files under `folder`, `FILES_PER_FOLDER` per sub-folder; returns the first shard K/SHARDS
    that holds none of them (`wildseg.inputs.shard_index` of their output stems)."""
    used = set()
    for index in range(count):
        if index % FILES_PER_FOLDER == 0:
            sub_folder = folder / f"{index // FILES_PER_FOLDER:05d}"
            sub_folder.mkdir()
        os.close(os.open(sub_folder / f"{index:08d}.jpg", os.O_CREAT | os.O_WRONLY, 0o644))
        stem = f"{sub_folder.name}/{index:08d}"
        used.add(shard_index(stem, SHARDS))
    return f"{next(shard for shard in range(1, SHARDS + 1) if shard not in used)}/{SHARDS}"


def plan(folder: Path, shard: str, out: Path, extra: list[str]) -> dict:
    """Seconds and peak memory (MB) of one `wildseg segment` of `shard` over `folder`, in a process of its own."""
    command = [sys.executable, "-c", MEASURED_RUN, "wildseg", "segment", str(folder), "--recursive", "--shard", shard, "--labels", "thing", "-q",
               "-o", str(out), *extra]
    started = time.perf_counter()
    finished = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    peak = [line for line in finished.stderr.splitlines() if line.startswith("peak_kb")]
    if not peak:
        raise SystemExit(f"the run failed:\n{finished.stderr[-2000:]}")
    return {"seconds": seconds, "peak_memory_mb": int(peak[-1].split()[1]) / 1024, "exit_code": finished.returncode}


def parse_arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--folder", type=Path, help="where to make the inputs (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("segment_options", nargs="*", help="after --: more options of wildseg segment")
    return parser.parse_args(argv)


def main() -> None:
    arguments = parse_arguments()
    rows = {}
    with tempfile.TemporaryDirectory(dir=arguments.folder) as temporary:
        for count in arguments.counts:
            folder = Path(temporary) / f"inputs_{count}"
            folder.mkdir()
            started = time.perf_counter()
            shard = make_inputs(folder, count)
            made = time.perf_counter() - started
            rows[count] = {"making_s": made, "shard": shard,
                           **plan(folder, shard, Path(temporary) / f"out_{count}", arguments.segment_options)}
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "command": f"wildseg segment FOLDER --recursive --shard K/{SHARDS} --labels thing -q", "inputs": rows}
    table = Table(title=f"planning an empty shard of N inputs ({result['machine']})")
    for column in ("inputs", "seconds", "peak memory (MB)"):
        table.add_column(column, justify="right")
    for count, row in rows.items():
        table.add_row(f"{count:,}", f"{row['seconds']:.2f}", f"{row['peak_memory_mb']:.0f}")
    Console().print(table)
    if arguments.json is not None:
        arguments.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
