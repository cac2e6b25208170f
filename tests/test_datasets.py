"""Dataset sources: split folders, seeded stratified splits and the embedded digits."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from pipeline.datasets import load_dataset, scan_folder, seeded_split
from pipeline.settings import DatasetSettings, SettingsError
from tests.conftest import write_colour_image


def test_split_folders_are_used(colour_folder):
    dataset = scan_folder(colour_folder, DatasetSettings(str(colour_folder)))
    assert dataset.split_source == "folders"
    assert dataset.count("train") == 18
    assert dataset.count("val") == 9
    assert dataset.count("test") == 0


def test_samples_ordered_by_split_then_path(colour_folder):
    dataset = scan_folder(colour_folder, DatasetSettings(str(colour_folder)))
    keys = [(sample.split != "train", sample.path) for sample in dataset.samples]
    assert keys == sorted(keys)


def test_seeded_split_is_stratified_and_reproducible(tmp_path):
    for name, count in (("a", 20), ("b", 10)):
        for item in range(count):
            write_colour_image(tmp_path / "flat" / name / f"{item}.png", (10, 20, 30), item)
    settings = DatasetSettings(str(tmp_path / "flat"), val_fraction=0.2, test_fraction=0.3, split_seed=5)
    first = load_dataset(settings)
    second = load_dataset(settings)
    assert first.samples == second.samples
    counts = Counter((sample.label, sample.split) for sample in first.samples)
    assert counts[(0, "test")] == 6
    assert counts[(0, "val")] == 4
    assert counts[(1, "test")] == 3
    assert counts[(1, "val")] == 2


def test_seeded_split_changes_with_seed():
    assert seeded_split(50, 0.2, 0.2, seed=1) != seeded_split(50, 0.2, 0.2, seed=2)


def test_seeded_split_keeps_a_training_image():
    assert seeded_split(1, 0.5, 0.4, seed=0) == ["train"]


def test_class_missing_from_train_is_an_error(colour_folder):
    write_colour_image(colour_folder / "val" / "purple" / "p.png", (120, 0, 120), 1)
    with pytest.raises(ValueError, match="purple"):
        scan_folder(colour_folder, DatasetSettings(str(colour_folder)))


def test_missing_folder_is_an_error(tmp_path):
    with pytest.raises(SettingsError, match="not found"):
        load_dataset(DatasetSettings(str(tmp_path / "nowhere")))


def test_digits_render_with_fixed_split(tmp_path: Path):
    dataset = load_dataset(DatasetSettings("digits"), data_root=tmp_path)
    assert len(dataset.samples) == 1797
    assert dataset.class_names == [str(digit) for digit in range(10)]
    assert dataset.count("train") + dataset.count("val") + dataset.count("test") == 1797
    assert abs(dataset.count("test") - 1797 * 0.2) < 10
    again = load_dataset(DatasetSettings("digits"), data_root=tmp_path)
    assert again.samples == dataset.samples


def test_invalid_fractions_rejected():
    with pytest.raises(SettingsError, match="leaves no"):
        DatasetSettings("digits", val_fraction=0.5, test_fraction=0.5).validate()
