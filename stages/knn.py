"""k-nearest-neighbour head on cosine similarity, with a cheap sweep over k."""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.validation import check_is_fitted

# Query rows per similarity block, which bounds the (block, N_train) similarity matrix in memory.
QUERY_BLOCK = 1024


def normalize_rows(X: np.ndarray) -> np.ndarray:
    X = np.asarray(X, dtype=np.float32)
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    return X / np.maximum(norms, 1e-12)


def nearest_neighbours(train: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Return the (n_queries, k) indices of the most cosine-similar rows of ``train``, most similar first."""
    train = normalize_rows(train)
    queries = normalize_rows(queries)
    k = min(k, len(train))
    found = []
    for start in range(0, len(queries), QUERY_BLOCK):
        similarity = queries[start : start + QUERY_BLOCK] @ train.T  # (block, N_train)
        top = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(similarity, top, axis=1), axis=1, kind="stable")
        found.append(np.take_along_axis(top, order, axis=1))
    return np.concatenate(found) if found else np.zeros((0, k), dtype=np.int64)


def vote(neighbour_targets: np.ndarray, k: int, n_classes: int) -> np.ndarray:
    """Return (n, C) probabilities: the share of each class among the first k neighbours."""
    counts = np.zeros((len(neighbour_targets), n_classes))
    rows = np.repeat(np.arange(len(neighbour_targets)), min(k, neighbour_targets.shape[1]))
    np.add.at(counts, (rows, neighbour_targets[:, :k].ravel()), 1.0)
    return counts / counts.sum(axis=1, keepdims=True)


def sweep_k(X_train: np.ndarray, y_train: np.ndarray, X_select: np.ndarray, y_select: np.ndarray, ks: list[int]) -> dict[int, float]:
    """Return the selection accuracy of every k, from one neighbour search at the largest k."""
    classes, targets = np.unique(y_train, return_inverse=True)
    neighbours = nearest_neighbours(X_train, X_select, max(ks))
    neighbour_targets = targets[neighbours]
    return {k: float(np.mean(classes[np.argmax(vote(neighbour_targets, k, len(classes)), axis=1)] == y_select)) for k in ks}


class KNNHead(ClassifierMixin, BaseEstimator):
    """Majority vote of the k most cosine-similar training features; ties go to the lower class index."""

    def __init__(self, *, k: int = 10) -> None:
        self.k = k

    def fit(self, X: np.ndarray, y: np.ndarray, eval_set=None) -> "KNNHead":
        if self.k < 1:
            raise ValueError(f"k={self.k} is invalid: use a positive number of neighbours.")
        self.classes_, self.targets_ = np.unique(np.asarray(y), return_inverse=True)
        self.features_ = normalize_rows(X)
        return self

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        check_is_fitted(self, "features_")
        neighbours = nearest_neighbours(self.features_, X, self.k)
        return vote(self.targets_[neighbours], self.k, len(self.classes_))

    def predict(self, X: np.ndarray) -> np.ndarray:
        probabilities = self.predict_proba(X)
        return self.classes_[np.argmax(probabilities, axis=1)]
