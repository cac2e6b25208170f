"""Inspect and verify a feature store without loading any backbone.

``inspect_store`` describes a store: counts per split and class, taps and dimensions, dtype,
provenance, modes of the source files and the skipped files. ``verify_store`` opens every shard and
checks it against the manifest (file present, SHA-256, row counts, key, tap dimensions and dtype)
and returns the problems it finds.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pipeline.store import MANIFEST, SHARD_FOLDER, StoreError, file_sha256, read_manifest

logger = logging.getLogger(__name__)

COLUMNS = ("label", "path", "split", "index")


def _load_manifest(folder: Path) -> dict[str, Any]:
    manifest = read_manifest(folder)
    if manifest is None and not Path(folder).is_dir():
        raise StoreError(f"No feature store at {folder}: the folder does not exist. Pass the folder of a store.")
    if manifest is None:
        raise StoreError(f"No feature store at {folder}: {MANIFEST} is missing. Pass the folder of a store.")
    return manifest


def verify_shard(folder: Path, entry: dict[str, Any], manifest: dict[str, Any]) -> list[str]:
    """Return the problems of one shard listed in the manifest; an empty list means it matches."""
    path = folder / entry["file"]
    name = entry["file"]
    if not path.is_file():
        return [f"{name}: file is missing"]
    digest = file_sha256(path)
    if digest != entry["sha256"]:
        return [f"{name}: SHA-256 is {digest[:16]}..., the manifest records {entry['sha256'][:16]}..."]

    problems = []
    count = entry["count"]
    try:
        with h5py.File(path, "r") as handle:
            if handle.attrs.get("key") != manifest["key"]:
                problems.append(f"{name}: key attribute {handle.attrs.get('key')!r} is not the store key")
            for column in COLUMNS:
                if column not in handle:
                    problems.append(f"{name}: dataset {column!r} is missing")
                elif len(handle[column]) != count:
                    problems.append(f"{name}: {column} has {len(handle[column])} rows, the manifest records {count}")
            for tap, dimension in manifest.get("taps", {}).items():
                if tap not in handle.get("features", {}):
                    problems.append(f"{name}: features of tap {tap!r} are missing")
                    continue
                values = handle["features"][tap]
                if len(values) != count:
                    problems.append(f"{name}: tap {tap} has {len(values)} rows, the manifest records {count}")
                if count and values.shape[1] != dimension:
                    problems.append(f"{name}: tap {tap} has dimension {values.shape[1]}, the manifest records {dimension}")
                if count and values.dtype != np.dtype(manifest["dtype"]):
                    problems.append(f"{name}: tap {tap} is {values.dtype}, the manifest records {manifest['dtype']}")
    except OSError as error:
        problems.append(f"{name}: cannot be opened as HDF5 ({error})")
    return problems


def verify_store(folder: str | Path) -> list[str]:
    """Open every shard of a store and return each mismatch with its manifest; an empty list means it verifies."""
    folder = Path(folder)
    manifest = _load_manifest(folder)
    problems = []
    if not manifest.get("complete"):
        problems.append("the store is incomplete: rerun the same 'featcache extract' command to finish it")

    shard_size = int(manifest["shard_size"])
    planned = int(manifest["num_samples_planned"])
    expected = set(range((planned + shard_size - 1) // shard_size))
    listed = {entry["shard"] for entry in manifest["shards"]}
    if manifest.get("complete") and listed != expected:
        problems.append(f"the manifest lists shards {sorted(listed)}, expected {sorted(expected)}")
    for entry in manifest["shards"]:
        problems += verify_shard(folder, entry, manifest)

    stored = sum(entry["count"] for entry in manifest["shards"])
    skipped = len(manifest.get("skipped", []))
    if manifest.get("complete") and stored + skipped != planned:
        problems.append(f"{stored} stored + {skipped} skipped samples, expected {planned}")
    return problems


def _read_columns(folder: Path, manifest: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    labels, splits = [], []
    for entry in manifest["shards"]:
        path = folder / entry["file"]
        if not path.is_file():
            continue
        with h5py.File(path, "r") as handle:
            labels.append(handle["label"][:])
            splits.append(handle["split"].asstr()[:])
    if not labels:
        return np.zeros(0, np.int64), np.zeros(0, object)
    return np.concatenate(labels), np.concatenate(splits)


def _describe_preprocessing(preprocessing: dict[str, Any]) -> str:
    if not preprocessing:
        return "not recorded"
    return (
        f"resize {preprocessing.get('resize_size')}, crop {preprocessing.get('crop_size')}, "
        f"{preprocessing.get('interpolation')}, mean {preprocessing.get('mean')}, std {preprocessing.get('std')}"
    )


def _describe_forward(fields: dict) -> str:
    """Describe the key fields that decide how the backbone ran: precision, memory format, folding, draft decoding."""
    def state(name: str) -> str:
        if name not in fields:
            return "unrecorded"
        return "on" if fields[name] else "off"

    return (
        f"amp {fields.get('amp', 'unrecorded')}, channels-last {state('channels_last')}, "
        f"batch norms folded {state('fold_batchnorm')}, JPEG draft decoding {state('draft')}"
    )


def inspect_store(folder: str | Path) -> str:
    """Return a plain-text report of a store, complete or not."""
    folder = Path(folder)
    manifest = _load_manifest(folder)
    provenance = manifest.get("provenance", {})
    shard_size = int(manifest["shard_size"])
    planned = int(manifest["num_samples_planned"])
    shard_total = (planned + shard_size - 1) // shard_size
    status = "complete" if manifest.get("complete") else f"incomplete, {len(manifest['shards'])} of {shard_total} shards"
    missing = [entry["file"] for entry in manifest["shards"] if not (folder / entry["file"]).is_file()]
    if missing:
        status += f"; {len(missing)} shard files missing, such as {missing[0]}: run 'featcache verify {folder}'"
    lines = [
        f"store        {folder} ({status})",
        f"key          {manifest['key']}",
        f"dataset      {manifest.get('dataset_root')} (split: {'split folders' if manifest.get('split_source') == 'folders' else 'seeded stratified'}), {planned} files",
        f"backbone     {provenance.get('backbone')} ({provenance.get('family')}), weights {provenance.get('weights')}",
        f"weights sha  {provenance.get('weights_sha256')}",
        f"preprocess   {_describe_preprocessing(provenance.get('preprocessing') or {})}",
        f"pooling      {provenance.get('pooling')}",
        f"forward pass {_describe_forward(manifest.get('key_fields') or {})}",
        f"dtype        {manifest.get('dtype')}, compression {manifest.get('compression', 'none')}",
        f"shards       {len(manifest['shards'])} in {SHARD_FOLDER}/, up to {shard_size} samples each",
        "taps",
    ]
    lines += [f"  {tap:30s} {dimension}" for tap, dimension in manifest.get("taps", {}).items()]

    # counts per split and class
    labels, splits = _read_columns(folder, manifest)
    class_names = manifest["class_names"]
    lines.append("samples per split and class" + (f" (in the {len(manifest['shards']) - len(missing)} shard files present)" if missing else ""))
    width = max([len(name) for name in class_names] + [5])
    lines.append("  " + f"{'class':{width}s}" + "".join(f" {split:>7s}" for split in ("train", "val", "test")))
    for label, name in enumerate(class_names):
        counts = [int(np.sum((labels == label) & (splits == split))) for split in ("train", "val", "test")]
        lines.append("  " + f"{name:{width}s}" + "".join(f" {count:7d}" for count in counts))
    totals = [int(np.sum(splits == split)) for split in ("train", "val", "test")]
    lines.append("  " + f"{'total':{width}s}" + "".join(f" {count:7d}" for count in totals))

    # source files: modes before conversion, EXIF rotations, skipped files, warnings
    modes: Counter = Counter()
    for entry in manifest["shards"]:
        modes.update(entry.get("modes", {}))
    lines.append("source modes " + (", ".join(f"{mode} {count}" for mode, count in sorted(modes.items())) or "none recorded"))
    rotated = sum(entry.get("exif_rotated", 0) for entry in manifest["shards"])
    lines.append(f"exif rotated {rotated} images")
    skipped = manifest.get("skipped", [])
    lines.append(f"skipped      {len(skipped)} files")
    lines += [f"  {item['path']}: {item['reason']}" for item in skipped]
    for warning in manifest.get("warnings", []):
        lines.append(f"warning      {warning}")
    versions = manifest.get("versions", {})
    lines.append("versions     " + ", ".join(f"{name} {version}" for name, version in versions.items()))
    return "\n".join(lines)
