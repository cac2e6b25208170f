"""Tests of stages.diagnostics: negative transfer, overfitting, class imbalance and small selection warnings."""

from __future__ import annotations

from stages.diagnostics import class_imbalance, negative_transfer, overfitting, small_selection


def result(head: str, accuracy: float, control: str | None = None, ci: float = 0.05, train: float = 0.9,
           select: float = 0.9) -> dict:
    return {"tap": "t", "head": head, "control": control, "accuracy": accuracy, "ci_low": accuracy - ci,
            "ci_high": accuracy + ci, "train_accuracy": train, "select_accuracy": select, "select_split": "val"}


def test_no_clear_gain_when_control_within_interval():
    warnings = negative_transfer([result("logreg", 0.80), result("logreg", 0.77, control="pixels")])
    assert len(warnings) == 1
    assert warnings[0].startswith("no clear transfer gain")
    assert "pixels control" in warnings[0]


def test_negative_transfer_when_control_is_better():
    warnings = negative_transfer([result("logreg", 0.80), result("logreg", 0.84, control="pixels")])
    assert len(warnings) == 1
    assert warnings[0].startswith("negative transfer")


def test_no_negative_transfer_beyond_interval():
    assert negative_transfer([result("logreg", 0.90), result("majority", 0.30, control="majority")]) == []


def test_overfitting_uses_settable_gap():
    results = [result("mlp", 0.8, train=1.0, select=0.85)]
    assert len(overfitting(results, gap=0.1)) == 1
    assert overfitting(results, gap=0.2) == []


def test_overfitting_skips_knn():
    assert overfitting([result("knn", 0.8, train=1.0, select=0.5)], gap=0.1) == []


def test_class_imbalance_suggests_class_weight():
    warnings = class_imbalance({"a": 90, "b": 10}, class_weight=None)
    assert len(warnings) == 1
    assert "--class-weight balanced" in warnings[0]
    assert class_imbalance({"a": 90, "b": 10}, class_weight="balanced") == []
    assert class_imbalance({"a": 50, "b": 40}, class_weight=None) == []


def test_negative_transfer_picks_best_head_on_selection():
    chosen = {**result("logreg", 0.80, select=0.95), "tap": "late"}
    lucky = {**result("knn", 0.99, select=0.50), "tap": "early"}  # best on test, worst on val
    warnings = negative_transfer([chosen, lucky, result("linear", 0.84, control="pixels")])
    assert len(warnings) == 1
    assert "logreg on late" in warnings[0]
    assert warnings[0].startswith("negative transfer")


def test_overfitting_skips_majority_control():
    assert overfitting([result("majority", 0.33, control="majority", train=0.6, select=0.33)], gap=0.1) == []


def test_small_selection_warns_below_fifty_images():
    warnings = small_selection(6, "val")
    assert len(warnings) == 1
    assert "selected on 6 images (val)" in warnings[0]
    assert "steps of 0.167" in warnings[0]
    assert "--val-fraction 0" in warnings[0]
    assert small_selection(50, "val") == []
