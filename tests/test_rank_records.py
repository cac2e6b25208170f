"""Rank records: per-rank shard lists, their merge into the manifest, and resume from them."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from pipeline.distributed import DistributedContext
from pipeline.rank_records import (
    RANK_FOLDER,
    RankStoreWriter,
    finish_writer,
    merge_rank_records,
    open_writer,
    read_rank_records,
    record_path,
)
from pipeline.store import FeatureStore, ShardData, StoreError, StoreWriter, read_manifest

SHARD_SIZE = 2
SAMPLES = 6  # three shards


def header(key: str = "key-a") -> dict:
    return {
        "key": key,
        "class_names": ["a", "b"],
        "num_samples_planned": SAMPLES,
        "shard_size": SHARD_SIZE,
        "dtype": "float32",
        "provenance": {},
    }


def shard_data(shard: int) -> ShardData:
    indices = np.arange(shard * SHARD_SIZE, min((shard + 1) * SHARD_SIZE, SAMPLES))
    return ShardData(
        features={"pre_logits": np.stack([np.full(3, index, np.float32) for index in indices])},  # (n, 3)
        labels=indices % 2,
        paths=[f"image-{index}.png" for index in indices],
        splits=["train"] * len(indices),
        indices=indices,
    )


def rank_writer(folder: Path, rank: int, world_size: int = 2) -> RankStoreWriter:
    context = DistributedContext(rank=rank, world_size=world_size, backend="gloo")
    return RankStoreWriter(folder, read_manifest(folder), context)


def write(writer: StoreWriter, shard: int, skipped: list[dict] | None = None) -> None:
    writer.manifest["taps"] = {"pre_logits": 3}
    writer.write_shard(shard, shard_data(shard), skipped or [], "float32")


@pytest.fixture
def store(tmp_path: Path) -> Path:
    folder = tmp_path / "store"
    StoreWriter.create_or_resume(folder, header(), {})
    return folder


def test_rank_writer_skips_shards_of_other_ranks(store):
    assert rank_writer(store, rank=1).completed_shards() == {0, 2}


def test_rank_writer_records_own_shards(store):
    writer = rank_writer(store, rank=1)
    write(writer, 1, [{"path": "broken.png", "reason": "truncated"}])

    record = json.loads(record_path(store, 1).read_text())
    assert [entry["shard"] for entry in record["shards"]] == [1]
    assert record["skipped"] == [{"path": "broken.png", "reason": "truncated", "shard": 1}]
    assert record["taps"] == {"pre_logits": 3}
    assert read_manifest(store)["shards"] == []  # only rank 0 writes the manifest, and only at merge time


def test_merge_adds_recorded_shards_in_shard_order(store):
    write(rank_writer(store, rank=1), 1, [{"path": "broken.png", "reason": "truncated"}])
    first = rank_writer(store, rank=0)
    write(first, 2)
    write(first, 0, [{"path": "empty.jpg", "reason": "empty file"}])
    manifest = read_manifest(store)

    added = merge_rank_records(store, manifest, read_rank_records(store, "key-a"))

    assert added == 3
    assert [entry["shard"] for entry in manifest["shards"]] == [0, 1, 2]
    assert [item["path"] for item in manifest["skipped"]] == ["empty.jpg", "broken.png"]
    assert manifest["taps"] == {"pre_logits": 3}


def test_merge_is_idempotent(store):
    write(rank_writer(store, rank=1), 1)
    manifest = read_manifest(store)
    records = read_rank_records(store, "key-a")

    merge_rank_records(store, manifest, records)
    assert merge_rank_records(store, manifest, records) == 0
    assert [entry["shard"] for entry in manifest["shards"]] == [1]


def test_records_of_another_key_are_ignored(store, caplog):
    write(rank_writer(store, rank=1), 1)

    with caplog.at_level(logging.WARNING):
        records = read_rank_records(store, "key-b")

    assert records == []
    assert "belongs to cache key" in caplog.text


def test_merge_skips_missing_shard_file(store, caplog):
    write(rank_writer(store, rank=1), 1)
    (store / "shards" / "shard-00001.h5").unlink()
    manifest = read_manifest(store)

    with caplog.at_level(logging.WARNING):
        added = merge_rank_records(store, manifest, read_rank_records(store, "key-a"))

    assert added == 0
    assert manifest["shards"] == []
    assert "extracted again" in caplog.text


def test_single_process_resume_absorbs_records(store):
    write(rank_writer(store, rank=1), 1)  # a torchrun run killed after one shard

    writer = open_writer(store, header(), {}, DistributedContext())

    assert type(writer) is StoreWriter
    assert writer.completed_shards() == {1}
    assert [entry["shard"] for entry in read_manifest(store)["shards"]] == [1]
    assert not (store / RANK_FOLDER).exists()


def test_open_writer_under_torchrun_is_rank_writer(store, gloo_group_of_one):
    writer = open_writer(store, header(), {}, gloo_group_of_one)

    assert isinstance(writer, RankStoreWriter)
    assert writer.completed_shards() == set()


def test_finish_merges_every_rank_and_completes(store, gloo_group_of_one):
    writer = open_writer(store, header(), {}, gloo_group_of_one)
    for shard in range(3):
        write(writer, shard)

    finish_writer(writer, {"taps": {"pre_logits": 3}}, gloo_group_of_one)

    manifest = read_manifest(store)
    assert manifest["complete"]
    assert manifest["world_size"] == 1
    assert not (store / RANK_FOLDER).exists()
    assert writer.manifest == manifest
    assert FeatureStore(store).features("pre_logits")[:, 0].tolist() == list(range(SAMPLES))


def test_finish_missing_shards_raises(store, gloo_group_of_one):
    writer = open_writer(store, header(), {}, gloo_group_of_one)
    write(writer, 0)

    with pytest.raises(StoreError, match=r"lacks shards \[1, 2\]"):
        finish_writer(writer, {"taps": {"pre_logits": 3}}, gloo_group_of_one)

    manifest = read_manifest(store)
    assert not manifest["complete"]
    assert [entry["shard"] for entry in manifest["shards"]] == [0]
