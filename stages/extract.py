"""Stage one: push a dataset through a frozen backbone once and write the taps to a feature store.

torch and the backbone modules are imported only when a backbone has to run, so that a cache hit
(a complete store with the same key) returns without loading either.
"""

from __future__ import annotations

import errno
import logging
import os
import platform
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from importlib import metadata
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from pipeline.cachekey import compute_key, key_fields
from pipeline.background import BackgroundWriter
from pipeline.datasets import Dataset, load_dataset
from pipeline.devices import autocast_context, check_amp, default_batch_size, prepare_model, to_device
from pipeline.distributed import DistributedContext, start_distributed
from pipeline.identity import cached_identity, remember_identity
from pipeline.memory import keep_heap, release_free_heap
from pipeline.rank_records import finish_writer, open_writer
from pipeline.settings import ExtractSettings, settings_to_dict
from pipeline.store import (
    DamagedStoreError,
    ShardData,
    StoreError,
    StoreWriter,
    mark_used,
    read_manifest,
    rebuild_folder,
    recover_replaced_store,
    replace_store,
)

if TYPE_CHECKING:
    import torch

    from pipeline.backbones import Backbone

logger = logging.getLogger(__name__)

VERSIONED_PACKAGES = ("torch", "torchvision", "timm", "h5py", "numpy", "scikit-learn", "pillow")


@dataclass
class ExtractionResult:
    """The outcome of one call of stage one."""

    folder: Path
    cache_hit: bool
    extracted: int  # images pushed through the backbone in this call
    skipped: int  # files that could not be decoded, over the whole store
    seconds: float
    # Seconds of the decode-forward-write loop alone, without dataset scan and backbone load.
    loop_seconds: float = 0.0


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for package in VERSIONED_PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def store_folder(settings: ExtractSettings, dataset: Dataset, backbone_name: str, key: str) -> Path:
    name = settings.name or f"{dataset.name}-{backbone_name}-{key[:12]}"
    return Path(settings.output_root) / name


def describe_write_error(error: OSError, folder: Path) -> str:
    """Turn a failed write into a message that names the file, the cause and the next step."""
    where = error.filename or folder
    # h5py reports HDF5 write failures as OSError, sometimes with the cause only in the message
    if error.errno == errno.ENOSPC or os.strerror(errno.ENOSPC) in str(error):
        return (
            f"No space left on device while writing {where}: free space on that disk or pass another --output. "
            "The shards already completed are kept and rerunning the same command resumes; "
            "earlier stores are unchanged."
        )
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR):
        return f"Cannot write the store to {where} ({error.strerror}): pass a writable --output folder."
    return f"Writing the store {folder} failed at {where}: {error}. Earlier stores are unchanged."


@contextmanager
def store_write_errors(folder: Path) -> Iterator[None]:
    """Re-raise an OSError from writing a store as a StoreError whose message names the next step."""
    try:
        yield
    except OSError as error:
        raise StoreError(describe_write_error(error, folder)) from error


def _build_backbone(settings: ExtractSettings) -> "Backbone":
    from pipeline.backbones import build_backbone

    backbone = build_backbone(settings.backbone, settings.weights, settings.checkpoint, settings.offline)
    remember_identity(settings, backbone.provenance())
    return backbone


def _locate_store(
    settings: ExtractSettings, dataset: Dataset, provenance: dict[str, Any]
) -> tuple[dict[str, Any], str, Path, dict[str, Any] | None]:
    """Return the key fields, the key, the store folder and the manifest already there (or None)."""
    fields = key_fields(settings, dataset, provenance)
    key = compute_key(fields)
    folder = store_folder(settings, dataset, provenance["backbone"], key)
    recover_replaced_store(folder)
    try:
        return fields, key, folder, read_manifest(folder)
    except DamagedStoreError:
        if not settings.force:
            raise
        logger.warning("The manifest of store %s is damaged: --force rebuilds the store from the start.", folder)
        return fields, key, folder, None


