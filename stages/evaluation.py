"""Train one result: sweep a head's search space, fit the selected setting per seed, and evaluate once.

The evaluation split is test. Without test it is val, which then also selected the setting, and
each result records this in its notes.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import numpy as np

from pipeline.settings import HeadSettings, SettingsError
from pipeline.store import FeatureStore
from stages.metrics import bootstrap_interval, classification_metrics
from stages.selection import (
    SEARCH_SPACES, Sweep, TapData, final_fit, make_folds, selection_split_name, sweep_knn, sweep_logreg, sweep_mlp_grid, sweep_torch,
)

logger = logging.getLogger(__name__)

# Heads whose fit does not depend on the seed: their seeds repeat one fit instead of training again.
DETERMINISTIC_HEADS = ("logreg", "knn", "majority")


def fixed_params(head_name: str, settings: HeadSettings) -> dict[str, Any]:
    """Return the head settings that selection does not sweep. They are part of each result's key."""
    if head_name == "logreg":
        return {"class_weight": settings.class_weight}
    if head_name == "linear":
        return {"class_weight": settings.class_weight, "device": settings.device, "patience": settings.patience}
    if head_name == "mlp":
        return {"class_weight": settings.class_weight, "device": settings.device, "patience": settings.patience,
                "hidden": settings.mlp_hidden}
    return {}


def evaluation_split(data: TapData) -> tuple[str, np.ndarray, np.ndarray, list[str]]:
    if data.X_test is not None:
        return "test", data.X_test, data.y_test, []
    if data.X_val is not None:
        return "val", data.X_val, data.y_val, ["no test split: accuracy is measured on val, which also selected the setting"]
    raise SettingsError("The store has only a train split: re-extract with --val-fraction or --test-fraction above 0.")


def sweep_head(head_name: str, data: TapData, settings: HeadSettings) -> Sweep:
    """Score every setting of a head's search space on val, or by cross-validation inside train."""
    folds = make_folds(data, settings.cv_folds, settings.seed, settings.cv_max_train)
    space = SEARCH_SPACES.get(head_name, {})
    if head_name == "logreg":
        return sweep_logreg(folds, space, settings.class_weight)
    if head_name == "knn":
        return sweep_knn(folds, space)
    if head_name == "majority":
        from sklearn.dummy import DummyClassifier

        scores = [float(np.mean(DummyClassifier().fit(f.X_train, f.y_train).predict(f.X_select) == f.y_select)) for f in folds]
        trains = [float(np.mean(DummyClassifier().fit(f.X_train, f.y_train).predict(f.X_train) == f.y_train)) for f in folds]
        return Sweep([{}], [float(np.mean(scores))], [float(np.mean(trains))], [0.0])
    from stages.heads import HEAD_CLASSES

    fixed = {**fixed_params(head_name, settings), "seed": settings.seed}
    if head_name == "mlp" and settings.device == "cpu":
        return sweep_mlp_grid(folds, space, fixed)
    return sweep_torch(HEAD_CLASSES[head_name], folds, space, fixed)


def fit_seed(head_name: str, sweep: Sweep, data: TapData, settings: HeadSettings, seed: int) -> tuple[Any, str]:
    if head_name == "majority":
        from sklearn.dummy import DummyClassifier

        return DummyClassifier().fit(data.X_train, data.y_train), "train"
    return final_fit(head_name, sweep.settings[sweep.best()], sweep, data, fixed_params(head_name, settings), seed)


def evaluate_in_memory(head_name: str, data: TapData, settings: HeadSettings, sweep: Sweep | None = None,
                       control: str | None = None, sweep_seconds: float = 0.0) -> tuple[dict[str, Any], Any]:
    """Select, fit per seed and evaluate one head on in-memory features. Return (result, head of the first seed).

    ``sweep_seconds`` is the time a ``sweep`` given by the caller took; the result's seconds include it.
    """
    started = time.perf_counter() - sweep_seconds
    sweep = sweep or sweep_head(head_name, data, settings)
    eval_split, X_eval, y_eval, notes = evaluation_split(data)

    def fit_and_predict(seed: int) -> tuple[Any, str, np.ndarray]:
        head, refit_on = fit_seed(head_name, sweep, data, settings, seed)
        return head, refit_on, head.predict_proba(X_eval)

    return assemble(head_name, data.tap, control, sweep, selection_split_name(data, settings.cv_folds, settings.cv_max_train), eval_split, y_eval,
                    fit_and_predict, settings, notes, started)


