"""Hyperparameter selection: search spaces, folds, sweeps on the selection split, and the final fit.

Selection uses val only. Where the store has no val split, it uses k-fold cross-validation inside
train, with folds grouped by dataset index so that several views of one image never straddle a
fold. Test plays no part here: the caller evaluates it once, for the selected setting.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.settings import SettingsError

logger = logging.getLogger(__name__)

# Search space of each head. The logreg grid spans C = 1e-6 .. 1e5, the range that the DINOv2
# frozen-feature evaluation sweeps (dinov2/eval/log_regression.py), at one value per decade.
SEARCH_SPACES: dict[str, dict[str, list]] = {
    "logreg": {"C": [float(value) for value in np.logspace(-6, 5, 12)]},
    "linear": {"lr": [1e-3, 1e-2], "weight_decay": [1e-4, 1e-2]},
    "mlp": {"lr": [1e-3, 3e-3], "weight_decay": [1e-4, 1e-2]},
    "knn": {"k": [1, 3, 5, 10, 20, 50]},
}


# Folds of the logistic-regression sweep that run at the same time (threads with one BLAS thread each).
LOGREG_THREADS = 2


@dataclass
class TapData:
    """Features of one tap (or of a control's feature source) for each split; val and test may be absent."""

    tap: str
    X_train: np.ndarray
    y_train: np.ndarray
    groups: np.ndarray  # (N_train,) dataset index of each train row, shared by the views of one image
    X_val: np.ndarray | None = None
    y_val: np.ndarray | None = None
    X_test: np.ndarray | None = None
    y_test: np.ndarray | None = None


@dataclass
class Fold:
    """One train / selection partition: the rows of train used to fit, and the selection features."""

    X_train: np.ndarray
    y_train: np.ndarray
    X_select: np.ndarray
    y_select: np.ndarray
    # positions in train of the fit and selection rows; None when the selection rows are val
    fit_rows: np.ndarray | None = None
    select_rows: np.ndarray | None = None


@dataclass
class Sweep:
    """Scores of every setting of a search space, averaged over the folds."""

    settings: list[dict[str, Any]]
    scores: list[float]  # selection accuracy per setting
    train_accuracies: list[float]  # train accuracy per setting, for the overfitting check
    best_epochs: list[float]  # mean best epoch per setting (torch heads), else 0
    fitted: list[Any] | None = None  # the fitted heads, when there is a single fold (val)
    losses: list[float] | None = None  # selection log loss per setting, where the head computes it

    def best(self) -> int:
        """Return the position of the best setting.

        Settings tied on accuracy go to the lowest selection log loss where the sweep has one, and
        then to the first in grid order. On a small or easy selection split many values of C tie,
        and the first of them, the smallest, gives nearly uniform probabilities.
        """
        scores = np.asarray(self.scores)
        tied = np.flatnonzero(scores == scores.max())
        if self.losses is None:
            return int(tied[0])
        return int(tied[np.argmin(np.asarray(self.losses)[tied])])

    def table(self) -> list[dict[str, Any]]:
        rows = [{"setting": setting, "score": score} for setting, score in zip(self.settings, self.scores)]
        for row, loss in zip(rows, self.losses or []):
            row["log_loss"] = loss
        return rows


def parameter_grid(space: dict[str, list]) -> list[dict[str, Any]]:
    import itertools

    names = sorted(space)
    return [dict(zip(names, values)) for values in itertools.product(*(space[name] for name in names))]


def choose_selection(has_val: bool, train_images: int, cv_max_train: int) -> str:
    """Return how settings are selected: on "val", on one "holdout" fold of train, or by "cv" over all folds."""
    if has_val:
        return "val"
    if cv_max_train and train_images > cv_max_train:
        return "holdout"
    return "cv"


def describe_selection(method: str, cv_folds: int) -> str:
    """Return the selection split's name in results and reports, for a method of ``choose_selection``."""
    if method == "holdout":
        return f"a held-out 1/{cv_folds} of train"
    return "val" if method == "val" else f"{cv_folds}-fold cross-validation on train"


def selection_method(data: TapData, cv_max_train: int) -> str:
    """Return ``choose_selection``'s method for one tap's data (train images are its distinct groups)."""
    return choose_selection(data.X_val is not None, len(np.unique(data.groups)), cv_max_train)


def selection_split_name(data: TapData, cv_folds: int, cv_max_train: int = 0) -> str:
    return describe_selection(selection_method(data, cv_max_train), cv_folds)


def make_folds(data: TapData, cv_folds: int, seed: int, cv_max_train: int = 0) -> list[Fold]:
    """Return [train vs val] when val exists, else stratified folds of train grouped by index.

    All ``cv_folds`` folds cross-validate train splits of up to ``cv_max_train`` images (any size
    when it is 0). Larger ones hold out the first fold only.
    """
    if data.X_val is not None:
        return [Fold(data.X_train, data.y_train, data.X_val, data.y_val)]
    rows = fold_rows(data.y_train, data.groups, cv_folds, seed)
    if selection_method(data, cv_max_train) == "holdout":
        rows = rows[:1]
    return [Fold(data.X_train[fit_rows], data.y_train[fit_rows], data.X_train[select_rows], data.y_train[select_rows],
                 fit_rows, select_rows)
            for fit_rows, select_rows in rows]


# Recent fold_rows results. Every head and control of a run splits the same train rows, and
# StratifiedGroupKFold takes about a second and a half for 5,000 groups (2-core CPU), so each run
# computes its folds once.
_FOLD_ROWS: dict[tuple, list[tuple[np.ndarray, np.ndarray]]] = {}
_FOLD_ROWS_KEPT = 4


def fold_rows(labels: np.ndarray, groups: np.ndarray, cv_folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Return (fit rows, selection rows) of each stratified fold of train, grouped by dataset index."""
    import hashlib

    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    labels, groups = np.asarray(labels), np.asarray(groups)
    digest = hashlib.sha1(labels.tobytes() + b"|" + groups.tobytes()).hexdigest()
    key = (digest, labels.dtype.str, groups.dtype.str, len(labels), cv_folds, seed)
    if key in _FOLD_ROWS:
        return _FOLD_ROWS[key]

    smallest = int(np.bincount(np.unique(labels, return_inverse=True)[1]).min())
    if smallest < cv_folds:
        raise SettingsError(
            f"The store has no val split and its smallest train class has {smallest} samples, fewer than "
            f"cv_folds={cv_folds}: lower --cv-folds or extract with a val split."
        )
    if len(np.unique(groups)) == len(groups):
        # one row per image (no augmented views): the groups constrain nothing, and StratifiedKFold
        # splits in milliseconds what StratifiedGroupKFold's greedy search takes seconds for
        splitter = StratifiedKFold(n_splits=cv_folds, shuffle=True, random_state=seed)
        rows = list(splitter.split(np.zeros((len(labels), 1)), labels))
    else:
        splitter = StratifiedGroupKFold(n_splits=cv_folds, shuffle=True, random_state=seed)
        rows = list(splitter.split(np.zeros((len(labels), 1)), labels, groups))
    if len(_FOLD_ROWS) >= _FOLD_ROWS_KEPT:
        _FOLD_ROWS.pop(next(iter(_FOLD_ROWS)))
    _FOLD_ROWS[key] = rows
    return rows


def sweep_logreg(folds: list[Fold], space: dict[str, list], class_weight: str | None, max_iter: int = 1000) -> Sweep:
    """Fit logistic regression for each C, smallest first, warm-starting each fit from the previous solution.

    The folds run in LOGREG_THREADS threads, each with one BLAS thread, because the matrix
    products release the GIL. On cifar10-small features (2-core CPU), 3 folds took 3.9 s this way,
    6.7 s one after the other with one BLAS thread, and 15.7 s one after the other with two.

    A fold's path stays one chain, even when it is the only fold and leaves a core idle. Past the
    best C, a warm-started fit stops within a few iterations near the previous solution, so the
    large values of C tie, with equal log losses, and the first of them is selected. A second
    chain that started cold in the middle of the path ran 1.6x faster on cifar10-small, but it
    ended those fits elsewhere and changed the selected C on digits (C = 1000 instead of 1).
    """
    from concurrent.futures import ThreadPoolExecutor

    from threadpoolctl import threadpool_limits

    settings = [{"C": value} for value in sorted(space["C"])]
    with threadpool_limits(1), ThreadPoolExecutor(min(LOGREG_THREADS, len(folds))) as pool:
        results = list(pool.map(lambda fold: _logreg_path(_standardized_fold(fold), settings, class_weight, max_iter), folds))
    scores, train_scores, losses = (np.array([result[part] for result in results]) for part in range(3))
    return Sweep(settings, scores.mean(axis=0).tolist(), train_scores.mean(axis=0).tolist(), [0.0] * len(settings),
                 losses=losses.mean(axis=0).tolist())


def _standardized_fold(fold: Fold) -> Fold:
    """Return the fold with its features standardized as ``LogisticRegressionHead`` does, on its fit rows' statistics."""
    from stages.heads import Standardizer

    scaler = Standardizer().fit(fold.X_train)
    return Fold(scaler.transform(fold.X_train), fold.y_train, scaler.transform(fold.X_select), fold.y_select,
                fold.fit_rows, fold.select_rows)


def _logreg_path(fold: Fold, settings: list[dict[str, float]], class_weight: str | None,
                 max_iter: int) -> tuple[list[float], list[float], list[float]]:
    """Return (selection accuracy, train accuracy, selection log loss) per C on one standardized fold."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    from stages.metrics import log_loss

    X_fit, X_select = fold.X_train, fold.X_select
    model = LogisticRegression(warm_start=True, max_iter=max_iter, class_weight=class_weight)
    select, train, losses = [], [], []
    for setting in settings:
        model.set_params(C=setting["C"])
        with warnings.catch_warnings():
            # NOTE: large C on separable features may stop at max_iter; the val score still ranks it.
            warnings.simplefilter("ignore", ConvergenceWarning)
            model.fit(X_fit, fold.y_train)
        probabilities = model.predict_proba(X_select)
        select.append(float(np.mean(model.classes_[probabilities.argmax(axis=1)] == fold.y_select)))
        train.append(float(np.mean(model.predict(X_fit) == fold.y_train)))
        losses.append(log_loss(fold.y_select, probabilities, model.classes_))
    return select, train, losses


def sweep_knn(folds: list[Fold], space: dict[str, list]) -> Sweep:
    from stages.knn import sweep_k, sweep_k_folds

    ks = sorted(space["k"])
    if all(fold.fit_rows is not None for fold in folds):
        # cross-validation folds of train: one similarity product serves every fold
        first = folds[0]
        X = np.concatenate([first.X_train, first.X_select])
        y = np.concatenate([first.y_train, first.y_select])
        order = np.argsort(np.concatenate([first.fit_rows, first.select_rows]))
        rows = [(fold.fit_rows, fold.select_rows) for fold in folds]
        scores, train = sweep_k_folds(X[order], y[order], rows, ks)
        return Sweep([{"k": k} for k in ks], scores.mean(axis=0).tolist(), train.mean(axis=0).tolist(), [0.0] * len(ks))
    scores = np.array([[found[k] for k in ks] for found in (sweep_k(f.X_train, f.y_train, f.X_select, f.y_select, ks) for f in folds)])
    # each train sample is its own nearest neighbour, so this train accuracy is optimistic and the
    # overfitting check skips kNN
    train = np.array([[found[k] for k in ks] for found in (sweep_k(f.X_train, f.y_train, f.X_train, f.y_train, ks) for f in folds)])
    return Sweep([{"k": k} for k in ks], scores.mean(axis=0).tolist(), train.mean(axis=0).tolist(), [0.0] * len(ks))


def sweep_torch(head_class: type, folds: list[Fold], space: dict[str, list], fixed: dict[str, Any]) -> Sweep:
    """Fit a torch head for every setting on every fold, with early stopping on the fold's selection rows."""
    settings = parameter_grid(space)
    scores = np.zeros((len(folds), len(settings)))
    train_scores = np.zeros_like(scores)
    epochs = np.zeros_like(scores)
    fitted = []
    for row, fold in enumerate(folds):
        for column, setting in enumerate(settings):
            head = head_class(**setting, **fixed).fit(fold.X_train, fold.y_train, eval_set=(fold.X_select, fold.y_select))
            scores[row, column] = np.mean(head.predict(fold.X_select) == fold.y_select)
            train_scores[row, column] = np.mean(head.predict(fold.X_train) == fold.y_train)
            epochs[row, column] = head.best_epoch_
            fitted.append(head)
    return Sweep(settings, scores.mean(axis=0).tolist(), train_scores.mean(axis=0).tolist(), epochs.mean(axis=0).tolist(),
                 fitted if len(folds) == 1 else None)


def sweep_mlp_grid(folds: list[Fold], space: dict[str, list], fixed: dict[str, Any]) -> Sweep:
    """Train the lr x weight decay grid of MLP heads as one batched computation per fold, on the CPU."""
    from stages.batched_mlp import MLPSetting, train_mlp_grid

    settings = parameter_grid(space)
    grid = [MLPSetting(setting["lr"], setting["weight_decay"]) for setting in settings]
    options = {name: value for name, value in fixed.items() if name != "device"}
    scores = np.zeros((len(folds), len(settings)))
    train_scores = np.zeros_like(scores)
    epochs = np.zeros_like(scores)
    fitted: list[Any] = []
    for row, fold in enumerate(folds):
        fitted = train_mlp_grid(fold.X_train, fold.y_train, grid, fold.X_select, fold.y_select, **options)
        for column, head in enumerate(fitted):
            scores[row, column] = np.mean(head.predict(fold.X_select) == fold.y_select)
            train_scores[row, column] = np.mean(head.predict(fold.X_train) == fold.y_train)
            epochs[row, column] = head.best_epoch_
    return Sweep(settings, scores.mean(axis=0).tolist(), train_scores.mean(axis=0).tolist(), epochs.mean(axis=0).tolist(),
                 fitted if len(folds) == 1 else None)


def sweep_linear_grid(datas: list[TapData], folds_by_tap: dict[str, list[Fold]], space: dict[str, list],
                      fixed: dict[str, Any]) -> dict[str, Sweep]:
    """Train the lr x weight decay x tap grid of linear heads as one batched computation per fold."""
    from stages.batched import LinearSetting, train_linear_grid

    grid = parameter_grid(space)
    settings = [LinearSetting(data.tap, setting["lr"], setting["weight_decay"]) for data in datas for setting in grid]
    fold_count = len(next(iter(folds_by_tap.values())))
    scores = np.zeros((fold_count, len(settings)))
    train_scores = np.zeros_like(scores)
    epochs = np.zeros_like(scores)
    fitted: list[Any] = []
    for row in range(fold_count):
        folds = {data.tap: folds_by_tap[data.tap][row] for data in datas}
        y_fit = folds[datas[0].tap].y_train
        y_select = folds[datas[0].tap].y_select
        heads = train_linear_grid(
            {tap: fold.X_train for tap, fold in folds.items()}, y_fit, settings,
            {tap: fold.X_select for tap, fold in folds.items()}, y_select, **fixed,
        )
        for column, (setting, head) in enumerate(zip(settings, heads)):
            fold = folds[setting.tap]
            scores[row, column] = np.mean(head.predict(fold.X_select) == fold.y_select)
            train_scores[row, column] = np.mean(head.predict(fold.X_train) == fold.y_train)
            epochs[row, column] = head.best_epoch_
        fitted = heads

    sweeps = {}
    for data in datas:
        columns = [column for column, setting in enumerate(settings) if setting.tap == data.tap]
        sweeps[data.tap] = Sweep(
            [grid[column % len(grid)] for column in columns],
            scores.mean(axis=0)[columns].tolist(),
            train_scores.mean(axis=0)[columns].tolist(),
            epochs.mean(axis=0)[columns].tolist(),
            [fitted[column] for column in columns] if fold_count == 1 else None,
        )
    return sweeps


def final_fit(head_name: str, setting: dict[str, Any], sweep: Sweep, data: TapData, fixed: dict[str, Any],
              seed: int) -> tuple[Any, str]:
    """Return the head fitted with the selected setting for one seed, and which rows it was fitted on.

    logreg and kNN refit on train + val when there is a test split, else on train alone. The torch heads keep the fit that
    early stopping chose on val, or, without val, train on all of train for the mean best epoch of
    the folds plus one.
    """
    from stages.heads import HEAD_CLASSES

    position = sweep.settings.index(setting)
    head_class = HEAD_CLASSES[head_name]
    if head_name in ("logreg", "knn"):
        if data.X_val is None or data.X_test is None:
            # without a test split, val is the evaluation split, so a refit on it would score seen rows
            return head_class(**setting, **fixed).fit(data.X_train, data.y_train), "train"
        X = np.concatenate([data.X_train, data.X_val])
        y = np.concatenate([data.y_train, data.y_val])
        return head_class(**setting, **fixed).fit(X, y), "train+val"

    fixed = {**fixed, "seed": seed}
    if data.X_val is not None:
        if sweep.fitted is not None and sweep.fitted[position].seed == seed:
            return sweep.fitted[position], "train (early stopping on val)"
        return head_class(**setting, **fixed).fit(data.X_train, data.y_train, eval_set=(data.X_val, data.y_val)), \
            "train (early stopping on val)"
    epochs = int(round(sweep.best_epochs[position])) + 1
    return head_class(**setting, **{**fixed, "epochs": epochs}).fit(data.X_train, data.y_train), f"train ({epochs} epochs)"
