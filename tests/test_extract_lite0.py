"""Stage one with the real Lite0 backbone: store contents, provenance, frozen weights."""

from __future__ import annotations

import copy
import importlib.metadata
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from pipeline.settings import DatasetSettings, ExtractSettings
from pipeline.store import FeatureStore
from stages.extract import run_extraction


def small_settings(root: Path, output: Path, **overrides) -> ExtractSettings:
    values = dict(
        dataset=DatasetSettings(str(root)),
        taps=("blocks.2", "pre_logits"),
        batch_size=4,
        workers=0,
        shard_size=8,
        device="cpu",
        output_root=str(output),
        offline=True,
    )
    values.update(overrides)
    return ExtractSettings(**values)


@pytest.fixture(scope="module")
def colour_store(tmp_path_factory):
    from tests.conftest import COLOURS, write_colour_image

    root = tmp_path_factory.mktemp("data") / "colours"
    seed = 0
    for split, count in (("train", 6), ("val", 3)):
        for name, colour in COLOURS.items():
            for item in range(count):
                seed += 1
                write_colour_image(root / split / name / f"{name}_{item}.png", colour, seed)
    output = tmp_path_factory.mktemp("features")
    result = run_extraction(small_settings(root, output))
    return root, output, result


def test_store_holds_every_sample(colour_store):
    _, _, result = colour_store
    store = FeatureStore(result.folder)
    assert len(store) == 27
    assert store.splits() == ["train", "val"]
    assert store.class_names == ["blue", "green", "red"]


def test_store_tap_dimensions(colour_store):
    store = FeatureStore(colour_store[2].folder)
    assert store.taps == {"blocks.2": 40, "pre_logits": 1280}
    X, y = store.load("train", "pre_logits")
    assert X.shape == (18, 1280)
    assert y.shape == (18,)


def test_store_shards_are_bounded(colour_store):
    store = FeatureStore(colour_store[2].folder)
    counts = [entry["count"] for entry in store.manifest["shards"]]
    assert counts == [8, 8, 8, 3]


def test_store_labels_follow_paths(colour_store):
    store = FeatureStore(colour_store[2].folder)
    _, y = store.load("val", "pre_logits")
    names = [path.split("/")[1] for path in store.paths("val")]
    assert [store.class_names[label] for label in y] == names


def test_store_records_provenance(colour_store):
    store = FeatureStore(colour_store[2].folder)
    provenance = store.provenance
    assert provenance["backbone"] == "efficientnet_lite0"
    assert provenance["preprocessing"]["crop_size"] == 224
    assert len(provenance["weights_sha256"]) == 64
    assert provenance["taps"] == ["blocks.2", "pre_logits"]
    assert store.manifest["versions"]["torch"] == importlib.metadata.version("torch")


def test_store_readable_with_plain_h5py(colour_store):
    store = FeatureStore(colour_store[2].folder)
    with h5py.File(store.shard_paths()[0], "r") as handle:
        features = handle["features"]["pre_logits"][:]
        paths = handle["path"].asstr()[:]
    assert features.shape == (8, 1280)
    assert np.array_equal(features, store.features("pre_logits")[:8])
    assert list(paths) == store.paths("train")[:8]


def test_features_match_direct_forward(colour_store, lite0):
    """The stored pre-logits equal the classifier input of a plain forward pass."""
    from pipeline.images import build_transform, load_image

    root, _, result = colour_store
    store = FeatureStore(result.folder)
    first_path = store.paths("train")[0]
    batch = build_transform(lite0.preprocessing)(load_image(root / first_path))[None]
    with torch.inference_mode():
        expected = lite0.model.forward_head(lite0.model.forward_features(batch), pre_logits=True)[0].numpy()
    assert np.allclose(store.features("pre_logits")[0], expected, atol=1e-5)


def test_second_run_is_cache_hit(colour_store):
    root, output, first = colour_store
    again = run_extraction(small_settings(root, output))
    assert again.cache_hit
    assert again.folder == first.folder
    assert again.extracted == 0


def test_changed_tap_makes_new_store(colour_store):
    root, output, first = colour_store
    other = run_extraction(small_settings(root, output, taps=("pre_logits",)))
    assert not other.cache_hit
    assert other.folder != first.folder


def test_extraction_leaves_backbone_unchanged(tmp_path, colour_folder):
    """BatchNorm running statistics and every weight are identical after an extraction without folding."""
    from dataclasses import replace

    from pipeline.backbones import build_backbone
    from pipeline.datasets import load_dataset
    from stages import extract

    backbone = build_backbone("efficientnet_lite0")
    before = copy.deepcopy(backbone.model.state_dict())
    # folding rewrites the weights on purpose; without it, nothing may change them
    settings = replace(small_settings(colour_folder, tmp_path / "features"), fold_batchnorm=False)
    writer_folder = tmp_path / "features" / "manual"
    from pipeline.store import StoreWriter

    writer = StoreWriter.create_or_resume(writer_folder, {"key": "manual", "shard_size": 8}, {})
    extract._extract_pending(settings, load_dataset(settings.dataset), backbone, writer)

    after = backbone.model.state_dict()
    assert not backbone.model.training
    assert all(not parameter.requires_grad for parameter in backbone.model.parameters())
    for key, tensor in before.items():
        assert torch.equal(tensor, after[key]), key
