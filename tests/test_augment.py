"""Tests of the augmentation policies and of stores with augmented views."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.augment import (
    POLICIES,
    ViewDataset,
    augmentation_key,
    build_augment_transform,
    collate_views,
    decode_in_threads,
    view_rows,
    view_seed,
)
from pipeline.backbones import IMAGENET_DEFAULT
from pipeline.datasets import DatasetSettings, load_dataset
from pipeline.images import build_transform, load_image, normalize_batch
from pipeline.settings import ExtractSettings, SettingsError
from pipeline.store import FeatureStore
from stages.extract import run_extraction

SMALL = dataclasses.replace(IMAGENET_DEFAULT, resize_size=36, crop_size=32)


def colour_dataset(colour_folder: Path):
    return load_dataset(DatasetSettings(source=str(colour_folder)))


def test_view_seed_depends_on_every_part():
    seeds = {view_seed(0, 1, 1), view_seed(1, 1, 1), view_seed(0, 2, 1), view_seed(0, 1, 2)}
    assert len(seeds) == 4
    assert view_seed(5, 7, 3) == view_seed(5, 7, 3)


def test_view_rows_give_views_to_train_only(colour_folder):
    dataset = colour_dataset(colour_folder)
    train = next(i for i, sample in enumerate(dataset.samples) if sample.split == "train")
    val = next(i for i, sample in enumerate(dataset.samples) if sample.split == "val")
    assert view_rows(dataset.samples, [train, val], 2) == [(train, 0), (train, 1), (train, 2), (val, 0)]


def test_view_zero_is_the_evaluation_transform(colour_folder):
    dataset = colour_dataset(colour_folder)
    views = ViewDataset(dataset.root, dataset.samples, SMALL, [(0, 0)], POLICIES["standard"], seed=0)
    expected = build_transform(SMALL)(load_image(dataset.root / dataset.samples[0].path))
    image = views[0].image
    assert image.dtype == torch.uint8  # workers send 8-bit crops; the main process normalizes batches
    assert torch.allclose(normalize_batch(image[None], SMALL)[0], expected, atol=1e-6)


def test_normalize_batch_memory_formats():
    images = torch.randint(0, 256, (4, 3, 9, 7), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    plain = normalize_batch(images, SMALL)
    last = normalize_batch(images, SMALL, torch.channels_last)
    mean = torch.tensor(SMALL.mean).reshape(1, 3, 1, 1)
    std = torch.tensor(SMALL.std).reshape(1, 3, 1, 1)

    assert plain.dtype == torch.float32
    assert plain.is_contiguous()
    assert last.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(plain, last)
    assert torch.allclose(plain, (images / 255.0 - mean) / std, atol=1e-6)


def test_threaded_decoding_matches_serial(colour_folder):
    dataset = colour_dataset(colour_folder)
    rows = view_rows(dataset.samples, list(range(len(dataset.samples))), 2)
    views = ViewDataset(dataset.root, dataset.samples, SMALL, rows, POLICIES["standard"], seed=3)
    batches = [list(range(start, min(start + 7, len(rows)))) for start in range(0, len(rows), 7)]
    serial = [collate_views([views[position] for position in batch]) for batch in batches]
    threaded = list(decode_in_threads(views, batches, threads=4))

    assert len(threaded) == len(serial)
    for expected, result in zip(serial, threaded):
        assert result.rows == expected.rows
        assert torch.equal(result.images, expected.images)


def test_augmented_view_is_reproducible_and_order_free(colour_folder):
    dataset = colour_dataset(colour_folder)
    rows = [(0, 1), (0, 2), (1, 1)]
    forward = ViewDataset(dataset.root, dataset.samples, SMALL, rows, POLICIES["standard"], seed=3)
    backward = ViewDataset(dataset.root, dataset.samples, SMALL, rows[::-1], POLICIES["standard"], seed=3)
    torch.manual_seed(123)  # the global generator must not matter
    first = forward[0].image
    assert torch.equal(first, backward[2].image)
    assert not torch.equal(first, forward[1].image)


def test_augmented_view_changes_with_seed(colour_folder):
    dataset = colour_dataset(colour_folder)
    one = ViewDataset(dataset.root, dataset.samples, SMALL, [(0, 1)], POLICIES["standard"], seed=0)[0].image
    two = ViewDataset(dataset.root, dataset.samples, SMALL, [(0, 1)], POLICIES["standard"], seed=1)[0].image
    assert not torch.equal(one, two)


def test_augmented_view_leaves_global_generator_alone(colour_folder):
    dataset = colour_dataset(colour_folder)
    views = ViewDataset(dataset.root, dataset.samples, SMALL, [(0, 1)], POLICIES["light"], seed=0)
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    views[0]
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_policy_output_shape_and_type(name, colour_folder):
    dataset = colour_dataset(colour_folder)
    image = load_image(dataset.root / dataset.samples[0].path)
    output = build_augment_transform(SMALL, POLICIES[name])(image)
    assert output.shape == (3, 32, 32)
    assert output.dtype == torch.float32


def test_unnormalized_policy_ends_at_the_uint8_crop(colour_folder):
    dataset = colour_dataset(colour_folder)
    image = load_image(dataset.root / dataset.samples[0].path)
    policy = POLICIES["standard"]
    crop = build_augment_transform(SMALL, policy, normalize=False)
    full = build_augment_transform(SMALL, policy)
    torch.manual_seed(5)
    raw = crop(image)
    torch.manual_seed(5)
    normalized = full(image)
    assert raw.dtype == torch.uint8
    assert torch.allclose(normalize_batch(raw[None], SMALL)[0], normalized, atol=1e-6)


def test_flip_policy_only_mirrors_view_zero(colour_folder):
    dataset = colour_dataset(colour_folder)
    image = load_image(dataset.root / dataset.samples[0].path)
    evaluation = build_transform(SMALL)(image)
    flip = build_augment_transform(SMALL, POLICIES["flip"])
    outputs = [flip(image) for _ in range(20)]
    assert all(torch.equal(out, evaluation) or torch.equal(out, evaluation.flip(-1)) for out in outputs)
    assert any(torch.equal(out, evaluation.flip(-1)) for out in outputs)


def test_augmentation_key_records_policy_views_and_seed():
    assert augmentation_key(0, "none", 0) is None
    key = augmentation_key(4, "light", 9)
    assert key["views"] == 4
    assert key["seed"] == 9
    assert key["policy"]["name"] == "light"
    assert tuple(key["policy"]["crop_scale"]) == (0.5, 1.0)


@pytest.mark.parametrize(
    ("views", "augment", "message"),
    [(2, "none", "needs an augmentation policy"), (0, "light", "has no effect"), (-1, "none", "views=-1"),
     (2, "rotate", "augment='rotate' is invalid")],
)
def test_settings_reject_inconsistent_views(views, augment, message):
    with pytest.raises(SettingsError, match=message):
        ExtractSettings(views=views, augment=augment).validate()


# stores with views, written by stage one with a tiny random timm backbone


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    """Two classes with 3 train and 1 val image each: 8 samples, 3 shards of 3."""
    from tests.conftest import write_colour_image

    root = tmp_path_factory.mktemp("tiny") / "colours"
    seed = 100
    for split, count in (("train", 3), ("val", 1)):
        for name, colour in (("red", (220, 30, 30)), ("blue", (30, 40, 220))):
            for item in range(count):
                seed += 1
                write_colour_image(root / split / name / f"{name}_{item}.png", colour, seed, size=(24, 20))
    return root


def tiny_settings(folder: Path, output: Path, **overrides) -> ExtractSettings:
    values = dict(
        dataset=DatasetSettings(source=str(folder)),
        backbone="test_efficientnet",
        weights="random",
        taps=("pre_logits", "blocks.1"),
        workers=0,
        batch_size=4,
        shard_size=3,
        device="cpu",
        output_root=str(output),
    )
    values.update(overrides)
    return ExtractSettings(**values)


def extract(folder: Path, output: Path, **overrides) -> FeatureStore:
    return FeatureStore(run_extraction(tiny_settings(folder, output, **overrides)).folder)


@pytest.fixture(scope="module")
def stores(tiny_folder, tmp_path_factory) -> dict[str, FeatureStore]:
    output = tmp_path_factory.mktemp("features")
    return {
        "plain": extract(tiny_folder, output),
        "views": extract(tiny_folder, output, views=2, augment="standard", view_seed=5, name="batch4"),
        "views_batch3": extract(
            tiny_folder, output, views=2, augment="standard", view_seed=5, name="batch3", batch_size=3
        ),
        "views_worker": extract(
            tiny_folder, output, views=2, augment="standard", view_seed=5, name="worker", batch_size=5, workers=1
        ),
    }


@pytest.mark.slow
def test_store_holds_views_of_train_rows_only(stores):
    train_views = stores["views"].views("train")
    assert len(train_views) == 6 * 3
    assert np.bincount(train_views).tolist() == [6, 6, 6]
    assert set(stores["views"].views("val").tolist()) == {0}
    assert len(stores["views"].load("val", "pre_logits")[1]) == 2


@pytest.mark.slow
def test_store_views_share_sample_index_and_label(stores):
    indices = stores["views"].indices("train")
    _, labels = stores["views"].load("train", "pre_logits")
    for index in np.unique(indices):
        rows = indices == index
        assert rows.sum() == 3
        assert len(set(labels[rows].tolist())) == 1


@pytest.mark.slow
def test_store_view_zero_matches_store_without_views(stores):
    X_plain, y_plain = stores["plain"].load("train", "pre_logits")
    X_zero, y_zero = stores["views"].load("train", "pre_logits", view=0)
    assert np.allclose(X_plain, X_zero, atol=1e-5)
    assert np.array_equal(y_plain, y_zero)


@pytest.mark.slow
def test_store_views_differ_from_view_zero(stores):
    X_zero, _ = stores["views"].load("train", "pre_logits", view=0)
    X_one, _ = stores["views"].load("train", "pre_logits", view=1)
    assert not np.allclose(X_zero, X_one)


@pytest.mark.slow
def test_store_views_same_for_any_batch_size(stores):
    first = stores["views"].load("train", "blocks.1")[0]
    second = stores["views_batch3"].load("train", "blocks.1")[0]
    assert np.allclose(first, second, atol=1e-5)


@pytest.mark.slow
def test_store_views_same_with_worker_process(stores):
    first = stores["views"].load("train", "blocks.1")[0]
    second = stores["views_worker"].load("train", "blocks.1")[0]
    assert np.allclose(first, second, atol=1e-5)


@pytest.mark.slow
def test_store_shards_hold_all_views_of_their_samples(stores):
    import h5py

    store = stores["views"]
    for entry in store.manifest["shards"]:
        with h5py.File(store.folder / entry["file"], "r") as handle:
            assert set((handle["index"][:] // 3).tolist()) == {entry["shard"]}


@pytest.mark.slow
def test_store_manifest_records_augmentation(stores):
    recorded = json.loads((stores["views"].folder / "manifest.json").read_text())["augmentation"]
    assert recorded["views"] == 2
    assert recorded["seed"] == 5
    assert recorded["policy"]["name"] == "standard"


def test_cache_key_changes_with_views_policy_and_seed(tiny_folder, tmp_path):
    from pipeline.backbones import build_backbone
    from pipeline.cachekey import compute_key, key_fields

    backbone = build_backbone("test_efficientnet", weights="random")
    dataset = load_dataset(DatasetSettings(source=str(tiny_folder)))
    variants = [{}, {"views": 1, "augment": "flip"}, {"views": 2, "augment": "flip"},
                {"views": 2, "augment": "light"}, {"views": 2, "augment": "light", "view_seed": 1}]
    keys = {compute_key(key_fields(tiny_settings(tiny_folder, tmp_path, **variant), dataset, backbone.provenance())) for variant in variants}
    assert len(keys) == len(variants)
