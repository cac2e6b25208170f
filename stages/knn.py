"""k-nearest-neighbour head on cosine similarity, with a cheap sweep over k.

Similarities are torch matrix products, one block of queries at a time, and a sweep reads every k
from one sorted list of the largest k's neighbours.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.validation import check_is_fitted

# Query rows per similarity block, which bounds the (block, N_train) similarity matrix in memory.
QUERY_BLOCK = 1024


def normalize_rows(X: np.ndarray) -> np.ndarray:
    X = np.asarray(X, dtype=np.float32)
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    return X / np.maximum(norms, 1e-12)


def nearest_neighbours(train: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Return the (n_queries, k) indices of the most cosine-similar rows of ``train``, most similar first.

    Neighbours of equal similarity are listed by ascending train index, except at the k-th place,
    where ``torch.topk`` decides which of them is kept.
    """
    train_rows = torch.from_numpy(normalize_rows(train))  # (N_train, D)
    query_rows = torch.from_numpy(normalize_rows(queries))  # (N_queries, D)
    k = min(k, len(train_rows))
    found = [top_k(query_rows[start : start + QUERY_BLOCK] @ train_rows.T, k)  # (block, N_train) similarities
             for start in range(0, len(query_rows), QUERY_BLOCK)]
    return torch.cat(found).numpy() if found else np.zeros((0, k), dtype=np.int64)


def top_k(similarity: torch.Tensor, k: int) -> torch.Tensor:
    """Return the (n, k) column indices of the k largest similarities of each row, largest first, ties by index."""
    _, top = torch.topk(similarity, k, dim=1)

    # ascending index, then a stable sort by similarity, so that ties keep index order
    top, _ = torch.sort(top, dim=1)
    _, order = torch.sort(torch.gather(similarity, 1, top), dim=1, descending=True, stable=True)
    return torch.gather(top, 1, order)


def sweep_k_folds(X: np.ndarray, y: np.ndarray, folds: list[tuple[np.ndarray, np.ndarray]], ks: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Return the (folds, len(ks)) selection and train accuracies of every k on cross-validation folds of (X, y).

    ``folds`` contains (fit rows, selection rows) pairs that together cover the rows of X. Each block
    of rows takes one similarity product with all of X, and every fold reads its fit columns from
    it, so the folds cost one (N, N) product in all instead of one per fold. As in ``sweep_k``, a
    train row is its own nearest neighbour.
    """
    rows = torch.from_numpy(normalize_rows(X))  # (N, D)
    y = np.asarray(y)
    found = [np.zeros((len(y), min(max(ks), len(fit_rows))), dtype=np.int64) for fit_rows, _ in folds]
    columns = [torch.as_tensor(fit_rows) for fit_rows, _ in folds]
    # one fold (a held-out part of train) needs its fit columns only: a third less to multiply
    targets = rows[columns[0]].T if len(folds) == 1 else rows.T  # (D, N_fit) or (D, N)
    for start in range(0, len(rows), QUERY_BLOCK):
        similarity = rows[start : start + QUERY_BLOCK] @ targets  # (block, N_fit) or (block, N)
        for position, fit_columns in enumerate(columns):
            block = similarity if len(folds) == 1 else similarity[:, fit_columns]
            neighbours = top_k(block, found[position].shape[1])  # positions in the fit rows
            found[position][start : start + len(neighbours)] = neighbours.numpy()

    select_scores = np.zeros((len(folds), len(ks)))
    train_scores = np.zeros_like(select_scores)
    for position, (fit_rows, select_rows) in enumerate(folds):
        classes, targets = np.unique(y[fit_rows], return_inverse=True)
        neighbour_targets = targets[found[position]]  # (N, k_max)
        for scores, queries in ((select_scores, select_rows), (train_scores, fit_rows)):
            counts = vote_counts(neighbour_targets[queries], ks, len(classes))
            scores[position] = [np.mean(classes[np.argmax(count, axis=1)] == y[queries]) for count in counts]
    return select_scores, train_scores


def vote(neighbour_targets: np.ndarray, k: int, n_classes: int) -> np.ndarray:
    """Return (n, C) probabilities: the share of each class among the first k neighbours."""
    return vote_counts(neighbour_targets, [k], n_classes)[0] / min(k, neighbour_targets.shape[1])


def vote_counts(neighbour_targets: np.ndarray, ks: list[int], n_classes: int) -> np.ndarray:
    """Return (len(ks), n, C) class counts among the first k neighbours, for every k, from one cumulative sum."""
    targets = torch.as_tensor(neighbour_targets, dtype=torch.int64)  # (n, k_max)
    one_hot = torch.zeros(*targets.shape, n_classes, dtype=torch.int32)  # (n, k_max, C)
    one_hot.scatter_(2, targets[:, :, None], 1)
    running = one_hot.cumsum(dim=1)  # (n, k_max, C): counts among the first j + 1 neighbours
    last = [min(k, targets.shape[1]) - 1 for k in ks]
    return running[:, last, :].permute(1, 0, 2).numpy().astype(np.float64)


def sweep_k(X_train: np.ndarray, y_train: np.ndarray, X_select: np.ndarray, y_select: np.ndarray, ks: list[int]) -> dict[int, float]:
    """Return the selection accuracy of every k, from one neighbour search at the largest k."""
    classes, targets = np.unique(y_train, return_inverse=True)
    neighbours = nearest_neighbours(X_train, X_select, max(ks))
    counts = vote_counts(targets[neighbours], ks, len(classes))  # (len(ks), n, C)
    # argmax takes the first maximum, so ties go to the lower class index, as in KNNHead
    return {k: float(np.mean(classes[np.argmax(counts[position], axis=1)] == y_select)) for position, k in enumerate(ks)}


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
