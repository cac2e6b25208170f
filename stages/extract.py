"""Stage one: push a dataset through a frozen backbone once and write the taps to a feature store."""

from __future__ import annotations

import logging
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import sklearn
import timm
import torch
import torchvision
from tqdm.auto import tqdm

from pipeline.augment import DETERMINISTIC_VIEW, ViewDataset, collate_views, get_policy, view_rows
from pipeline.backbones import Backbone, build_backbone, resolve_device
from pipeline.cachekey import compute_key, key_fields
from pipeline.datasets import Dataset, load_dataset
from pipeline.settings import ExtractSettings, settings_to_dict
from pipeline.store import ShardData, StoreWriter, read_manifest
from pipeline.taps import TapExtractor

logger = logging.getLogger(__name__)


@dataclass
class ExtractionResult:
    """What one call of stage one produced."""

    folder: Path
    cache_hit: bool
    extracted: int  # images pushed through the backbone in this call
    skipped: int  # files that could not be decoded, over the whole store
    seconds: float


def library_versions() -> dict[str, str]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "h5py": h5py.__version__,
        "numpy": np.__version__,
        "scikit-learn": sklearn.__version__,
    }


def store_folder(settings: ExtractSettings, dataset: Dataset, backbone: Backbone, key: str) -> Path:
    name = settings.name or f"{dataset.name}-{backbone.name}-{key[:12]}"
    return Path(settings.output_root) / name


def run_extraction(settings: ExtractSettings) -> ExtractionResult:
    """Extract every tap of every image into a store, reusing a complete store with the same key."""
    settings.validate()
    started = time.perf_counter()

    dataset = load_dataset(settings.dataset)
    backbone = build_backbone(settings.backbone, settings.weights, settings.checkpoint, settings.offline)
    fields = key_fields(settings, dataset, backbone)
    key = compute_key(fields)
    folder = store_folder(settings, dataset, backbone, key)

    # cache hit: a complete store with the same key
    existing = read_manifest(folder)
    if existing and existing.get("complete") and existing.get("key") == key and not settings.force:
        seconds = time.perf_counter() - started
        logger.info("Cache hit: store %s is complete for key %s; the backbone was not run.", folder, key[:12])
        return ExtractionResult(folder, True, 0, len(existing.get("skipped", [])), seconds)
    if settings.force and existing:
        _clear_store(folder)

    header = {
        "key": key,
        "key_fields": fields,
        "class_names": dataset.class_names,
        "num_samples_planned": len(dataset.samples),
        "shard_size": settings.shard_size,
        "dtype": settings.dtype,
        "split_source": dataset.split_source,
        "dataset_root": str(dataset.root),
        "provenance": {**backbone.provenance(), "taps": list(settings.taps), "pooling": settings.pooling},
        "augmentation": fields["augmentation"],
        "versions": library_versions(),
        "warnings": dataset.warnings,
    }
    writer = StoreWriter.create_or_resume(folder, header, settings_to_dict(settings))
    extracted, tap_dims = _extract_pending(settings, dataset, backbone, writer)

    taps = tap_dims or writer.manifest.get("taps") or {}
    writer.finish({"taps": taps})
    seconds = time.perf_counter() - started
    skipped = len(writer.manifest["skipped"])
    if skipped:
        logger.warning("Skipped %d unreadable files; 'featcache inspect %s' lists them.", skipped, folder)
    logger.info(
        "Extracted %d images (%d skipped) in %.1f s (%.1f images/s) into %s",
        extracted, skipped, seconds, extracted / max(seconds, 1e-9), folder,
    )
    return ExtractionResult(folder, False, extracted, skipped, seconds)


def _clear_store(folder: Path) -> None:
    for path in sorted(folder.rglob("*"), reverse=True):
        if path.is_file():
            path.unlink()