def _is_cache_hit(existing: dict[str, Any] | None, key: str, settings: ExtractSettings) -> bool:
    return bool(existing and existing.get("complete") and existing.get("key") == key and not settings.force)


def _store_header(
    settings: ExtractSettings, dataset: Dataset, key: str, fields: dict[str, Any], provenance: dict[str, Any]
) -> dict[str, Any]:
    """Return what a new manifest records besides its shards: key, classes, provenance and versions."""
    return {
        "key": key,
        "key_fields": fields,
        "class_names": dataset.class_names,
        "num_samples_planned": len(dataset.samples),
        "shard_size": settings.shard_size,
        "dtype": settings.dtype,
        "compression": settings.compression,
        "split_source": dataset.split_source,
        "dataset_root": str(dataset.root),
        "provenance": {**provenance, "taps": list(settings.taps), "pooling": settings.pooling},
        "augmentation": fields["augmentation"],
        "versions": library_versions(),
        "warnings": dataset.warnings,
    }


def _check_any_stored(writer: StoreWriter, dataset: Dataset) -> None:
    """Raise when no file of the dataset decoded; the store then stays incomplete."""
    if any(entry["count"] for entry in writer.manifest["shards"]):
        return
    reasons = "; ".join(f"{item['path']}: {item['reason']}" for item in writer.manifest["skipped"][:3])
    raise ValueError(
        f"Every one of the {len(dataset.samples)} images of {dataset.root} failed to decode "
        f"(for example {reasons}): check that the source contains readable images."
    )


def run_extraction(settings: ExtractSettings) -> ExtractionResult:
    """Extract every tap of every image into a store, reusing a complete store with the same key.

    Under torchrun each rank writes the shards it owns, and rank 0 writes the manifest.
    """
    context = start_distributed(settings.device)
    try:
        return _run_extraction(settings, context)
    finally:
        context.close()


