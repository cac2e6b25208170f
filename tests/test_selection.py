"""Tests of stages.selection: search spaces, grouped folds, sweeps and the final fit."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.settings import SettingsError
from stages.selection import SEARCH_SPACES, TapData, final_fit, make_folds, selection_split_name, sweep_knn, sweep_logreg


def tap_data(with_val: bool, views: int = 1, seed: int = 0) -> TapData:
    rng = np.random.default_rng(seed)
    images = 60
    labels = np.repeat(np.arange(images) % 3, views)
    X = (labels[:, None] * 1.5 + rng.normal(size=(images * views, 4))).astype(np.float32)
    data = TapData("t", X, labels, groups=np.repeat(np.arange(images), views))
    if with_val:
        data.X_val = (np.arange(30)[:, None] % 3 * 1.5 + rng.normal(size=(30, 4))).astype(np.float32)
        data.y_val = np.arange(30) % 3
    return data


def test_logreg_grid_spans_published_range():
    values = SEARCH_SPACES["logreg"]["C"]
    assert min(values) == pytest.approx(1e-6)
    assert max(values) == pytest.approx(1e5)


def test_folds_use_val_when_present():
    data = tap_data(with_val=True)
    folds = make_folds(data, cv_folds=3, seed=0)
    assert len(folds) == 1
    assert folds[0].X_select is data.X_val


def test_folds_keep_views_of_one_image_together():
    data = tap_data(with_val=False, views=3)
    folds = make_folds(data, cv_folds=3, seed=0)
    assert len(folds) == 3
    for fold in folds:
        fit_rows = {tuple(row) for row in fold.X_train.tolist()}
        assert not fit_rows & {tuple(row) for row in fold.X_select.tolist()}
    group_of = {tuple(row): group for row, group in zip(data.X_train.tolist(), data.groups)}
    for fold in folds:
        fit_groups = {group_of[tuple(row)] for row in fold.X_train.tolist()}
        select_groups = {group_of[tuple(row)] for row in fold.X_select.tolist()}
        assert not fit_groups & select_groups


def test_large_train_holds_out_first_fold():
    data = tap_data(with_val=False, views=3)  # 60 images in 180 rows
    folds = make_folds(data, cv_folds=3, seed=0)
    held_out = make_folds(data, cv_folds=3, seed=0, cv_max_train=59)

    assert len(held_out) == 1
    assert np.array_equal(held_out[0].select_rows, folds[0].select_rows)
    assert np.array_equal(held_out[0].fit_rows, folds[0].fit_rows)
    assert len(held_out[0].select_rows) == 60  # a third of the rows, views of 20 images
    assert selection_split_name(data, 3, cv_max_train=59) == "a held-out 1/3 of train"


def test_train_up_to_limit_cross_validates():
    data = tap_data(with_val=False, views=3)
    # the limit counts images, not rows: 60 images, 180 rows
    assert len(make_folds(data, cv_folds=3, seed=0, cv_max_train=60)) == 3
    assert len(make_folds(data, cv_folds=3, seed=0, cv_max_train=0)) == 3
    assert selection_split_name(data, 3, cv_max_train=60) == "3-fold cross-validation on train"
    with_val = tap_data(with_val=True)
    assert len(make_folds(with_val, cv_folds=3, seed=0, cv_max_train=1)) == 1
    assert selection_split_name(with_val, 3, cv_max_train=1) == "val"


def test_folds_reject_too_small_classes():
    data = tap_data(with_val=False)
    with pytest.raises(SettingsError, match="cv_folds=30"):
        make_folds(data, cv_folds=30, seed=0)


def test_logreg_warm_sweep_matches_cold_fits():
    from stages.heads import LogisticRegressionHead

    rng = np.random.default_rng(0)
    y = np.arange(60) % 2
    y_val = np.arange(200) % 2
    X = rng.normal(size=(60, 40)).astype(np.float32)
    V = rng.normal(size=(200, 40)).astype(np.float32)
    X[:, 0] += y * 1.5
    V[:, 0] += y_val * 1.5
    data = TapData("t", X, y, groups=np.arange(60), X_val=V, y_val=y_val)
    grid = [1e-6, 1e-2, 1e5]
    sweep = sweep_logreg(make_folds(data, 3, 0), {"C": grid[::-1]}, None)
    assert sweep.settings == [{"C": C} for C in grid]
    for C, score in zip(grid, sweep.scores):
        cold = np.mean(LogisticRegressionHead(C=C).fit(X, y).predict(V) == y_val)
        assert score == pytest.approx(cold, abs=0.02), C
    assert sweep.train_accuracies[2] == 1.0
    assert sweep.scores[1] > sweep.scores[2]


def test_final_logreg_refits_on_train_and_val():
    data = tap_data(with_val=True)
    data.X_test, data.y_test = data.X_val.copy(), data.y_val.copy()
    sweep = sweep_logreg(make_folds(data, 3, 0), {"C": [1.0]}, None)
    head, refit_on = final_fit("logreg", {"C": 1.0}, sweep, data, {"class_weight": None}, seed=0)
    assert refit_on == "train+val"
    assert head.pipeline_[-1].n_features_in_ == 4
    assert head.pipeline_[0].n_samples_seen_ == 90


@pytest.mark.parametrize("head_name, setting", [("logreg", {"C": 1.0}), ("knn", {"k": 3})])
def test_final_fit_keeps_val_unseen_without_test(head_name, setting):
    """Without a test split, val is the evaluation split, so the final fit must not train on it."""
    data = tap_data(with_val=True)
    folds = make_folds(data, 3, 0)
    sweep = sweep_logreg(folds, {"C": [1.0]}, None) if head_name == "logreg" else sweep_knn(folds, {"k": [3]})
    fixed = {"class_weight": None} if head_name == "logreg" else {}
    head, refit_on = final_fit(head_name, setting, sweep, data, fixed, seed=0)
    assert refit_on == "train"
    if head_name == "logreg":
        assert head.pipeline_[0].n_samples_seen_ == 60
    else:
        assert len(head.features_) == 60


@pytest.mark.slow
def test_torch_refit_without_val_epochs():
    from stages.evaluation import sweep_head
    from pipeline.settings import HeadSettings

    data = tap_data(with_val=False)
    settings = HeadSettings(heads=("mlp",), cv_folds=2)
    sweep = sweep_head("mlp", data, settings)
    head, refit_on = final_fit("mlp", sweep.settings[sweep.best()], sweep, data, {"class_weight": None}, seed=0)
    assert refit_on == f"train ({head.epochs} epochs)"
    assert head.epochs == int(round(sweep.best_epochs[sweep.best()])) + 1


def test_fold_rows_computed_once_per_split():
    from sklearn.model_selection import StratifiedGroupKFold

    from stages.selection import fold_rows

    data = tap_data(with_val=False, views=2, seed=7)
    first = fold_rows(data.y_train, data.groups, 3, 11)
    second = fold_rows(data.y_train.copy(), data.groups.copy(), 3, 11)
    expected = StratifiedGroupKFold(n_splits=3, shuffle=True, random_state=11).split(data.X_train, data.y_train, data.groups)
    assert second is first
    for (fit_rows, select_rows), (fit_expected, select_expected) in zip(first, expected):
        assert np.array_equal(fit_rows, fit_expected)
        assert np.array_equal(select_rows, select_expected)


def test_folds_record_their_train_rows():
    data = tap_data(with_val=False)
    for fold in make_folds(data, cv_folds=3, seed=0):
        assert np.array_equal(fold.X_train, data.X_train[fold.fit_rows])
        assert np.array_equal(fold.X_select, data.X_train[fold.select_rows])


def test_accuracy_ties_go_to_lowest_log_loss():
    from stages.selection import Sweep

    settings = [{"C": C} for C in (1e-6, 1e-2, 1.0, 100.0)]
    tied = Sweep(settings, [0.9, 0.95, 0.95, 0.95], [0.9] * 4, [0.0] * 4, losses=[0.69, 0.40, 0.15, 0.15])
    assert tied.best() == 2  # lowest loss among the tied, then the first of those
    assert Sweep(settings, [0.9, 0.95, 0.95, 0.95], [0.9] * 4, [0.0] * 4).best() == 1
    assert Sweep(settings, [0.96, 0.95, 0.95, 0.95], [0.9] * 4, [0.0] * 4, losses=[0.69, 0.1, 0.1, 0.1]).best() == 0
    assert tied.table()[2] == {"setting": {"C": 1.0}, "score": 0.95, "log_loss": 0.15}


def test_logreg_on_easy_data_avoids_the_smallest_c():
    rng = np.random.default_rng(3)
    y = np.arange(60) % 2
    y_val = np.arange(40) % 2
    # one feature, the classes 12 standard deviations apart: every C classifies val perfectly
    X = (12.0 * y + rng.normal(size=60)).astype(np.float32)[:, None]
    V = (12.0 * y_val + rng.normal(size=40)).astype(np.float32)[:, None]
    data = TapData("t", X, y, groups=np.arange(60), X_val=V, y_val=y_val)
    sweep = sweep_logreg(make_folds(data, 3, 0), {"C": [1e-6, 1e-4, 1e-2, 1.0]}, None)
    assert sweep.scores == [1.0, 1.0, 1.0, 1.0]
    assert sweep.settings[sweep.best()]["C"] == 1.0
    assert sweep.losses[sweep.best()] < sweep.losses[0] / 10
