"""Train and evaluate torch heads shard by shard, for features that do not fit the memory budget."""

from __future__ import annotations

import logging

import numpy as np
import torch

from pipeline.store import FeatureStore
from stages.heads import TorchHead

logger = logging.getLogger(__name__)


def streamed_statistics(store: FeatureStore, split: str, tap: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (classes, mean, scale) of one split in one pass over its shards, with float64 sums."""
    total = np.zeros(store.taps[tap])
    squares = np.zeros(store.taps[tap])
    count = 0
    labels = []
    for features, shard_labels in store.iter_shards(split, tap):
        total += features.sum(axis=0, dtype=np.float64)
        squares += np.square(features, dtype=np.float64).sum(axis=0)
        count += len(features)
        labels.append(np.unique(shard_labels))
    if count == 0:
        raise ValueError(f"Split {split!r} of store {store.name} is empty: there is nothing to train on.")
    mean = total / count
    scale = np.sqrt(np.maximum(squares / count - mean**2, 0.0))
    scale[scale < 1e-6] = 1.0
    return np.unique(np.concatenate(labels)), mean.astype(np.float32), scale.astype(np.float32)


def predict_streamed(head: TorchHead, store: FeatureStore, split: str, tap: str) -> tuple[np.ndarray, np.ndarray]:
    """Return (labels (n,), probabilities (n, C)) of one split, predicted one shard at a time."""
    labels, probabilities = [], []
    for features, shard_labels in store.iter_shards(split, tap):
        labels.append(shard_labels)
        probabilities.append(head.predict_proba(features))
    return np.concatenate(labels), np.concatenate(probabilities)


def fit_streamed(head: TorchHead, store: FeatureStore, split: str, tap: str, eval_split: str | None = None) -> TorchHead:
    """Fit a torch head on one split of a store without loading the split at once.

    Each epoch visits the shards in a seeded random order and shuffles the rows of each shard in
    memory, so batches mix samples within a shard only. The result therefore differs from an
    in-memory fit, which shuffles across the whole split, by the batch order alone.
    """
    classes, mean, scale = streamed_statistics(store, split, tap)
    head.classes_ = classes
    counts = np.zeros(len(classes), dtype=np.int64)
    for _, shard_labels in store.iter_shards(split, tap):
        counts += np.bincount(np.searchsorted(classes, shard_labels), minlength=len(classes))
    shard_count = len(store.shard_paths())

    def epoch_batches(generator: torch.Generator):
        shard_order = torch.randperm(shard_count, generator=generator).tolist()
        for position in shard_order:
            block = store.read_shard(position, split, tap)
            if block is None:
                continue
            features = torch.as_tensor(block[0])
            targets = torch.as_tensor(np.searchsorted(classes, block[1]))
            order = torch.randperm(len(features), generator=generator)
            for start in range(0, len(order), head.batch_size):
                batch = order[start : start + head.batch_size]
                yield features[batch], targets[batch]

    evaluate = None
    if eval_split is not None:

        def evaluate() -> float:
            labels, probabilities = predict_streamed(head, store, eval_split, tap)
            return float(np.mean(classes[np.argmax(probabilities, axis=1)] == labels))

    logger.debug("Streaming %s of %s over %d shards for %s", split, tap, shard_count, type(head).__name__)
    return head.train_loop(store.taps[tap], mean, scale, counts, epoch_batches, evaluate)

