"""The feature store: a folder of HDF5 shards plus a JSON manifest.

Layout of a store folder::

    manifest.json          key, provenance, class names, taps, and the list of complete shards
    settings.json          the resolved stage-one settings
    shards/shard-00000.h5  features/<tap> (n, D), label (n,), path (n,), split (n,), index (n,)

Shard ``k`` holds the samples whose dataset index lies in ``[k * shard_size, (k + 1) * shard_size)``
(fewer when some failed to decode). Each shard is written under a temporary name, flushed,
fsynced and renamed into place; only then is it added to the manifest, which is itself replaced
atomically. A reader therefore never sees a partial shard, and an interrupted run resumes from
the shards the manifest lists.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import h5py
import numpy as np

logger = logging.getLogger(__name__)

FORMAT = "featcache-store/1"
MANIFEST = "manifest.json"
SETTINGS = "settings.json"
SHARD_FOLDER = "shards"
STRING = h5py.string_dtype("utf-8")


class StoreError(RuntimeError):
    """A store is missing, incomplete or does not match its manifest."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json_atomic(path: Path, payload: Any) -> None:
    """Replace ``path`` with ``payload`` as JSON so that readers see the old or the new file, never a mix."""
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def read_manifest(folder: Path) -> dict[str, Any] | None:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


@dataclass
class ShardData:
    """The samples of one shard, ready to write."""

    features: dict[str, np.ndarray]  # tap -> (n, D)
    labels: np.ndarray  # (n,) int64
    paths: list[str]
    splits: list[str]
    indices: np.ndarray  # (n,) int64, dataset order


