"""Measure peak resident memory of stage one for two dataset sizes, each in a fresh subprocess.

Memory must stay flat in the dataset size: the peak for the larger size should be within 10% of
the peak for the smaller one. Each size runs ``run_extraction`` in its own Python process, which
then reports ``resource.getrusage`` maxima of itself and of its data-loading workers.

    python -m benchmarks.extract_memory --data cifar10 --sizes 600,6000
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import add_common_arguments, configure_logging, describe_machine, link_subset, resolve_dataset, select_samples

# Runs in the child process; ru_maxrss is in KiB on Linux.
CHILD = """
import json, resource, sys, time
from pipeline.settings import DatasetSettings, ExtractSettings
from stages.extract import run_extraction
folder, output, backbone, weights = sys.argv[1:5]
settings = ExtractSettings(dataset=DatasetSettings(folder), backbone=backbone, weights=weights,
                           device="cpu", output_root=output, force=True)
result = run_extraction(settings)
print(json.dumps({
    "images": result.extracted,
    "workers": settings.workers,
    "seconds": result.seconds,
    "main_peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    "workers_peak_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
}))
"""


def measure(folder: Path, output: Path, backbone: str, weights: str) -> dict:
    """Run one extraction in a child Python process and return its JSON report."""
    completed = subprocess.run(
        [sys.executable, "-c", CHILD, str(folder), str(output), backbone, weights],
        capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1],
    )
    if completed.returncode != 0:
        raise SystemExit(f"The extraction subprocess failed with exit code {completed.returncode}:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="cifar10", help="hymenoptera, cifar10, flowers5, or a class-per-folder path")
    parser.add_argument("--sizes", default="600,6000", help="two comma-separated image counts, smaller first")
    add_common_arguments(parser)
    args = parser.parse_args()
    configure_logging(args.verbose)

    sizes = [int(size) for size in args.sizes.split(",")]
    if len(sizes) != 2 or sizes[0] >= sizes[1]:
        raise SystemExit(f"--sizes={args.sizes!r} is invalid: give two image counts, smaller first, such as 600,6000.")
    root = resolve_dataset(args.data)
    print(f"machine: {describe_machine()}")
    print(f"dataset: {root}, backbone {args.backbone} ({args.weights} weights)")

    reports = []
    with tempfile.TemporaryDirectory(prefix="featcache-memory-") as scratch:
        for size in sizes:
            samples = select_samples(root, size)
            folder = link_subset(root, samples, Path(scratch) / f"{root.name}-{size}")
            report = measure(folder, Path(scratch) / "features", args.backbone, args.weights)
            reports.append(report)
            # with 0 workers the only children are short-lived commands, whose peak counts the pages they
            # shared with this process at their fork
            workers = (
                f"largest worker peak {report['workers_peak_kib'] / 1024:7.1f} MiB" if report["workers"] else "no worker process"
            )
            print(
                f"{report['images']:6d} images: main process peak {report['main_peak_kib'] / 1024:7.1f} MiB, "
                f"{workers}, {report['seconds']:.1f} s"
            )
    growth = reports[1]["main_peak_kib"] / reports[0]["main_peak_kib"] - 1
    print(f"main process peak grows by {growth * 100:+.1f}% from {sizes[0]} to {sizes[1]} images (target: within +10%)")


if __name__ == "__main__":
    main()
