"""The feature store: a folder of HDF5 shards plus a JSON manifest.

Layout of a store folder::

    manifest.json          key, provenance, class names, taps, and the list of complete shards
    settings.json          the resolved stage-one settings
    shards/shard-00000.h5  features/<tap> (n, D), label (n,), path (n,), split (n,), index (n,),
                           view (n,), mode (n,), orientation (n,); attributes name the key, the
                           shard, its index range and the files it skipped
    ranks/rank-00001.json  during a distributed run: the shards one rank has written (pipeline.rank_records)
    store.h5               optional: one HDF5 virtual dataset view of all shards (pipeline.virtual)

Shard ``k`` contains the samples whose dataset index lies in ``[k * shard_size, (k + 1) * shard_size)``
(fewer when some failed to decode). Each shard is written under a temporary name, flushed,
fsynced and renamed into place; only then is it added to the manifest, which is itself replaced
atomically. A reader therefore never sees a partial shard, and an interrupted run resumes from
the shards the manifest lists.

A ``--force`` rebuild, or a new key under a folder name that contains a complete store, writes into
``<folder>.rebuild`` and replaces the old store only once the new one is complete, so a failed
rebuild leaves the earlier store intact.

A shard contains every view of its samples, one row per (index, view). View 0 is the deterministic
evaluation view, and training samples of a store extracted with ``--views K`` also have augmented
views 1..K. Stores written before views existed have no ``view`` column and read as view 0.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import h5py
import numpy as np

logger = logging.getLogger(__name__)

FORMAT = "featcache-store/1"
MANIFEST = "manifest.json"
# Written by a cache hit of featcache extract: the store counts as the newest for latest_store.
LAST_USED = "last-used.txt"
SETTINGS = "settings.json"
SHARD_FOLDER = "shards"
STRING = h5py.string_dtype("utf-8")
REBUILD_SUFFIX = ".rebuild"
RETIRED_SUFFIX = ".replaced"
# Rows per HDF5 chunk of the feature datasets, at most. Chunks run along the samples, so reading a
# range of samples touches only the chunks that contain them.
CHUNK_ROWS = 256


def chunk_rows(rows: int) -> int:
    """Return the rows per chunk that split ``rows`` into the fewest chunks of at most CHUNK_ROWS, evenly.

    HDF5 allocates every chunk whole, so 300 rows in chunks of 256 would take the space of 512:
    two chunks of 150 take the space of 300.
    """
    chunks = max(1, -(-rows // CHUNK_ROWS))
    return max(1, -(-rows // chunks))


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


class DamagedStoreError(StoreError):
    """Error for a store whose manifest or shard file cannot be read."""


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """Return a store's manifest, or None when it has none; raise DamagedStoreError when it is unreadable or incomplete JSON."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    fix = "rebuild the store by rerunning its 'featcache extract' command with --force, or delete the folder"
    try:
        with open(path, encoding="utf-8") as handle:
            manifest = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DamagedStoreError(f"The manifest {path} is damaged ({error}): {fix}.") from error
    expected = {"key": str, "shards": list, "shard_size": int}
    wrong = [name for name, kind in expected.items() if not isinstance(manifest, dict) or not isinstance(manifest.get(name), kind)]
    if wrong:
        raise DamagedStoreError(f"The manifest {path} is damaged (no valid {', '.join(wrong)}): {fix}.")
    return manifest


@contextmanager
def open_shard(path: Path, store: Path) -> Iterator[h5py.File]:
    """Open a shard file for reading, raising DamagedStoreError with what to do when it is missing or unreadable."""
    try:
        handle = h5py.File(path, "r")
    except OSError as error:
        reason = "is missing" if not Path(path).exists() else f"cannot be read ({error})"
        raise DamagedStoreError(
            f"Shard {path} of store {store} {reason}: run 'featcache verify {store}', and rebuild the store by "
            "rerunning its 'featcache extract' command with --force."
        ) from error
    with handle:
        yield handle


@dataclass
class ShardData:
    """The samples of one shard, ready to write."""

    features: dict[str, np.ndarray]  # tap -> (n, D)
    labels: np.ndarray  # (n,) int64
    paths: list[str]
    splits: list[str]
    indices: np.ndarray  # (n,) int64, dataset order
    views: np.ndarray | None = None  # (n,) int64, the view of each row; None means view 0 only
    modes: list[str] = field(default_factory=list)  # Pillow mode of each file before conversion
    orientations: list[int] = field(default_factory=list)  # EXIF orientation applied, 1 when upright


