"""Scanning class-per-folder datasets: hidden and non-image files, subfolders, splits, odd names."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import pytest

from pipeline.datasets import load_dataset, scan_folder, seeded_split
from pipeline.settings import DatasetSettings, SettingsError
from tests.conftest import write_colour_image


def make_split_folder(root: Path) -> Path:
    for split, count in (("train", 3), ("val", 1)):
        for name in ("cats", "dogs"):
            for item in range(count):
                write_colour_image(root / split / name / f"{item}.png", (100, 100, 100), item)
    return root


def paths_of(root: Path) -> list[str]:
    return [sample.path for sample in scan_folder(root, DatasetSettings(str(root))).samples]


def test_hidden_files_and_folders_ignored(tmp_path: Path) -> None:
    root = make_split_folder(tmp_path / "data")
    (root / "train" / "cats" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    write_colour_image(root / "train" / "cats" / ".ipynb_checkpoints" / "0-checkpoint.png", (1, 2, 3), 0)
    write_colour_image(root / "train" / ".hidden_class" / "0.png", (1, 2, 3), 0)
    dataset = scan_folder(root, DatasetSettings(str(root)))
    assert dataset.class_names == ["cats", "dogs"]
    assert not any("/." in path or path.startswith(".") for path in paths_of(root))


def test_non_image_files_ignored(tmp_path: Path) -> None:
    root = make_split_folder(tmp_path / "data")
    (root / "train" / "cats" / "notes.txt").write_text("not an image")
    (root / "train" / "cats" / "labels.csv").write_text("a,b\n")
    paths = paths_of(root)
    assert "train/cats/notes.txt" not in paths
    assert "train/cats/labels.csv" not in paths
    assert len(paths) == 8


def test_subfolder_images_join_class(tmp_path: Path) -> None:
    root = make_split_folder(tmp_path / "data")
    write_colour_image(root / "train" / "dogs" / "puppies" / "small.png", (1, 2, 3), 0)
    dataset = scan_folder(root, DatasetSettings(str(root)))
    labels = {sample.path: dataset.class_names[sample.label] for sample in dataset.samples}
    assert labels["train/dogs/puppies/small.png"] == "dogs"


def test_empty_class_folder_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = make_split_folder(tmp_path / "data")
    (root / "train" / "birds").mkdir()
    (root / "train" / "birds" / "readme.txt").write_text("no images yet")
    with caplog.at_level(logging.WARNING, logger="pipeline.datasets"):
        dataset = scan_folder(root, DatasetSettings(str(root)))
    assert "birds" in dataset.class_names
    assert any("birds" in warning for warning in dataset.warnings)
    assert "train/birds contains no images" in caplog.text


def test_class_only_in_val_is_error(tmp_path: Path) -> None:
    root = make_split_folder(tmp_path / "data")
    write_colour_image(root / "val" / "foxes" / "0.png", (1, 2, 3), 0)
    with pytest.raises(ValueError, match="'foxes'"):
        scan_folder(root, DatasetSettings(str(root)))


def test_class_index_shared_by_splits(tmp_path: Path) -> None:
    root = make_split_folder(tmp_path / "data")
    # val lists its class folders in another creation order; the index still comes from train's names
    write_colour_image(root / "test" / "dogs" / "0.png", (1, 2, 3), 0)
    write_colour_image(root / "test" / "cats" / "0.png", (1, 2, 3), 1)
    dataset = scan_folder(root, DatasetSettings(str(root)))
    for sample in dataset.samples:
        class_name = sample.path.split("/")[1]
        assert dataset.class_names[sample.label] == class_name


def test_non_ascii_and_space_names_kept(tmp_path: Path) -> None:
    root = make_split_folder(tmp_path / "data")
    write_colour_image(root / "train" / "cats" / "chat noir é.png", (1, 2, 3), 0)
    write_colour_image(root / "train" / "dogs" / "犬 photo.PNG", (1, 2, 3), 1)
    paths = paths_of(root)
    assert "train/cats/chat noir é.png" in paths
    assert "train/dogs/犬 photo.PNG" in paths


def test_missing_source_names_csv_option(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="CSV manifest"):
        load_dataset(DatasetSettings(str(tmp_path / "absent")))


@pytest.mark.real_data
def test_hymenoptera_keeps_odd_files(shared_datasets: Path) -> None:
    root = shared_datasets / "hymenoptera_data"
    paths = paths_of(root)
    assert "train/ants/imageNotFound.gif" in paths
    assert "train/ants/ant photos.jpg" in paths
    assert len(paths) == 398


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


def test_images_outside_class_folders_named(tmp_path: Path) -> None:
    write_colour_image(tmp_path / "loose.png", (200, 10, 10), seed=0)
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(ValueError, match="1 lie directly in it, such as 'loose.png': move each image"):
        scan_folder(tmp_path, DatasetSettings(str(tmp_path)))


def test_loose_images_beside_class_folders_warned(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_colour_image(tmp_path / "loose.png", (200, 10, 10), seed=0)
    for index in range(3):
        write_colour_image(tmp_path / "red" / f"{index}.png", (200, 10, 10), seed=index)
    with caplog.at_level(logging.WARNING, logger="pipeline.datasets"):
        dataset = scan_folder(tmp_path, DatasetSettings(str(tmp_path)))
    assert len(dataset.samples) == 3
    assert "1 images lie directly in" in caplog.text
    assert "'loose.png': they are skipped" in caplog.text


def test_fraction_sum_names_both_fractions() -> None:
    with pytest.raises(SettingsError, match=r"val_fraction=0.5 \+ test_fraction=0.6 = 1.1 leaves no training images"):
        DatasetSettings("digits", val_fraction=0.5, test_fraction=0.6).validate()
