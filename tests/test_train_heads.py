"""Tests of stages.train_heads: the stage-two run, its cache of results, reports and warnings."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from pipeline.settings import HeadSettings
from pipeline.store import FeatureStore
from stages.train_heads import run_heads
from tests.synthetic_store import write_store

REPOSITORY = Path(__file__).resolve().parents[1]
FAST_HEADS = ("logreg", "knn")


def by_unit(results: list[dict]) -> dict[tuple[str, str], dict]:
    return {(result["tap"], result["head"]): result for result in results}


@pytest.fixture
def store_folder(tmp_path: Path) -> Path:
    return write_store(tmp_path / "store", image_root=tmp_path / "images")


def test_run_records_selection_protocol(store_folder, tmp_path):
    results = run_heads(HeadSettings(store=str(store_folder), heads=FAST_HEADS, controls=(), output_root=str(tmp_path / "out")))
    logreg = by_unit(results)[("late", "logreg")]
    assert len(results) == 4
    assert logreg["select_split"] == "val"
    assert logreg["eval_split"] == "test"
    assert logreg["refit_on"] == "train+val"
    assert logreg["search_space"]["C"][0] == pytest.approx(1e-6)
    assert len(logreg["selection"]) == 12
    assert logreg["selected"] in [entry["setting"] for entry in logreg["selection"]]
    assert logreg["accuracy"] > 0.9
    assert logreg["ci_low"] <= logreg["accuracy"] <= logreg["ci_high"]
    assert set(logreg["metrics"]) >= {"balanced_accuracy", "macro_f1", "per_class_recall", "confusion_matrix", "log_loss"}


def test_test_split_does_not_change_selection(tmp_path):
    clean = write_store(tmp_path / "clean", seed=3)
    results = run_heads(HeadSettings(store=str(clean), heads=("logreg",), controls=(), output_root=str(tmp_path / "a")))

    # same train and val, test labels shuffled: selection must not move
    store = FeatureStore(clean)
    import h5py

    for path in store.shard_paths():
        with h5py.File(path, "r+") as handle:
            test_rows = handle["split"].asstr()[:] == "test"
            labels = handle["label"][:]
            labels[test_rows] = np.random.default_rng(0).permutation(labels[test_rows])
            handle["label"][:] = labels
    shuffled = run_heads(HeadSettings(store=str(clean), heads=("logreg",), controls=(), output_root=str(tmp_path / "b")))
    for before, after in zip(results, shuffled):
        assert before["selected"] == after["selected"]
        assert before["select_accuracy"] == after["select_accuracy"]


def test_store_without_val_selects_by_cross_validation(tmp_path):
    store = write_store(tmp_path / "store", counts={"train": 90, "test": 45})
    results = run_heads(HeadSettings(store=str(store), heads=("logreg", "linear"), controls=(), cv_folds=3,
                                     output_root=str(tmp_path / "out")))
    for result in results:
        assert result["select_split"] == "3-fold cross-validation on train"
        assert result["eval_split"] == "test"
    assert by_unit(results)[("early", "linear")]["refit_on"].startswith("train (")


def test_large_train_holdout_selection(tmp_path):
    store = write_store(tmp_path / "store", counts={"train": 90, "test": 45})
    settings = HeadSettings(store=str(store), heads=("logreg", "linear"), controls=("majority",), cv_max_train=89,
                            output_root=str(tmp_path / "out"))
    results = run_heads(settings)
    for result in results:
        assert result["select_split"] == "a held-out 1/3 of train"
    assert by_unit(results)[("early", "logreg")]["refit_on"] == "train"
    assert by_unit(results)[("early", "linear")]["refit_on"].startswith("train (")

    # cross-validation is another selection, so its results are trained, not read from the cache
    crossed = run_heads(replace(settings, cv_max_train=0))
    assert all(result["select_split"] == "3-fold cross-validation on train" for result in crossed)


def test_small_val_split_is_warned(tmp_path, caplog):
    store = write_store(tmp_path / "store", counts={"train": 60, "val": 12, "test": 30})
    run_heads(HeadSettings(store=str(store), heads=("logreg",), controls=(), output_root=str(tmp_path / "out")))
    assert "small selection split: settings are selected on 12 images (val)" in caplog.text


def test_rerun_trains_only_missing_results(store_folder, tmp_path):
    settings = HeadSettings(store=str(store_folder), heads=("logreg",), controls=("majority",), output_root=str(tmp_path / "out"))
    first = run_heads(settings)
    again = run_heads(settings)
    wider = run_heads(HeadSettings(**{**settings.__dict__, "heads": ("logreg", "knn")}))
    assert [result["seconds"] for result in again] == [result["seconds"] for result in first]
    assert by_unit(wider)[("late", "logreg")]["seconds"] == by_unit(first)[("late", "logreg")]["seconds"]
    assert len(wider) == 5


def test_cli_rerun_with_nothing_missing_is_fast(store_folder, tmp_path):
    arguments = ["heads", "--store", str(store_folder), "--heads", "logreg", "--controls", "majority",
                 "--results", str(tmp_path / "out")]
    first = subprocess.run([sys.executable, "-m", "pipeline", *arguments], cwd=REPOSITORY, capture_output=True, text=True)

    # the rerun reports which heavy libraries it imported; CPU time, not wall time, because the
    # test machine may be shared
    probe = f"import sys; from pipeline.cli import main; main({arguments!r}); print(sorted({{'torch', 'sklearn', 'matplotlib'}} & set(sys.modules)))"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    second = subprocess.run([sys.executable, "-c", probe], cwd=REPOSITORY, capture_output=True, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_seconds = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert first.returncode == 0, first.stderr
    assert second.returncode == 0, second.stderr
    assert "0 to train" in second.stderr
    assert second.stdout.strip().splitlines()[-1] == "[]"
    assert cpu_seconds < 2.0


def test_reports_are_written(store_folder, tmp_path):
    run_heads(HeadSettings(store=str(store_folder), heads=FAST_HEADS, controls=("majority", "pixels"),
                           output_root=str(tmp_path / "out")))
    folder = tmp_path / "out" / "store"
    leaderboard = (folder / "leaderboard.md").read_text()
    payload = json.loads((folder / "results.json").read_text())
    assert "| rank | tap | head |" in leaderboard
    assert len((folder / "leaderboard.csv").read_text().splitlines()) == 7
    assert len(payload["results"]) == 6
    assert len(list((folder / "results").glob("*.json"))) == 6
    for name in ("accuracy-per-tap.png", "confusion-best.png"):
        assert (folder / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_seeds_give_mean_and_interval(store_folder, tmp_path):
    results = run_heads(HeadSettings(store=str(store_folder), heads=("mlp",), taps=("early",), controls=(), seeds=3,
                                     output_root=str(tmp_path / "out")))
    mlp = results[0]
    assert len(mlp["seed_accuracies"]) == 3
    assert mlp["accuracy"] == pytest.approx(np.mean(mlp["seed_accuracies"]))
    assert mlp["ci_low"] <= mlp["accuracy"] <= mlp["ci_high"]


def test_warnings_for_imbalance_and_negative_transfer(tmp_path):
    store = write_store(tmp_path / "store", separation=0.0, class_sizes=(8, 1, 1), image_root=tmp_path / "images")
    run_heads(HeadSettings(store=str(store), heads=("logreg",), controls=("majority",), output_root=str(tmp_path / "out")))
    warnings = json.loads((tmp_path / "out" / "store" / "results.json").read_text())["warnings"]
    assert any(warning.startswith("class imbalance") for warning in warnings)
    assert any(warning.startswith(("negative transfer", "no clear transfer gain")) for warning in warnings)


def test_tiny_memory_budget_streams_linear_head(store_folder, tmp_path):
    settings = HeadSettings(store=str(store_folder), heads=("linear",), taps=("late",), controls=(), output_root=str(tmp_path / "a"))
    in_memory = run_heads(settings)[0]
    streamed = run_heads(HeadSettings(**{**settings.__dict__, "memory_budget_mb": 0.001, "output_root": str(tmp_path / "b")}))[0]
    assert "streamed" in " ".join(streamed["notes"])
    assert streamed["accuracy"] > 0.8
    assert abs(streamed["accuracy"] - in_memory["accuracy"]) <= 0.1


# the Python usage shown in the README, run verbatim
PYTHON_USAGE = """
from pipeline.store import FeatureStore, latest_store
from stages.heads import LogisticRegressionHead
from stages.metrics import classification_metrics

