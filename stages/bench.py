"""Benchmark backbones as extractors: speed, cost and head accuracy of each tap, in one leaderboard.

For every backbone (optionally also with random weights) the bench runs stage one and stage two
on one dataset. It collects extraction images per second, parameters, GFLOPs per image, feature
dimension, store size, and the best head's val and test accuracy per tap. Images per second are
those of the decode, forward and write loop, without the backbone load. Stage one's cache key
makes a rerun reuse every complete store; head results and extraction timings of earlier runs are
reused too. Backbones that cannot be built, such as those whose weights are not on disk, become
skipped rows with the reason.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from pipeline.backbones import RANDOM_WEIGHTS, Backbone, WeightsNotAvailableError, build_backbone
from pipeline.datasets import load_dataset
from pipeline.devices import default_workers
from pipeline.settings import DATA_ROOT, DatasetSettings, ExtractSettings, HeadSettings, SettingsError
from pipeline.store import FeatureStore
from pipeline.taps import TapExtractor
from stages.extract import run_extraction
from stages.leaderboard import write_leaderboard
from stages.train_heads import HEAD_NAMES, check_results_folder, run_heads

logger = logging.getLogger(__name__)

DEFAULT_BENCH_BACKBONES = ("efficientnet_lite0", "mobilenet_v3_large", "resnet18", "resnet50", "convnext_tiny")
TIMINGS = "timings.json"


@dataclass(frozen=True)
class BenchSettings:
    """Backbones to compare, the dataset they run on, and the folders of stores, results and leaderboard."""

    dataset: DatasetSettings = field(default_factory=DatasetSettings)
    # Backbone names; "name@weights" picks weights other than "default", such as "resnet18@random".
    backbones: tuple[str, ...] = DEFAULT_BENCH_BACKBONES
    # Taps extracted from every backbone; a tap a backbone lacks makes that backbone a skipped row.
    taps: tuple[str, ...] = ("pre_logits",)
    # Head names trained on every tap; the leaderboard keeps the best one on the selection split.
    heads: tuple[str, ...] = ("logreg", "linear", "mlp")
    # Also run every backbone with random weights, the control that shows what pretraining adds.
    include_random: bool = False
    # Images per forward pass; 0 picks one for the device.
    batch_size: int = 0
    # Data-loading worker processes; 0 decodes in the main process.
    workers: int = field(default_factory=default_workers)
    # "cpu", "cuda", "cuda:N" or "auto".
    device: str = "auto"
    # Never download weights; a backbone whose weights are not on disk is skipped.
    offline: bool = True
    # Folder of the feature stores.
    features_root: str = str(DATA_ROOT / "features")
    # Folder of the head results of each store.
    results_root: str = str(DATA_ROOT / "results")
    # Folder that receives the leaderboard files and the timings of earlier extractions.
    output: str = str(DATA_ROOT / "bench")

    def validate(self) -> None:
        if not self.backbones:
            raise SettingsError("backbones is empty: name at least one backbone, such as 'efficientnet_lite0'.")
        if not self.heads:
            raise SettingsError("heads is empty: name at least one head, such as 'logreg'.")
        unknown = [name for name in self.heads if name not in HEAD_NAMES]
        if unknown:
            raise SettingsError(f"heads={unknown} are not known: use some of {list(HEAD_NAMES)}.")
        for spec in self.backbones:
            parse_backbone_spec(spec)
        self.dataset.validate()


def parse_backbone_spec(spec: str) -> tuple[str, str]:
    """Split "name@weights" into (name, weights); a bare name means the default weights."""
    name, _, weights = spec.partition("@")
    if not name or (spec.count("@") and not weights):
        raise SettingsError(f"backbone {spec!r} is invalid: use 'name' or 'name@weights', such as 'resnet18@random'.")
    return name, weights or "default"


def expand_runs(settings: BenchSettings) -> list[tuple[str, str]]:
    """Return the (backbone, weights) pairs to run, with the random control after each when requested."""
    runs: list[tuple[str, str]] = []
    for spec in settings.backbones:
        name, weights = parse_backbone_spec(spec)
        for pair in [(name, weights)] + ([(name, RANDOM_WEIGHTS)] if settings.include_random else []):
            if pair not in runs:
                runs.append(pair)
    return runs


def count_gflops(backbone: Backbone, taps: list[str]) -> float:
    """Count the GFLOPs of one image's forward pass up to the last tap (a multiply-add counts as 2 FLOPs)."""
    size = backbone.preprocessing.crop_size
    extractor = TapExtractor(backbone, taps)
    counter = FlopCounterMode(display=False)
    with counter:
        extractor(torch.zeros(1, 3, size, size))  # (1, 3, H, W)
    return counter.get_total_flops() / 1e9


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def load_timings(output: Path) -> dict[str, dict[str, float]]:
    path = output / TIMINGS
    return json.loads(path.read_text()) if path.is_file() else {}


def save_timings(output: Path, timings: dict[str, dict[str, float]]) -> None:
    output.mkdir(parents=True, exist_ok=True)
    (output / TIMINGS).write_text(json.dumps(timings, indent=2, sort_keys=True))


