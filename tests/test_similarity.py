"""Tests of the similarity signal: sampling, the ImageNet classifier's confidence, and tap depth order."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.datasets import DatasetSettings
from pipeline.settings import ExtractSettings
from pipeline.store import FeatureStore
from stages.extract import run_extraction
from stages.similarity import SIMILARITY_FILE, measure_confidence, sample_paths, tap_depth_order


def extract(folder: Path, output: Path, backbone: str, weights: str, **overrides) -> FeatureStore:
    settings = ExtractSettings(
        dataset=DatasetSettings(source=str(folder)), backbone=backbone, weights=weights, workers=0, device="cpu",
        output_root=str(output), **overrides,
    )
    return FeatureStore(run_extraction(settings).folder)


def stored_settings(store: FeatureStore) -> dict:
    return json.loads((store.folder / "settings.json").read_text())


def test_tap_depth_order_efficientnet():
    settings = {"backbone": "test_efficientnet", "weights": "random"}
    order = tap_depth_order(settings, ["pre_logits", "blocks.2", "conv_stem", "blocks.0"], offline=True)
    assert order == ["conv_stem", "blocks.0", "blocks.2", "pre_logits"]


def test_tap_depth_order_resnet():
    settings = {"backbone": "test_resnet", "weights": "random"}
    assert tap_depth_order(settings, ["layer4", "layer1", "layer3"], offline=True) == ["layer1", "layer3", "layer4"]


@pytest.mark.slow
def test_sample_paths_alternate_classes_and_skip_views(colour_folder, tmp_path):
    store = extract(colour_folder, tmp_path, "test_efficientnet", "random", views=1, augment="flip")
    paths = sample_paths(store, 4)
    assert len(paths) == 4
    assert len(set(paths)) == 4
    assert len({Path(path).parent.name for path in paths[:3]}) == 3


@pytest.mark.slow
def test_confidence_not_measured_for_random_weights(colour_folder, tmp_path):
    store = extract(colour_folder, tmp_path, "test_efficientnet", "random")
    result = measure_confidence(store, stored_settings(store), tmp_path / "results", 4, "cpu", offline=True)
    assert "mean_max_softmax" not in result
    assert "random" in result["note"]


@pytest.mark.slow
def test_confidence_of_lite0_is_saved_and_reused(colour_folder, tmp_path):
    store = extract(colour_folder, tmp_path, "efficientnet_lite0", "default", batch_size=9)
    results = tmp_path / "results"
    result = measure_confidence(store, stored_settings(store), results, 6, "cpu", offline=True)
    assert result["images"] == 6
    assert 0.0 < result["mean_max_softmax"] <= 1.0
    assert 0.0 <= result["mean_normalized_entropy"] <= 1.0
    assert sum(count for _, count in result["top_categories"]) == 6
    assert (results / SIMILARITY_FILE).is_file()
    assert measure_confidence(store, {}, results, 6, "cpu", offline=True) == result
