"""Warnings about a leaderboard: negative transfer, overfitting, class imbalance and a small selection split."""

from __future__ import annotations

from typing import Any

import numpy as np

# A class imbalance warning is raised when the largest train class is this many times the smallest.
IMBALANCE_RATIO = 3.0

# A selection split of fewer images than this gets a warning: with 50 images an accuracy moves in
# steps of 0.02, and its standard error can reach 7 points.
SMALL_SELECTION = 50


def negative_transfer(results: list[dict[str, Any]]) -> list[str]:
    """Warn when the best pretrained result (by selection accuracy) does not beat a control beyond its 95% confidence interval."""
    pretrained = [result for result in results if not result.get("control")]
    controls = [result for result in results if result.get("control")]
    if not pretrained or not controls:
        return []
    # the best head is chosen on the selection split, so that test accuracy is only reported
    best = max(pretrained, key=lambda result: result["select_accuracy"])
    warnings = []
    for control in controls:
        if best["ci_low"] <= control["accuracy"]:
            # below the control is negative transfer; within the interval it is no clear gain
            label = "negative transfer" if best["accuracy"] < control["accuracy"] else "no clear transfer gain"
            warnings.append(
                f"{label}: the best pretrained head ({best['head']} on {best['tap']}, accuracy "
                f"{best['accuracy']:.3f}, 95% CI [{best['ci_low']:.3f}, {best['ci_high']:.3f}]) does not beat the "
                f"{control['control']} control ({control['head']} on {control['tap']}, accuracy {control['accuracy']:.3f}) "
                "beyond its confidence interval."
            )
    return warnings


def overfitting(results: list[dict[str, Any]], gap: float) -> list[str]:
    """Warn when a head's train accuracy exceeds its selection accuracy by more than ``gap``.

    kNN is skipped because each train sample is its own nearest neighbour, and the majority
    control because it learns nothing but the class counts.
    """
    warnings = []
    for result in results:
        if result["head"] in ("knn", "majority"):
            continue
        difference = result["train_accuracy"] - result["select_accuracy"]
        if difference > gap:
            warnings.append(
                f"overfitting: {result['head']} on {result['tap']} has train accuracy {result['train_accuracy']:.3f} and "
                f"{result['select_split']} accuracy {result['select_accuracy']:.3f}, a gap of {difference:.3f} > "
                f"{gap:.3f} (set with --overfit-gap)."
            )
    return warnings


def class_imbalance(train_counts: dict[str, int], class_weight: str | None) -> list[str]:
    """Warn when the train classes are imbalanced and no class weighting is used."""
    counts = np.array(list(train_counts.values()), dtype=float)
    if len(counts) == 0 or counts.min() == 0:
        return [] if len(counts) == 0 else [f"class imbalance: train has no samples of classes "
                                            f"{[name for name, count in train_counts.items() if count == 0]}."]
    ratio = counts.max() / counts.min()
    if ratio < IMBALANCE_RATIO or class_weight == "balanced":
        return []
    return [
        f"class imbalance: the largest train class has {ratio:.1f} times the samples of the smallest "
        f"(counts {train_counts}); read balanced accuracy and per-class recall, and consider --class-weight balanced."
    ]


def small_selection(images: int, description: str) -> list[str]:
    """Warn when settings are selected on fewer than SMALL_SELECTION images (val, a held-out fold, or train across folds)."""
    if images >= SMALL_SELECTION:
        return []
    return [
        f"small selection split: settings are selected on {images} images ({description}), so a selection accuracy "
        f"moves in steps of {1 / max(images, 1):.3f}, settings often tie and the ranking is uncertain. Add val images, "
        "or extract with --val-fraction 0 so that heads cross-validate inside train."
    ]