def shard_file_name(shard: int) -> str:
    return f"{SHARD_FOLDER}/shard-{shard:05d}.h5"


def pending_shards(manifest: dict[str, Any], total: int, shard_size: int) -> list[int]:
    """Return the shards of a dataset of ``total`` samples that the manifest does not list as complete."""
    done = {entry["shard"] for entry in manifest["shards"]}
    shard_count = (total + shard_size - 1) // shard_size
    return [shard for shard in range(shard_count) if shard not in done]


def write_shard_file(
    folder: Path,
    shard: int,
    data: ShardData,
    skipped: list[dict[str, str]],
    key: str,
    shard_size: int,
    dtype: str,
    compression: str = "none",
) -> dict[str, Any]:
    """Write one shard under a temporary name, fsync it, rename it into place and return its manifest entry.

    The file describes itself: its attributes name the store key, the shard number, the dataset
    index range it covers and the files of that range that were skipped.
    """
    relative = shard_file_name(shard)
    final = Path(folder) / relative
    temporary = final.with_name(final.name + ".tmp")
    filter_name = None if compression == "none" else compression
    with h5py.File(temporary, "w") as handle:
        group = handle.create_group("features")
        for tap, values in data.features.items():
            values = values.astype(dtype, copy=False)  # (n, D)
            chunks = (chunk_rows(len(values)), values.shape[1]) if values.size else None
            group.create_dataset(tap, data=values, chunks=chunks, compression=filter_name)
        handle.create_dataset("label", data=data.labels.astype(np.int64))
        handle.create_dataset("path", data=np.array(data.paths, dtype=object), dtype=STRING)
        handle.create_dataset("split", data=np.array(data.splits, dtype=object), dtype=STRING)
        handle.create_dataset("index", data=data.indices.astype(np.int64))
        views = data.views if data.views is not None else np.zeros(len(data.indices), np.int64)
        handle.create_dataset("view", data=views.astype(np.int64))
        handle.create_dataset("mode", data=np.array(data.modes, dtype=object), dtype=STRING)
        handle.create_dataset("orientation", data=np.array(data.orientations, dtype=np.int8))
        handle.attrs["format"] = FORMAT
        handle.attrs["key"] = key
        handle.attrs["shard"] = shard
        handle.attrs["first_index"] = shard * shard_size
        handle.attrs["stop_index"] = (shard + 1) * shard_size
        handle.attrs["skipped"] = json.dumps(skipped)
        handle.flush()
    with open(temporary, "rb+") as raw:
        os.fsync(raw.fileno())
    os.replace(temporary, final)
    _fsync_folder(final.parent)

    return {
        "shard": shard,
        "file": relative,
        "count": int(len(data.labels)),
        "sha256": file_sha256(final),
        "modes": dict(sorted(Counter(data.modes).items())),
        "exif_rotated": sum(1 for orientation in data.orientations if orientation != 1),
    }


def add_shard_entry(manifest: dict[str, Any], entry: dict[str, Any], skipped: list[dict[str, str]]) -> None:
    """Record a written shard and the files it skipped in ``manifest``, replacing an older entry of that shard."""
    shard = entry["shard"]
    others = [item for item in manifest["shards"] if item["shard"] != shard]
    manifest["shards"] = sorted(others + [entry], key=lambda item: item["shard"])
    kept = [item for item in manifest["skipped"] if item.get("shard") != shard]
    manifest["skipped"] = kept + [{**item, "shard": shard} for item in skipped]


