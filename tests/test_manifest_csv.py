"""CSV manifests as a dataset source: paths relative to the CSV, splits, and errors with row numbers."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.datasets import load_dataset
from pipeline.manifest_csv import ManifestError, read_csv_manifest
from pipeline.settings import DatasetSettings
from tests.conftest import write_colour_image


def make_images(root: Path, names: list[str]) -> None:
    for seed, name in enumerate(names):
        write_colour_image(root / name, (90, 90, 90), seed)


def write_csv(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def read(path: Path):
    return read_csv_manifest(path, DatasetSettings(str(path)))


def test_csv_with_split_column(tmp_path: Path) -> None:
    make_images(tmp_path / "img", ["a1.png", "a2.png", "b1.png", "b2.png", "b3.png"])
    csv_path = write_csv(
        tmp_path / "list.csv",
        ["path,label,split", "img/b1.png,bee,train", "img/a1.png,ant,train", "img/a2.png,ant,val", "img/b2.png,bee,test",
         "img/b3.png,bee,val"],
    )
    dataset = load_dataset(DatasetSettings(str(csv_path)))
    by_path = {sample.path: sample for sample in dataset.samples}
    assert dataset.root == tmp_path
    assert dataset.class_names == ["ant", "bee"]
    assert dataset.split_source == "csv"
    assert by_path["img/a2.png"].split == "val"
    assert by_path["img/a2.png"].label == 0
    assert by_path["img/b2.png"].label == 1
    assert [sample.split for sample in dataset.samples] == ["train", "train", "val", "val", "test"]


def test_csv_without_split_is_seeded(tmp_path: Path) -> None:
    names = [f"{label}{item}.png" for label in "ab" for item in range(5)]
    make_images(tmp_path, names)
    csv_path = write_csv(tmp_path / "list.csv", ["path,label"] + [f"{name},{name[0]}" for name in names])
    first = read(csv_path)
    second = read(csv_path)
    assert first.split_source == "seeded"
    assert first.samples == second.samples
    assert {sample.split for sample in first.samples} == {"train", "val", "test"}


def test_csv_non_ascii_and_spaces(tmp_path: Path) -> None:
    make_images(tmp_path / "photos", ["fourmi é.png", "蜂 1.png"])
    csv_path = write_csv(
        tmp_path / "list.csv", ["path,label,split", "photos/fourmi é.png,ant,train", "photos/蜂 1.png,bee,train"]
    )
    assert [sample.path for sample in read(csv_path).samples] == ["photos/fourmi é.png", "photos/蜂 1.png"]


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (["file,class", "a.png,x"], "row 1: the header"),
        (["path,label,split", "a.png,x,train", "b.png,x"], "row 3: 2 columns, expected 3"),
        (["path,label", "a.png,x", ",x"], "row 3: the path is empty"),
        (["path,label", "a.png,x", "b.png,"], "row 3: the label of b.png is empty"),
        (["path,label,split", "a.png,x,train", "b.png,x,holdout"], "row 3: split 'holdout' is invalid"),
        (["path,label", "a.png,x", "", "missing.png,x"], "row 4: image missing.png not found"),
        (["path,label", "a.png,x", "./a.png,y"], "row 3: ./a.png is already listed in row 2"),
        (["path,label,split", "a.png,x,train", "b.png,y,val"], "row 3: class 'y' appears in val"),
        (["path,label,split", "a.png,x,val"], "has no train rows"),
        (["path,label"], "lists no images"),
    ],
)
def test_csv_errors_name_row(tmp_path: Path, lines: list[str], message: str) -> None:
    make_images(tmp_path, ["a.png", "b.png"])
    csv_path = write_csv(tmp_path / "list.csv", lines)
    with pytest.raises(ManifestError, match=message):
        read(csv_path)


def test_empty_csv_is_error(tmp_path: Path) -> None:
    csv_path = tmp_path / "empty.csv"
    csv_path.write_text("")
    with pytest.raises(ManifestError, match="is empty"):
        read(csv_path)
