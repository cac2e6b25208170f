"""Rank records: how the ranks of a distributed run share one store while only rank 0 writes its manifest.

Each rank writes the shards it owns and lists them in its own record, ``ranks/rank-00001.json``,
which it replaces atomically after every shard. Once every rank has passed the final barrier,
rank 0 merges the records into ``manifest.json``, marks the store complete and deletes them.

A rerun after a killed rank (with torchrun or in one process) merges the records it finds into
the manifest before extracting, so completed shards are skipped whichever rank wrote them.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from pipeline.distributed import DistributedContext
from pipeline.store import StoreError, StoreWriter, read_manifest, write_json_atomic

logger = logging.getLogger(__name__)

RANK_FOLDER = "ranks"
RECORD_FORMAT = "featcache-rank-record/1"


def record_path(folder: Path, rank: int) -> Path:
    return Path(folder) / RANK_FOLDER / f"rank-{rank:05d}.json"


def planned_shard_count(manifest: dict[str, Any]) -> int:
    shard_size = int(manifest["shard_size"])
    return (int(manifest["num_samples_planned"]) + shard_size - 1) // shard_size


class RankStoreWriter(StoreWriter):
    """Write the shards one rank owns, and list them in that rank's record instead of the manifest."""

    def __init__(self, folder: Path, manifest: dict[str, Any], context: DistributedContext) -> None:
        super().__init__(folder, manifest)
        self.context = context
        self.inherited = super().completed_shards()  # complete before this run started
        record_path(self.folder, context.rank).parent.mkdir(parents=True, exist_ok=True)

    def completed_shards(self) -> set[int]:
        """Return the shards this rank must not write: the complete ones and those other ranks own."""
        others = {shard for shard in range(planned_shard_count(self.manifest)) if not self.context.owns_shard(shard)}
        return super().completed_shards() | others

    def save_manifest(self) -> None:
        written = {entry["shard"] for entry in self.manifest["shards"]} - self.inherited
        record = {
            "format": RECORD_FORMAT,
            "key": self.manifest["key"],
            "rank": self.context.rank,
            "world_size": self.context.world_size,
            "shards": [entry for entry in self.manifest["shards"] if entry["shard"] in written],
            "skipped": [item for item in self.manifest["skipped"] if item.get("shard") in written],
            "taps": self.manifest.get("taps", {}),
            "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        write_json_atomic(record_path(self.folder, self.context.rank), record)


def read_rank_records(folder: Path, key: str) -> list[dict[str, Any]]:
    """Return the rank records of ``folder`` written for cache key ``key``, ignoring those of other keys."""
    records = []
    for path in sorted((Path(folder) / RANK_FOLDER).glob("rank-*.json")):
        with open(path, encoding="utf-8") as handle:
            record = json.load(handle)
        if record.get("key") != key:
            logger.warning("Ignoring rank record %s: it belongs to cache key %s, not %s.", path, str(record.get("key"))[:12], key[:12])
            continue
        records.append(record)
    return records


def merge_rank_records(folder: Path, manifest: dict[str, Any], records: list[dict[str, Any]]) -> int:
    """Add the shards, skipped files and taps of ``records`` to ``manifest``, and return the number of shards added."""
    shards = {entry["shard"]: entry for entry in manifest["shards"]}
    skipped = {item.get("shard"): [] for item in manifest["skipped"]}
    for item in manifest["skipped"]:
        skipped[item.get("shard")].append(item)
    added = 0

    for record in records:
        for entry in record["shards"]:
            if not (Path(folder) / entry["file"]).is_file():
                logger.warning("Rank %d recorded shard %d, but %s is missing, so the shard will be extracted again.", record["rank"], entry["shard"], entry["file"])
                continue
            added += entry["shard"] not in shards
            shards[entry["shard"]] = entry
            skipped[entry["shard"]] = [item for item in record["skipped"] if item.get("shard") == entry["shard"]]
        if record.get("taps") and not manifest.get("taps"):
            manifest["taps"] = record["taps"]

    manifest["shards"] = [shards[shard] for shard in sorted(shards)]
    manifest["skipped"] = [item for shard in sorted(skipped, key=lambda value: (value is None, value)) for item in skipped[shard]]
    return added


def remove_rank_records(folder: Path) -> None:
    rank_folder = Path(folder) / RANK_FOLDER
    if not rank_folder.is_dir():
        return
    for path in rank_folder.glob("rank-*.json*"):
        path.unlink()
    if not any(rank_folder.iterdir()):
        rank_folder.rmdir()


def absorb_rank_records(writer: StoreWriter) -> None:
    """Merge the rank records left by an interrupted run into the manifest, then delete them."""
    records = read_rank_records(writer.folder, writer.manifest["key"])
    added = merge_rank_records(writer.folder, writer.manifest, records)
    if added:
        logger.info("Resuming with %d shards that ranks of an earlier run recorded.", added)
        writer.save_manifest()
    remove_rank_records(writer.folder)


def open_writer(
    folder: Path, header: dict[str, Any], settings: dict[str, Any], context: DistributedContext, fresh: bool = False
) -> StoreWriter:
    """Open the store for this process: rank 0 creates or resumes it, then every other rank opens it.

    Return a plain :class:`StoreWriter` in a single process and a :class:`RankStoreWriter` under torchrun.
    """
    writer = None
    if context.is_main:
        writer = StoreWriter.create_or_resume(folder, header, settings, fresh=fresh)
        absorb_rank_records(writer)
    context.barrier()

    if not context.is_distributed:
        return writer
    return RankStoreWriter(folder, read_manifest(folder), context)


def finish_writer(writer: StoreWriter, extra: dict[str, Any], context: DistributedContext) -> None:
    """Mark the store complete. Under torchrun, wait for every rank and let rank 0 merge their records first."""
    if not context.is_distributed:
        writer.finish(extra)
        return

    context.barrier()
    if context.is_main:
        shared = StoreWriter(writer.folder, read_manifest(writer.folder))
        merge_rank_records(writer.folder, shared.manifest, read_rank_records(writer.folder, shared.manifest["key"]))
        missing = sorted(set(range(planned_shard_count(shared.manifest))) - shared.completed_shards())
        if missing:
            shared.save_manifest()
            raise StoreError(
                f"Store {writer.folder} lacks shards {missing[:20]} after every rank finished: rerun the same "
                "torchrun command to extract them."
            )
        taps = extra.get("taps") or shared.manifest.get("taps") or {}
        shared.finish({**extra, "taps": taps, "world_size": context.world_size})
        remove_rank_records(writer.folder)
        logger.info("Merged the records of %d ranks into %s", context.world_size, writer.folder / "manifest.json")
    context.barrier()
    writer.manifest = read_manifest(writer.folder)
