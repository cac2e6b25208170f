"""Tests of stages.streaming and the store's shard readers: heads trained shard by shard."""

from __future__ import annotations

import numpy as np

from pipeline.store import FeatureStore
from stages.heads import LinearHead, MLPHead
from stages.streaming import fit_streamed, predict_streamed, streamed_statistics
from tests.synthetic_store import write_store


def test_shard_reader_matches_load(tmp_path):
    store = FeatureStore(write_store(tmp_path / "store", shard_size=25))
    X, y = store.load("val", "late")
    blocks = list(store.iter_shards("val", "late"))
    np.testing.assert_array_equal(np.concatenate([block[0] for block in blocks]), X)
    np.testing.assert_array_equal(np.concatenate([block[1] for block in blocks]), y)
    assert len(store.shard_paths()) == 8
    assert store.feature_bytes("val", "late") == X.nbytes


def test_streamed_statistics_match_in_memory(tmp_path):
    store = FeatureStore(write_store(tmp_path / "store", shard_size=25))
    X, y = store.load("train", "late")
    classes, mean, scale = streamed_statistics(store, "train", "late")
    np.testing.assert_array_equal(classes, np.unique(y))
    np.testing.assert_allclose(mean, X.mean(axis=0), atol=1e-5)
    np.testing.assert_allclose(scale, X.std(axis=0), atol=1e-4)


def test_streamed_linear_head_matches_in_memory(tmp_path):
    store = FeatureStore(write_store(tmp_path / "store", shard_size=20, separation=1.0))
    X, y = store.load("train", "late")
    X_val, y_val = store.load("val", "late")
    options = {"lr": 1e-2, "epochs": 40, "batch_size": 16, "patience": 40, "seed": 0}

    streamed = fit_streamed(LinearHead(**options), store, "train", "late", eval_split="val")
    in_memory = LinearHead(**options).fit(X, y, eval_set=(X_val, y_val))

    labels, probabilities = predict_streamed(streamed, store, "val", "late")
    streamed_accuracy = np.mean(streamed.classes_[probabilities.argmax(axis=1)] == labels)
    in_memory_accuracy = np.mean(in_memory.predict(X_val) == y_val)
    assert abs(streamed_accuracy - in_memory_accuracy) <= 0.05
    assert streamed_accuracy > 0.8


def test_streamed_mlp_trains(tmp_path):
    store = FeatureStore(write_store(tmp_path / "store", shard_size=30))
    options = {"hidden": 16, "lr": 1e-2, "epochs": 30, "seed": 0}
    head = fit_streamed(MLPHead(**options), store, "train", "early", eval_split="val")
    labels, probabilities = predict_streamed(head, store, "test", "early")
    X_test, y_test = store.load("test", "early")
    in_memory = MLPHead(**options).fit(*store.load("train", "early"), eval_set=store.load("val", "early"))
    streamed_accuracy = np.mean(head.classes_[probabilities.argmax(axis=1)] == labels)
    assert streamed_accuracy > 0.8
    assert abs(streamed_accuracy - np.mean(in_memory.predict(X_test) == y_test)) <= 0.1