def evaluate_streamed(head_name: str, store: FeatureStore, tap: str, settings: HeadSettings) -> tuple[dict[str, Any], Any]:
    """Select, fit per seed and evaluate a torch head reading its features one shard at a time."""
    from stages.heads import HEAD_CLASSES
    from stages.selection import parameter_grid
    from stages.streaming import fit_streamed, predict_streamed

    started = time.perf_counter()
    splits = store.splits()
    if "val" not in splits:
        raise SettingsError(
            f"The features of tap {tap!r} exceed memory_budget_mb={settings.memory_budget_mb} and store {store.name} has no "
            "val split: streamed heads select on val only. Raise --memory-budget-mb or extract with a val split."
        )
    head_class = HEAD_CLASSES[head_name]
    fixed = fixed_params(head_name, settings)
    grid = parameter_grid(SEARCH_SPACES[head_name])
    scores, trains, epochs, fitted = [], [], [], []
    for setting in grid:
        head = fit_streamed(head_class(**setting, **fixed, seed=settings.seed), store, "train", tap, eval_split="val")
        for split, bucket in (("val", scores), ("train", trains)):
            labels, probabilities = predict_streamed(head, store, split, tap)
            bucket.append(float(np.mean(head.classes_[np.argmax(probabilities, axis=1)] == labels)))
        epochs.append(float(head.best_epoch_))
        fitted.append(head)
    sweep = Sweep(grid, scores, trains, epochs, fitted)
    eval_split = "test" if "test" in splits else "val"
    notes = ["features streamed shard by shard (over the memory budget)"]
    if eval_split == "val":
        notes.append("no test split: accuracy is measured on val, which also selected the setting")
    y_eval = store.load_labels(eval_split)

    def fit_and_predict(seed: int) -> tuple[Any, str, np.ndarray]:
        setting = sweep.settings[sweep.best()]
        head = sweep.fitted[sweep.best()]
        if seed != settings.seed:
            head = fit_streamed(head_class(**setting, **fixed, seed=seed), store, "train", tap, eval_split="val")
        return head, "train (early stopping on val, streamed)", predict_streamed(head, store, eval_split, tap)[1]

    return assemble(head_name, tap, None, sweep, "val", eval_split, y_eval, fit_and_predict, settings, notes, started)


def assemble(head_name: str, tap: str, control: str | None, sweep: Sweep, select_split: str, eval_split: str,
             y_eval: np.ndarray, fit_and_predict: Callable, settings: HeadSettings, notes: list[str],
             started: float) -> tuple[dict[str, Any], Any]:
    """Fit the selected setting for every seed, evaluate each once, and build the result record."""
    best = sweep.best()
    predictions, seed_metrics, first = [], [], None
    for offset in range(settings.seeds):
        if offset > 0 and head_name in DETERMINISTIC_HEADS:
            predictions.append(predictions[0])
            seed_metrics.append(seed_metrics[0])
            continue
        head, refit_on, probabilities = fit_and_predict(settings.seed + offset)
        predictions.append(np.asarray(head.classes_)[np.argmax(probabilities, axis=1)])
        seed_metrics.append(classification_metrics(y_eval, probabilities, np.asarray(head.classes_)))
        if first is None:
            first = (head, refit_on)
    head, refit_on = first
    if settings.seeds > 1 and head_name in DETERMINISTIC_HEADS:
        notes = notes + [f"{head_name} does not depend on the seed: its {settings.seeds} seeds repeat one fit"]

    # scalar metrics are means over the seeds; per-class recall and the confusion matrix are the first seed's
    metrics = dict(seed_metrics[0])
    for name, value in seed_metrics[0].items():
        if isinstance(value, float):
            metrics[name] = float(np.mean([found[name] for found in seed_metrics]))
    if settings.seeds > 1:
        notes = notes + ["per-class recall and the confusion matrix are those of the first seed"]

    interval = bootstrap_interval(y_eval, predictions, seed=settings.seed)
    result = {
        "tap": tap,
        "head": head_name,
        "control": control,
        "selected": sweep.settings[best],
        "search_space": SEARCH_SPACES.get(head_name, {}),
        "selection": sweep.table(),
        "select_split": select_split,
        "select_accuracy": sweep.scores[best],
        # The same score under the name that other readers of results.json use. select_split names
        # whether it is val accuracy or cross-validated accuracy inside train.
        "val_accuracy": sweep.scores[best],
        "train_accuracy": sweep.train_accuracies[best],
        "refit_on": refit_on,
        "eval_split": eval_split,
        "accuracy": interval["mean"],
        "ci_low": interval["ci_low"],
        "ci_high": interval["ci_high"],
        "seeds": settings.seeds,
        "seed_accuracies": interval["seed_accuracies"],
        "metrics": metrics,
        "notes": notes,
        "seconds": time.perf_counter() - started,
    }
    logger.info("%s on %s%s: %s accuracy %.4f [%.4f, %.4f], selected %s on %s", head_name, tap,
                f" ({control} control)" if control else "", eval_split, result["accuracy"], result["ci_low"],
                result["ci_high"], result["selected"], select_split)
    return result, head
