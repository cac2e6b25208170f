"""Tests of the background writer thread and of stage one writing its shards through it."""

from __future__ import annotations

import threading
import time

import pytest

from pipeline.background import BackgroundWriter
from pipeline.settings import DatasetSettings, ExtractSettings
from pipeline.store import FeatureStore


def test_jobs_run_in_submission_order():
    done = []
    with BackgroundWriter() as writer:
        for item in range(20):
            writer.submit(done.append, item)
    assert done == list(range(20))


def test_job_error_raised_on_exit():
    def fail() -> None:
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        with BackgroundWriter() as writer:
            writer.submit(fail)


def test_jobs_after_error_are_dropped():
    done = []

    def fail() -> None:
        raise OSError("disk full")

    with pytest.raises(OSError):
        with BackgroundWriter() as writer:
            writer.submit(fail)
            writer.submit(done.append, 1)
    assert done == []


def test_block_error_still_finishes_queued_jobs():
    done = []
    with pytest.raises(KeyError):
        with BackgroundWriter() as writer:
            writer.submit(time.sleep, 0.05)
            writer.submit(done.append, "shard 0")
            raise KeyError("loop failed")
    assert done == ["shard 0"]


def test_submit_waits_while_queue_full():
    release = threading.Event()
    writer = BackgroundWriter(max_pending=1)
    writer.submit(release.wait)  # taken by the thread, which then blocks
    time.sleep(0.05)
    writer.submit(lambda: None)  # fills the queue
    producer = threading.Thread(target=writer.submit, args=(lambda: None,))
    producer.start()
    producer.join(timeout=0.2)
    blocked = producer.is_alive()
    release.set()
    producer.join(timeout=5)
    writer.close()
    assert blocked
    assert not producer.is_alive()


def test_max_pending_zero_is_rejected():
    with pytest.raises(ValueError, match="max_pending=0"):
        BackgroundWriter(max_pending=0)


def test_extraction_writes_every_shard(colour_folder, in_tmp):
    from stages.extract import run_extraction

    settings = ExtractSettings(
        dataset=DatasetSettings(str(colour_folder)),
        backbone="test_efficientnet",
        weights="random",
        shard_size=4,
        batch_size=3,
        workers=0,
    )
    result = run_extraction(settings)
    store = FeatureStore(result.folder)
    assert len(store.manifest["shards"]) == 7  # 27 images in shards of 4
    assert len(store) == 27
    assert store.features("pre_logits").shape[0] == 27


def test_write_failure_keeps_earlier_shards(colour_folder, in_tmp, monkeypatch):
    from pipeline.store import StoreError, StoreWriter, read_manifest
    from stages.extract import run_extraction

    original = StoreWriter.write_shard

    def fail_on_shard_one(self, shard, *args):
        if shard == 1:
            raise OSError("No space left on device")
        return original(self, shard, *args)

    monkeypatch.setattr(StoreWriter, "write_shard", fail_on_shard_one)
    settings = ExtractSettings(
        dataset=DatasetSettings(str(colour_folder)),
        backbone="test_efficientnet",
        weights="random",
        shard_size=9,
        batch_size=9,
        workers=0,
        name="partial",
    )
    with pytest.raises(StoreError, match="No space left"):
        run_extraction(settings)
    manifest = read_manifest(in_tmp / "data" / "features" / "partial")
    assert not manifest["complete"]
    assert [entry["shard"] for entry in manifest["shards"]] == [0]

    # the same command resumes once the disk has room again
    monkeypatch.setattr(StoreWriter, "write_shard", original)
    result = run_extraction(settings)
    assert result.extracted == 18
    assert len(FeatureStore(result.folder)) == 27
