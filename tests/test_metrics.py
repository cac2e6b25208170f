"""Tests of stages.metrics: classification metrics and bootstrap intervals."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import f1_score
from sklearn.metrics import log_loss as sklearn_log_loss

from stages.metrics import bootstrap_interval, classification_metrics


def test_metrics_on_known_predictions():
    y_true = np.array([0, 0, 0, 1, 1, 2])
    proba = np.array([[0.8, 0.1, 0.1], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1], [0.3, 0.6, 0.1], [0.1, 0.2, 0.7]])
    metrics = classification_metrics(y_true, proba, np.array([0, 1, 2]))
    assert metrics["accuracy"] == pytest.approx(5 / 6)
    assert metrics["balanced_accuracy"] == pytest.approx((2 / 3 + 1 + 1) / 3)
    assert metrics["per_class_recall"] == {"0": pytest.approx(2 / 3), "1": 1.0, "2": 1.0}
    assert metrics["confusion_matrix"] == [[2, 1, 0], [0, 2, 0], [0, 0, 1]]
    assert metrics["macro_f1"] == pytest.approx(f1_score(y_true, proba.argmax(axis=1), average="macro"))
    assert metrics["log_loss"] == pytest.approx(sklearn_log_loss(y_true, proba))


def test_top5_only_above_five_classes():
    rng = np.random.default_rng(0)
    few = classification_metrics(np.arange(5), rng.dirichlet(np.ones(5), size=5), np.arange(5))
    many = classification_metrics(np.arange(7), np.eye(7)[[1, 1, 2, 3, 4, 5, 6]], np.arange(7))
    assert "top5_accuracy" not in few
    assert many["top5_accuracy"] == pytest.approx(1.0)
    assert many["accuracy"] == pytest.approx(6 / 7)


def test_unseen_class_counts_as_error():
    metrics = classification_metrics(np.array([0, 1, 2]), np.array([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]]), np.array([0, 1]))
    assert metrics["accuracy"] == pytest.approx(2 / 3)
    assert metrics["per_class_recall"]["2"] == 0.0
    assert metrics["log_loss"] > 10.0


def test_bootstrap_interval_brackets_mean():
    rng = np.random.default_rng(1)
    y_true = rng.integers(0, 2, size=400)
    predictions = [np.where(rng.random(400) < 0.8, y_true, 1 - y_true) for _ in range(3)]
    interval = bootstrap_interval(y_true, predictions)
    expected = np.mean([np.mean(prediction == y_true) for prediction in predictions])
    assert interval["mean"] == pytest.approx(expected)
    assert interval["ci_low"] < interval["mean"] < interval["ci_high"]
    assert interval["ci_high"] - interval["ci_low"] < 0.1
    assert len(interval["seed_accuracies"]) == 3


def test_bootstrap_interval_narrows_with_samples():
    rng = np.random.default_rng(2)
    widths = []
    for count in (50, 2000):
        y_true = rng.integers(0, 2, size=count)
        prediction = np.where(rng.random(count) < 0.7, y_true, 1 - y_true)
        interval = bootstrap_interval(y_true, [prediction])
        widths.append(interval["ci_high"] - interval["ci_low"])
    assert widths[1] < widths[0] / 3
