"""Tests of stages.reports: leaderboards, plots and the skip when nothing changed."""

from __future__ import annotations

import csv

from stages.reports import format_table, write_reports


def result(key: str, tap: str, head: str, accuracy: float, control: str | None = None) -> dict:
    metrics = {"balanced_accuracy": accuracy, "macro_f1": accuracy, "log_loss": 0.5, "confusion_matrix": [[3, 1], [0, 4]],
               "confusion_labels": [0, 1], "per_class_recall": {"0": 0.75, "1": 1.0}}
    return {"key": key, "tap": tap, "head": head, "control": control, "selected": {"C": 1.0}, "select_split": "val",
            "select_accuracy": accuracy, "train_accuracy": 1.0, "eval_split": "test", "accuracy": accuracy,
            "ci_low": accuracy - 0.1, "ci_high": min(accuracy + 0.1, 1.0), "seeds": 1, "metrics": metrics, "notes": []}


def test_reports_rank_by_accuracy(tmp_path):
    results = [result("k1", "early", "logreg", 0.7), result("k2", "late", "logreg", 0.9), result("k3", "labels", "majority", 0.5, "majority")]
    header = {"store_name": "s", "store_key": "abc", "taps": ["early", "late"], "class_names": ["cat", "dog"]}
    assert write_reports(results, ["overfitting: example"], tmp_path, header)
    rows = list(csv.DictReader(open(tmp_path / "leaderboard.csv")))
    assert [row["tap"] for row in rows] == ["late", "early", "labels"]
    assert "- overfitting: example" in (tmp_path / "leaderboard.md").read_text()
    assert (tmp_path / "accuracy-per-tap.png").stat().st_size > 1000
    assert (tmp_path / "confusion-best.png").stat().st_size > 1000
    assert format_table(results).splitlines()[2].startswith("1     late")


def test_reports_skip_when_unchanged(tmp_path):
    results = [result("k1", "early", "logreg", 0.7)]
    header = {"store_name": "s", "store_key": "abc", "taps": ["early"], "class_names": ["cat", "dog"]}
    assert write_reports(results, [], tmp_path, header)
    assert not write_reports(results, [], tmp_path, header)
    assert write_reports(results, ["class imbalance: example"], tmp_path, header)


def test_ranking_uses_selection_not_test_accuracy():
    from stages.reports import ranked

    chosen = {**result("k1", "late", "logreg", 0.80), "select_accuracy": 0.90}
    lucky = {**result("k2", "early", "knn", 0.95), "select_accuracy": 0.60}  # best on test, worst on val
    rows = ranked([lucky, chosen])
    assert [row["key"] for row in rows] == ["k1", "k2"]
    assert [row["rank"] for row in rows] == [1, 2]


def test_table_of_rows_without_metrics():
    row = {"tap": "finetune:last-1", "head": "finetune", "selected": {"epoch": 3}, "select_split": "val",
           "select_accuracy": 0.9, "val_accuracy": 0.9, "train_accuracy": 0.95, "eval_split": "test",
           "accuracy": 0.875, "balanced_accuracy": 0.86}
    line = format_table([row]).splitlines()[2]
    assert "0.875" in line
    assert line.endswith("0.860")
    assert "[" not in line  # no interval to show
