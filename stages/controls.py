"""Controls that a leaderboard compares the pretrained features with.

- majority: predict the most frequent train class;
- pixels: a linear head on the images themselves, downscaled, read from the store's
  ``dataset_root`` and stored relative paths;
- random weights: the same backbone and taps with untrained weights, extracted by stage one and
  cached like any other store.
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from itertools import count, repeat
from pathlib import Path

import numpy as np

from pipeline.devices import available_cpus
from pipeline.store import FeatureStore, StoreError
from stages.selection import TapData

logger = logging.getLogger(__name__)

def store_tap_data(store: FeatureStore, tap: str) -> TapData:
    """Load one tap of a store into the splits that selection and evaluation use."""
    splits = store.splits()
    if "train" not in splits:
        raise StoreError(f"Store {store.name} has no train split (it has {splits}): re-extract with a train split.")
    data = TapData(tap, *store.load("train", tap), groups=store.indices("train"))
    if "val" in splits:
        data.X_val, data.y_val = store.load("val", tap)
    if "test" in splits:
        data.X_test, data.y_test = store.load("test", tap)
    return data


def pixel_tap_data(store: FeatureStore, size: int) -> TapData:
    """Read every stored image, convert it to RGB, downscale it to size x size and flatten it to (3 * size**2,)."""
    from PIL import Image

    root = Path(store.manifest.get("dataset_root", ""))
    if not root.is_dir():
        raise StoreError(f"The images of store {store.name} are not at dataset_root={str(root)!r}: the pixels control needs them.")

    def read_into(pixels: np.ndarray, row: int, relative: str) -> None:
        with Image.open(root / relative) as image:
            image.seek(0)
            # A JPEG decodes at the smallest of 1/1, 1/2, 1/4 or 1/8 scale that keeps both sides at
            # least size. That took half the time for hymenoptera's photos and a third less for
            # 32 x 32 images. The pixels differ from a full decode's by 0.008 and 0.018 (of 1) on average.
            image.draft("RGB", (size, size))
            small = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
        pixels[row] = np.asarray(small, dtype=np.float32).ravel() / 255.0

    def read(split: str) -> tuple[np.ndarray, np.ndarray]:
        labels = store.load_labels(split)
        paths = store.paths(split)
        pixels = np.zeros((len(labels), 3 * size * size), dtype=np.float32)
        if threads_pay_off(root, paths):
            with ThreadPoolExecutor(available_cpus()) as pool:
                list(pool.map(read_into, repeat(pixels), count(), paths))
        else:
            for row, relative in enumerate(paths):
                read_into(pixels, row, relative)
        return pixels, labels

    splits = store.splits()
    data = TapData(f"pixels{size}", *read("train"), groups=store.indices("train"))
    if "val" in splits:
        data.X_val, data.y_val = read("val")
    if "test" in splits:
        data.X_test, data.y_test = read("test")
    return data


# Mean pixels per image from which the pixels control reads its images in threads. Pillow releases
# the GIL while it decodes and resizes, so threads read hymenoptera's photos (about 500 x 375) in
# 0.48 s instead of 1.0 s on 2 cores. A 32 x 32 image spends most of its 0.12 ms in Python, and
# threads contending for the GIL read cifar10-small's 6,000 in 1.4 s instead of 0.75 s.
THREADED_READ_PIXELS = 256 * 256


def threads_pay_off(root: Path, paths: list[str], probe: int = 8) -> bool:
    """Return whether the first ``probe`` images of ``paths`` average at least THREADED_READ_PIXELS (headers only)."""
    from PIL import Image

    sizes = []
    for relative in paths[:probe]:
        try:
            with Image.open(root / relative) as image:
                sizes.append(image.size[0] * image.size[1])
        except OSError:
            continue  # the read itself reports the file
    return available_cpus() > 1 and bool(sizes) and float(np.mean(sizes)) >= THREADED_READ_PIXELS


def random_weights_store(store: FeatureStore) -> FeatureStore:
    """Return the store of the same backbone, dataset and taps with random weights, running stage one on a cache miss."""
    from stages.extract import run_extraction

    from pipeline.settings import DatasetSettings, ExtractSettings

    saved = json.loads((store.folder / "settings.json").read_text(encoding="utf-8"))
    if store.provenance.get("weights") == "random":
        raise StoreError(f"Store {store.name} already has random weights: the random-weights control compares pretrained ones.")
    fields = {name: value for name, value in saved.items() if name in ExtractSettings.__dataclass_fields__}
    fields["dataset"] = DatasetSettings(**saved["dataset"])
    fields["taps"] = tuple(fields.get("taps", ()))
    # a fresh name, derived from the key, so that a store given an explicit name is never overwritten
    fields.update(weights="random", checkpoint=None, name=None, force=False, output_root=str(store.folder.parent))
    logger.info("Random-weights control: stage one of %s with weights='random' (cached like any store)", saved.get("backbone"))
    return FeatureStore(run_extraction(ExtractSettings(**fields)).folder)
