"""Stage two: train heads on the taps of a feature store, select on val, report on test.

Never runs a backbone, except for the random-weights control, which calls stage one. Results are
keyed by the store's key and each head's full settings, so a rerun trains only what is missing.
torch and scikit-learn are imported only when something has to be trained.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.settings import HeadSettings, SettingsError, settings_to_dict
from pipeline.store import FeatureStore, latest_store
from stages.cache import ResultsIndex, result_key
from stages.diagnostics import class_imbalance, negative_transfer, overfitting, small_selection
from stages.reports import format_table, write_reports
from stages.selection import SEARCH_SPACES, choose_selection, describe_selection

logger = logging.getLogger(__name__)

HEAD_NAMES = ("logreg", "linear", "mlp", "knn")
# Head trained on the features of the random-weights control.
CONTROL_HEAD = "logreg"
# Head trained on the pixels control. The batched linear grid fits it in seconds, where
# logistic regression's large C values ran for minutes on 16x16 pixels of 5,000 images.
PIXELS_HEAD = "linear"
STREAMING_HEADS = ("linear", "mlp")

__all__ = ["run_heads", "format_table"]


@dataclass(frozen=True)
class Unit:
    """One result to produce: a head on a tap of the store, or on a control's features."""

    tap: str
    head: str
    control: str | None
    streamed: bool

    def description(self, settings: HeadSettings, selection: str) -> dict[str, Any]:
        """Return every setting that changes this unit's result. Its hash with the store key is the result key."""
        from stages.evaluation import fixed_params

        return {
            "tap": self.tap,
            "head": self.head,
            "control": self.control,
            "streamed": self.streamed,
            "search_space": SEARCH_SPACES.get(self.head, {}),
            "fixed": fixed_params(self.head, settings),
            "selection": selection,
            "seed": settings.seed,
            "seeds": settings.seeds,
            "pixel_size": settings.pixel_size if self.control == "pixels" else None,
        }


def selection_images(store: FeatureStore, method: str, cv_folds: int) -> int:
    """Return how many images select each head's setting, for a method of ``choose_selection``."""
    if method == "val":
        return len(np.unique(store.indices("val")))
    train_images = len(np.unique(store.indices("train")))
    return train_images // cv_folds if method == "holdout" else train_images


def plan_units(store: FeatureStore, taps: list[str], settings: HeadSettings) -> list[Unit]:
    """List the results of this run: every head on every tap, then the controls."""
    budget = settings.memory_budget_mb * 2**20
    units = []
    for tap in taps:
        size = sum(store.feature_bytes(split, tap) for split in store.splits())
        for head in settings.heads:
            units.append(Unit(tap, head, None, head in STREAMING_HEADS and size > budget))
    if "majority" in settings.controls:
        units.append(Unit("labels", "majority", "majority", False))
    if "pixels" in settings.controls:
        units.append(Unit(f"pixels{settings.pixel_size}", PIXELS_HEAD, "pixels", False))
    if "random" in settings.controls:
        # NOTE: these results are keyed by the pretrained store's key, so that a rerun need not build the
        # backbone to find the random-weights store; changing its seed in pipeline.backbones does not retrain them.
        units += [Unit(tap, CONTROL_HEAD, "random weights", False) for tap in taps]
    return units


def check_results_folder(folder: Path, option: str = "--results (output_root)") -> None:
    """Create a folder for results, or raise SettingsError naming ``option``, before any work starts."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".featcache-write-test"
        probe.touch()
        probe.unlink()
    except OSError as error:
        reason = "it or a folder above it is a file" if isinstance(error, (FileExistsError, NotADirectoryError)) else error.strerror
        raise SettingsError(
            f"Cannot write results to {folder}: {reason}. Pass a writable folder as {option}."
        ) from error


def run_heads(settings: HeadSettings, features_root: Path = Path("data/features")) -> list[dict[str, Any]]:
    """Train every head on every tap of a store, plus the controls, and write the leaderboard and plots."""
    settings.validate()
    unknown = [name for name in settings.heads if name not in HEAD_NAMES]
    if unknown:
        raise SettingsError(f"heads={unknown} are not known: use some of {list(HEAD_NAMES)}.")
    store = FeatureStore(settings.store or latest_store(features_root))
    taps = list(settings.taps) or list(store.taps)
    missing_taps = [tap for tap in taps if tap not in store.taps]
    if missing_taps:
        raise SettingsError(
            f"taps={missing_taps} (--head-taps) are not in store {store.name}: use some of its taps {list(store.taps)}."
        )

    # look up each unit's result by key
    output = Path(settings.output_root) / store.name
    check_results_folder(output)
    index = ResultsIndex(output)
    method = choose_selection("val" in store.splits(), len(np.unique(store.indices("train"))), settings.cv_max_train)
    selection = "val" if method == "val" else f"{method}{settings.cv_folds}"  # cv3 or holdout3 in the result keys
    units = plan_units(store, taps, settings)
    keys = {unit: result_key(store.key, unit.description(settings, selection)) for unit in units}
    results: dict[Unit, dict[str, Any]] = {}
    for unit in units:
        cached = index.cached(keys[unit])
        if cached is not None:
            results[unit] = cached
    missing = [unit for unit in units if unit not in results]
    logger.info("Store %s: %d results cached, %d to train", store.name, len(results), len(missing))

    if missing:
        present = np.unique(store.load_labels("train")) if "train" in store.splits() else np.array([], np.int64)
        if len(present) < 2:
            names = [store.class_names[label] for label in present]
            raise SettingsError(
                f"Store {store.name} has {len(present)} class in train {names}: a head needs at least 2. Add a folder of "
                "images for each other class and run 'featcache extract' again."
            )
        import torch
        from threadpoolctl import threadpool_limits

        from stages.training import train_units

        # torch gets settings.threads. numpy and scikit-learn get one BLAS thread, because their
        # L-BFGS on 1,280 features ran 3 times slower with 2 threads than with 1 (2-core CPU).
        threads = torch.get_num_threads()
        try:
            with threadpool_limits(limits=1, user_api="blas"):
                torch.set_num_threads(settings.threads)
                for unit, result, head in train_units(store, missing, settings):
                    results[unit] = index.record(keys[unit], {**result, "key": keys[unit]}, head)
        finally:
            torch.set_num_threads(threads)

    # warnings, printed and saved with the reports
    ordered = [results[unit] for unit in units]
    train_labels = store.load_labels("train")
    counts = {name: int((train_labels == label).sum()) for label, name in enumerate(store.class_names)}
    warnings = negative_transfer(ordered) + overfitting(ordered, settings.overfit_gap) + class_imbalance(counts, settings.class_weight)
    warnings += small_selection(selection_images(store, method, settings.cv_folds), describe_selection(method, settings.cv_folds))
    for warning in warnings:
        logger.warning("%s", warning)

    header = {
        "store": str(store.folder),
        "store_name": store.name,
        "store_key": store.key,
        "settings": settings_to_dict(settings),
        "taps": taps,
        "class_names": store.class_names,
    }
    write_reports(ordered, warnings, output, header)
    return ordered
