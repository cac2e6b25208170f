"""Helpers shared by the benchmark scripts: dataset subsets, the machine's description, timing."""

from __future__ import annotations

import argparse
import logging
import os
import platform
import time
from pathlib import Path

import torch

from pipeline.datasets import Sample, scan_folder
from pipeline.devices import available_cpus
from pipeline.settings import DatasetSettings

SHARED_DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
DATASET_ALIASES = {"hymenoptera": "hymenoptera_data", "cifar10": "cifar10-small", "flowers5": "flowers5"}


def resolve_dataset(name: str) -> Path:
    """Return the folder of a dataset alias (hymenoptera, cifar10, flowers5) or of a given path."""
    path = SHARED_DATASETS / DATASET_ALIASES[name] if name in DATASET_ALIASES else Path(name)
    if not path.is_dir():
        raise SystemExit(
            f"Dataset folder {path} not found: pass a class-per-folder directory or one of {sorted(DATASET_ALIASES)} "
            f"(looked for them under {SHARED_DATASETS})."
        )
    return path


def select_samples(root: Path, count: int | None) -> list[Sample]:
    """Return ``count`` samples spread evenly over the dataset's sorted samples (all when None)."""
    samples = scan_folder(root, DatasetSettings(source=str(root))).samples
    if count is None or count >= len(samples):
        return samples
    return [samples[position * len(samples) // count] for position in range(count)]


def link_subset(root: Path, samples: list[Sample], folder: Path) -> Path:
    """Mirror the chosen samples into ``folder`` as symbolic links, keeping split and class folders."""
    for sample in samples:
        target = folder / sample.path
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            target.symlink_to((root / sample.path).resolve())
    return folder


def describe_machine() -> str:
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?", "?", "?")
    return (
        f"{platform.processor() or platform.machine()}, {available_cpus()} cores available, "
        f"torch {torch.__version__} with {torch.get_num_threads()} intra-op threads, "
        f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at start"
    )


class Timer:
    """Context manager that measures wall-clock seconds with time.perf_counter."""

    def __enter__(self) -> "Timer":
        self.started = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc_info) -> None:
        self.seconds = time.perf_counter() - self.started


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backbone", default="efficientnet_lite0", help="backbone name, as for featcache extract")
    parser.add_argument("--weights", default="default", help="backbone weights, as for featcache extract")
    parser.add_argument("-v", "--verbose", action="store_true", help="show the library's info logs")


def configure_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