class StoreWriter:
    """Write shards of one store and keep its manifest current after each one."""

    def __init__(self, folder: Path, manifest: dict[str, Any]) -> None:
        self.folder = Path(folder)
        self.manifest = manifest

    @classmethod
    def create_or_resume(cls, folder: Path, header: dict[str, Any], settings: dict[str, Any]) -> "StoreWriter":
        """Open the store at ``folder`` for writing, resuming it when its manifest has the same key."""
        folder = Path(folder)
        existing = read_manifest(folder)
        if existing is not None and existing.get("key") == header["key"] and not existing.get("complete"):
            logger.info("Resuming store %s: %d shards already complete", folder, len(existing["shards"]))
            return cls(folder, existing)

        (folder / SHARD_FOLDER).mkdir(parents=True, exist_ok=True)
        manifest = {
            "format": FORMAT,
            "complete": False,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "shards": [],
            "skipped": [],
            **header,
        }
        write_json_atomic(folder / SETTINGS, settings)
        write_json_atomic(folder / MANIFEST, manifest)
        return cls(folder, manifest)

    def completed_shards(self) -> set[int]:
        return {entry["shard"] for entry in self.manifest["shards"]}

    def write_shard(self, shard: int, data: ShardData, skipped: list[dict[str, str]], dtype: str) -> None:
        """Write one shard atomically and record it, with the files it skipped, in the manifest."""
        name = f"shard-{shard:05d}.h5"
        final = self.folder / SHARD_FOLDER / name
        temporary = final.with_name(name + ".tmp")
        with h5py.File(temporary, "w") as handle:
            group = handle.create_group("features")
            for tap, values in data.features.items():
                group.create_dataset(tap, data=values.astype(dtype, copy=False))
            handle.create_dataset("label", data=data.labels.astype(np.int64))
            handle.create_dataset("path", data=np.array(data.paths, dtype=object), dtype=STRING)
            handle.create_dataset("split", data=np.array(data.splits, dtype=object), dtype=STRING)
            handle.create_dataset("index", data=data.indices.astype(np.int64))
            handle.attrs["shard"] = shard
            handle.attrs["key"] = self.manifest["key"]
            handle.flush()
        with open(temporary, "rb+") as raw:
            os.fsync(raw.fileno())
        os.replace(temporary, final)
        _fsync_folder(final.parent)

        entry = {"shard": shard, "file": f"{SHARD_FOLDER}/{name}", "count": int(len(data.labels)), "sha256": file_sha256(final)}
        self.manifest["shards"] = sorted(
            [item for item in self.manifest["shards"] if item["shard"] != shard] + [entry], key=lambda item: item["shard"]
        )
        self.manifest["skipped"] = [item for item in self.manifest["skipped"] if item.get("shard") != shard] + [
            {**item, "shard": shard} for item in skipped
        ]
        write_json_atomic(self.folder / MANIFEST, self.manifest)

    def finish(self, extra: dict[str, Any]) -> None:
        self.manifest.update(extra)
        self.manifest["complete"] = True
        self.manifest["completed"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        write_json_atomic(self.folder / MANIFEST, self.manifest)


class FeatureStore:
    """Read a complete store: numpy arrays per split and tap.

    >>> store = FeatureStore("data/features/digits-efficientnet_lite0-1a2b3c4d5e6f")
    >>> X, y = store.load("train", "pre_logits")
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        manifest = read_manifest(self.folder)
        if manifest is None:
            raise StoreError(f"No feature store at {self.folder}: {MANIFEST} is missing. Run 'featcache extract' first.")
        if not manifest.get("complete"):
            raise StoreError(
                f"Store {self.folder} is incomplete ({len(manifest['shards'])} shards written): "
                "rerun the same 'featcache extract' command to resume it."
            )
        self.manifest = manifest
        self._columns: dict[str, np.ndarray] | None = None
        self._features: dict[str, np.ndarray] = {}

    @property
    def key(self) -> str:
        return self.manifest["key"]

    @property
    def class_names(self) -> list[str]:
        return list(self.manifest["class_names"])

    @property
    def taps(self) -> dict[str, int]:
        """Tap name -> feature dimension, in extraction order."""
        return dict(self.manifest["taps"])

    @property
    def provenance(self) -> dict[str, Any]:
        return dict(self.manifest["provenance"])

    @property
    def name(self) -> str:
        return self.folder.name

    def shard_paths(self) -> list[Path]:
        return [self.folder / entry["file"] for entry in self.manifest["shards"]]

    def _read_columns(self) -> dict[str, np.ndarray]:
        if self._columns is None:
            parts: dict[str, list[np.ndarray]] = {"label": [], "path": [], "split": [], "index": []}
            for path in self.shard_paths():
                with h5py.File(path, "r") as handle:
                    parts["label"].append(handle["label"][:])
                    parts["index"].append(handle["index"][:])
                    parts["path"].append(handle["path"].asstr()[:])
                    parts["split"].append(handle["split"].asstr()[:])
            self._columns = {name: np.concatenate(values) if values else np.array([]) for name, values in parts.items()}
        return self._columns

    def features(self, tap: str) -> np.ndarray:
        """Return the (N, D) features of every stored sample for one tap, in dataset order."""
        if tap not in self.taps:
            raise KeyError(f"Tap {tap!r} is not in store {self.name}: it holds {list(self.taps)}.")
        if tap not in self._features:
            blocks = []
            for path in self.shard_paths():
                with h5py.File(path, "r") as handle:
                    blocks.append(handle["features"][tap][:])
            self._features[tap] = np.concatenate(blocks) if blocks else np.zeros((0, self.taps[tap]), np.float32)
        return self._features[tap]

    def splits(self) -> list[str]:
        """Return the splits that hold at least one sample, in train, val, test order."""
        present = set(self._read_columns()["split"].tolist())
        return [split for split in ("train", "val", "test") if split in present]

    def mask(self, split: str) -> np.ndarray:
        return self._read_columns()["split"] == split

    def load(self, split: str, tap: str) -> tuple[np.ndarray, np.ndarray]:
        """Return (features (n, D) float32, labels (n,)) of one split and tap."""
        mask = self.mask(split)
        return self.features(tap)[mask].astype(np.float32, copy=False), self._read_columns()["label"][mask]

    def load_labels(self, split: str) -> np.ndarray:
        """Return the (n,) labels of one split without reading any features."""
        return self._read_columns()["label"][self.mask(split)]

    def paths(self, split: str) -> list[str]:
        return self._read_columns()["path"][self.mask(split)].tolist()

    def indices(self, split: str) -> np.ndarray:
        """Return the dataset index of each sample of one split; several views of one image share it."""
        return self._read_columns()["index"][self.mask(split)]

    def feature_bytes(self, split: str, tap: str) -> int:
        """Return the size in bytes of one split's features of one tap once loaded as float32."""
        return int(self.mask(split).sum()) * self.taps[tap] * 4

    def iter_shards(self, split: str, tap: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (features (n, D) float32, labels (n,)) of one split, one shard at a time, in shard order.

        At most one shard's features of one tap are held at once; shards without the split are skipped.
        """
        for position in range(len(self.manifest["shards"])):
            block = self.read_shard(position, split, tap)
            if block is not None:
                yield block

    def read_shard(self, position: int, split: str, tap: str) -> tuple[np.ndarray, np.ndarray] | None:
        """Return (features (n, D) float32, labels (n,)) of one split in the shard at ``position``, or None.

        The shard's tap is read as one contiguous block and the split's rows are selected in memory.
        """
        if tap not in self.taps:
            raise KeyError(f"Tap {tap!r} is not in store {self.name}: its taps are {list(self.taps)}.")
        with h5py.File(self.shard_paths()[position], "r") as handle:
            rows = handle["split"].asstr()[:] == split
            if not rows.any():
                return None
            features = handle["features"][tap][:]
            labels = handle["label"][:]
        return features[rows].astype(np.float32, copy=False), labels[rows]

    def __len__(self) -> int:
        return sum(entry["count"] for entry in self.manifest["shards"])


def latest_store(root: Path) -> Path:
    """Return the most recently completed store folder under ``root``."""
    candidates = []
    for manifest_path in Path(root).glob(f"*/{MANIFEST}"):
        manifest = read_manifest(manifest_path.parent)
        if manifest and manifest.get("complete"):
            candidates.append((manifest.get("completed", ""), manifest_path.stat().st_mtime, manifest_path.parent))
    if not candidates:
        raise StoreError(f"No complete feature store under {root}: run 'featcache extract' (or 'make extract') first.")
    return max(candidates)[2]