def _extract_pending(
    settings: ExtractSettings, dataset: Dataset, backbone: Backbone, writer: StoreWriter
) -> tuple[int, dict[str, int]]:
    """Run the backbone over every (sample, view) row of the shards the store still lacks, and write those shards."""
    shard_size = int(writer.manifest["shard_size"])
    total = len(dataset.samples)
    shard_count = (total + shard_size - 1) // shard_size
    done = writer.completed_shards()
    pending = [index for index in range(total) if index // shard_size not in done]
    if not pending:
        return 0, {}
    rows = view_rows(dataset.samples, pending, settings.views)

    device = resolve_device(settings.device)
    backbone.model.to(device)
    extractor = TapExtractor(backbone, settings.taps, settings.pooling, settings.max_flatten_dim)
    policy = get_policy(settings.augment) if settings.views else None
    loader = torch.utils.data.DataLoader(
        ViewDataset(dataset.root, dataset.samples, backbone.preprocessing, rows, policy, settings.view_seed),
        batch_size=settings.batch_size,
        num_workers=settings.workers,
        collate_fn=collate_views,
        pin_memory=device.type == "cuda",
    )
    logger.info(
        "Extracting %d of %d images (%d rows with %d augmented views per training image; %d of %d shards pending) "
        "with %s on %s",
        len(pending), total, len(rows), settings.views, shard_count - len(done), shard_count, backbone.name, device,
    )

    buffers: dict[int, dict] = {}
    remaining = {shard: 0 for shard in range(shard_count)}
    for index, _ in rows:
        remaining[index // shard_size] += 1
    tap_dims: dict[str, int] = {}
    extracted = 0

    with tqdm(total=len(rows), unit="view", desc=f"extract {backbone.name}", dynamic_ncols=True) as progress:
        for images, good_rows, failures in loader:
            outputs: dict[str, np.ndarray] = {}
            if images is not None:
                tapped = extractor(images.to(device, non_blocking=True))
                outputs = {tap: value.float().cpu().numpy() for tap, value in tapped.items()}  # tap -> (B, D)
                tap_dims = {tap: int(value.shape[1]) for tap, value in outputs.items()}

            for position, (index, view) in enumerate(good_rows):
                buffer = buffers.setdefault(index // shard_size, {"rows": [], "skipped": []})
                buffer["rows"].append((index, view, {tap: value[position] for tap, value in outputs.items()}))
            for index, view, reason in failures:
                buffer = buffers.setdefault(index // shard_size, {"rows": [], "skipped": []})
                # every view of an unreadable file fails the same way: report the file once
                if view == DETERMINISTIC_VIEW:
                    logger.warning("Skipping %s: %s", dataset.samples[index].path, reason)
                    buffer["skipped"].append({"path": dataset.samples[index].path, "reason": reason})

            for index, _ in good_rows + [(index, view) for index, view, _ in failures]:
                shard = index // shard_size
                remaining[shard] -= 1
                if remaining[shard] == 0:
                    _flush_shard(writer, dataset, shard, buffers.pop(shard), settings, tap_dims)
            extracted += sum(1 for _, view in good_rows if view == DETERMINISTIC_VIEW)
            progress.update(len(good_rows) + len(failures))

    if extracted == 0 and not writer.manifest["shards"]:
        raise RuntimeError(f"Every one of the {total} images of {dataset.root} failed to decode; see the warnings above.")
    return extracted, tap_dims


def _flush_shard(
    writer: StoreWriter, dataset: Dataset, shard: int, buffer: dict, settings: ExtractSettings, tap_dims: dict[str, int]
) -> None:
    rows = sorted(buffer["rows"], key=lambda row: (row[0], row[1]))  # by (index, view)
    indices = np.array([index for index, _, _ in rows], dtype=np.int64)
    features = {
        tap: (np.stack([row[tap] for _, _, row in rows]) if rows else np.zeros((0, tap_dims.get(tap, 0)), np.float32))
        for tap in settings.taps
    }
    data = ShardData(
        features=features,
        labels=np.array([dataset.samples[index].label for index in indices], dtype=np.int64),
        paths=[dataset.samples[index].path for index in indices],
        splits=[dataset.samples[index].split for index in indices],
        indices=indices,
        views=np.array([view for _, view, _ in rows], dtype=np.int64),
    )
    if rows:
        writer.manifest["taps"] = {tap: int(values.shape[1]) for tap, values in features.items()}
    writer.write_shard(shard, data, buffer["skipped"], settings.dtype)