def _run_extraction(settings: ExtractSettings, context: DistributedContext) -> ExtractionResult:
    settings.validate()
    started = time.perf_counter()

    # key: from the cached backbone identity when there is one, so a cache hit builds nothing.
    # Under torchrun every rank builds the backbone, so that all ranks pass the same barriers.
    backbone = None
    with context.main_first():
        dataset = load_dataset(settings.dataset)
        if len(dataset.class_names) < 2 and context.is_main:
            logger.warning("Dataset %s has %d class %s: stage one runs, but stage two needs at least 2 classes.",
                           dataset.root, len(dataset.class_names), dataset.class_names)
        provenance = None if context.is_distributed else cached_identity(settings)
        if provenance is None:
            backbone = _build_backbone(settings)
            provenance = backbone.provenance()
    fields, key, folder, existing = _locate_store(settings, dataset, provenance)
    context.check_same(key, "cache keys")

    # cache hit: a complete store with the same key
    if _is_cache_hit(existing, key, settings):
        seconds = time.perf_counter() - started
        logger.info(
            "Cache hit: store %s is complete for key %s, so the backbone was not run (%.2f s).", folder, key[:12], seconds
        )
        if context.is_main:
            mark_used(folder)
            if rebuild_folder(folder).is_dir():
                logger.warning("An earlier --force run left an unfinished replacement of this store in %s: rerun with "
                               "--force to resume it, or delete that folder.", rebuild_folder(folder))
        return ExtractionResult(folder, True, 0, len(existing.get("skipped", [])), seconds)

    if backbone is None:
        backbone = _build_backbone(settings)
        built_key = compute_key(key_fields(settings, dataset, backbone.provenance()))
        if built_key != key:
            # _build_backbone has replaced the stale cache entry; the built backbone decides the key
            logger.warning("The cached identity of backbone %s was stale; using the built one.", settings.backbone)
            fields, key, folder, existing = _locate_store(settings, dataset, backbone.provenance())
            if _is_cache_hit(existing, key, settings):
                logger.info("Cache hit: store %s is complete for key %s.", folder, key[:12])
                if context.is_main:
                    mark_used(folder)
                return ExtractionResult(folder, True, 0, len(existing.get("skipped", [])), time.perf_counter() - started)
        provenance = backbone.provenance()

    # an unusable device, precision or tap fails here, before any store folder is touched
    from pipeline.backbones import resolve_device
    from pipeline.taps import resolve_tap_module

    check_amp(settings.amp, resolve_device(settings.device))
    for tap in settings.taps:
        resolve_tap_module(backbone, tap)

    context.barrier()  # every rank has read the old manifest before rank 0 changes the store

    # a complete store already in the folder stays in place until its replacement is complete
    target = folder
    if existing and existing.get("complete"):
        target = rebuild_folder(folder)
        logger.info("Building the replacement of store %s (key %s) in %s", folder, str(existing.get("key"))[:12], target)

    header = _store_header(settings, dataset, key, fields, provenance)
    # --force starts a store over, but a replacement that an earlier --force run left unfinished
    # has the same key and is resumed like any interrupted store
    with store_write_errors(target):
        writer = open_writer(target, header, settings_to_dict(settings), context, fresh=settings.force and target == folder)
    loop_started = time.perf_counter()
    extracted, tap_dims = _extract_pending(replace(settings, device=context.device), dataset, backbone, writer)
    loop_seconds = time.perf_counter() - loop_started

    # a rank's manifest lists only its own shards until the records are merged, so ranks check after the merge
    if not context.is_distributed:
        _check_any_stored(writer, dataset)
    taps = tap_dims or writer.manifest.get("taps") or {}
    extra: dict[str, Any] = {"taps": taps}
    if extracted and not context.is_distributed:
        # the speed of the run that finished the store, which featcache bench reports for a reused store
        extra["extraction"] = {"images": extracted, "loop_seconds": round(loop_seconds, 3), "device": str(context.device)}
    with store_write_errors(target):
        finish_writer(writer, extra, context)
        if target != folder and context.is_main:
            replace_store(target, folder)
    context.barrier()  # every rank returns once the store is in its final folder
    if context.is_distributed:
        _check_any_stored(writer, dataset)

    seconds = time.perf_counter() - started
    skipped = len(writer.manifest["skipped"])
    if skipped:
        logger.warning("Skipped %d unreadable files; 'featcache inspect %s' lists them.", skipped, folder)
    logger.info(
        "Extracted %d images (%d skipped) in %.1f s with start-up, %.1f s in the decode-forward-write loop "
        "(%.1f images/s, the figure featcache bench and benchmarks/extract_speed.py report) into %s",
        extracted, skipped, seconds, loop_seconds, extracted / max(loop_seconds, 1e-9), folder,
    )
    return ExtractionResult(folder, False, extracted, skipped, seconds, loop_seconds)


def prepare_backbone(backbone: "Backbone", settings: ExtractSettings, device: "torch.device") -> None:
    """Get a frozen backbone ready for stage one's forward passes, in place.

    Keeps freed memory on the heap for the next batch (``keep_heap``), moves the backbone to the
    device, folds its batch norms into their convolutions (``settings.fold_batchnorm``), then
    applies channels-last and ``torch.compile`` as the settings request.
    """
    import torch

    from pipeline.folding import fold_backbone

    keep_heap()
    backbone.model.to(device)
    if settings.fold_batchnorm:
        crop = backbone.preprocessing.crop_size
        sample = torch.randn(1, 3, crop, crop, generator=torch.Generator().manual_seed(0)).to(device)
        report = fold_backbone(backbone, list(settings.taps), sample)
        if not report.folded:
            logger.info("No batch norm folded into %s: %s.", backbone.name, report.reason)
    prepare_model(backbone.model, device, settings.channels_last, settings.compile)


