"""Classification metrics of a head's predictions, and bootstrap confidence intervals over samples."""

from __future__ import annotations

from typing import Any

import numpy as np

# Top-k accuracy is reported only when there are more classes than k.
TOP_K = 5
# Resamples of the evaluated samples behind each 95% confidence interval.
BOOTSTRAP_RESAMPLES = 1000
# Probabilities are clipped to [EPSILON, 1] before the log, as scikit-learn's log_loss does.
EPSILON = 1e-15


def classification_metrics(y_true: np.ndarray, proba: np.ndarray, classes: np.ndarray) -> dict[str, Any]:
    """Compute accuracy, balanced accuracy, macro F1, top-5, per-class recall, confusion matrix and log loss.

    ``proba`` is (n, C) with columns in the order of ``classes``. Classes of ``y_true`` that the head
    never saw count as errors and get a recall of 0.
    """
    from sklearn.metrics import confusion_matrix, f1_score, recall_score

    y_true = np.asarray(y_true)
    classes = np.asarray(classes)
    predictions = classes[np.argmax(proba, axis=1)]
    labels = np.union1d(classes, np.unique(y_true))
    recalls = recall_score(y_true, predictions, labels=labels, average=None, zero_division=0)

    metrics: dict[str, Any] = {
        "accuracy": float(np.mean(predictions == y_true)),
        "balanced_accuracy": float(np.mean(recalls[np.isin(labels, y_true)])),
        "macro_f1": float(f1_score(y_true, predictions, labels=labels, average="macro", zero_division=0)),
        "per_class_recall": {str(label): float(recall) for label, recall in zip(labels.tolist(), recalls)},
        "confusion_matrix": confusion_matrix(y_true, predictions, labels=labels).tolist(),
        "confusion_labels": labels.tolist(),
        "log_loss": log_loss(y_true, proba, classes),
    }
    if len(classes) > TOP_K:
        metrics[f"top{TOP_K}_accuracy"] = top_k_accuracy(y_true, proba, classes, TOP_K)
    return metrics


def top_k_accuracy(y_true: np.ndarray, proba: np.ndarray, classes: np.ndarray, k: int) -> float:
    top = np.argsort(-proba, axis=1)[:, :k]  # (n, k) column indices
    return float(np.mean(np.any(np.asarray(classes)[top] == np.asarray(y_true)[:, None], axis=1)))


def log_loss(y_true: np.ndarray, proba: np.ndarray, classes: np.ndarray) -> float:
    """Return the mean negative log-likelihood. A class the head never saw gets probability EPSILON."""
    column = {label: position for position, label in enumerate(np.asarray(classes).tolist())}
    picked = np.array(
        [proba[row, column[label]] if label in column else 0.0 for row, label in enumerate(np.asarray(y_true).tolist())]
    )
    # adding 0.0 turns the -0.0 of a perfect prediction into 0.0
    return float(-np.mean(np.log(np.clip(picked, EPSILON, 1.0)))) + 0.0


def bootstrap_interval(
    y_true: np.ndarray, predictions: list[np.ndarray], resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0
) -> dict[str, float]:
    """Return the mean accuracy over seeds and its 95% percentile interval, resampling the evaluated samples.

    ``predictions`` contains one (n,) prediction vector per seed. Each resample draws n sample indices
    with replacement and averages the accuracy of every seed on them, so the interval covers both
    the finite evaluation set and the spread over seeds.
    """
    y_true = np.asarray(y_true)
    correct = np.stack([np.asarray(prediction) == y_true for prediction in predictions])  # (seeds, n)
    per_sample = correct.mean(axis=0)  # (n,)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(per_sample), size=(resamples, len(per_sample)))
    scores = per_sample[draws].mean(axis=1)  # (resamples,)
    return {
        "mean": float(per_sample.mean()),
        "ci_low": float(np.percentile(scores, 2.5)),
        "ci_high": float(np.percentile(scores, 97.5)),
        "seed_accuracies": [float(row.mean()) for row in correct],
    }
