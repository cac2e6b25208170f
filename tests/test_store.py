"""The store's write path: self-describing shards, storage options, pending shards, safe replacement."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from pipeline.store import (
    CHUNK_ROWS,
    MANIFEST,
    FeatureStore,
    ShardData,
    StoreWriter,
    chunk_rows,
    pending_shards,
    read_manifest,
    rebuild_folder,
    recover_replaced_store,
    replace_store,
    write_shard_file,
)


def shard_data(count: int, dimension: int = 6, first: int = 0) -> ShardData:
    rng = np.random.default_rng(first)
    return ShardData(
        features={"pre_logits": rng.normal(size=(count, dimension)).astype(np.float32)},
        labels=np.arange(count, dtype=np.int64) % 2,
        paths=[f"train/c/{index}.png" for index in range(first, first + count)],
        splits=["train"] * count,
        indices=np.arange(first, first + count, dtype=np.int64),
        modes=["RGB"] * (count - 1) + ["CMYK"],
        orientations=[1] * (count - 1) + [6],
    )


def header(key: str = "k1", shard_size: int = 4) -> dict:
    return {
        "key": key,
        "class_names": ["a", "b"],
        "num_samples_planned": 8,
        "shard_size": shard_size,
        "dtype": "float32",
        "provenance": {},
    }


def test_shard_file_describes_itself(tmp_path: Path) -> None:
    (tmp_path / "shards").mkdir()
    skipped = [{"path": "train/c/bad.jpg", "reason": "UnidentifiedImageError: cannot identify"}]
    entry = write_shard_file(tmp_path, 1, shard_data(3, first=4), skipped, "key-1", 4, "float32")
    with h5py.File(tmp_path / entry["file"], "r") as handle:
        assert handle.attrs["key"] == "key-1"
        assert handle.attrs["shard"] == 1
        assert handle.attrs["first_index"] == 4
        assert handle.attrs["stop_index"] == 8
        assert json.loads(handle.attrs["skipped"]) == skipped
        assert handle["mode"].asstr()[:].tolist() == ["RGB", "RGB", "CMYK"]
        assert handle["orientation"][:].tolist() == [1, 1, 6]
    assert entry["count"] == 3
    assert entry["modes"] == {"CMYK": 1, "RGB": 2}
    assert entry["exif_rotated"] == 1


def test_float16_gzip_chunked_along_samples(tmp_path: Path) -> None:
    (tmp_path / "shards").mkdir()
    data = shard_data(300, dimension=5)
    entry = write_shard_file(tmp_path, 0, data, [], "k", 512, "float16", "gzip")
    with h5py.File(tmp_path / entry["file"], "r") as handle:
        values = handle["features"]["pre_logits"]
        assert values.dtype == np.float16
        assert values.compression == "gzip"
        assert values.chunks == (150, 5)  # 300 rows in 2 even chunks of at most 256
        np.testing.assert_array_equal(values[:], data.features["pre_logits"].astype(np.float16))


def test_lzf_compression(tmp_path: Path) -> None:
    (tmp_path / "shards").mkdir()
    entry = write_shard_file(tmp_path, 0, shard_data(3), [], "k", 4, "float32", "lzf")
    with h5py.File(tmp_path / entry["file"], "r") as handle:
        assert handle["features"]["pre_logits"].compression == "lzf"


def test_pending_shards_skip_listed() -> None:
    manifest = {"shards": [{"shard": 0}, {"shard": 2}]}
    assert pending_shards(manifest, total=17, shard_size=4) == [1, 3, 4]


def test_writer_closes_every_hdf5_file(tmp_path: Path) -> None:
    writer = StoreWriter.create_or_resume(tmp_path / "store", header(), {})
    writer.write_shard(0, shard_data(4), [], "float32")
    assert len(h5py.h5f.get_obj_ids(types=h5py.h5f.OBJ_FILE)) == 0


def test_resume_keeps_shards_of_same_key(tmp_path: Path) -> None:
    folder = tmp_path / "store"
    writer = StoreWriter.create_or_resume(folder, header(), {})
    writer.write_shard(0, shard_data(4), [], "float32")
    resumed = StoreWriter.create_or_resume(folder, header(), {})
    assert resumed.completed_shards() == {0}


def test_new_key_clears_old_shards(tmp_path: Path) -> None:
    folder = tmp_path / "store"
    writer = StoreWriter.create_or_resume(folder, header("k1"), {})
    writer.write_shard(0, shard_data(4), [], "float32")
    fresh = StoreWriter.create_or_resume(folder, header("k2"), {})
    assert fresh.completed_shards() == set()
    assert list((folder / "shards").iterdir()) == []
    assert read_manifest(folder)["key"] == "k2"


def test_fresh_discards_same_key(tmp_path: Path) -> None:
    folder = tmp_path / "store"
    writer = StoreWriter.create_or_resume(folder, header(), {})
    writer.write_shard(0, shard_data(4), [], "float32")
    fresh = StoreWriter.create_or_resume(folder, header(), {}, fresh=True)
    assert fresh.completed_shards() == set()


def write_complete_store(folder: Path, key: str) -> None:
    writer = StoreWriter.create_or_resume(folder, header(key), {})
    writer.write_shard(0, shard_data(4), [], "float32")
    writer.write_shard(1, shard_data(4, first=4), [], "float32")
    writer.finish({"taps": {"pre_logits": 6}})


def test_finish_sums_modes(tmp_path: Path) -> None:
    folder = tmp_path / "store"
    write_complete_store(folder, "k1")
    manifest = read_manifest(folder)
    assert manifest["modes"] == {"CMYK": 2, "RGB": 6}
    assert manifest["exif_rotated"] == 2


def test_replace_store_swaps_complete_store(tmp_path: Path) -> None:
    folder = tmp_path / "store"
    write_complete_store(folder, "old")
    write_complete_store(rebuild_folder(folder), "new")
    replace_store(rebuild_folder(folder), folder)
    assert read_manifest(folder)["key"] == "new"
    assert not rebuild_folder(folder).exists()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["store"]
    assert len(FeatureStore(folder)) == 8


def test_recover_interrupted_replacement(tmp_path: Path) -> None:
    folder = tmp_path / "store"
    write_complete_store(rebuild_folder(folder), "new")
    # a crash after the old store was renamed away and before the rebuilt one was moved in
    recover_replaced_store(folder)
    assert read_manifest(folder)["key"] == "new"


def test_recover_ignores_incomplete_rebuild(tmp_path: Path) -> None:
    folder = tmp_path / "store"
    writer = StoreWriter.create_or_resume(rebuild_folder(folder), header("new"), {})
    writer.write_shard(0, shard_data(4), [], "float32")
    recover_replaced_store(folder)
    assert not (folder / MANIFEST).exists()


def test_reader_skips_empty_shard(tmp_path: Path) -> None:
    folder = tmp_path / "store"
    writer = StoreWriter.create_or_resume(folder, header(), {})
    empty = ShardData({"pre_logits": np.zeros((0, 0), np.float32)}, np.zeros(0, np.int64), [], [], np.zeros(0, np.int64))
    writer.write_shard(0, empty, [{"path": "x.jpg", "reason": "bad"}], "float32")
    writer.write_shard(1, shard_data(4, first=4), [], "float32")
    writer.finish({"taps": {"pre_logits": 6}})
    assert FeatureStore(folder).features("pre_logits").shape == (4, 6)


def test_incomplete_store_rejected_by_reader(tmp_path: Path) -> None:
    folder = tmp_path / "store"
    StoreWriter.create_or_resume(folder, header(), {})
    with pytest.raises(RuntimeError, match="incomplete"):
        FeatureStore(folder)


@pytest.mark.parametrize(("rows", "expected"), [(1, 1), (255, 255), (256, 256), (257, 129), (300, 150), (1024, 256), (1025, 205)])
def test_chunk_rows_even_and_at_most_limit(rows: int, expected: int) -> None:
    assert chunk_rows(rows) == expected
    assert chunk_rows(rows) <= CHUNK_ROWS


def test_partial_chunk_takes_no_extra_space(tmp_path: Path) -> None:
    (tmp_path / "shards").mkdir()
    data = shard_data(300, dimension=64)
    entry = write_shard_file(tmp_path, 0, data, [], "k", 512, "float32", "none")
    with h5py.File(tmp_path / entry["file"], "r") as handle:
        assert handle["features"]["pre_logits"].id.get_storage_size() == 300 * 64 * 4