def reusable_head_rows(results_folder: Path, store: FeatureStore, heads: tuple[str, ...], taps: list[str]) -> list[dict] | None:
    """Return earlier head results of this store when they cover every requested head and tap."""
    path = results_folder / "results.json"
    if not path.is_file():
        return None
    payload = json.loads(path.read_text())
    if payload.get("store_key") != store.key:
        return None
    rows = payload.get("results", [])
    covered = {(row.get("tap"), row.get("head")) for row in rows}
    if any((tap, head) not in covered for tap in taps for head in heads):
        return None
    return [row for row in rows if row.get("tap") in taps and row.get("head") in heads]


def best_head_per_tap(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Keep, for each tap, the head with the highest selection-split accuracy (the first one on a tie)."""
    best: dict[str, dict[str, Any]] = {}
    for row in rows:
        current = best.get(row["tap"])
        if current is None or row["val_accuracy"] > current["val_accuracy"]:
            best[row["tap"]] = row
    return best


def skipped_rows(name: str, weights: str, taps: tuple[str, ...], reason: str) -> list[dict[str, Any]]:
    logger.warning("Skipping %s (weights %s): %s", name, weights, reason)
    return [{"backbone": name, "weights": weights, "tap": tap, "status": "skipped", "reason": reason} for tap in taps]


def store_timing(store: FeatureStore) -> dict[str, float]:
    """Return the speed that a store's manifest records for the run that completed it, or {} for older stores."""
    recorded = store.manifest.get("extraction") or {}
    if not recorded.get("images") or not recorded.get("loop_seconds"):
        return {}
    return {"images": recorded["images"], "loop_seconds": recorded["loop_seconds"],
            "images_per_second": recorded["images"] / recorded["loop_seconds"]}


def bench_one(name: str, weights: str, settings: BenchSettings, timings: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """Extract, train heads and measure one backbone; return one leaderboard row per tap."""

    # build the backbone once for its cost figures; unavailable weights make skipped rows
    try:
        backbone = build_backbone(name, weights, offline=settings.offline)
        gflops = count_gflops(backbone, list(settings.taps))
    except (WeightsNotAvailableError, SettingsError, FileNotFoundError) as error:
        return skipped_rows(name, weights, settings.taps, f"{type(error).__name__}: {error}")
    parameters = sum(parameter.numel() for parameter in backbone.model.parameters())
    del backbone

    # stage one: a complete store with the same key is reused, with the timing recorded when it was built
    extract_settings = ExtractSettings(
        dataset=settings.dataset,
        backbone=name,
        weights=weights,
        taps=settings.taps,
        batch_size=settings.batch_size,
        workers=settings.workers,
        device=settings.device,
        output_root=settings.features_root,
        offline=settings.offline,
    )
    result = run_extraction(extract_settings)
    store = FeatureStore(result.folder)
    if not result.cache_hit:
        timings[store.key] = {
            "images": result.extracted,
            "seconds": result.seconds,
            "loop_seconds": result.loop_seconds,
            "images_per_second": result.extracted / max(result.loop_seconds, 1e-9),
        }
    timing = timings.get(store.key) or store_timing(store)

    # stage two: reuse earlier results of this store when they cover every head and tap
    results_folder = Path(settings.results_root) / store.name
    head_rows = reusable_head_rows(results_folder, store, settings.heads, list(settings.taps))
    heads_reused = head_rows is not None
    if head_rows is None:
        head_settings = HeadSettings(store=str(store.folder), heads=settings.heads, taps=settings.taps, output_root=settings.results_root)
        head_rows = run_heads(head_settings)
    best = best_head_per_tap(head_rows)

    rows = []
    for tap in settings.taps:
        head = best[tap]
        rows.append(
            {
                "backbone": name,
                "weights": weights,
                "tap": tap,
                "status": "ok",
                "reason": "" if timing else "store reused, and it records no extraction speed: extract it again with --force",
                "images_per_second": timing.get("images_per_second"),
                "parameters": parameters,
                "gflops": gflops,
                "feature_dim": store.taps[tap],
                "store_bytes": folder_bytes(store.folder),
                "best_head": head["head"],
                "val_accuracy": head["val_accuracy"],
                "test_accuracy": head["accuracy"],
                "eval_split": head["eval_split"],
                "store": str(store.folder),
                "store_reused": result.cache_hit,
                "heads_reused": heads_reused,
            }
        )
    return rows


def run_bench(settings: BenchSettings) -> list[dict[str, Any]]:
    """Run every backbone of the settings and write the leaderboard (Markdown, CSV, JSON and PNG)."""
    settings.validate()
    load_dataset(settings.dataset)  # a missing or empty dataset fails here, before any backbone is built
    output = Path(settings.output)
    check_results_folder(output, "--output")
    check_results_folder(Path(settings.results_root))
    timings = load_timings(output)
    rows: list[dict[str, Any]] = []
    for name, weights in expand_runs(settings):
        logger.info("Benchmarking %s with weights %s", name, weights)
        rows += bench_one(name, weights, settings, timings)
        save_timings(output, timings)
    write_leaderboard(rows, output)
    return rows