store = FeatureStore(latest_store("data/features"))
X_train, y_train = store.load("train", "pre_logits")
X_test, y_test = store.load("test", "pre_logits")
head = LogisticRegressionHead(C=1.0).fit(X_train, y_train)
print(classification_metrics(y_test, head.predict_proba(X_test), head.classes_)["accuracy"])
"""


def test_python_usage_snippet_runs(in_tmp, capsys):
    write_store(in_tmp / "data" / "features" / "synthetic", taps={"pre_logits": 12})
    exec(PYTHON_USAGE, {})
    assert float(capsys.readouterr().out) > 0.9


def test_pixels_control_uses_linear_grid(tmp_path):
    store = write_store(tmp_path / "store", counts={"train": 90, "test": 45}, image_root=tmp_path / "images")
    results = run_heads(HeadSettings(store=str(store), heads=("knn",), controls=("pixels",), output_root=str(tmp_path / "out")))
    pixels = next(result for result in results if result["control"] == "pixels")
    assert pixels["head"] == "linear"
    assert pixels["select_split"] == "3-fold cross-validation on train"
    assert pixels["refit_on"].startswith("train (")
    assert [entry["setting"] for entry in pixels["selection"]] == [
        {"lr": lr, "weight_decay": weight_decay} for lr in (1e-3, 1e-2) for weight_decay in (1e-4, 1e-2)
    ]
    # images coloured by class: pixels give well above chance (1/3) with 90 train images
    assert pixels["accuracy"] > 0.6
    assert pixels["seconds"] > 0.0


def test_results_folder_that_is_a_file(store_folder: Path, tmp_path: Path) -> None:
    from pipeline.settings import SettingsError

    occupied = tmp_path / "occupied"
    occupied.write_text("not a folder\n")
    settings = HeadSettings(store=str(store_folder), heads=FAST_HEADS, controls=(), output_root=str(occupied))
    with pytest.raises(SettingsError, match="Cannot write results to .*occupied.*--results"):
        run_heads(settings)
    assert occupied.read_text() == "not a folder\n"


def test_single_class_store_rejected_before_training(tmp_path: Path) -> None:
    from pipeline.settings import SettingsError

    folder = write_store(tmp_path / "store", class_names=("only",))
    settings = HeadSettings(store=str(folder), heads=FAST_HEADS, controls=(), output_root=str(tmp_path / "results"))
    with pytest.raises(SettingsError, match=r"1 class in train \['only'\]: a head needs at least 2"):
        run_heads(settings)
    assert not list((tmp_path / "results").rglob("*.joblib"))
