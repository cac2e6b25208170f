"""Tests of stages.cache: result keys and head files verified by SHA-256 before loading."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from pipeline.store import file_sha256
from stages.cache import HeadFileError, ResultsIndex, load_head, result_key, save_head
from stages.heads import LinearHead, LogisticRegressionHead


def training_data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    y = np.arange(60) % 3
    return (y[:, None] + rng.normal(0, 0.3, size=(60, 4))).astype(np.float32), y


def test_result_key_changes_with_any_setting():
    base = {"tap": "a", "head": "logreg", "seeds": 1}
    assert result_key("store", base) == result_key("store", dict(base))
    assert result_key("store", base) != result_key("other-store", base)
    assert result_key("store", base) != result_key("store", {**base, "seeds": 2})


@pytest.mark.parametrize("head", [LogisticRegressionHead(C=1.0), LinearHead(epochs=3)])
def test_saved_head_loads_with_its_hash(tmp_path, head):
    X, y = training_data()
    head.fit(X, y)
    path = save_head(head, tmp_path, "key")
    loaded = load_head(path, file_sha256(path))
    np.testing.assert_allclose(loaded.predict_proba(X), head.predict_proba(X), atol=1e-6)


@pytest.mark.parametrize("head", [LogisticRegressionHead(C=1.0), LinearHead(epochs=3)])
def test_changed_head_file_is_rejected(tmp_path, head, monkeypatch):
    X, y = training_data()
    path = save_head(head.fit(X, y), tmp_path, "key")
    expected = file_sha256(path)
    with open(path, "ab") as handle:
        handle.write(b"\0")

    # neither unpickler may run on a file whose hash does not match
    import joblib
    import torch

    def fail(*args, **kwargs):
        raise AssertionError("the file was loaded before its hash was checked")

    monkeypatch.setattr(joblib, "load", fail)
    monkeypatch.setattr(torch, "load", fail)
    with pytest.raises(HeadFileError, match="SHA-256"):
        load_head(path, expected)


def test_index_retrains_result_with_changed_head(tmp_path, caplog):
    X, y = training_data()
    index = ResultsIndex(tmp_path)
    recorded = index.record("k1", {"tap": "a", "head": "logreg"}, LogisticRegressionHead().fit(X, y))
    assert ResultsIndex(tmp_path).cached("k1") == recorded
    assert ResultsIndex(tmp_path).manifest["results"]["k1"]["head_sha256"] == file_sha256(tmp_path / recorded["head_file"])
    (tmp_path / recorded["head_file"]).write_bytes(b"not a head")
    with caplog.at_level(logging.WARNING, logger="stages.cache"):
        assert ResultsIndex(tmp_path).cached("k1") is None
    assert "changed after training and is not loaded: training result k1 again." in caplog.text
    assert "Rerun" not in caplog.text  # the run that logs it is the one that trains it again
