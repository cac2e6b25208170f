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
