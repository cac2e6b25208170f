"""The virtual view store.h5: one HDF5 file over every shard, read with plain h5py."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import COLOURS, write_colour_image
from pipeline.cli import main
from pipeline.settings import DatasetSettings, ExtractSettings
from pipeline.store import FeatureStore, StoreError, StoreWriter
from pipeline.virtual import VIRTUAL_FILE, write_virtual_view
from stages.extract import run_extraction

TAPS = ("pre_logits", "blocks.3")


def extract(data: Path, output: Path, shard_size: int) -> Path:
    settings = ExtractSettings(
        dataset=DatasetSettings(str(data)),
        backbone="test_efficientnet",
        weights="random",
        taps=TAPS,
        shard_size=shard_size,
        batch_size=4,
        workers=0,
        device="cpu",
        output_root=str(output),
        name="store",
    )
    return run_extraction(settings).folder


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory) -> Path:
    """A store of 27 colour images in shards of 4, extracted once for the tests that only read it."""
    root = tmp_path_factory.mktemp("virtual")
    seed = 0
    for split, count in (("train", 6), ("val", 3)):
        for name, colour in COLOURS.items():
            for item in range(count):
                seed += 1
                write_colour_image(root / "colours" / split / name / f"{name}_{item}.png", colour, seed)
    return extract(root / "colours", root / "features", shard_size=4)


@pytest.fixture
def store_copy(shared_store, tmp_path) -> Path:
    return Path(shutil.copytree(shared_store, tmp_path / "features" / "store"))


def test_view_matches_feature_store(store_copy):
    folder = store_copy
    store = FeatureStore(folder)

    path = write_virtual_view(folder)

    assert path == folder / VIRTUAL_FILE
    with h5py.File(path, "r") as handle:
        for tap in TAPS:
            assert np.array_equal(handle["features"][tap][:], store.features(tap)), tap
        assert handle["label"][:].tolist() == store._read_columns()["label"].tolist()
        assert handle["path"].asstr()[:].tolist() == store._read_columns()["path"].tolist()
        assert handle["split"].asstr()[:].tolist() == store._read_columns()["split"].tolist()
        assert handle["index"][:].tolist() == list(range(len(store)))
        assert handle.attrs["key"] == store.key
        assert handle.attrs["shard_count"] == 7  # 27 images in shards of 4


def test_view_opens_after_store_is_moved(store_copy, tmp_path):
    write_virtual_view(store_copy)
    expected = FeatureStore(store_copy).features("pre_logits")

    moved = tmp_path / "elsewhere" / "store"
    moved.parent.mkdir()
    store_copy.rename(moved)

    with h5py.File(moved / VIRTUAL_FILE, "r") as handle:
        assert np.array_equal(handle["features/pre_logits"][:], expected)


def test_view_leaves_out_empty_shards(colour_folder, tmp_path):
    # train/ sorts blue, green, red: the two broken files are samples 18 and 19, all of shard 9
    for name in ("zz_broken_1.png", "zz_broken_2.png"):
        (colour_folder / "train" / "red" / name).write_bytes(b"not an image")
    folder = extract(colour_folder, tmp_path / "features", shard_size=2)
    store = FeatureStore(folder)

    write_virtual_view(folder)

    assert [entry["count"] for entry in store.manifest["shards"]][9] == 0
    with h5py.File(folder / VIRTUAL_FILE, "r") as handle:
        assert handle["features/blocks.3"].shape == (27, 48)
        assert "train/red/zz_broken_1.png" not in handle["path"].asstr()[:].tolist()
        assert np.array_equal(handle["features/blocks.3"][:], store.features("blocks.3"))


def test_view_of_incomplete_store_raises(tmp_path):
    folder = tmp_path / "store"
    StoreWriter.create_or_resume(folder, {"key": "k", "shard_size": 4}, {})

    with pytest.raises(StoreError, match="incomplete"):
        write_virtual_view(folder)
    assert not (folder / VIRTUAL_FILE).exists()


def test_cli_virtual_prints_view_path(store_copy, capsys):
    assert main(["virtual", str(store_copy)]) == 0
    assert capsys.readouterr().out.strip() == str(store_copy / VIRTUAL_FILE)


def test_cli_virtual_without_store_fails(tmp_path):
    assert main(["virtual", str(tmp_path / "missing")]) == 2


def test_cli_extract_virtual_view_flag(colour_folder, tmp_path, capsys):
    arguments = ["extract", "--data", str(colour_folder), "--backbone", "test_efficientnet", "--weights", "random"]
    arguments += ["--workers", "0", "--device", "cpu", "--output", str(tmp_path / "features"), "--name", "store"]

    assert main(arguments + ["--virtual-view"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "features" / "store")
    assert (tmp_path / "features" / "store" / VIRTUAL_FILE).is_file()
