"""The similarity signal: how confidently a backbone's own ImageNet classifier recognizes the images.

A high mean max-softmax means the images look like ImageNet classes to the pretrained network, so
its last features are likely to transfer. The measurement runs the full backbone, classifier
included, on a small stratified sample of training images, and is saved as ``similarity.json``
next to the store's results so that later calls of ``featcache advise`` reuse it.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline.backbones import PRE_LOGITS, RANDOM_WEIGHTS, build_backbone, resolve_device
from pipeline.images import UnreadableImageError, build_transform, load_image
from pipeline.store import FeatureStore

logger = logging.getLogger(__name__)

IMAGENET_CLASSES = 1000
SIMILARITY_FILE = "similarity.json"


def sample_paths(store: FeatureStore, sample_size: int, seed: int = 0) -> list[str]:
    """Pick up to ``sample_size`` training images, taking classes in turn so that each is represented."""
    paths = np.array(store.paths("train"))
    views = store.views("train")
    _, labels = store.load("train", next(iter(store.taps)))
    paths, labels = paths[views == 0], labels[views == 0]
    rng = np.random.default_rng(seed)
    queues = [list(rng.permutation(paths[labels == label])) for label in np.unique(labels)]
    chosen: list[str] = []
    while len(chosen) < sample_size and any(queues):
        for queue in queues:
            if queue and len(chosen) < sample_size:
                chosen.append(str(queue.pop()))
    return chosen


def _unavailable(note: str) -> dict[str, Any]:
    logger.warning("Similarity signal not measured: %s", note)
    return {"note": note}


def measure_confidence(
    store: FeatureStore, settings: dict[str, Any], results_folder: Path, sample_size: int, device: str, offline: bool
) -> dict[str, Any]:
    """Return the mean max-softmax and normalized entropy of the backbone's ImageNet classifier.

    The result has a ``note`` instead of the values when the backbone has no pretrained ImageNet
    classifier or the images cannot be read.
    """
    cache = results_folder / SIMILARITY_FILE
    if cache.is_file():
        cached = json.loads(cache.read_text())
        if cached.get("store_key") == store.key and cached.get("sample_size") == sample_size:
            return cached

    if settings.get("weights") == RANDOM_WEIGHTS or settings.get("checkpoint"):
        return _unavailable(f"the store's backbone has {settings.get('checkpoint') or 'random'} weights, not a pretrained ImageNet classifier")
    backbone = build_backbone(settings["backbone"], settings["weights"], offline=offline)
    classifier = backbone.model.get_submodule(backbone.classifier_name) if backbone.classifier_name else None
    if getattr(classifier, "out_features", None) != IMAGENET_CLASSES:
        return _unavailable(f"{backbone.name} has no {IMAGENET_CLASSES}-class ImageNet classifier")
    root = Path(store.manifest["dataset_root"])
    if not root.is_dir():
        return _unavailable(
            f"the dataset folder {root} recorded in the store was not found: run 'featcache advise' from the folder "
            "where 'featcache extract' ran"
        )

    # decode the sample; unreadable files are skipped, as in stage one
    transform = build_transform(backbone.preprocessing)
    images = []
    for path in sample_paths(store, sample_size):
        try:
            images.append(transform(load_image(root / path)))
        except UnreadableImageError as error:
            logger.warning("Skipping %s in the similarity sample: %s", path, error)
    if not images:
        return _unavailable(f"none of the sampled images below {root} could be read")

    # run the whole network, classifier included
    target = resolve_device(device)
    backbone.model.to(target)
    probabilities = []
    with torch.inference_mode():
        for start in tqdm(range(0, len(images), 16), desc="similarity", unit="batch", dynamic_ncols=True):
            batch = torch.stack(images[start : start + 16]).to(target)  # (B, 3, H, W)
            probabilities.append(torch.softmax(backbone.model(batch).float(), dim=1).cpu())  # (B, 1000)
    probability = torch.cat(probabilities)  # (N, 1000)
    entropy = -(probability * probability.clamp(min=1e-12).log()).sum(dim=1) / math.log(IMAGENET_CLASSES)  # (N,)

    predictions = probability.argmax(dim=1).tolist()
    names = backbone.categories or [f"class {index}" for index in range(IMAGENET_CLASSES)]
    result = {
        "store_key": store.key,
        "sample_size": sample_size,
        "images": len(images),
        "backbone": backbone.name,
        "mean_max_softmax": float(probability.max(dim=1).values.mean()),
        "mean_normalized_entropy": float(entropy.mean()),
        "top_categories": [[names[index], count] for index, count in Counter(predictions).most_common(5)],
    }
    results_folder.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(result, indent=2))
    return result


def tap_depth_order(settings: dict[str, Any], taps: list[str], offline: bool) -> list[str]:
    """Sort tap names from shallow to deep by the backbone's module order; pre_logits comes last."""
    # the module order depends on the architecture only, so random weights save loading a checkpoint
    backbone = build_backbone(settings["backbone"], RANDOM_WEIGHTS, offline=offline)
    position = {name: order for order, (name, _) in enumerate(backbone.model.named_modules())}
    depth = {tap: (math.inf if tap == PRE_LOGITS else position.get(tap, -1)) for tap in taps}
    return sorted(taps, key=lambda tap: depth[tap])
