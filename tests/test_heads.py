"""Heads follow the scikit-learn contract and learn separable features."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError

from stages.heads import LinearHead, LogisticRegressionHead, MLPHead
from stages.train_heads import HEAD_NAMES


def blobs(seed: int, n_per_class: int = 40, n_classes: int = 3, dim: int = 16):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 4, (n_classes, dim))
    X = np.concatenate([centres[label] + rng.normal(0, 1, (n_per_class, dim)) for label in range(n_classes)])
    y = np.repeat(np.arange(n_classes), n_per_class)
    return X.astype(np.float32), y


HEAD_FACTORIES = {
    "logreg": lambda: LogisticRegressionHead(C=1.0),
    "linear": lambda: LinearHead(lr=1e-2, epochs=30),
    "mlp": lambda: MLPHead(hidden=32, lr=1e-2, epochs=30),
}


@pytest.mark.parametrize("name", sorted(HEAD_FACTORIES))
def test_head_learns_separable_blobs(name):
    X, y = blobs(0)
    X_test, y_test = blobs(0, n_per_class=20)
    head = HEAD_FACTORIES[name]().fit(X, y)
    assert np.mean(head.predict(X_test) == y_test) > 0.95


@pytest.mark.parametrize("name", sorted(HEAD_FACTORIES))
def test_head_probabilities_sum_to_one(name):
    X, y = blobs(1)
    probabilities = HEAD_FACTORIES[name]().fit(X, y).predict_proba(X)
    assert probabilities.shape == (len(X), 3)
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("name", sorted(HEAD_FACTORIES))
def test_head_not_fitted_raises(name):
    with pytest.raises(NotFittedError):
        HEAD_FACTORIES[name]().predict(np.zeros((2, 16), np.float32))


@pytest.mark.parametrize("name", sorted(HEAD_FACTORIES))
def test_head_fit_returns_self(name):
    X, y = blobs(2)
    head = HEAD_FACTORIES[name]()
    assert head.fit(X, y) is head


def test_head_keeps_string_classes():
    X, y = blobs(3)
    labels = np.array(["ant", "bee", "wasp"])[y]
    head = LinearHead(lr=1e-2, epochs=20).fit(X, labels)
    assert set(head.predict(X)) <= {"ant", "bee", "wasp"}
    assert list(head.classes_) == ["ant", "bee", "wasp"]


def test_mlp_params_clone():
    head = MLPHead(hidden=64, dropout=0.1, lr=0.5)
    cloned = clone(head)
    assert cloned.get_params()["hidden"] == 64
    assert cloned.get_params()["lr"] == 0.5


def test_torch_head_is_seeded():
    X, y = blobs(4)
    first = LinearHead(lr=1e-2, epochs=5, seed=7).fit(X, y).predict_proba(X)
    second = LinearHead(lr=1e-2, epochs=5, seed=7).fit(X, y).predict_proba(X)
    assert np.array_equal(first, second)


def test_registry_names():
    assert set(HEAD_NAMES) >= {"logreg", "linear", "mlp", "knn"}


def test_standardizer_matches_scikit_learn_scaler():
    from sklearn.preprocessing import StandardScaler

    from stages.heads import Standardizer

    rng = np.random.default_rng(4)
    X = (rng.normal(3.0, 2.0, (300, 12)) * rng.uniform(0.1, 50.0, 12)).astype(np.float32)
    X[:, 5] = 7.0  # a constant feature keeps a scale of 1
    ours = Standardizer().fit(X)
    theirs = StandardScaler().fit(X)
    assert ours.n_samples_seen_ == 300
    assert ours.n_features_in_ == 12
    assert np.allclose(ours.transform(X), theirs.transform(X), atol=1e-4)
    assert np.all(ours.transform(X)[:, 5] == 0.0)
    with pytest.raises(ValueError, match="fitted on 12 features"):
        ours.transform(X[:, :4])
