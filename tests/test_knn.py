"""Tests of stages.knn: cosine k-nearest-neighbour head and its k sweep."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.exceptions import NotFittedError

from stages.knn import KNNHead, nearest_neighbours, sweep_k


def test_neighbours_use_cosine_not_distance():
    train = np.array([[1.0, 0.0], [0.0, 1.0], [10.0, 1.0]], dtype=np.float32)
    found = nearest_neighbours(train, np.array([[1.0, 0.0]], dtype=np.float32), k=2)
    assert found[0].tolist() == [0, 2]


def test_head_votes_among_k_neighbours():
    train = np.array([[1, 0], [1, 0.1], [0, 1], [0.1, 1], [0.2, 1]], dtype=np.float32)
    labels = np.array([7, 7, 3, 3, 3])
    head = KNNHead(k=3).fit(train, labels)
    assert head.predict(np.array([[1, 0.05]], dtype=np.float32)).tolist() == [7]
    assert head.predict_proba(np.array([[1, 0.05]], dtype=np.float32))[0].tolist() == pytest.approx([1 / 3, 2 / 3])


def test_sweep_matches_head_per_k():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(80, 5)).astype(np.float32)
    y = (X[:, 0] > 0).astype(int) + (X[:, 1] > 0)
    V = rng.normal(size=(30, 5)).astype(np.float32)
    y_val = (V[:, 0] > 0).astype(int) + (V[:, 1] > 0)
    scores = sweep_k(X, y, V, y_val, [1, 5, 15])
    for k, score in scores.items():
        assert score == pytest.approx(np.mean(KNNHead(k=k).fit(X, y).predict(V) == y_val)), k


def test_head_before_fit_raises():
    with pytest.raises(NotFittedError):
        KNNHead().predict(np.zeros((1, 2)))


def test_predictions_equal_scikit_learn_cosine_knn():
    from sklearn.neighbors import KNeighborsClassifier

    rng = np.random.default_rng(1)
    X = rng.normal(size=(300, 16)).astype(np.float32)
    y = rng.integers(0, 4, size=300)
    X[:, :4] += np.eye(4, dtype=np.float32)[y] * 1.5
    V = rng.normal(size=(200, 16)).astype(np.float32)
    for k in (1, 5, 20):
        reference = KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute").fit(X, y)
        expected = reference.predict(V)
        found = KNNHead(k=k).fit(X, y).predict(V)
        assert np.array_equal(found, expected), k


def test_neighbours_equal_scikit_learn_order():
    from sklearn.neighbors import NearestNeighbors

    rng = np.random.default_rng(2)
    X = rng.normal(size=(2500, 8)).astype(np.float32)
    V = rng.normal(size=(1100, 8)).astype(np.float32)  # more than one query block
    expected = NearestNeighbors(n_neighbors=7, metric="cosine", algorithm="brute").fit(X).kneighbors(V, return_distance=False)
    assert np.array_equal(nearest_neighbours(X, V, 7), expected)


def test_sweep_reads_every_k_from_one_search():
    rng = np.random.default_rng(3)
    X = rng.normal(size=(120, 6)).astype(np.float32)
    y = rng.integers(0, 3, size=120)
    X[:, :3] += np.eye(3, dtype=np.float32)[y]
    ks = [1, 2, 7, 40, 200]
    scores = sweep_k(X, y, X, y, ks)
    assert scores[1] == 1.0
    for k in ks:
        assert scores[k] == pytest.approx(np.mean(KNNHead(k=k).fit(X, y).predict(X) == y)), k


def test_fold_sweep_equals_sweep_per_fold():
    from stages.selection import TapData, make_folds, sweep_knn

    rng = np.random.default_rng(4)
    y = np.arange(150) % 3
    X = rng.normal(size=(150, 5)).astype(np.float32)
    X[:, :3] += np.eye(3, dtype=np.float32)[y]
    data = TapData("t", X, y, groups=np.arange(150))
    folds = make_folds(data, 3, seed=0)
    ks = [1, 3, 10]

    sweep = sweep_knn(folds, {"k": ks})

    for position, k in enumerate(ks):
        select = np.mean([sweep_k(f.X_train, f.y_train, f.X_select, f.y_select, [k])[k] for f in folds])
        train = np.mean([sweep_k(f.X_train, f.y_train, f.X_train, f.y_train, [k])[k] for f in folds])
        assert sweep.scores[position] == pytest.approx(select), k
        assert sweep.train_accuracies[position] == pytest.approx(train), k


def test_sweep_of_held_out_fold():
    from stages.selection import TapData, make_folds, sweep_knn

    rng = np.random.default_rng(5)
    y = np.arange(240) % 4
    X = rng.normal(size=(240, 6)).astype(np.float32)
    X[:, :4] += 0.8 * np.eye(4, dtype=np.float32)[y]
    data = TapData("t", X, y, groups=np.arange(240))
    folds = make_folds(data, 3, seed=1, cv_max_train=100)  # over 100 images: one held-out fold
    assert len(folds) == 1
    ks = [1, 5, 20]

    sweep = sweep_knn(folds, {"k": ks})

    fold = folds[0]
    select = sweep_k(fold.X_train, fold.y_train, fold.X_select, fold.y_select, ks)
    train = sweep_k(fold.X_train, fold.y_train, fold.X_train, fold.y_train, ks)
    assert sweep.scores == pytest.approx([select[k] for k in ks])
    assert sweep.train_accuracies == pytest.approx([train[k] for k in ks])
    assert 0.3 < sweep.scores[2] < 1.0