def prepare_worker(worker_id: int) -> None:
    """Let a data-loading worker leave Ctrl-C to the main process, and stop quietly when it is shut down.

    The main process handles the SIGINT of Ctrl-C by shutting the workers down. A worker passes each
    batch's shared memory to the main process through a thread of multiprocessing's resource
    sharer. When the main process exits during a transfer, that thread's connection ends in
    EOFError or ConnectionResetError. The thread reports it through ``sys.excepthook``, so a worker's
    hook leaves those two out of the output.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    report = sys.excepthook

    def quiet_at_shutdown(kind: type[BaseException], error: BaseException, traceback: TracebackType | None) -> None:
        if not issubclass(kind, (EOFError, ConnectionError)):
            report(kind, error, traceback)

    sys.excepthook = quiet_at_shutdown


def shard_batches(rows: list[tuple[int, int]], shard_size: int, batch_size: int) -> list[list[int]]:
    """Split (index, view) rows into batches of row positions that never cross a shard boundary.

    A batch's contents then depend only on its shard, so a resumed run feeds the backbone exactly
    the batches an uninterrupted run does, and CPU features match bit for bit.
    """
    batches: list[list[int]] = []
    current: list[int] = []
    for position, (index, _) in enumerate(rows):
        if current and (len(current) == batch_size or rows[current[0]][0] // shard_size != index // shard_size):
            batches.append(current)
            current = []
        current.append(position)
    if current:
        batches.append(current)
    return batches


def _extract_pending(
    settings: ExtractSettings, dataset: Dataset, backbone: "Backbone", writer: StoreWriter
) -> tuple[int, dict[str, int]]:
    """Run the backbone over every (sample, view) row of the shards the store still lacks, and write those shards."""
    import torch
    from tqdm.auto import tqdm

    from pipeline.augment import DETERMINISTIC_VIEW, ViewDataset, collate_views, decode_in_threads, get_policy, view_rows
    from pipeline.backbones import resolve_device
    from pipeline.images import normalize_batch
    from pipeline.taps import TapExtractor

    shard_size = int(writer.manifest["shard_size"])
    total = len(dataset.samples)
    shard_count = (total + shard_size - 1) // shard_size
    # the writer's completed shards include, under torchrun, the shards other ranks own
    done = writer.completed_shards()
    shards = [shard for shard in range(shard_count) if shard not in done]
    pending = [index for shard in shards for index in range(shard * shard_size, min(total, (shard + 1) * shard_size))]
    pending_count = len(pending)
    if not pending_count:
        return 0, {}
    device = resolve_device(settings.device)
    rows = view_rows(dataset.samples, pending, settings.views)  # (index, view) in that order
    batches = shard_batches(rows, shard_size, settings.batch_size or default_batch_size(device))

    check_amp(settings.amp, device)
    policy = get_policy(settings.augment) if settings.views else None
    draft_size = backbone.preprocessing.resize_size if settings.draft else None
    views = ViewDataset(
        dataset.root, dataset.samples, backbone.preprocessing, rows, policy, settings.view_seed,
        settings.max_image_pixels, draft_size,
    )
    keep_heap()  # before any worker forks, so that the workers keep their heap too
    if settings.workers:
        # The loader's workers start here, while no HDF5 file is open: shards are opened only inside
        # write_shard_file and closed before it returns, so no worker inherits a handle.
        loader = torch.utils.data.DataLoader(
            views, batch_sampler=batches, num_workers=settings.workers, collate_fn=collate_views,
            pin_memory=device.type == "cuda", worker_init_fn=prepare_worker,
        )
        release_free_heap()
        batch_iterator = iter(loader)  # the workers decode the first batches while the backbone is prepared
    else:
        batch_iterator = decode_in_threads(views, batches, torch.get_num_threads())
    prepare_backbone(backbone, settings, device)
    extractor = TapExtractor(backbone, settings.taps, settings.pooling, settings.max_flatten_dim)
    logger.info(
        "Extracting %d of %d images (%d rows with %d augmented views per training image; %d of %d shards pending) "
        "with %s on %s",
        pending_count, total, len(rows), settings.views, len(shards), shard_count, backbone.name, device,
    )

    buffers: dict[int, dict] = {}
    remaining = {shard: 0 for shard in shards}
    for index, _ in rows:
        remaining[index // shard_size] += 1
    tap_dims: dict[str, int] = {}
    extracted = 0

    # shards are written by a background thread, so HDF5 writes overlap with the next forward passes
    progress = tqdm(total=len(rows), unit="view", desc=f"extract {backbone.name}", dynamic_ncols=True)
    with BackgroundWriter() as background, progress:
        for batch in batch_iterator:
            outputs: dict[str, np.ndarray] = {}
            if batch.images is not None:
                with autocast_context(settings.amp, device):
                    images = to_device(batch.images, device, channels_last=False)  # uint8
                    memory_format = torch.channels_last if settings.channels_last else torch.contiguous_format
                    tapped = extractor(normalize_batch(images, backbone.preprocessing, memory_format))
                outputs = {tap: value.float().cpu().numpy() for tap, value in tapped.items()}  # tap -> (B, D)
                tap_dims = {tap: int(value.shape[1]) for tap, value in outputs.items()}

            for position, (index, view) in enumerate(batch.rows):
                buffer = buffers.setdefault(index // shard_size, {"rows": [], "skipped": []})
                row = {tap: value[position] for tap, value in outputs.items()}
                buffer["rows"].append((index, view, row, batch.modes[position], batch.orientations[position]))
            for index, view, reason in batch.failures:
                buffer = buffers.setdefault(index // shard_size, {"rows": [], "skipped": []})
                # every view of an unreadable file fails the same way: report the file once
                if view == DETERMINISTIC_VIEW:
                    logger.warning("Skipping %s: %s", dataset.samples[index].path, reason)
                    buffer["skipped"].append({"path": dataset.samples[index].path, "reason": reason})

            for index, _ in batch.rows + [(index, view) for index, view, _ in batch.failures]:
                shard = index // shard_size
                remaining[shard] -= 1
                if remaining[shard] == 0:
                    background.submit(_flush_shard, writer, dataset, shard, buffers.pop(shard), settings, tap_dims)
            extracted += sum(1 for _, view in batch.rows if view == DETERMINISTIC_VIEW)
            progress.update(len(batch.rows) + len(batch.failures))

    return extracted, tap_dims


def _flush_shard(
    writer: StoreWriter, dataset: Dataset, shard: int, buffer: dict, settings: ExtractSettings, tap_dims: dict[str, int]
) -> None:
    rows = sorted(buffer["rows"], key=lambda row: (row[0], row[1]))  # by (index, view)
    indices = np.array([row[0] for row in rows], dtype=np.int64)
    features = {}
    for tap in settings.taps:
        if rows:
            features[tap] = np.stack([row[2][tap] for row in rows])  # (n, D)
        else:
            features[tap] = np.zeros((0, tap_dims.get(tap, 0)), np.float32)
    data = ShardData(
        features=features,
        labels=np.array([dataset.samples[index].label for index in indices], dtype=np.int64),
        paths=[dataset.samples[index].path for index in indices],
        splits=[dataset.samples[index].split for index in indices],
        indices=indices,
        views=np.array([row[1] for row in rows], dtype=np.int64),
        modes=[row[3] for row in rows],
        orientations=[row[4] for row in rows],
    )
    if rows:
        writer.manifest["taps"] = {tap: int(values.shape[1]) for tap, values in features.items()}
    with store_write_errors(writer.folder):
        writer.write_shard(shard, data, buffer["skipped"], settings.dtype, settings.compression)

