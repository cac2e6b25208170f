"""Train the missing results of a stage-two run, loading each tap's features once."""

from __future__ import annotations

import logging
import time
from typing import Any, Iterator

import numpy as np

from pipeline.settings import HeadSettings
from pipeline.store import FeatureStore
from stages.controls import pixel_tap_data, random_weights_store, store_tap_data
from stages.evaluation import evaluate_in_memory, evaluate_streamed
from stages.selection import SEARCH_SPACES, TapData, make_folds, sweep_linear_grid

logger = logging.getLogger(__name__)


def train_units(store: FeatureStore, units: list, settings: HeadSettings) -> Iterator[tuple[Any, dict[str, Any], Any]]:
    """Yield (unit, result, fitted head of the first seed) for every unit, as each one finishes."""
    pretrained = [unit for unit in units if unit.control is None]
    budget = settings.memory_budget_mb * 2**20

    # linear heads of every in-memory tap: one batched computation per group of taps within the budget
    linear_taps = [unit.tap for unit in pretrained if unit.head == "linear" and not unit.streamed]
    for group in tap_groups(store, linear_taps, budget):
        datas = [store_tap_data(store, tap) for tap in group]
        folds = {data.tap: make_folds(data, settings.cv_folds, settings.seed, settings.cv_max_train) for data in datas}
        logger.info("Training %d linear heads together on taps %s", len(datas) * grid_size("linear"), group)
        started = time.perf_counter()
        sweeps = sweep_linear_grid(datas, folds, SEARCH_SPACES["linear"], linear_grid_options(settings))
        # the taps of a group share one sweep, so each is charged an equal part of its time
        share = (time.perf_counter() - started) / len(datas)
        for data in datas:
            unit = next(unit for unit in pretrained if unit.head == "linear" and unit.tap == data.tap)
            yield (unit, *evaluate_in_memory("linear", data, settings, sweep=sweeps[data.tap], sweep_seconds=share))

    # the other heads, one tap at a time
    for tap in dict.fromkeys(unit.tap for unit in pretrained):
        todo = [unit for unit in pretrained if unit.tap == tap and not (unit.head == "linear" and not unit.streamed)]
        data = None
        for unit in todo:
            if unit.streamed:
                yield (unit, *evaluate_streamed(unit.head, store, tap, settings))
                continue
            if data is None:
                if sum(store.feature_bytes(split, tap) for split in store.splits()) > budget:
                    logger.warning("%s loads tap %s into memory although its features exceed memory_budget_mb=%s: "
                                   "only linear and mlp heads stream", unit.head, tap, settings.memory_budget_mb)
                data = store_tap_data(store, tap)
            yield (unit, *evaluate_in_memory(unit.head, data, settings))

    yield from train_controls(store, [unit for unit in units if unit.control is not None], settings)


def train_controls(store: FeatureStore, units: list, settings: HeadSettings) -> Iterator[tuple[Any, dict[str, Any], Any]]:
    random_store = None
    for unit in units:
        if unit.control == "majority":
            labels_only = label_data(store)
            yield (unit, *evaluate_in_memory("majority", labels_only, settings, control="majority"))
        elif unit.control == "pixels":
            logger.info("Pixels control: reading %d images at %dx%d", len(store), settings.pixel_size, settings.pixel_size)
            started = time.perf_counter()
            pixels = pixel_tap_data(store, settings.pixel_size)
            sweep = None
            if unit.head == "linear":
                folds = {pixels.tap: make_folds(pixels, settings.cv_folds, settings.seed, settings.cv_max_train)}
                sweep = sweep_linear_grid([pixels], folds, SEARCH_SPACES["linear"], linear_grid_options(settings))[pixels.tap]
            yield (unit, *evaluate_in_memory(unit.head, pixels, settings, sweep=sweep, control="pixels",
                                             sweep_seconds=time.perf_counter() - started))
        else:
            random_store = random_store or random_weights_store(store)
            result, head = evaluate_in_memory(unit.head, store_tap_data(random_store, unit.tap), settings, control=unit.control)
            yield unit, {**result, "control_store": str(random_store.folder)}, head


def linear_grid_options(settings: HeadSettings) -> dict[str, Any]:
    """Return the options of ``train_linear_grid`` that the settings fix; ``fixed_params('linear')`` lists the same."""
    return {"seed": settings.seed, "class_weight": settings.class_weight, "patience": settings.patience}


def label_data(store: FeatureStore) -> TapData:
    """Return the splits' labels with a constant feature, which is all the majority control reads."""
    splits = store.splits()

    def constant(split: str) -> tuple[np.ndarray, np.ndarray]:
        labels = store.load_labels(split)
        return np.zeros((len(labels), 1), dtype=np.float32), labels

    data = TapData("labels", *constant("train"), groups=store.indices("train"))
    if "val" in splits:
        data.X_val, data.y_val = constant("val")
    if "test" in splits:
        data.X_test, data.y_test = constant("test")
    return data


def tap_groups(store: FeatureStore, taps: list[str], budget: float) -> list[list[str]]:
    """Split taps into consecutive groups whose features together fit the memory budget (a tap alone always fits)."""
    groups: list[list[str]] = []
    used = 0.0
    for tap in taps:
        size = sum(store.feature_bytes(split, tap) for split in store.splits())
        if groups and used + size <= budget:
            groups[-1].append(tap)
            used += size
        else:
            groups.append([tap])
            used = size
    return groups


def grid_size(head_name: str) -> int:
    return int(np.prod([len(values) for values in SEARCH_SPACES[head_name].values()]))