class StoreWriter:
    """Write shards of one store and keep its manifest current after each one."""

    def __init__(self, folder: Path, manifest: dict[str, Any]) -> None:
        self.folder = Path(folder)
        self.manifest = manifest

    @classmethod
    def create_or_resume(
        cls, folder: Path, header: dict[str, Any], settings: dict[str, Any], fresh: bool = False
    ) -> "StoreWriter":
        """Open the store at ``folder`` for writing, resuming it when its manifest has the same key.

        With ``fresh``, or when the key differs, a new manifest replaces the old one first and the
        old shard files are deleted after it, so a crash in between never pairs a manifest with
        shards of another key.
        """
        folder = Path(folder)
        try:
            existing = read_manifest(folder)
        except DamagedStoreError:
            if not fresh:
                raise
            existing = None  # replaced below, with the shards
        same_key = existing is not None and existing.get("key") == header["key"]
        if same_key and not existing.get("complete") and not fresh:
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
        write_json_atomic(folder / MANIFEST, manifest)
        write_json_atomic(folder / SETTINGS, settings)
        for stale in (folder / SHARD_FOLDER).iterdir():
            if stale.is_file():
                stale.unlink()
        return cls(folder, manifest)

    def completed_shards(self) -> set[int]:
        return {entry["shard"] for entry in self.manifest["shards"]}

    def write_shard(
        self, shard: int, data: ShardData, skipped: list[dict[str, str]], dtype: str, compression: str = "none"
    ) -> None:
        """Write one shard atomically and record it, with the files it skipped, in the manifest."""
        entry = write_shard_file(
            self.folder, shard, data, skipped, self.manifest["key"], int(self.manifest["shard_size"]), dtype, compression
        )
        add_shard_entry(self.manifest, entry, skipped)
        self.save_manifest()

    def save_manifest(self) -> None:
        """Write the manifest after a shard. A rank of a distributed run overrides this to write its rank record."""
        write_json_atomic(self.folder / MANIFEST, self.manifest)

    def finish(self, extra: dict[str, Any]) -> None:
        self.manifest.update(extra)
        modes: Counter = Counter()
        for entry in self.manifest["shards"]:
            modes.update(entry.get("modes", {}))
        self.manifest["modes"] = dict(sorted(modes.items()))
        self.manifest["exif_rotated"] = sum(entry.get("exif_rotated", 0) for entry in self.manifest["shards"])
        self.manifest["complete"] = True
        self.manifest["completed"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        write_json_atomic(self.folder / MANIFEST, self.manifest)


def rebuild_folder(folder: Path) -> Path:
    """Return the folder where a replacement of the complete store at ``folder`` is built."""
    return folder.with_name(folder.name + REBUILD_SUFFIX)


def replace_store(rebuilt: Path, folder: Path) -> None:
    """Move a complete rebuilt store into ``folder``, retiring the old store only after the move.

    A crash between the two renames leaves no store at ``folder``, and the next call of
    ``recover_replaced_store`` completes the move.
    """
    retired = folder.with_name(folder.name + RETIRED_SUFFIX)
    if retired.exists():
        shutil.rmtree(retired)
    if folder.exists():
        os.replace(folder, retired)
    os.replace(rebuilt, folder)
    _fsync_folder(folder.parent)
    if retired.exists():
        shutil.rmtree(retired)


def recover_replaced_store(folder: Path) -> None:
    """Finish a replacement that a crash interrupted between its two renames."""
    rebuilt = rebuild_folder(folder)
    if folder.exists() or not rebuilt.is_dir():
        return
    manifest = read_manifest(rebuilt)
    if manifest is not None and manifest.get("complete"):
        logger.warning("Completing the interrupted replacement of store %s by %s", folder, rebuilt)
        replace_store(rebuilt, folder)


class FeatureStore:
    """Read a complete store: numpy arrays per split and tap.

    >>> store = FeatureStore("data/features/digits-efficientnet_lite0-1a2b3c4d5e6f")
    >>> X, y = store.load("train", "pre_logits")
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        manifest = read_manifest(self.folder)
        if manifest is None and not self.folder.is_dir():
            raise StoreError(f"No feature store at {self.folder}: the folder does not exist. Pass a store folder "
                             "that 'featcache extract' printed, or run 'featcache extract' first.")
        if manifest is None:
            raise StoreError(f"No feature store at {self.folder}: {MANIFEST} is missing. Run 'featcache extract' first.")
        if not manifest.get("complete"):
            rebuild = self.folder.name.endswith(REBUILD_SUFFIX)  # a --force run's unfinished replacement
            command = "'featcache extract' command with --force" if rebuild else "same 'featcache extract' command"
            raise StoreError(
                f"Store {self.folder} is incomplete ({len(manifest['shards'])} shards written): rerun the {command} to resume it."
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
            parts: dict[str, list[np.ndarray]] = {"label": [], "path": [], "split": [], "index": [], "view": []}
            for path in self.shard_paths():
                with open_shard(path, self.folder) as handle:
                    parts["label"].append(handle["label"][:])
                    parts["index"].append(handle["index"][:])
                    has_views = "view" in handle
                    parts["view"].append(handle["view"][:] if has_views else np.zeros(len(handle["index"]), np.int64))
                    parts["path"].append(handle["path"].asstr()[:])
                    parts["split"].append(handle["split"].asstr()[:])
            self._columns = {name: np.concatenate(values) if values else np.array([]) for name, values in parts.items()}
        return self._columns

    def features(self, tap: str) -> np.ndarray:
        """Return the (N, D) features of every stored sample for one tap, in dataset order."""
        if tap not in self.taps:
            raise KeyError(f"Tap {tap!r} is not in store {self.name}: use one of its taps {list(self.taps)}.")
        if tap not in self._features:
            blocks = []
            for path in self.shard_paths():
                with open_shard(path, self.folder) as handle:
                    block = handle["features"][tap][:]
                # a shard whose files all failed to decode may store (0, 0) when no dimension was known yet
                if len(block):
                    blocks.append(block)
            self._features[tap] = np.concatenate(blocks) if blocks else np.zeros((0, self.taps[tap]), np.float32)
        return self._features[tap]

    def splits(self) -> list[str]:
        """Return the splits that hold at least one sample, in train, val, test order."""
        present = set(self._read_columns()["split"].tolist())
        return [split for split in ("train", "val", "test") if split in present]

    def mask(self, split: str) -> np.ndarray:
        return self._read_columns()["split"] == split

    def load(self, split: str, tap: str, view: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Return (features (n, D) float32, labels (n,)) of one split and tap.

        With ``view=None`` every view of the split is returned (train rows then include the
        augmented views); ``view=0`` returns one deterministic row per sample.
        """
        mask = self.mask(split)
        if view is not None:
            mask = mask & (self._read_columns()["view"] == view)
        return self.features(tap)[mask].astype(np.float32, copy=False), self._read_columns()["label"][mask]

    def indices(self, split: str, view: int | None = None) -> np.ndarray:
        """Return the dataset index of each row of a split, in the row order of ``load``."""
        mask = self.mask(split)
        if view is not None:
            mask = mask & (self._read_columns()["view"] == view)
        return self._read_columns()["index"][mask]

    def views(self, split: str) -> np.ndarray:
        """Return the view of each row of a split, in the row order of ``load(split, tap)``."""
        return self._read_columns()["view"][self.mask(split)]

    def load_labels(self, split: str) -> np.ndarray:
        """Return the (n,) labels of one split without reading any features."""
        return self._read_columns()["label"][self.mask(split)]

    def paths(self, split: str) -> list[str]:
        return self._read_columns()["path"][self.mask(split)].tolist()

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
        with open_shard(self.shard_paths()[position], self.folder) as handle:
            rows = handle["split"].asstr()[:] == split
            if not rows.any():
                return None
            features = handle["features"][tap][:]
            labels = handle["label"][:]
        return features[rows].astype(np.float32, copy=False), labels[rows]

    def __len__(self) -> int:
        return sum(entry["count"] for entry in self.manifest["shards"])


def mark_used(folder: Path) -> None:
    """Record that a command used this store just now, so that ``latest_store`` picks it (a cache hit counts)."""
    try:
        (Path(folder) / LAST_USED).write_text(time.strftime("%Y-%m-%dT%H:%M:%S%z") + "\n")
    except OSError as error:  # a read-only store stays usable; only the choice of the newest store is affected
        logger.warning("Could not mark store %s as used: %s", folder, error)


def latest_store(root: Path) -> Path:
    """Return the complete store under ``root`` that was completed or used by ``featcache extract`` most recently."""
    candidates = []
    for manifest_path in Path(root).glob(f"*/{MANIFEST}"):
        manifest = read_manifest(manifest_path.parent)
        if manifest and manifest.get("complete"):
            used = manifest_path.parent / LAST_USED
            moment = max(manifest_path.stat().st_mtime, used.stat().st_mtime if used.exists() else 0.0)
            candidates.append((moment, str(manifest_path.parent), manifest_path.parent))
    if not candidates:
        raise StoreError(f"No complete feature store under {root}: run 'featcache extract' (or 'make extract') first.")
    return max(candidates)[2]
