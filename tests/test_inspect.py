"""Inspecting and verifying stores, through the library and the CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.cli import main
from pipeline.store import ShardData, StoreError, StoreWriter, read_manifest, write_json_atomic
from stages.inspect import inspect_store, verify_store


def make_store(folder: Path) -> Path:
    """Write a complete two-shard store of 7 samples, one of them skipped."""
    header = {
        "key": "feedbeef" * 8,
        "class_names": ["ant", "bee"],
        "num_samples_planned": 8,
        "shard_size": 4,
        "dtype": "float32",
        "compression": "none",
        "dataset_root": "/data/hymenoptera",
        "split_source": "folders",
        "provenance": {"backbone": "test_efficientnet", "family": "timm", "weights": "random", "pooling": "avg"},
        "versions": {"torch": "2.14.1"},
        "warnings": ["class folder /data/x contains no images"],
    }
    writer = StoreWriter.create_or_resume(folder, header, {})
    rng = np.random.default_rng(0)
    for shard, (count, split) in enumerate(((4, "train"), (3, "val"))):
        indices = np.arange(shard * 4, shard * 4 + count)
        data = ShardData(
            features={"pre_logits": rng.normal(size=(count, 3)).astype(np.float32)},
            labels=indices % 2,
            paths=[f"{split}/x/{index}.jpg" for index in indices],
            splits=[split] * count,
            indices=indices,
            modes=["RGB"] * (count - 1) + ["CMYK"],
            orientations=[1] * count,
        )
        skipped = [{"path": "val/x/broken.jpg", "reason": "OSError: image file is truncated"}] if shard else []
        writer.write_shard(shard, data, skipped, "float32")
    writer.finish({"taps": {"pre_logits": 3}})
    return folder


def test_verify_complete_store(tmp_path: Path) -> None:
    assert verify_store(make_store(tmp_path / "store")) == []


def test_verify_detects_corrupt_byte(tmp_path: Path) -> None:
    folder = make_store(tmp_path / "store")
    shard = folder / "shards" / "shard-00001.h5"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    problems = verify_store(folder)
    assert len(problems) == 1
    assert "shard-00001.h5: SHA-256" in problems[0]


def test_verify_detects_deleted_shard(tmp_path: Path) -> None:
    folder = make_store(tmp_path / "store")
    (folder / "shards" / "shard-00000.h5").unlink()
    assert verify_store(folder) == ["shards/shard-00000.h5: file is missing"]


def test_verify_detects_count_mismatch(tmp_path: Path) -> None:
    folder = make_store(tmp_path / "store")
    manifest = read_manifest(folder)
    manifest["shards"][0]["count"] = 5
    write_json_atomic(folder / "manifest.json", manifest)
    problems = verify_store(folder)
    assert "shards/shard-00000.h5: label has 4 rows, the manifest records 5" in problems
    assert "8 stored + 1 skipped samples, expected 8" in problems


def test_verify_detects_unlisted_shard(tmp_path: Path) -> None:
    folder = make_store(tmp_path / "store")
    manifest = read_manifest(folder)
    manifest["shards"] = manifest["shards"][:1]
    write_json_atomic(folder / "manifest.json", manifest)
    assert "the manifest lists shards [0], expected [0, 1]" in verify_store(folder)


def test_verify_missing_store_raises(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="manifest.json is missing"):
        verify_store(tmp_path)


def test_inspect_lists_counts_and_skipped(tmp_path: Path) -> None:
    report = inspect_store(make_store(tmp_path / "store"))
    lines = report.splitlines()
    assert "  ant         2       2       0" in lines
    assert "  bee         2       1       0" in lines
    assert "  total       4       3       0" in lines
    assert "  pre_logits                     3" in lines
    assert "source modes CMYK 2, RGB 5" in lines
    assert "forward pass amp unrecorded, channels-last unrecorded, batch norms folded unrecorded, JPEG draft decoding unrecorded" in lines
    assert "  val/x/broken.jpg: OSError: image file is truncated" in lines
    assert "dtype        float32, compression none" in lines
    assert "warning      class folder /data/x contains no images" in lines


def test_inspect_incomplete_store(tmp_path: Path) -> None:
    folder = make_store(tmp_path / "store")
    manifest = read_manifest(folder)
    manifest["complete"] = False
    manifest["shards"] = manifest["shards"][:1]
    write_json_atomic(folder / "manifest.json", manifest)
    assert "(incomplete, 1 of 2 shards)" in inspect_store(folder).splitlines()[0]


def test_cli_verify_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = make_store(tmp_path / "store")
    assert main(["verify", str(folder)]) == 0
    (folder / "shards" / "shard-00001.h5").unlink()
    assert main(["verify", str(folder)]) == 1
    assert main(["verify", str(tmp_path / "absent")]) == 2
    assert "1 problem found" in capsys.readouterr().out


def test_cli_inspect_prints_report(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = make_store(tmp_path / "store")
    assert main(["inspect", str(folder)]) == 0
    assert f"store        {folder} (complete)" in capsys.readouterr().out
