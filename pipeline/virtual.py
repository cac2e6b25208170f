"""One HDF5 file that views every shard of a store: ``store.h5``, made of virtual datasets.

``store.h5`` contains ``features/<tap>`` (N, D), ``label``, ``path``, ``split`` and ``index`` (N,),
the shards concatenated in shard order, which is dataset order. It stores no features itself:
each dataset maps row ranges onto the shard files, so plain h5py reads it like one file::

    with h5py.File("data/features/<store>/store.h5") as handle:
        X = handle["features/pre_logits"][:]

Source files are named relative to ``store.h5`` (``shards/shard-00000.h5``), and HDF5 resolves
them from the folder of ``store.h5``, so the store folder can be moved or copied as a whole.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import h5py
import numpy as np

from pipeline.store import STRING, FeatureStore

logger = logging.getLogger(__name__)

VIRTUAL_FILE = "store.h5"
COLUMNS = ("label", "path", "split", "index")


def write_virtual_view(folder: str | Path) -> Path:
    """Write ``store.h5`` into a complete store, replacing an older one, and return its path."""
    store = FeatureStore(folder)  # raises StoreError when the store is missing or incomplete
    shards = [(entry["file"], int(entry["count"])) for entry in store.manifest["shards"] if entry["count"] > 0]
    total = sum(count for _, count in shards)

    # read the dtype and row shape of every dataset from the first shard, because all shards of a store share them
    shapes: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
    if shards:
        with h5py.File(store.folder / shards[0][0], "r") as handle:
            for tap in store.taps:
                shapes[f"features/{tap}"] = (handle["features"][tap].shape[1:], handle["features"][tap].dtype)
            for column in COLUMNS:
                shapes[column] = ((), STRING if column in ("path", "split") else handle[column].dtype)
    else:
        for tap, width in store.taps.items():
            shapes[f"features/{tap}"] = ((width,), np.dtype(store.manifest["dtype"]))
        for column in COLUMNS:
            shapes[column] = ((), STRING if column in ("path", "split") else np.dtype(np.int64))

    # map each dataset's rows onto the shards, in shard order
    final = store.folder / VIRTUAL_FILE
    temporary = final.with_name(VIRTUAL_FILE + ".tmp")
    with h5py.File(temporary, "w") as handle:
        for name, (row_shape, dtype) in shapes.items():
            layout = h5py.VirtualLayout(shape=(total, *row_shape), dtype=dtype)
            start = 0
            for file, count in shards:
                layout[start : start + count] = h5py.VirtualSource(file, name, shape=(count, *row_shape), dtype=dtype)
                start += count
            handle.create_virtual_dataset(name, layout)
        handle.attrs["key"] = store.key
        handle.attrs["class_names"] = store.class_names
        handle.attrs["shard_count"] = len(store.manifest["shards"])
    os.replace(temporary, final)  # readers see the old view or the new one, never a partial file

    logger.info("Wrote %s: a virtual view of %d samples in %d shards", final, total, len(shards))
    return final
