"""Tests of stages.batched: K linear heads trained together equal each head trained alone."""

from __future__ import annotations

import numpy as np
import pytest

from stages.batched import LinearSetting, train_linear_grid
from stages.heads import LinearHead


def blobs(seed: int, count: int, dim: int, shift: float) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % 3
    centres = np.random.default_rng(99).normal(0, shift, size=(3, dim))
    return (centres[labels] + rng.normal(0, 1, size=(count, dim))).astype(np.float32), labels


@pytest.mark.parametrize("class_weight", [None, "balanced"])
def test_grid_heads_equal_heads_trained_alone(class_weight):
    X_a, y = blobs(0, 120, 10, 1.0)
    X_b = np.random.default_rng(3).normal(size=(120, 4)).astype(np.float32) + y[:, None] * 0.5
    V_a, y_val = blobs(1, 60, 10, 1.0)
    V_b = np.random.default_rng(4).normal(size=(60, 4)).astype(np.float32) + y_val[:, None] * 0.5
    settings = [LinearSetting(tap, lr, weight_decay) for tap in ("a", "b") for lr in (1e-3, 3e-2) for weight_decay in (0.0, 0.1)]
    options = {"epochs": 12, "batch_size": 32, "patience": 3, "seed": 5, "class_weight": class_weight}

    heads = train_linear_grid({"a": X_a, "b": X_b}, y, settings, {"a": V_a, "b": V_b}, y_val, **options)

    inputs = {"a": (X_a, V_a), "b": (X_b, V_b)}
    for setting, head in zip(settings, heads):
        X, V = inputs[setting.tap]
        alone = LinearHead(lr=setting.lr, weight_decay=setting.weight_decay, **options).fit(X, y, eval_set=(V, y_val))
        assert head.best_epoch_ == alone.best_epoch_, setting
        np.testing.assert_allclose(head.predict_proba(V), alone.predict_proba(V), atol=1e-5, err_msg=str(setting))


def test_grid_without_selection_trains_every_epoch():
    X, y = blobs(0, 90, 6, 2.0)
    heads = train_linear_grid({"a": X}, y, [LinearSetting("a", 1e-2, 0.0)], epochs=5, batch_size=30, seed=0)
    alone = LinearHead(lr=1e-2, weight_decay=0.0, epochs=5, batch_size=30, seed=0).fit(X, y)
    assert heads[0].best_epoch_ == 4
    np.testing.assert_allclose(heads[0].predict_proba(X), alone.predict_proba(X), atol=1e-5)


def test_grid_heads_learn_separable_classes():
    X, y = blobs(0, 150, 8, 3.0)
    V, y_val = blobs(1, 60, 8, 3.0)
    heads = train_linear_grid({"a": X}, y, [LinearSetting("a", 1e-2, 1e-4)], {"a": V}, y_val, epochs=30, seed=0)
    assert np.mean(heads[0].predict(V) == y_val) > 0.9
