"""Measure stage one in one process against torchrun with several CPU processes, and print a table.

Usage, from the repository root::

    python benchmarks/distributed_scaling.py --data /path/to/cifar10-small --per-class 20

The script links ``--per-class`` training images of each class into a temporary folder (no copies),
then runs ``featcache extract --force`` once per configuration of processes x threads per process,
each into its own temporary store. It prints the wall time of the whole command (Python start, model
build and extraction) and the extraction time, which is the slowest rank's "Extracted ... in S s"
line of featcache: dataset scan, model build and the forward passes, without the Python start.
Every run reads the same images, so a one-process run first warms the page cache.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

logger = logging.getLogger("benchmarks.distributed_scaling")

REPO_ROOT = Path(__file__).resolve().parents[1]
EXTRACTED = re.compile(r"Extracted (\d+) images \(\d+ skipped\) in ([0-9.]+) s")
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def link_subset(source: Path, target: Path, per_class: int) -> int:
    """Symlink the first ``per_class`` images of each class of ``source``/train into ``target``/train."""
    count = 0
    for class_folder in sorted((source / "train").iterdir()):
        if not class_folder.is_dir():
            continue
        destination = target / "train" / class_folder.name
        destination.mkdir(parents=True)
        for image in sorted(class_folder.iterdir())[:per_class]:
            (destination / image.name).symlink_to(image.resolve())
            count += 1
    return count


def run_configuration(processes: int, threads: int, data: Path, output: Path, options: list[str]) -> tuple[float, float, int]:
    """Run one extraction and return (wall seconds, slowest rank's extraction seconds, images extracted)."""
    environment = {name: value for name, value in os.environ.items() if name not in TORCHRUN_VARIABLES}
    environment["PYTHONPATH"] = str(REPO_ROOT)
    environment["OMP_NUM_THREADS"] = str(threads)
    launcher = [sys.executable, "-m", "pipeline"]
    if processes > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes), "-m", "pipeline"]
    command = launcher + ["extract", "--data", str(data), "--output", str(output), "--force", *options]

    started = time.perf_counter()
    result = subprocess.run(command, env=environment, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed with exit code {result.returncode}:\n{result.stderr[-3000:]}")

    ranks = [(int(images), float(seconds)) for images, seconds in EXTRACTED.findall(result.stderr)]
    return wall, max(seconds for _, seconds in ranks), sum(images for images, _ in ranks)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="class-per-folder dataset with a train/ folder")
    parser.add_argument("--per-class", type=int, default=20, help="training images linked per class")
    parser.add_argument("--backbone", default="efficientnet_lite0", help="backbone name passed to featcache extract")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    parser.add_argument("--shard-size", type=int, default=25, help="samples per shard, so that every rank owns several shards")
    parser.add_argument(
        "--configurations", default="1x1,1x2,2x1", help="comma-separated PROCESSESxTHREADS runs, such as 1x2 for one process with two threads"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)

    options = ["--backbone", args.backbone, "--batch-size", str(args.batch_size), "--shard-size", str(args.shard_size)]
    options += ["--workers", "0", "--device", "cpu", "--name", "store"]
    configurations = [tuple(int(part) for part in item.split("x")) for item in args.configurations.split(",")]

    with tempfile.TemporaryDirectory(prefix="featcache-scaling-") as scratch:
        data = Path(scratch) / "subset"
        count = link_subset(args.data, data, args.per_class)
        logger.info("Linked %d images of %s into %s", count, args.data, data)

        # warm the page cache and any first-use files, so the first measured run is not penalized
        run_configuration(1, 1, data, Path(scratch) / "warm", options)

        rows = []
        for processes, threads in configurations:
            logger.info("Running %d process(es) x %d thread(s)", processes, threads)
            wall, extraction, images = run_configuration(processes, threads, data, Path(scratch) / f"{processes}x{threads}", options)
            rows.append((processes, threads, images, wall, extraction))

    print("| processes x threads | images | wall s | extraction s | images/s (extraction) | images/s (wall) |")
    print("|---|---|---|---|---|---|")
    for processes, threads, images, wall, extraction in rows:
        print(f"| {processes} x {threads} | {images} | {wall:.1f} | {extraction:.1f} | {images / extraction:.1f} | {images / wall:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
