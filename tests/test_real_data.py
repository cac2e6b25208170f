"""The main job on real photos and on the embedded digits (slow; real photos need ../shared/datasets)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.cli import main


@pytest.mark.real_data
@pytest.mark.slow
def test_hymenoptera_lite0_logreg_reaches_tutorial_accuracy(in_tmp, shared_datasets, capsys):
    """Frozen Lite0 pre-logits + logistic regression on ants vs bees, GIF placeholder included."""
    data = shared_datasets / "hymenoptera_data"
    assert main(["extract", "--data", str(data), "--offline"]) == 0
    store_folder = Path(capsys.readouterr().out.strip().splitlines()[-1])
    manifest = json.loads((store_folder / "manifest.json").read_text())
    assert sum(shard["count"] for shard in manifest["shards"]) == 398
    assert manifest["skipped"] == []

    assert main(["heads", "--heads", "logreg", "--store", str(store_folder)]) == 0
    rows = json.loads((in_tmp / "data" / "results" / store_folder.name / "results.json").read_text())["results"]
    logreg = next(row for row in rows if row["tap"] == "pre_logits" and row["head"] == "logreg" and not row["control"])
    assert logreg["eval_split"] == "val"
    assert logreg["select_split"] == "val"
    assert logreg["val_accuracy"] >= 0.92


@pytest.mark.real_data
def test_hymenoptera_gif_and_space_names_round_trip(in_tmp, shared_datasets, capsys):
    data = shared_datasets / "hymenoptera_data"
    assert main(["extract", "--data", str(data), "--taps", "blocks.0", "--workers", "0",
                 "--batch-size", "64", "--offline"]) == 0
    from pipeline.store import FeatureStore

    store = FeatureStore(capsys.readouterr().out.strip().splitlines()[-1])
    paths = store.paths("train")
    assert "train/ants/imageNotFound.gif" in paths
    assert "train/ants/ant photos.jpg" in paths


@pytest.mark.slow
def test_demo_prints_depth_profile(in_tmp, capsys):
    """The main job on the embedded digits: four taps, three heads, one table."""
    assert main(["demo"]) == 0
    table = capsys.readouterr().out
    results = next((in_tmp / "data" / "results").glob("digits-*/results.json"))
    rows = json.loads(results.read_text())["results"]
    pretrained = {(row["tap"], row["head"]) for row in rows if not row["control"]}
    for tap in ("blocks.1", "blocks.3", "blocks.5", "pre_logits"):
        assert tap in table
        for head in ("logreg", "linear", "mlp"):
            assert (tap, head) in pretrained
    best = max(row["accuracy"] for row in rows if not row["control"])
    assert best > 0.9
