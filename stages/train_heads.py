"""Stage two: train heads on the taps of a feature store, select on val, report on test.

Never runs a backbone: everything comes from the store's HDF5 shards.
"""

from __future__ import annotations

import csv
import itertools
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import torch
from sklearn.metrics import accuracy_score, balanced_accuracy_score
from sklearn.model_selection import train_test_split

from pipeline.settings import HeadSettings, SettingsError, settings_to_dict
from pipeline.store import FeatureStore, latest_store
from stages.heads import HEADS, TorchHead

logger = logging.getLogger(__name__)

TABLE_COLUMNS = ("tap", "head", "selected", "train_accuracy", "val_accuracy", "eval_split", "accuracy", "balanced_accuracy")


@dataclass
class SplitData:
    """Features and labels of the train, selection and evaluation splits of one tap."""

    X_train: np.ndarray
    y_train: np.ndarray
    X_select: np.ndarray
    y_select: np.ndarray
    select_split: str  # "val", or "train-holdout" when the store has no val split
    X_eval: np.ndarray
    y_eval: np.ndarray
    eval_split: str  # "test", or "val" when the store has no test split
    notes: list[str] = field(default_factory=list)


def prepare_splits(store: FeatureStore, tap: str, seed: int) -> SplitData:
    """Pick the selection and evaluation splits that the store offers, and say which were used."""
    splits = store.splits()
    if "train" not in splits:
        raise SettingsError(f"Store {store.name} has no train split (it has {splits}): re-extract with a train split.")
    X_train, y_train = store.load("train", tap)
    notes = []
    if "val" in splits:
        X_select, y_select = store.load("val", tap)
        select_split = "val"
    else:
        X_train, X_select, y_train, y_select = train_test_split(
            X_train, y_train, test_size=0.2, stratify=y_train, random_state=seed
        )
        select_split = "train-holdout"
        notes.append("no val split: selected on a stratified 20% holdout of train")
    if "test" in splits:
        X_eval, y_eval = store.load("test", tap)
        eval_split = "test"
    else:
        X_eval, y_eval = X_select, y_select
        eval_split = select_split
        notes.append(f"no test split: the reported accuracy is on {select_split}, which also selected the head")
    return SplitData(X_train, y_train, X_select, y_select, select_split, X_eval, y_eval, eval_split, notes)


def parameter_grid(space: dict[str, list]) -> list[dict[str, Any]]:
    names = sorted(space)
    return [dict(zip(names, values)) for values in itertools.product(*(space[name] for name in names))]


def fit_selected(head_name: str, data: SplitData, seed: int, device: str) -> tuple[Any, dict[str, Any], float]:
    """Fit every setting of a head's search space on train and keep the best on the selection split."""
    head_class, space = HEADS[head_name]
    best = None
    for params in parameter_grid(space):
        extra = {"seed": seed, "device": device} if issubclass(head_class, TorchHead) else {}
        head = head_class(**params, **extra)
        head.fit(data.X_train, data.y_train, eval_set=(data.X_select, data.y_select))
        score = accuracy_score(data.y_select, head.predict(data.X_select))
        logger.debug("%s %s: %s accuracy %.4f", head_name, params, data.select_split, score)
        if best is None or score > best[2]:
            best = (head, params, score)
    return best


def save_head(head: Any, folder: Path, tap: str, head_name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(head, TorchHead):
        path = folder / f"{tap}__{head_name}.pt"
        torch.save({"state_dict": head.module_.state_dict(), "params": head.get_params(), "classes": head.classes_.tolist()}, path)
    else:
        path = folder / f"{tap}__{head_name}.joblib"
        joblib.dump(head, path)
    return path


def run_heads(settings: HeadSettings, features_root: Path = Path("data/features")) -> list[dict[str, Any]]:
    """Train every head on every tap of a store and write the results table."""
    settings.validate()
    unknown = [name for name in settings.heads if name not in HEADS]
    if unknown:
        raise SettingsError(f"heads={unknown} are not known: use some of {sorted(HEADS)}.")
    store = FeatureStore(settings.store or latest_store(features_root))
    taps = list(settings.taps) or list(store.taps)
    missing = [tap for tap in taps if tap not in store.taps]
    if missing:
        raise SettingsError(f"taps={missing} are not in store {store.name}: it holds {list(store.taps)}.")

    output = Path(settings.output_root) / store.name
    logger.info("Training heads %s on taps %s of %s", list(settings.heads), taps, store.folder)
    rows = []
    for tap in taps:
        data = prepare_splits(store, tap, settings.seed)
        for note in data.notes:
            logger.warning("%s", note)
        for head_name in settings.heads:
            started = time.perf_counter()
            head, params, select_score = fit_selected(head_name, data, settings.seed, settings.device)
            predictions = head.predict(data.X_eval)
            rows.append(
                {
                    "tap": tap,
                    "head": head_name,
                    "selected": params,
                    "select_split": data.select_split,
                    "train_accuracy": float(accuracy_score(data.y_train, head.predict(data.X_train))),
                    "val_accuracy": float(select_score),
                    "eval_split": data.eval_split,
                    "accuracy": float(accuracy_score(data.y_eval, predictions)),
                    "balanced_accuracy": float(balanced_accuracy_score(data.y_eval, predictions)),
                    "notes": data.notes,
                    "seconds": time.perf_counter() - started,
                    "head_file": str(save_head(head, output / "heads", tap, head_name)),
                }
            )
    write_results(rows, output, store, settings)
    return rows


def write_results(rows: list[dict[str, Any]], folder: Path, store: FeatureStore, settings: HeadSettings) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    payload = {"store": str(store.folder), "store_key": store.key, "settings": settings_to_dict(settings), "results": rows}
    (folder / "results.json").write_text(json.dumps(payload, indent=2))
    with open(folder / "results.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(TABLE_COLUMNS)
        for row in rows:
            writer.writerow([json.dumps(row[column]) if column == "selected" else row[column] for column in TABLE_COLUMNS])
    logger.info("Wrote results to %s", folder)


def format_table(rows: list[dict[str, Any]]) -> str:
    """Render the results as an aligned text table: tap x head -> accuracies."""
    header = ["tap", "head", "train acc", "val acc", "eval split", "accuracy", "balanced acc"]
    lines = [
        [row["tap"], row["head"], f"{row['train_accuracy']:.3f}", f"{row['val_accuracy']:.3f}", row["eval_split"],
         f"{row['accuracy']:.3f}", f"{row['balanced_accuracy']:.3f}"]
        for row in rows
    ]
    widths = [max(len(str(item)) for item in column) for column in zip(header, *lines)]

    def render(items: list) -> str:
        return "  ".join(str(item).ljust(width) for item, width in zip(items, widths)).rstrip()

    return "\n".join([render(header), render(["-" * width for width in widths]), *map(render, lines)])
