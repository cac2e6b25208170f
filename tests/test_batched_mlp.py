"""Tests of stages.batched_mlp: an MLP grid trained together behaves like MLP heads trained alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stages.batched_mlp import MLPSetting, train_mlp_grid
from stages.heads import MLPHead


def blobs(seed: int, count: int, dim: int, shift: float) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % 3
    centres = np.random.default_rng(99).normal(0, shift, size=(3, dim))
    return (centres[labels] + rng.normal(0, 1, size=(count, dim))).astype(np.float32), labels


SETTINGS = [MLPSetting(lr, weight_decay) for lr in (1e-4, 1e-2) for weight_decay in (1e-4, 1e-2)]
OPTIONS = {"hidden": 16, "dropout": 0.2, "epochs": 30, "batch_size": 32, "patience": 5, "seed": 0}


def test_grid_selects_like_heads_trained_alone():
    X, y = blobs(0, 240, 10, 1.0)
    V, y_val = blobs(1, 120, 10, 1.0)

    heads = train_mlp_grid(X, y, SETTINGS, V, y_val, **OPTIONS)

    grid_scores = [np.mean(head.predict(V) == y_val) for head in heads]
    alone = [MLPHead(lr=setting.lr, weight_decay=setting.weight_decay, **OPTIONS).fit(X, y, eval_set=(V, y_val))
             for setting in SETTINGS]
    alone_scores = [np.mean(head.predict(V) == y_val) for head in alone]
    # the slow learning rate is clearly worse within 30 epochs, in both
    assert max(grid_scores[:2]) < min(grid_scores[2:])
    assert max(alone_scores[:2]) < min(alone_scores[2:])
    assert max(grid_scores) == pytest.approx(max(alone_scores), abs=0.03)
    for grid_score, alone_score in zip(grid_scores, alone_scores):
        assert grid_score == pytest.approx(alone_score, abs=0.05)


def test_grid_heads_start_from_mlp_head_initialization():
    X, y = blobs(0, 60, 6, 2.0)
    heads = train_mlp_grid(X, y, [MLPSetting(0.0, 0.0)], **{**OPTIONS, "epochs": 1})
    torch.manual_seed(OPTIONS["seed"])
    expected = MLPHead(hidden=16).build_body(6, 3)
    # a learning rate of 0 leaves the initial weights in place
    assert torch.equal(heads[0].module_.body[0].weight, expected[0].weight)
    assert torch.equal(heads[0].module_.body[3].bias, expected[3].bias)


def test_grid_heads_learn_separable_classes():
    X, y = blobs(0, 150, 8, 3.0)
    V, y_val = blobs(1, 60, 8, 3.0)
    heads = train_mlp_grid(X, y, SETTINGS[2:], V, y_val, **OPTIONS)
    for head in heads:
        assert np.mean(head.predict(V) == y_val) > 0.9


def test_stopped_heads_keep_their_best_epoch():
    X, y = blobs(0, 150, 8, 3.0)
    V, y_val = blobs(1, 60, 8, 3.0)
    heads = train_mlp_grid(X, y, SETTINGS, V, y_val, **{**OPTIONS, "patience": 2})
    for head in heads:
        assert 0 <= head.best_epoch_ < OPTIONS["epochs"]
        assert head.patience == 2
        assert head.hidden == 16


def test_grid_without_selection_trains_every_epoch():
    X, y = blobs(0, 90, 6, 2.0)
    heads = train_mlp_grid(X, y, SETTINGS[2:], **{**OPTIONS, "epochs": 4})
    assert [head.best_epoch_ for head in heads] == [3, 3]
    assert heads[0].predict_proba(X).shape == (90, 3)
