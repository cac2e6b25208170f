"""Cache keys: every keyed input changes the key, and nothing else does."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from pipeline.cachekey import compute_key, dataset_fingerprint, key_fields
from pipeline.datasets import load_dataset
from pipeline.settings import DatasetSettings, ExtractSettings

PROVENANCE = {
    "backbone": "test_efficientnet",
    "weights_sha256": "a" * 64,
    "preprocessing": {"resize_size": 168, "crop_size": 160, "interpolation": "bicubic"},
}


def key_of(settings: ExtractSettings, provenance: dict = PROVENANCE) -> str:
    return compute_key(key_fields(settings, load_dataset(settings.dataset), provenance))


@pytest.fixture
def base(colour_folder: Path) -> ExtractSettings:
    return ExtractSettings(dataset=DatasetSettings(str(colour_folder)), backbone="test_efficientnet", weights="random")


def test_same_inputs_same_key(base: ExtractSettings) -> None:
    assert key_of(base) == key_of(base)


@pytest.mark.parametrize(
    "change",
    [
        {"taps": ("blocks.1",)},
        {"pooling": "max"},
        {"dtype": "float16"},
        {"max_image_pixels": 1000},
    ],
)
def test_keyed_setting_changes_key(base: ExtractSettings, change: dict) -> None:
    assert key_of(dataclasses.replace(base, **change)) != key_of(base)


@pytest.mark.parametrize("change", [{"batch_size": 7}, {"workers": 0}, {"shard_size": 3}, {"compression": "gzip"}])
def test_unkeyed_setting_keeps_key(base: ExtractSettings, change: dict) -> None:
    assert key_of(dataclasses.replace(base, **change)) == key_of(base)


@pytest.mark.parametrize(
    "field",
    [("backbone", "test_resnet"), ("weights_sha256", "b" * 64), ("preprocessing", {"resize_size": 200})],
)
def test_backbone_identity_changes_key(base: ExtractSettings, field: tuple) -> None:
    changed = {**PROVENANCE, field[0]: field[1]}
    assert key_of(base, changed) != key_of(base)


def test_modified_file_changes_key(base: ExtractSettings, colour_folder: Path) -> None:
    before = key_of(base)
    path = colour_folder / "train" / "red" / "red_0.jpg"
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert key_of(base) != before


def test_added_file_changes_key(base: ExtractSettings, colour_folder: Path) -> None:
    before = key_of(base)
    (colour_folder / "train" / "red" / "red_0.jpg").rename(colour_folder / "train" / "red" / "red_9.jpg")
    assert key_of(base) != before


def test_content_hash_ignores_mtime(colour_folder: Path) -> None:
    settings = DatasetSettings(str(colour_folder), content_hash=True)
    dataset = load_dataset(settings)
    before = dataset_fingerprint(dataset, content_hash=True)
    path = colour_folder / "val" / "blue" / "blue_1.png"
    os.utime(path, ns=(1, 1))
    assert dataset_fingerprint(dataset, content_hash=True) == before


def test_content_hash_sees_same_size_edit(colour_folder: Path) -> None:
    dataset = load_dataset(DatasetSettings(str(colour_folder)))
    path = colour_folder / "val" / "blue" / "blue_1.png"
    stat = path.stat()
    before_stat = dataset_fingerprint(dataset, content_hash=False)
    before_content = dataset_fingerprint(dataset, content_hash=True)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert dataset_fingerprint(dataset, content_hash=False) == before_stat
    assert dataset_fingerprint(dataset, content_hash=True) != before_content


def test_content_hash_option_changes_key(base: ExtractSettings) -> None:
    hashed = dataclasses.replace(base, dataset=dataclasses.replace(base.dataset, content_hash=True))
    assert key_of(hashed) != key_of(base)
