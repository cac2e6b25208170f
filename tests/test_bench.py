"""Tests of the backbone bench: leaderboard rows, skipped backbones, reuse, and the files it writes."""

from __future__ import annotations

import csv
import json

import pytest

from pipeline.backbones import build_backbone
from pipeline.settings import DatasetSettings, SettingsError
from pipeline.store import FeatureStore
from stages.bench import BenchSettings, best_head_per_tap, count_gflops, expand_runs, parse_backbone_spec, run_bench


def test_backbone_spec_defaults_weights():
    assert parse_backbone_spec("resnet18") == ("resnet18", "default")


def test_backbone_spec_with_weights():
    assert parse_backbone_spec("resnet18@random") == ("resnet18", "random")


def test_backbone_spec_empty_weights_rejected():
    with pytest.raises(SettingsError, match="resnet18@"):
        parse_backbone_spec("resnet18@")


def test_include_random_adds_control_once():
    settings = BenchSettings(backbones=("efficientnet_lite0", "resnet18@random"), include_random=True)
    assert expand_runs(settings) == [
        ("efficientnet_lite0", "default"),
        ("efficientnet_lite0", "random"),
        ("resnet18", "random"),
    ]


def test_best_head_highest_val_first_on_tie():
    rows = [
        {"tap": "a", "head": "logreg", "val_accuracy": 0.8, "accuracy": 0.7, "eval_split": "test"},
        {"tap": "a", "head": "mlp", "val_accuracy": 0.9, "accuracy": 0.6, "eval_split": "test"},
        {"tap": "b", "head": "logreg", "val_accuracy": 0.5, "accuracy": 0.5, "eval_split": "test"},
        {"tap": "b", "head": "mlp", "val_accuracy": 0.5, "accuracy": 0.4, "eval_split": "test"},
    ]
    best = best_head_per_tap(rows)
    assert best["a"]["head"] == "mlp"
    assert best["b"]["head"] == "logreg"


def test_gflops_of_resnet18_matches_published():
    backbone = build_backbone("resnet18", "random")
    # ResNet18_Weights.IMAGENET1K_V1.meta["_ops"] in torchvision is 1.814 GFLOPS, counting a multiply-add as one.
    assert count_gflops(backbone, ["pre_logits"]) == pytest.approx(2 * 1.81, rel=0.02)


def test_gflops_stop_at_last_tap():
    backbone = build_backbone("resnet18", "random")
    assert count_gflops(backbone, ["layer1"]) < count_gflops(backbone, ["pre_logits"]) / 2


@pytest.mark.slow
def test_bench_rows_files_and_reuse(colour_folder, in_tmp, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    settings = BenchSettings(
        dataset=DatasetSettings(str(colour_folder)),
        backbones=("efficientnet_lite0", "test_efficientnet@random", "resnet18"),
        heads=("logreg",),
        workers=0,
        device="cpu",
        offline=True,
    )
    rows = run_bench(settings)
    by_backbone = {row["backbone"]: row for row in rows}

    lite0 = by_backbone["efficientnet_lite0"]
    assert lite0["status"] == "ok"
    assert lite0["feature_dim"] == 1280
    assert lite0["parameters"] == 4_652_008
    assert lite0["gflops"] == pytest.approx(0.77, rel=0.05)
    assert lite0["images_per_second"] > 0
    assert lite0["store_bytes"] > 27 * 1280 * 4
    assert lite0["best_head"] == "logreg"
    assert 0.0 <= lite0["test_accuracy"] <= 1.0
    assert lite0["eval_split"] == "val"

    control = by_backbone["test_efficientnet"]
    assert control["weights"] == "random"
    assert control["status"] == "ok"

    missing = by_backbone["resnet18"]
    assert missing["status"] == "skipped"
    assert "WeightsNotAvailableError" in missing["reason"]
    assert "empty-torch-home" in missing["reason"]

    bench = in_tmp / "data" / "bench"
    for name in ("leaderboard.md", "leaderboard.csv", "leaderboard.json", "accuracy_vs_speed.png"):
        assert (bench / name).is_file(), name
    with open(bench / "leaderboard.csv") as handle:
        assert len(list(csv.DictReader(handle))) == 3
    assert len(json.loads((bench / "leaderboard.json").read_text())) == 3
    assert "| efficientnet_lite0 | default | pre_logits | ok |" in (bench / "leaderboard.md").read_text()

    # a second run reuses every store, result and timing
    again = {row["backbone"]: row for row in run_bench(settings)}
    assert again["efficientnet_lite0"]["store_reused"]
    assert again["efficientnet_lite0"]["heads_reused"]
    assert again["efficientnet_lite0"]["images_per_second"] == lite0["images_per_second"]
    assert again["efficientnet_lite0"]["test_accuracy"] == lite0["test_accuracy"]

    # a store extracted before the bench knew of it: its manifest's speed is reported
    (bench / "timings.json").unlink()
    fresh = {row["backbone"]: row for row in run_bench(settings)}
    recorded = FeatureStore(lite0["store"]).manifest["extraction"]
    assert fresh["efficientnet_lite0"]["store_reused"]
    assert fresh["efficientnet_lite0"]["images_per_second"] == pytest.approx(recorded["images"] / recorded["loop_seconds"])
    assert fresh["efficientnet_lite0"]["reason"] == ""


def test_unknown_head_rejected():
    with pytest.raises(SettingsError, match="heads=\\['ridge'\\] are not known"):
        BenchSettings(heads=("ridge",)).validate()


def test_missing_dataset_fails_before_backbones(in_tmp):
    settings = BenchSettings(dataset=DatasetSettings(str(in_tmp / "no-such-folder")), backbones=("efficientnet_lite0",))
    with pytest.raises(SettingsError, match="no-such-folder"):
        run_bench(settings)
    assert not (in_tmp / "data" / "features").exists()


def test_output_file_fails_before_backbones(colour_folder, in_tmp):
    occupied = in_tmp / "occupied"
    occupied.write_text("not a folder\n")
    settings = BenchSettings(dataset=DatasetSettings(str(colour_folder)), backbones=("test_efficientnet@random",),
                             output=str(occupied))
    with pytest.raises(SettingsError, match="Cannot write results to .*occupied.*--output"):
        run_bench(settings)
    assert not (in_tmp / "data" / "features").exists()


def test_unknown_tap_becomes_skipped_row(colour_folder, in_tmp):
    settings = BenchSettings(
        dataset=DatasetSettings(str(colour_folder)),
        backbones=("test_efficientnet@random",),
        taps=("no_such_layer",),
        heads=("logreg",),
        workers=0,
        device="cpu",
    )
    rows = run_bench(settings)
    assert len(rows) == 1
    assert rows[0]["status"] == "skipped"
    assert "tap='no_such_layer' is not a layer" in rows[0]["reason"]
